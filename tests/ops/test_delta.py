"""Delta rule / gated delta rule: naive loop vs chunkwise vs one-token steps."""

import pytest
import torch
import torch.nn.functional as F

from nimblelm.ops.delta import chunk_delta_rule, naive_delta_rule, step_delta_rule


def assert_close(actual, expected, atol, rtol, msg=""):
    """Like torch.testing.assert_close, without its multi-second first-call import cost."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, msg
    err = (actual - expected).abs() - (atol + rtol * expected.abs())
    assert err.max() <= 0, f"{msg}: max abs diff {(actual - expected).abs().max().item():.3e}"


def make_inputs(B=2, T=37, H=2, Dk=8, Dv=6, dtype=torch.float64, gated=True, seed=0,
                g_range=(-3.0, 0.0)):
    """Inputs with L2-normalised q, k, beta in (0,1), log-decay g <= 0, a random h0."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    lo, hi = g_range
    x = {
        "q": F.normalize(rnd(B, T, H, Dk), dim=-1),
        "k": F.normalize(rnd(B, T, H, Dk), dim=-1),
        "v": rnd(B, T, H, Dv),
        "beta": torch.rand(B, T, H, generator=gen, dtype=dtype) * 0.98 + 0.01,
        "g": (lo + (hi - lo) * torch.rand(B, T, H, generator=gen, dtype=dtype)) if gated else None,
        "initial_state": rnd(B, H, Dk, Dv),
    }
    return {n: (t.requires_grad_() if t is not None else None) for n, t in x.items()}


def run_steps(x, scale=None):
    """Token-by-token decoding with step_delta_rule; returns (o, final state)."""
    state, outs = x["initial_state"], []
    for t in range(x["q"].shape[1]):
        sl = lambda a: None if a is None else a[:, t:t + 1]  # noqa: E731
        o, state = step_delta_rule(sl(x["q"]), sl(x["k"]), sl(x["v"]), sl(x["beta"]), sl(x["g"]),
                                   scale=scale, state=state)
        outs.append(o)
    return torch.cat(outs, dim=1), state


def run(form, x, **kw):
    if form == "steps":
        return run_steps(x, kw.get("scale"))
    fn = {"naive": naive_delta_rule, "chunk": chunk_delta_rule}[form]
    return fn(**x, output_final_state=True, **kw)


def outputs_and_grads(form, x, seed=1, **kw):
    """(o, S, grads of every input) for a fixed random cotangent on o and S."""
    o, S = run(form, x, **kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    dS = torch.randn(S.shape, generator=gen, dtype=S.dtype)
    inputs = [t for t in x.values() if t is not None]
    grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), inputs)
    names = [n for n, t in x.items() if t is not None]
    return o.detach(), S.detach(), dict(zip(names, grads))


