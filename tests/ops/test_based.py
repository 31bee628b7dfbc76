"""Based on raw q, k: naive loop vs chunkwise (scores from q.k) vs one-token steps, and the
equality with gated linear attention on the Taylor features."""

import pytest
import torch

from nimblelm.ops.based import chunk_based, naive_based, step_based
from nimblelm.ops.feature_maps import taylor_second_order
from nimblelm.ops.gla import chunk_gla

from .test_gla import assert_close, rms_ratio


def make_inputs(B=2, T=37, H=2, D=4, Dv=5, dtype=torch.float64, seed=0, state=True):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    F = 1 + D + D * (D + 1) // 2
    x = {"q": rnd(B, T, H, D), "k": rnd(B, T, H, D), "v": rnd(B, T, H, Dv)}
    if state:  # a state some earlier tokens left: S from real features, z > 0
        prior = taylor_second_order(rnd(B, 3, H, D))
        x["initial_state"] = (torch.einsum("bthf,bthv->bhfv", prior, rnd(B, 3, H, Dv)), prior.sum(1))
    return x


def with_grads(fn, x, seed=1, **kw):
    """(o, S, z, grads of q, k, v, S0, z0) for a fixed random cotangent."""
    leaves = {n: (t.clone().requires_grad_() if n != "initial_state" else tuple(s.clone().requires_grad_() for s in t))
              for n, t in x.items()}
    o, (S, z) = fn(**leaves, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    outs = [o, S, z]
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in outs)
    inputs = [leaves["q"], leaves["k"], leaves["v"], *leaves.get("initial_state", ())]
    return [t.detach() for t in outs] + list(torch.autograd.grad(loss, inputs))


def run_steps(x):
    state, outs = x.get("initial_state"), []
    for t in range(x["q"].shape[1]):
        o, state = step_based(x["q"][:, t:t + 1], x["k"][:, t:t + 1], x["v"][:, t:t + 1], state=state)
        outs.append(o)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("T,chunk_size", [(1, 16), (37, 16), (64, 16), (50, 64), (70, 12)])
def test_chunk_matches_naive_float64(T, chunk_size):
    """Outputs, final state and every gradient, padded last chunks included."""
    x = make_inputs(T=T)
    want = with_grads(naive_based, x)
    got = with_grads(chunk_based, x, chunk_size=chunk_size)
    for g, w in zip(got, want):
        assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_chunk_without_state_or_autograd():
    x = make_inputs(T=45, state=False)
    with torch.no_grad():
        o, (S, z) = chunk_based(**x, output_final_state=True, chunk_size=16)
        o_ref, (S_ref, z_ref) = naive_based(**x, output_final_state=True)
    for g, w in ((o, o_ref), (S, S_ref), (z, z_ref)):
        assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert chunk_based(**x)[1] is None


def test_equals_gla_on_the_features_and_the_steps():
    x = make_inputs(T=40)
    o, (S, z) = chunk_based(**x, output_final_state=True, chunk_size=16)
    phi = lambda t: taylor_second_order(t)  # noqa: E731
    o_gla, (S_gla, z_gla) = chunk_gla(phi(x["q"]), phi(x["k"]), x["v"], scale=1.0, normalize=True,
                                      initial_state=x["initial_state"], output_final_state=True, chunk_size=16)
    o_steps, (S_steps, z_steps) = run_steps(x)
    for ref in ((o_gla, S_gla, z_gla), (o_steps, S_steps, z_steps)):
        for g, w in zip((o, S, z), ref):
            assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_state_carry():
    x, t1 = make_inputs(T=45), 19
    o_full, state_full = chunk_based(**x, output_final_state=True, chunk_size=16)
    first = {n: (t[:, :t1] if n != "initial_state" else t) for n, t in x.items()}
    o1, state = chunk_based(**first, output_final_state=True, chunk_size=16)
    second = {n: t[:, t1:] for n, t in x.items() if n != "initial_state"}
    o2, state = chunk_based(**second, initial_state=state, output_final_state=True, chunk_size=16)
    assert_close(torch.cat([o1, o2], 1), o_full, rtol=1e-10, atol=1e-10)
    for g, w in zip(state, state_full):
        assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_float32_default_feature_dim():
    x = make_inputs(B=1, T=300, H=2, D=16, Dv=16, dtype=torch.float32)
    x64 = {n: (t.double() if n != "initial_state" else tuple(s.double() for s in t)) for n, t in x.items()}
    o, (S, z) = chunk_based(**x, output_final_state=True)
    o_ref, (S_ref, z_ref) = naive_based(**x64, output_final_state=True)
    assert rms_ratio(o.double(), o_ref) <= 5e-3 and rms_ratio(S.double(), S_ref) <= 5e-3
    assert rms_ratio(z.double(), z_ref) <= 5e-3


def test_bad_shapes():
    x = make_inputs(T=5)
    with pytest.raises(ValueError, match="same shape"):
        chunk_based(x["q"], x["k"][..., :3], x["v"])
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_based(x["q"], x["k"], x["v"], chunk_size=0)
