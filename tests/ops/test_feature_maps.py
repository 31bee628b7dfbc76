"""Feature maps: phi(q).phi(k) equals each map's closed-form kernel."""

import math

import pytest
import torch
import torch.nn.functional as F

from nimblelm.ops import feature_maps as fm


def assert_close(a, b, rtol=1e-10, atol=1e-10):
    """Like torch.testing.assert_close (whose first call costs seconds of imports)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"max abs diff {(a - b).abs().max():.3g}"


def pairs(D=7, n=50, scale=1.0):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, 3, D, generator=gen, dtype=torch.float64) * scale
    k = torch.randn(n, 3, D, generator=gen, dtype=torch.float64) * scale
    return q, k


def dot(a, b):
    return (a * b).sum(-1)


def test_identity_and_elu_plus_one():
    q, k = pairs()
    assert fm.identity(q) is q
    phi = fm.elu_plus_one(q)
    assert (phi > 0).all()
    assert_close(phi, torch.where(q > 0, q + 1, q.exp()), rtol=0, atol=1e-15)


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_taylor_first_order_kernel(scale):
    q, k = pairs(scale=scale)
    pq, pk = fm.taylor_first_order(q), fm.taylor_first_order(k)
    assert pq.shape[-1] == 1 + q.shape[-1] == fm.feature_dim("taylor_first_order", q.shape[-1])
    kernel = 1 + F.cosine_similarity(q, k, dim=-1)
    assert_close(dot(pq, pk), kernel, rtol=1e-13, atol=1e-13)
    assert (dot(pq, pk) >= -1e-12).all()
    raw = dot(fm.taylor_first_order(q, normalize=False), fm.taylor_first_order(k, normalize=False))
    assert_close(raw, 1 + dot(q, k), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("D", [1, 4, 16])
def test_taylor_second_order_kernel(D):
    q, k = pairs(D=D, scale=2.0)
    pq, pk = fm.taylor_second_order(q), fm.taylor_second_order(k)
    assert pq.shape == (*q.shape[:-1], 1 + D + D * (D + 1) // 2)  # each unordered pair once
    assert pq.shape[-1] == fm.feature_dim("taylor_second_order", D)
    u = dot(q, k)
    kernel = 1 + u / math.sqrt(D) + u ** 2 / (2 * D)
    assert_close(dot(pq, pk), kernel, rtol=1e-13, atol=1e-12)
    assert (dot(pq, pk) > 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-15)])
def test_taylor_second_order_native_matches_reference(dtype, tol):
    """Without autograd the map runs the native kernel: equal to the PyTorch expression, also
    for a strided (head-major transposed) input and an empty one; with autograd, the reference."""
    from nimblelm.ops.native_scan import native_inference_ok

    if not native_inference_ok(torch.zeros(1, dtype=dtype)):
        pytest.skip("native kernels not built here")
    x = torch.randn(2, 40, 3, 16, dtype=dtype).transpose(1, 2)  # [2, 3, 40, 16], not contiguous
    got, want = fm.taylor_second_order(x), fm.reference_taylor_second_order(x)
    assert got.shape == want.shape == (2, 3, 40, 153)
    assert (got - want).abs().max() <= tol * want.abs().max()
    assert fm.taylor_second_order(x[:, :, :0]).shape == (2, 3, 0, 153)
    xg = x.detach().requires_grad_()
    assert fm.taylor_second_order(xg).grad_fn is not None


def test_maps_are_differentiable_and_finite_at_zero():
    x = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    for phi in (fm.identity, fm.elu_plus_one, fm.taylor_first_order, fm.taylor_second_order):
        y = phi(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(y).all() and torch.isfinite(g).all()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for phi in (fm.elu_plus_one, fm.taylor_first_order, fm.taylor_second_order):
        assert torch.autograd.gradcheck(phi, (x,))


def test_feature_dim_unknown_name():
    with pytest.raises(ValueError, match="unknown feature map"):
        fm.feature_dim("relu", 4)
