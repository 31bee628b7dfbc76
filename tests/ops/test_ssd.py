"""chunk_ssd (grouped SSD) against the gated-linear-attention oracle naive_gla on the
equivalent inputs (q = C, k = dt * B, v = x, g = dt * A, scale 1)."""

import pytest
import torch

from nimblelm.ops.gla import naive_gla
from nimblelm.ops.ssd import chunk_ssd, naive_ssd


def inputs(Bz=2, T=37, H=4, P=5, G=2, N=6, dt_scale=1.0, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(Bz, T, H, P, generator=gen, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(Bz, T, H, generator=gen, dtype=dtype)) * dt_scale
    A = -torch.rand(H, generator=gen, dtype=dtype) * 4 - 0.1
    Bm = torch.randn(Bz, T, G, N, generator=gen, dtype=dtype)
    Cm = torch.randn(Bz, T, G, N, generator=gen, dtype=dtype)
    S0 = torch.randn(Bz, H, N, P, generator=gen, dtype=dtype)
    return x, dt, A, Bm, Cm, S0


def oracle(x, dt, A, Bm, Cm, S0):
    return naive_ssd(x, dt, A, Bm, Cm, initial_state=S0, output_final_state=True)


def test_naive_ssd_is_naive_gla_on_repeated_inputs():
    x, dt, A, Bm, Cm, S0 = inputs(T=9, G=2)
    q, k = Cm.repeat_interleave(2, dim=2), Bm.repeat_interleave(2, dim=2) * dt[..., None]
    y_gla, S_gla = naive_gla(q, k, x, g=dt * A, scale=1.0, initial_state=S0, output_final_state=True)
    y, S = oracle(x, dt, A, Bm, Cm, S0)
    assert torch.equal(y, y_gla) and torch.equal(S, S_gla)


@pytest.mark.parametrize("dt_scale", [0.01, 1.0, 30.0])  # decay near 1, usual, near 0 (wide chunks)
@pytest.mark.parametrize("G,chunk", [(1, 8), (2, 16), (4, 64)])
def test_chunk_ssd_equals_the_oracle_in_float64(dt_scale, G, chunk):
    x, dt, A, Bm, Cm, S0 = inputs(G=G, dt_scale=dt_scale)
    y, S = chunk_ssd(x, dt, A, Bm, Cm, initial_state=S0, output_final_state=True, chunk_size=chunk)
    y_ref, S_ref = oracle(x, dt, A, Bm, Cm, S0)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)
    assert S.is_contiguous() and S.untyped_storage().nbytes() == S.nbytes, \
        "the final state must not keep the chunk-state buffer alive"


@pytest.mark.parametrize("dt_scale", [3.0, 30.0])  # 30: chunks too wide for the factored form
def test_chunk_ssd_gradients_and_split_state_match(dt_scale):
    x, dt, A, Bm, Cm, S0 = inputs(T=29, G=2, dt_scale=dt_scale)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, Bm, Cm, S0)]
    y, S = chunk_ssd(*leaves[:5], initial_state=leaves[5], output_final_state=True, chunk_size=8)
    (y.square().sum() + S.sum()).backward()
    ours = [t.grad for t in leaves]
    y_autograd, S_autograd = y.detach(), S.detach()  # the autograd path (no out= buffers)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, Bm, Cm, S0)]
    y, S = oracle(*leaves)
    torch.testing.assert_close(y_autograd, y.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S_autograd, S.detach(), rtol=1e-10, atol=1e-10)
    (y.square().sum() + S.sum()).backward()
    for got, want in zip(ours, (t.grad for t in leaves)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # carrying the state across a split equals one run
    y1, s1 = chunk_ssd(x[:, :11], dt[:, :11], A, Bm[:, :11], Cm[:, :11], S0, True, chunk_size=8)
    y2, s2 = chunk_ssd(x[:, 11:], dt[:, 11:], A, Bm[:, 11:], Cm[:, 11:], s1, True, chunk_size=8)
    y_full, s_full = chunk_ssd(x, dt, A, Bm, Cm, S0, True, chunk_size=8)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-10)


def test_chunk_ssd_float32_long_sequence_with_extreme_decays_is_finite_and_close():
    x, dt, A, Bm, Cm, S0 = inputs(Bz=1, T=8192, H=2, P=4, G=1, N=4, dtype=torch.float32, seed=3)
    dt = dt.clone()
    dt[:, ::2] = 60.0  # decay exp(-6..-240): near 0
    dt[:, 1::2] = 1e-6  # near 1
    y, S = chunk_ssd(x, dt, A, Bm, Cm, initial_state=S0, output_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(S).all()
    y_ref, _ = oracle(*(t.double() for t in (x, dt, A, Bm, Cm, S0)))
    assert (y.double() - y_ref).norm() / y_ref.norm() < 5e-3
