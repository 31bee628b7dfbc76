"""Gated linear attention: naive loop vs chunkwise vs one-token step, plus independent oracles."""

import math
import time

import pytest
import torch
import torch.nn.functional as F

from nimblelm.ops.feature_maps import elu_plus_one
from nimblelm.ops import gla
from nimblelm.ops.gla import chunk_gla, naive_gla, retnet_log_decay, step_gla


def assert_close(a, b, rtol=1e-10, atol=1e-10):
    """Like torch.testing.assert_close (whose first call costs seconds of imports)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"max abs diff {(a - b).abs().max():.3g}"


MODES = ["none", "scalar", "per_dim", "both"]


def make_inputs(mode, B=2, T=37, H=2, Dk=8, Dv=6, dtype=torch.float64, normalize=False,
                gate_scale=3.0):
    """Random q, k, v, gates and initial state; positive features when normalize=True."""
    q, k = torch.randn(B, T, H, Dk, dtype=dtype), torch.randn(B, T, H, Dk, dtype=dtype)
    v = torch.randn(B, T, H, Dv, dtype=dtype)
    if normalize:
        q, k = elu_plus_one(q), elu_plus_one(k)
    gates = {}
    if mode in ("scalar", "both"):
        gates["g"] = F.logsigmoid(torch.randn(B, T, H, dtype=dtype) * gate_scale + 1.0)
    if mode in ("per_dim", "both"):
        gates["gk"] = F.logsigmoid(torch.randn(B, T, H, Dk, dtype=dtype) * gate_scale + 1.0)
    S0 = torch.randn(B, H, Dk, Dv, dtype=dtype) * 0.5
    state = (S0.abs(), torch.rand(B, H, Dk, dtype=dtype)) if normalize else S0
    return (q, k, v), gates, state


def flat_state(state):
    return list(state) if isinstance(state, tuple) else [state]


def run_with_grads(fn, qkv, gates, state, seed=7, **kw):
    """Output, final state, and gradients of a random projection w.r.t. every input."""
    leaves = [x.clone().requires_grad_() for x in (*qkv, *gates.values(), *flat_state(state))]
    q, k, v = leaves[:3]
    g = dict(zip(gates, leaves[3:3 + len(gates)]))
    s = leaves[3 + len(gates):]
    s = tuple(s) if isinstance(state, tuple) else s[0]
    o, final = fn(q, k, v, **g, initial_state=s, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    outs = [o, *flat_state(final)]
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)).sum()
               for x in outs)
    grads = torch.autograd.grad(loss, leaves)
    return [x.detach() for x in outs], list(grads)


def run_steps(qkv, gates, state, normalize=False, **kw):
    """step_gla token by token; returns (o [B,T,H,Dv], final state)."""
    q, k, v = qkv
    outs = []
    for t in range(q.shape[1]):
        g = {name: x[:, t:t + 1] for name, x in gates.items()}
        o, state = step_gla(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], **g, state=state,
                            normalize=normalize, **kw)
        outs.append(o)
    return torch.cat(outs, dim=1), state


def rms_ratio(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_naive_chunk_step_agree_float64(mode, normalize):
    qkv, gates, state = make_inputs(mode, normalize=normalize)
    ref, ref_grads = run_with_grads(naive_gla, qkv, gates, state, normalize=normalize)
    for cs, sub in [(16, 4), (64, 8)]:
        got, grads = run_with_grads(chunk_gla, qkv, gates, state, normalize=normalize,
                                    chunk_size=cs, sub_chunk_size=sub)
        for a, b in zip(got + grads, ref + ref_grads):
            assert_close(a, b, rtol=1e-10, atol=1e-10)
    o, final = run_steps(qkv, gates, state, normalize=normalize)
    for a, b in zip([o, *flat_state(final)], ref):
        assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [10, 70])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_chunk_without_autograd_writes_the_same_results(mode, normalize, T):
    """Without autograd the chunk states are written into one preallocated buffer (out=):
    outputs and final state equal the naive loop's, and the final state is its own tensor
    (a view would keep every chunk's state alive in a cache)."""
    qkv, gates, state = make_inputs(mode, T=T, normalize=normalize)
    with torch.no_grad():
        o_ref, final_ref = naive_gla(*qkv, **gates, initial_state=state, output_final_state=True,
                                     normalize=normalize)
        o, final = chunk_gla(*qkv, **gates, initial_state=state, output_final_state=True,
                             normalize=normalize, chunk_size=16, sub_chunk_size=4)
    assert_close(o, o_ref)
    for a, b in zip(flat_state(final), flat_state(final_ref)):
        assert_close(a, b)
    S = flat_state(final)[0]
    assert S.untyped_storage().nbytes() <= 2 * S.nbytes, "the final state must not keep the chunk buffer alive"


@pytest.mark.parametrize("mode", MODES)
def test_float32_matches_float64_naive(mode):
    qkv, gates, state = make_inputs(mode, B=1, T=100, H=2, Dk=32, Dv=32)
    ref, ref_grads = run_with_grads(naive_gla, qkv, gates, state)
    to32 = lambda d: {n: x.float() for n, x in d.items()}  # noqa: E731
    got, grads = run_with_grads(chunk_gla, [x.float() for x in qkv], to32(gates), state.float())
    for a, b in zip(got + grads, ref + ref_grads):
        assert a.dtype == torch.float32
        assert rms_ratio(a.double(), b) <= 5e-3


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_state_carry_and_decode(mode, normalize):
    """[0:t1] then [t1:T] from the carried state == one run; prefill + step decode too."""
    qkv, gates, state = make_inputs(mode, T=45, normalize=normalize)
    kw = dict(normalize=normalize, chunk_size=16, sub_chunk_size=4)
    o_full, s_full = chunk_gla(*qkv, **gates, initial_state=state, output_final_state=True, **kw)
    t1 = 19
    head = lambda x, a, b: x[:, a:b]  # noqa: E731
    o1, s1 = chunk_gla(*(head(x, 0, t1) for x in qkv), **{n: head(x, 0, t1) for n, x in gates.items()},
                       initial_state=state, output_final_state=True, **kw)
    o2, s2 = chunk_gla(*(head(x, t1, None) for x in qkv),
                       **{n: head(x, t1, None) for n, x in gates.items()},
                       initial_state=s1, output_final_state=True, **kw)
    assert_close(torch.cat([o1, o2], 1), o_full, rtol=1e-10, atol=1e-10)
    for a, b in zip(flat_state(s2), flat_state(s_full)):
        assert_close(a, b, rtol=1e-10, atol=1e-10)
    o3, s3 = run_steps([head(x, t1, None) for x in qkv],
                       {n: head(x, t1, None) for n, x in gates.items()}, s1, normalize=normalize)
    assert_close(o3, o_full[:, t1:], rtol=1e-10, atol=1e-10)
    for a, b in zip(flat_state(s3), flat_state(s_full)):
        assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_chunk(normalize):
    torch.manual_seed(0)
    qkv, gates, state = make_inputs("both", B=1, T=7, H=1, Dk=2, Dv=2, normalize=normalize)
    leaves = [x.clone().requires_grad_() for x in (*qkv, gates["g"], gates["gk"], *flat_state(state))]

    def fn(q, k, v, g, gk, *s):
        s = tuple(s) if normalize else s[0]
        o, final = chunk_gla(q, k, v, g=g, gk=gk, initial_state=s, output_final_state=True,
                             normalize=normalize, chunk_size=4, sub_chunk_size=2)
        return (o, *flat_state(final))

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("gates", ["mild", "wide", "mixed", "mixed_small_groups"])
def test_per_dim_paths(gates, monkeypatch):
    """Per-dim decay: one-reference chunks, sub-chunked chunks, both in one call, and groups
    of one chunk, all equal the naive loop (outputs, states, gradients)."""
    qkv, g, state = make_inputs("per_dim", T=70, Dk=4)
    lo = {"mild": -0.5, "wide": -20.0}.get(gates, None)
    if lo is None:  # first chunks mild, later ones very wide
        lo = torch.where(torch.arange(70)[None, :, None, None] < 32, -0.5, -20.0)
    gk = {"gk": torch.rand(g["gk"].shape, dtype=torch.float64) * lo}
    if gates == "mixed_small_groups":
        monkeypatch.setattr(gla, "_GROUP_ELEMENTS", 1)  # one wide chunk per group
    ref, ref_grads = run_with_grads(naive_gla, qkv, gk, state)
    got, grads = run_with_grads(chunk_gla, qkv, gk, state, chunk_size=16, sub_chunk_size=4)
    for a, b in zip(got + grads, ref + ref_grads):
        assert_close(a, b, rtol=1e-10, atol=1e-10)


def deep_start_gate(mode, shape, T, chunk=16, start=32):
    """Mild random log-decays with one step of -60 opening the chunk at `start`: that chunk
    spans little but its reference point lies below -40."""
    shape = shape[:3] if mode == "scalar" else shape
    gate = torch.rand(shape, dtype=torch.float64) * -0.5
    gate[:, start] = -60.0
    return gate


@pytest.mark.parametrize("mode", ["scalar", "per_dim"])
def test_chunk_opening_with_a_deep_decay(mode):
    """Chunks whose reference point lies below -40 take their q / k decays from the
    exponentials, the others from the reference products; all equal the naive loop."""
    qkv, _, state = make_inputs("none", T=70, Dk=4)
    gate = {"g" if mode == "scalar" else "gk": deep_start_gate(mode, qkv[0].shape, 70)}
    ref, ref_grads = run_with_grads(naive_gla, qkv, gate, state)
    got, grads = run_with_grads(chunk_gla, qkv, gate, state, chunk_size=16, sub_chunk_size=4)
    for a, b in zip(got + grads, ref + ref_grads):
        assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["scalar", "per_dim"])