def rms_ratio(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("T,chunk_size", [(1, 16), (37, 16), (64, 16), (50, 64)])
@pytest.mark.parametrize("form", ["chunk", "steps"])
def test_forms_agree_float64(form, T, chunk_size, gated):
    x = make_inputs(T=T, gated=gated)
    o_ref, S_ref, g_ref = outputs_and_grads("naive", x)
    kw = {"chunk_size": chunk_size} if form == "chunk" else {}
    o, S, grads = outputs_and_grads(form, x, **kw)
    assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    assert_close(S, S_ref, atol=1e-10, rtol=1e-10)
    assert grads.keys() == g_ref.keys()
    for name in g_ref:
        assert_close(grads[name], g_ref[name], atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("gates", ["none", "mild", "wide"])
def test_chunk_without_autograd_writes_the_same_results(gates):
    """Without autograd the solve's right-hand side and the chunk carry are written into
    preallocated buffers (out=); it must give the naive loop's outputs and final state, like
    the autograd path, also for chunks wider than the reference point's safe span."""
    g_range = (-20.0, -5.0) if gates == "wide" else (-3.0, 0.0)
    x = make_inputs(T=37, gated=gates != "none", g_range=g_range)
    x = {n: (t.detach() if t is not None else None) for n, t in x.items()}
    with torch.no_grad():
        o_ref, S_ref = naive_delta_rule(**x, output_final_state=True)
        o, S = chunk_delta_rule(**x, output_final_state=True, chunk_size=16)
    assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    assert_close(S, S_ref, atol=1e-10, rtol=1e-10)
    assert S.untyped_storage().nbytes() == S.nbytes, "the final state must not keep the chunk buffer alive"


@pytest.mark.parametrize("gates", ["wide", "deep_start", "mixed"])
def test_gated_chunk_decay_paths_float64(gates):
    """Gated decays enter the chunk products through a reference point per chunk: chunks
    spanning more than its safe range (exact [C, C] decay matrix), chunks opening with a -60
    step and mild chunks, alone and mixed, all equal the naive loop."""
    x = make_inputs(T=70, g_range=(-20.0, -5.0) if gates == "wide" else (-0.5, 0.0))
    with torch.no_grad():
        if gates == "deep_start":
            x["g"][:, 32] = -60.0
        if gates == "mixed":
            x["g"][:, 48:] *= 40.0
    o_ref, S_ref, g_ref = outputs_and_grads("naive", x)
    o, S, grads = outputs_and_grads("chunk", x, chunk_size=16)
    assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    assert_close(S, S_ref, atol=1e-10, rtol=1e-10)
    for name in g_ref:
        assert_close(grads[name], g_ref[name], atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("gated", [True, False])
def test_forms_agree_float32(gated):
    x = make_inputs(B=2, T=150, H=2, Dk=16, Dv=16, dtype=torch.float32, gated=gated)
    o_ref, S_ref, g_ref = outputs_and_grads("naive", x)
    for form in ("chunk", "steps"):
        o, S, grads = outputs_and_grads(form, x, chunk_size=32) if form == "chunk" else \
            outputs_and_grads(form, x)
        assert rms_ratio(o, o_ref) <= 5e-3
        assert rms_ratio(S, S_ref) <= 5e-3
        for name in g_ref:
            assert rms_ratio(grads[name], g_ref[name]) <= 5e-3, (form, name)


def test_scale_and_no_initial_state():
    x = make_inputs(T=20)
    x["initial_state"] = None
    o_ref, S_ref = naive_delta_rule(**x, scale=0.37, output_final_state=True)
    o, S = chunk_delta_rule(**x, scale=0.37, output_final_state=True, chunk_size=8)
    assert_close(o, o_ref, atol=1e-12, rtol=1e-12)
    assert_close(S, S_ref, atol=1e-12, rtol=1e-12)
    # scale multiplies the output only
    o1, _ = naive_delta_rule(**x, scale=1.0)
    assert_close(o_ref, 0.37 * o1, atol=1e-12, rtol=1e-12)
    assert chunk_delta_rule(**x)[1] is None


@pytest.mark.parametrize("form", ["naive", "chunk"])
def test_state_carry(form):
    T, t1 = 45, 19
    x = make_inputs(T=T)
    fn = {"naive": naive_delta_rule, "chunk": chunk_delta_rule}[form]
    kw = {"chunk_size": 16} if form == "chunk" else {}
    o_full, S_full = fn(**x, output_final_state=True, **kw)
    first = {n: (t[:, :t1] if n != "initial_state" else t) for n, t in x.items()}
    o1, S1 = fn(**first, output_final_state=True, **kw)
    second = {n: t[:, t1:] for n, t in x.items() if n != "initial_state"}
    o2, S2 = fn(**second, initial_state=S1, output_final_state=True, **kw)
    assert_close(torch.cat([o1, o2], dim=1), o_full, atol=1e-10, rtol=1e-10)
    assert_close(S2, S_full, atol=1e-10, rtol=1e-10)


def test_prefill_then_decode():
    x = make_inputs(T=40)
    o_full, S_full = chunk_delta_rule(**x, output_final_state=True, chunk_size=16)
    pre = {n: (t[:, :10] if n != "initial_state" else t) for n, t in x.items()}
    o_pre, state = chunk_delta_rule(**pre, output_final_state=True, chunk_size=16)
    rest = {n: t[:, 10:] for n, t in x.items() if n != "initial_state"}
    o_dec, state = run_steps({**rest, "initial_state": state})
    assert_close(torch.cat([o_pre, o_dec], 1), o_full, atol=1e-10, rtol=1e-10)
    assert_close(state, S_full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("form", ["naive", "chunk"])
def test_gradcheck(form):
    x = make_inputs(B=1, T=5, H=1, Dk=3, Dv=2)
    names = list(x)
    fn = {"naive": naive_delta_rule, "chunk": chunk_delta_rule}[form]
    kw = {"chunk_size": 3} if form == "chunk" else {}

    def f(*args):
        o, S = fn(**dict(zip(names, args)), output_final_state=True, **kw)
        return o, S

    assert torch.autograd.gradcheck(f, tuple(x[n] for n in names))


@pytest.mark.parametrize("g_value", [-30.0, -1e-6])
def test_extreme_gates_long_fp32(g_value):
    """T=8192 fp32 with decay ~0 (g=-30) and ~1 (g=-1e-6), beta near 0 and 1: finite."""
    x = make_inputs(B=1, T=8192, H=1, Dk=16, Dv=16, dtype=torch.float32,
                    g_range=(g_value, g_value))
    with torch.no_grad():
        x["beta"][..., : 4096] = 0.999
        x["beta"][..., 4096:] = 1e-4
    o, S = chunk_delta_rule(**x, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    grads = torch.autograd.grad(o.sum() + S.sum(), [t for t in x.values() if t is not None])
    assert all(torch.isfinite(gr).all() for gr in grads)


def test_step_rejects_multiple_tokens():
    x = make_inputs(T=2)
    with pytest.raises(ValueError, match="T == 1"):
        step_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], state=x["initial_state"])
