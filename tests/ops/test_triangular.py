"""Batched unit-lower-triangular solves: the native kernel against torch.linalg.solve_triangular."""

import pytest
import torch

from nimblelm.native import build
from nimblelm.ops import triangular
from nimblelm.ops.triangular import reference_unit_lower_solve, unit_lower_solve

from ..threads_util import with_threads

needs_kernel = pytest.mark.skipif(build._compiler() is None or not build.native_enabled(),
                                  reason="no C compiler (or NIMBLELM_NATIVE=0): the native kernels are not built")
TOLERANCE = {torch.float64: 1e-11, torch.float32: 2e-5}


def delta_rule_system(batch, C, W, dtype, seed=0):
    """L strictly lower as in the delta rule (beta_i k_i . k_j, unit k, beta in (0, 1)), with
    garbage on and above the diagonal (never read), and right-hand sides [*batch, C, W]."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.nn.functional.normalize(torch.randn(*batch, C, 16, generator=gen, dtype=dtype), dim=-1)
    beta = torch.rand(*batch, C, 1, generator=gen, dtype=dtype)
    L = (beta * k) @ k.transpose(-1, -2)
    L = L.tril(-1) + 5.0 * torch.randn(L.shape, generator=gen, dtype=dtype).triu()
    return L, torch.randn(*batch, C, W, generator=gen, dtype=dtype)


def assert_close(got, want, dtype):
    scale = want.abs().max().clamp_min(1.0)
    assert (got - want).abs().max() <= TOLERANCE[dtype] * scale, f"max abs diff {(got - want).abs().max():.3g}"


@needs_kernel
def test_kernel_is_available():
    assert triangular._native_ok(torch.zeros(1, 2, 2), torch.zeros(1, 2, 1))
    assert not triangular._native_ok(torch.zeros(1, 2, 2, dtype=torch.bfloat16), torch.zeros(1, 2, 1))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C,W", [(1, 3), (2, 1), (3, 5), (7, 33), (64, 128), (65, 77), (64, 31)])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_matches_lapack(dtype, C, W, threads):
    """Odd sizes (the kernel pairs rows and tiles columns by 32 bytes x 4; remainders go elementwise)."""
    L, R = delta_rule_system((3, 2), C, W, dtype)
    got = with_threads(threads, lambda: unit_lower_solve(L, R))
    assert_close(got, reference_unit_lower_solve(L, R), dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_match_lapack(dtype):
    L, R = delta_rule_system((2, 3), 19, 10, dtype)
    cot = torch.randn(2, 3, 19, 10, dtype=dtype)
    grads = []
    for solve in (unit_lower_solve, reference_unit_lower_solve):
        leaves = [L.clone().requires_grad_(), R.clone().requires_grad_()]
        grads.append(torch.autograd.grad((solve(*leaves) * cot).sum(), leaves))
    for got, want in zip(*grads):
        assert_close(got, want, dtype)
    assert torch.equal(grads[0][0], grads[0][0].tril(-1))  # only the strictly lower part matters


@needs_kernel
def test_gradcheck():
    L, R = delta_rule_system((2,), 6, 3, torch.float64)
    assert torch.autograd.gradcheck(unit_lower_solve, (L.requires_grad_(), R.requires_grad_()))


@needs_kernel
def test_batch_dimensions_broadcast():
    L, R = delta_rule_system((4,), 9, 5, torch.float64)
    got = unit_lower_solve(L[:1], R[:, None].expand(4, 3, 9, 5))  # L [1, C, C] against rhs [4, 3, C, W]
    assert got.shape == (4, 3, 9, 5)
    assert_close(got, reference_unit_lower_solve(L[:1], R[:, None].expand(4, 3, 9, 5)), torch.float64)


def test_fallback_without_the_kernel(monkeypatch):
    """No library: the LAPACK form, same results (and gradients)."""
    monkeypatch.setattr(triangular, "_library", lambda: None)
    L, R = delta_rule_system((2,), 8, 4, torch.float64)
    assert_close(unit_lower_solve(L, R), torch.linalg.solve(torch.eye(8, dtype=torch.float64) + L.tril(-1), R),
                 torch.float64)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="L \\[..., C, C\\]"):
        unit_lower_solve(torch.zeros(2, 3, 4), torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="rhs"):
        unit_lower_solve(torch.zeros(2, 3, 3), torch.zeros(2, 4, 1))