def test_chunk_local_keeps_float32_decays_normal(mode):
    """In float32 the reference products q_ref e^r would be subnormal (slow) for a chunk
    starting at log-decay -100: that chunk's decayed q and k are the exponentials' (floored
    at 1e-19, never subnormal)."""
    q, k = (torch.randn(1, 64, 2, 8) for _ in range(2))
    gate = deep_start_gate(mode, q.shape, 64, start=16).float()
    gate[:, 16] = -100.0
    a_log = gate[..., None] if mode == "scalar" else gate
    qc, kc = (gla._to_chunks(x, 4, 16) for x in (q, k))
    b = gla._to_chunks(a_log, 4, 16).cumsum(-2)
    _, q_in, _ = gla._chunk_local(qc, kc, b, 4)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((q_in != 0) & (q_in.abs() < tiny)).any()
    assert torch.allclose(q_in, qc * gla.exp_decay(b), rtol=1e-5, atol=0)


def test_per_dim_one_reference_float32_at_the_safe_limit():
    """A decay span just under SAFE_SPAN per chunk (one reference point) is accurate in fp32."""
    qkv, _, state = make_inputs("none", B=1, T=256, H=2, Dk=16, Dv=16)
    gk = torch.full(qkv[0].shape, -0.99 * gla.SAFE_SPAN / 63, dtype=torch.float64)
    ref, ref_grads = run_with_grads(naive_gla, qkv, {"gk": gk}, state)
    got, grads = run_with_grads(chunk_gla, [x.float() for x in qkv], {"gk": gk.float()}, state.float())
    for a, b in zip(got + grads, ref + ref_grads):
        assert torch.isfinite(a).all() and rms_ratio(a.double(), b) <= 5e-3


