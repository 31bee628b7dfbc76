"""TTT-Linear / TTT-MLP: per-token loop vs mini-batch dual form vs one-token steps."""

import pytest
import torch
import torch.nn.functional as F

from nimblelm.ops import ttt
from nimblelm.ops.ttt import (naive_ttt_linear, naive_ttt_mlp, step_ttt_linear, step_ttt_mlp,
                              ttt_linear, ttt_mlp)

FORMS = {
    "linear": {"naive": naive_ttt_linear, "fast": ttt_linear, "step": step_ttt_linear},
    "mlp": {"naive": naive_ttt_mlp, "fast": ttt_mlp, "step": step_ttt_mlp},
}
PARAMS = {"linear": ("W", "b"), "mlp": ("W1", "b1", "W2", "b2")}


def assert_close(actual, expected, atol, rtol, msg=""):
    """Like torch.testing.assert_close, without its multi-second first-call import cost."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, msg
    err = (actual - expected).abs() - (atol + rtol * expected.abs())
    assert err.max() <= 0, f"{msg}: max abs diff {(actual - expected).abs().max().item():.3e}"


def param_shapes(kind, H, D, hidden=None):
    if kind == "linear":
        return {"W": (H, D, D), "b": (H, D)}
    Fh = hidden or 4 * D
    return {"W1": (H, D, Fh), "b1": (H, Fh), "W2": (H, Fh, D), "b2": (H, D)}


def make_inputs(kind, B=2, T=37, H=2, D=8, dtype=torch.float64, seed=0, mb=16,
                token_scale=False, offset=None, eta_max=0.3, hidden=None):
    """Inputs as the layer would pass them; `offset` adds a random mid-mini-batch state."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=1.0: std * torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x = {"q": rnd(B, T, H, D), "k": rnd(B, T, H, D), "v": rnd(B, T, H, D),
         "eta": eta_max * torch.rand(B, T, H, generator=gen, dtype=dtype),
         "ln_weight": 1 + rnd(H, D, std=0.2), "ln_bias": rnd(H, D, std=0.2)}
    shapes = param_shapes(kind, H, D, hidden)
    x.update({n: rnd(*s, std=0.3) for n, s in shapes.items()})
    if token_scale:
        x["token_scale"] = 1 / torch.arange(1, mb + 1, dtype=dtype) + rnd(mb, std=0.05)
    x = {n: t.requires_grad_() for n, t in x.items()}
    state = None
    if offset is not None:
        state = {"offset": offset}
        for n, s in shapes.items():
            state[n] = rnd(B, *s, std=0.3).requires_grad_()
            state[f"grad_{n}"] = rnd(B, *s, std=0.1).requires_grad_()
    return x, state


def split_args(kind, x):
    """Positional args (q, k, v, eta, ln_weight, ln_bias, *params) and keyword args."""
    names = ("q", "k", "v", "eta", "ln_weight", "ln_bias") + PARAMS[kind]
    return [x[n] for n in names], {"token_scale": x.get("token_scale")}


def run(kind, form, x, state=None, mb=16):
    args, kw = split_args(kind, x)
    if form != "steps":
        return FORMS[kind][form](*args, mini_batch_size=mb, initial_state=state,
                                 output_final_state=True, **kw)
    outs = []
    for t in range(x["q"].shape[1]):
        tok = [a[:, t:t + 1] for a in args[:4]] + args[4:]
        o, state = FORMS[kind]["step"](*tok, mini_batch_size=mb, state=state, **kw)
        outs.append(o)
    return torch.cat(outs, dim=1), state


def state_tensors(state):
    return {n: t for n, t in state.items() if n != "offset"}


def outputs_and_grads(kind, form, x, state=None, mb=16, seed=1):
    """(o, final state, grads of every input and initial-state tensor) for fixed cotangents."""
    o, st = run(kind, form, x, state, mb)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    for n, t in sorted(state_tensors(st).items()):
        loss = loss + (t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum()
    inputs = dict(x)
    if state is not None:
        inputs.update({f"state.{n}": t for n, t in state_tensors(state).items()})
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    grads = {n: (torch.zeros_like(inputs[n]) if g is None else g) for n, g in zip(inputs, grads)}
    return o.detach(), st, grads


def rms_ratio(a, b):
    """||a - b|| / ||b||; ||a|| when b is exactly zero (an input the form does not use)."""
    return ((a - b).norm() / b.norm()).item() if b.norm() > 0 else a.norm().item()


def test_explicit_inner_gradients_match_autograd():
    gen = torch.Generator().manual_seed(0)
    z, target = (torch.randn(5, 3, 7, generator=gen, dtype=torch.float64) for _ in range(2))
    w, b = torch.randn(3, 7, generator=gen, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    z.requires_grad_()
    loss = 0.5 * (F.layer_norm(z, (7,), eps=1e-6) * w + b - target).pow(2).sum()
    (ref,) = torch.autograd.grad(loss, z)
    assert_close(ttt._ln_l2_grad(z, target, w, b, 1e-6), ref, atol=1e-12, rtol=1e-12)
    (ref,) = torch.autograd.grad(ttt._gelu(z).sum(), z)
    assert_close(ttt._gelu_grad(z), ref, atol=1e-12, rtol=1e-12)


CASES = [  # (T, mini_batch_size, token_scale, initial offset)
    (37, 16, False, None),  # two full mini-batches + a partial one
    (16, 16, True, None),   # exactly one mini-batch, official per-position scale
    (29, 8, True, 5),       # start mid-mini-batch from a carried state
    (1, 16, False, 3),
]


@pytest.mark.parametrize("T,mb,token_scale,offset", CASES)
@pytest.mark.parametrize("form", ["fast", "steps"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_forms_agree_float64(kind, form, T, mb, token_scale, offset):
    x, state = make_inputs(kind, T=T, mb=mb, token_scale=token_scale, offset=offset)
    o_ref, st_ref, g_ref = outputs_and_grads(kind, "naive", x, state, mb)
    o, st, grads = outputs_and_grads(kind, form, x, state, mb)
    assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    assert st["offset"] == st_ref["offset"] == ((offset or 0) + T) % mb
    assert st.keys() == st_ref.keys()
    for n, t in state_tensors(st_ref).items():
        assert_close(st[n], t, atol=1e-10, rtol=1e-10, msg=n)
    for n, g in g_ref.items():
        assert_close(grads[n], g, atol=1e-10, rtol=1e-10, msg=n)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_forms_agree_float32(kind):
    x, state = make_inputs(kind, T=70, D=16, dtype=torch.float32, token_scale=True, offset=2)
    o_ref, st_ref, g_ref = outputs_and_grads(kind, "naive", x, state)
    for form in ("fast", "steps"):
        o, st, grads = outputs_and_grads(kind, form, x, state)
        assert rms_ratio(o, o_ref) <= 5e-3
        for n, t in state_tensors(st_ref).items():
            assert rms_ratio(st[n], t) <= 5e-3, (form, n)
        for n, g in g_ref.items():
            assert rms_ratio(grads[n], g) <= 5e-3, (form, n)


@pytest.mark.parametrize("form", ["naive", "fast"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_state_carry(kind, form):
    T, t1 = 45, 19  # t1 falls inside the second mini-batch
    x, _ = make_inputs(kind, T=T, token_scale=True)
    o_full, st_full = run(kind, form, x)
    seq = ("q", "k", "v", "eta")
    o1, st1 = run(kind, form, {n: (t[:, :t1] if n in seq else t) for n, t in x.items()})
    assert st1["offset"] == t1 % 16
    o2, st2 = run(kind, form, {n: (t[:, t1:] if n in seq else t) for n, t in x.items()}, st1)
    assert_close(torch.cat([o1, o2], 1), o_full, atol=1e-10, rtol=1e-10)
    for n, t in state_tensors(st_full).items():
        assert_close(st2[n], t, atol=1e-10, rtol=1e-10, msg=n)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_prefill_then_decode(kind):
    x, _ = make_inputs(kind, T=40, token_scale=True)
    o_full, st_full = run(kind, "fast", x)
    seq = ("q", "k", "v", "eta")
    o_pre, st = run(kind, "fast", {n: (t[:, :10] if n in seq else t) for n, t in x.items()})
    o_dec, st = run(kind, "steps", {n: (t[:, 10:] if n in seq else t) for n, t in x.items()}, st)
    assert_close(torch.cat([o_pre, o_dec], 1), o_full, atol=1e-10, rtol=1e-10)
    for n, t in state_tensors(st_full).items():
        assert_close(st[n], t, atol=1e-10, rtol=1e-10, msg=n)


@pytest.mark.parametrize("form", ["naive", "fast"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gradcheck(kind, form):
    x, state = make_inputs(kind, B=1, T=4, H=1, D=3, mb=3, token_scale=True, offset=1, hidden=4)
    names = list(x) + [f"state.{n}" for n in state_tensors(state)]
    values = list(x.values()) + list(state_tensors(state).values())

    def f(*vals):
        d = dict(zip(names, vals))
        st = {n[6:]: t for n, t in d.items() if n.startswith("state.")}
        st["offset"] = state["offset"]
        o, st = run(kind, form, {n: t for n, t in d.items() if not n.startswith("state.")},
                    st, mb=3)
        return (o,) + tuple(state_tensors(st).values())

    # fast_mode (random Jacobian projections) keeps the MLP's ~300 inputs affordable
    assert torch.autograd.gradcheck(f, tuple(values), fast_mode=kind == "mlp")


def long_extreme_inputs(kind, eta_max, D=16):
    """T=8192 fp32 with eta = 0 or the largest layer value (base lr 1 / D, sigmoid -> 1),
    without the official 1/(i+1) averaging (token_scale None): the harshest setting."""
    x, _ = make_inputs(kind, B=1, T=8192, H=1, D=D, dtype=torch.float32)
    with torch.no_grad():
        x["eta"].fill_(eta_max / D)
    return x


@pytest.mark.parametrize("eta_max", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_extreme_learning_rates_long_fp32(kind, eta_max):
    x = long_extreme_inputs(kind, eta_max)
    with torch.no_grad():
        o, st = run(kind, "fast", x)
    assert torch.isfinite(o).all()
    assert all(torch.isfinite(t).all() for t in state_tensors(st).values())


@pytest.mark.slow
@pytest.mark.parametrize("eta_max", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_extreme_learning_rates_long_fp32_gradients(kind, eta_max):
    x = long_extreme_inputs(kind, eta_max)
    o, st = run(kind, "fast", x)
    grads = torch.autograd.grad(o.sum(), list(x.values()))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_step_rejects_multiple_tokens(kind):
    x, _ = make_inputs(kind, T=2)
    args, kw = split_args(kind, x)
    with pytest.raises(ValueError, match="T == 1"):
        FORMS[kind]["step"](*args, **kw)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_no_final_state_and_default_start(kind):
    """output_final_state=False gives None; initial_state=None starts from the given weights
    with zero gradients, i.e. equals an explicit state built from them."""
    x, _ = make_inputs(kind, T=20)
    args, kw = split_args(kind, x)
    o, st = FORMS[kind]["fast"](*args, **kw)
    assert st is None
    B = x["q"].shape[0]
    explicit = {"offset": 0}
    for n in PARAMS[kind]:
        explicit[n] = x[n].expand(B, *x[n].shape)
        explicit[f"grad_{n}"] = torch.zeros_like(explicit[n])
    o2, _ = FORMS[kind]["fast"](*args, initial_state=explicit, **kw)
    assert_close(o2, o, atol=1e-12, rtol=1e-12)


def test_fused_inner_helpers_match_plain_ones():
    gen = torch.Generator().manual_seed(0)
    z, target = (3 * torch.randn(4, 5, 7, generator=gen, dtype=torch.float64) for _ in range(2))
    w, b, eta = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((7,), (7,), (4, 5, 1)))
    ref = eta * ttt._ln_l2_grad(z, target, w, b, 1e-6)
    fused = ttt._ln_l2_grad_scaled(z, (b - target) * w, w * w, eta, 1e-6)
    assert_close(fused, ref, atol=1e-12, rtol=1e-12)
    gelu, gelu_grad = ttt.gelu_tanh_and_grad(z)  # the dual form's; the token loops use the others
    assert_close(gelu, ttt._gelu(z), atol=1e-12, rtol=1e-12)
    assert_close(gelu_grad, ttt._gelu_grad(z), atol=1e-12, rtol=1e-12)