def parallel_oracle(q, k, v, gk, scale):
    """Materialised form: o_t = scale sum_{s<=t} sum_d q_td k_sd exp(G_td - G_sd) v_s, G = cumsum gk."""
    G = gk.cumsum(1)  # [B,T,H,Dk]
    w = (G[:, :, None] - G[:, None, :]).exp()  # [B,T(t),T(s),H,Dk]
    A = torch.einsum("bthd,bshd,btshd->bhts", q, k, w) * scale
    A = A * torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
    return torch.einsum("bhts,bshv->bthv", A, v)


def test_per_dim_matches_materialised_oracle():
    """fla's naive_recurrent_gla semantics: decay before adding k_t v_t, o_t = scale q_t S_t."""
    qkv, gates, _ = make_inputs("per_dim", T=30, gate_scale=1.0)
    o, _ = chunk_gla(*qkv, gk=gates["gk"], chunk_size=8, sub_chunk_size=4)
    assert_close(o, parallel_oracle(*qkv, gates["gk"], 8 ** -0.5), rtol=1e-10, atol=1e-10)


def test_ssd_quadratic_form():
    """Mamba-2 SSD: y = (L o C B^T) (dt x), L[t,s] = exp(sum_{s<r<=t} dt_r A), with g = dt A."""
    B, T, H, N, P = 1, 40, 2, 4, 3
    C, Bm, x = torch.randn(B, T, H, N, dtype=torch.float64), torch.randn(B, T, H, N, dtype=torch.float64), \
        torch.randn(B, T, H, P, dtype=torch.float64)
    dt = F.softplus(torch.randn(B, T, H, dtype=torch.float64))
    A = -torch.rand(H, dtype=torch.float64) * 4
    g = dt * A  # [B,T,H]
    cs = g.cumsum(1)
    L = (cs[:, :, None] - cs[:, None, :]).exp() * torch.ones(T, T, dtype=torch.bool).tril()[..., None]
    y_ref = torch.einsum("btsh,bthn,bshn,bshp->bthp", L, C, Bm, x * dt[..., None])
    y, _ = chunk_gla(C, Bm * dt[..., None], x, g=g, scale=1.0, chunk_size=16)
    assert_close(y, y_ref, rtol=1e-10, atol=1e-10)


def test_retnet_log_decay_values():
    gamma = retnet_log_decay(4, torch.float64).exp()
    assert_close(gamma, 1 - 2.0 ** -torch.arange(5, 9, dtype=torch.float64))
    qkv, _, state = make_inputs("none", T=20)
    g = retnet_log_decay(2, torch.float64).expand(2, 20, 2)
    o1, _ = naive_gla(*qkv, g=g, initial_state=state)
    o2, _ = chunk_gla(*qkv, g=g, initial_state=state, chunk_size=8)
    assert_close(o1, o2, rtol=1e-10, atol=1e-10)


def test_normalized_linear_attention_closed_form():
    """normalize=True == sum_s phi_t.phi_s v_s / (sum_s phi_t.phi_s + eps) (no decay, scale=1)."""
    qkv, _, _ = make_inputs("none", T=25, normalize=True)
    q, k, v = qkv
    o, _ = chunk_gla(q, k, v, scale=1.0, normalize=True, eps=0.0, chunk_size=8)
    A = torch.einsum("bthd,bshd->bhts", q, k) * torch.ones(25, 25, dtype=torch.bool).tril()
    ref = torch.einsum("bhts,bshv->bthv", A, v) / A.sum(-1).transpose(1, 2)[..., None]
    assert_close(o, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["scalar", "per_dim"])
def test_extreme_gates_long_float32(mode):
    """T=8192 fp32, log-decays in [-20, -1e-6] (decay ~0 and ~1 mixed): finite outputs and
    gradients, and the same as the float64 chunk form (itself checked against naive above)."""
    B, T, H, D = 1, 8192, 1, 16
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3))
    shape = (B, T, H) if mode == "scalar" else (B, T, H, D)
    u = torch.rand(shape)
    lg = torch.where(u < 0.5, -20.0 * torch.rand(shape), -1e-6 * torch.rand(shape)).double()
    name = "g" if mode == "scalar" else "gk"
    o_ref, s_ref = chunk_gla(q, k, v, **{name: lg}, output_final_state=True)
    q32, lg32 = q.float().requires_grad_(), lg.float().requires_grad_()
    o, s = chunk_gla(q32, k.float(), v.float(), **{name: lg32}, output_final_state=True)
    (o.sum() + s.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert torch.isfinite(q32.grad).all() and torch.isfinite(lg32.grad).all()
    assert rms_ratio(o.detach().double(), o_ref) <= 5e-3
    assert rms_ratio(s.detach().double(), s_ref) <= 5e-3
    o_naive, _ = naive_gla(q[:, :300].float(), k[:, :300].float(), v[:, :300].float(),
                           **{name: lg[:, :300].float()})
    assert rms_ratio(o[:, :300].detach().double(), o_ref[:, :300]) <= 5e-3
    assert rms_ratio(o_naive.double(), o_ref[:, :300]) <= 5e-3


def test_errors():
    qkv, gates, state = make_inputs("per_dim", T=3)
    with pytest.raises(ValueError, match="T == 1"):
        step_gla(*qkv, **gates)
    with pytest.raises(ValueError, match="tuple"):
        chunk_gla(*qkv, **gates, initial_state=state, normalize=True)
    with pytest.raises(ValueError, match="gk must have"):
        naive_gla(*qkv, gk=gates["gk"][..., :2])
    with pytest.raises(ValueError, match="must divide"):
        chunk_gla(*qkv, chunk_size=64, sub_chunk_size=24)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "scalar", "per_dim"])
def test_chunk_is_10x_faster_than_naive(mode):
    B, T, H, D = 1, 4096, 4, 64
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    gates = {"none": {}, "scalar": {"g": -torch.rand(B, T, H)},
             "per_dim": {"gk": F.logsigmoid(torch.randn(B, T, H, D) + 3)}}[mode]

    def timed(fn):
        fn(q, k, v, **gates)
        t0 = time.perf_counter()
        fn(q, k, v, **gates)
        return time.perf_counter() - t0

    assert timed(naive_gla) >= 10 * timed(chunk_gla)
    assert math.isfinite(chunk_gla(q, k, v, **gates)[0].sum().item())
