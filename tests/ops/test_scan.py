"""Mamba selective scan and RG-LRU linear recurrence: naive loop vs chunked vs step, and outside parity."""

import math
import time

import pytest
import torch

from nimblelm.ops.native_scan import linear_recurrence
from nimblelm.ops.scan import (
    chunk_selective_scan,
    naive_linear_recurrence,
    naive_selective_scan,
    rglru_gates,
    scan_linear_recurrence,
    step_linear_recurrence,
    step_selective_scan,
)

DTYPES = [torch.float64, torch.float32]


def assert_close(actual, expected, dtype):
    """float64: ~1e-10 absolute/relative; float32: RMS ratio ||a-b|| / ||b|| <= 5e-3."""
    assert torch.isfinite(actual).all()
    if dtype == torch.float64:
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)
    else:
        ratio = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
        assert ratio <= 5e-3, f"RMS ratio {ratio:.2e}"


def outputs_and_grads(fn, inputs, cotangents):
    """Run fn(**inputs) -> (y, state); return [y, state, grad of every input] for fixed cotangents."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y, state = fn(**leaves)
    loss = (y * cotangents[0]).sum() + (state * cotangents[1]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [y.detach(), state.detach()] + [g for g in grads]


# ------------------------------------------------------------------------------------------
# Mamba selective scan
# ------------------------------------------------------------------------------------------


def selective_inputs(B=2, T=50, Dch=6, N=4, dtype=torch.float64, skip_gate=True, init=True):
    u = torch.randn(B, T, Dch, dtype=dtype)
    inputs = dict(
        u=u,
        delta=torch.nn.functional.softplus(torch.randn(B, T, Dch, dtype=dtype) - 1.0),
        A=-torch.exp(torch.randn(Dch, N, dtype=dtype)),
        Bmat=torch.randn(B, T, N, dtype=dtype),
        Cmat=torch.randn(B, T, N, dtype=dtype),
    )
    if skip_gate:
        inputs["D"] = torch.randn(Dch, dtype=dtype)
        inputs["z"] = torch.randn(B, T, Dch, dtype=dtype)
    if init:
        inputs["initial_state"] = torch.randn(B, Dch, N, dtype=dtype)
    return inputs


def selective_by_steps(u, delta, A, Bmat, Cmat, D=None, z=None, initial_state=None):
    """The step function applied token by token."""
    state, ys = initial_state, []
    for t in range(u.shape[1]):
        sl = slice(t, t + 1)
        y, state = step_selective_scan(
            u[:, sl], delta[:, sl], A, Bmat[:, sl], Cmat[:, sl], D, None if z is None else z[:, sl], state
        )
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
def test_selective_forms_agree(dtype, chunk_size):
    inputs = selective_inputs(dtype=dtype)
    cot = [torch.randn(2, 50, 6, dtype=dtype), torch.randn(2, 6, 4, dtype=dtype)]
    ref = outputs_and_grads(lambda **a: naive_selective_scan(**a, output_final_state=True), inputs, cot)
    chunk = outputs_and_grads(
        lambda **a: chunk_selective_scan(**a, output_final_state=True, chunk_size=chunk_size), inputs, cot
    )
    for got, want in zip(chunk, ref):
        assert_close(got, want, dtype)
    if chunk_size == 16:
        steps = outputs_and_grads(selective_by_steps, inputs, cot)
        for got, want in zip(steps, ref):
            assert_close(got, want, dtype)


@pytest.mark.parametrize("fn", [naive_selective_scan, chunk_selective_scan])
def test_selective_optional_arguments(fn):
    inputs = selective_inputs(T=20, skip_gate=False, init=False)
    y, state = fn(**inputs)
    assert state is None and y.shape == (2, 20, 6)
    y_ref, state_ref = naive_selective_scan(**inputs, initial_state=torch.zeros(2, 6, 4, dtype=torch.float64),
                                            output_final_state=True)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    _, state = fn(**inputs, output_final_state=True)
    torch.testing.assert_close(state, state_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_state_carry(dtype):
    inputs = selective_inputs(T=77, dtype=dtype)
    full_y, full_state = chunk_selective_scan(**inputs, output_final_state=True, chunk_size=16)
    t1 = 29
    first = {k: (v[:, :t1] if v.dim() == 3 and v.shape[1] == 77 else v) for k, v in inputs.items()}
    rest = {k: (v[:, t1:] if v.dim() == 3 and v.shape[1] == 77 else v) for k, v in inputs.items()}
    y1, s1 = chunk_selective_scan(**first, output_final_state=True, chunk_size=16)
    rest["initial_state"] = s1
    y2, s2 = chunk_selective_scan(**rest, output_final_state=True, chunk_size=16)
    assert_close(torch.cat([y1, y2], dim=1), full_y, dtype)
    assert_close(s2, full_state, dtype)


def test_selective_gradcheck():
    inputs = selective_inputs(B=1, T=5, Dch=2, N=2)
    names = list(inputs)

    def fn(*args):
        y, s = chunk_selective_scan(**dict(zip(names, args)), output_final_state=True, chunk_size=2)
        return y, s

    args = tuple(v.clone().requires_grad_(True) for v in inputs.values())
    assert torch.autograd.gradcheck(fn, args)


def test_selective_extreme_gates_long():
    """T = 8192 in fp32; channel 0: decay ~0 (delta * A = -1000), channel 1: decay ~1
    (delta * A = -1e-9), channel 2: delta and A spread over 8 decades."""
    B, T, Dch, N = 1, 8192, 3, 4
    inputs = selective_inputs(B=B, T=T, Dch=Dch, N=N, dtype=torch.float32)
    delta = torch.exp(torch.empty(B, T, Dch).uniform_(-14.0, 4.0))
    delta[..., 0], delta[..., 1] = 50.0, 1e-6
    A = -torch.exp(torch.empty(Dch, N).uniform_(-5.0, 3.0))
    A[0], A[1] = -20.0, -1e-3
    inputs.update(delta=delta, A=A)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, state = chunk_selective_scan(**leaves, output_final_state=True)
    (y.sum() + state.sum()).backward()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())
    with torch.no_grad():
        y_ref, state_ref = naive_selective_scan(**inputs, output_final_state=True)
    for channel in range(Dch):
        assert_close(y.detach()[..., channel], y_ref[..., channel], torch.float32)
        assert_close(state.detach()[:, channel], state_ref[:, channel], torch.float32)


def test_selective_matches_transformers_reference():
    """transformers' torch path of Mamba's selective scan (layout [B, D, L]) and state update."""
    modeling_mamba = pytest.importorskip("transformers.models.mamba.modeling_mamba")
    inputs = selective_inputs(T=33, dtype=torch.float32, init=False)
    u, delta, A, Bm, Cm, D, z = (inputs[k] for k in ["u", "delta", "A", "Bmat", "Cmat", "D", "z"])
    ref_y, ref_state = modeling_mamba.mamba_selective_scan(
        u.transpose(1, 2), delta.transpose(1, 2), A, Bm.transpose(1, 2), Cm.transpose(1, 2),
        D=D, z=z.transpose(1, 2), return_last_state=True,
    )
    y, state = chunk_selective_scan(u, delta, A, Bm, Cm, D, z, output_final_state=True, chunk_size=8)
    torch.testing.assert_close(y, ref_y.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)
    ref_state_copy = ref_state.clone()
    ref_step = modeling_mamba.mamba_selective_state_update(
        ref_state_copy, u[:, 0], delta[:, 0], A, Bm[:, 0], Cm[:, 0], D=D, z=z[:, 0]
    )
    y1, s1 = step_selective_scan(u[:, :1], delta[:, :1], A, Bm[:, :1], Cm[:, :1], D, z[:, :1], state)
    torch.testing.assert_close(y1[:, 0], ref_step, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, ref_state_copy, atol=1e-5, rtol=1e-5)


def test_selective_shape_errors():
    inputs = selective_inputs(T=4)
    with pytest.raises(ValueError, match="Bmat and Cmat"):
        chunk_selective_scan(**{**inputs, "Bmat": inputs["Bmat"][:, :, :2]})
    with pytest.raises(ValueError, match="one token"):
        step_selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["Bmat"], inputs["Cmat"])
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_selective_scan(**inputs, chunk_size=0)


# ------------------------------------------------------------------------------------------
# RG-LRU linear recurrence
# ------------------------------------------------------------------------------------------


def recurrence_inputs(B=2, T=50, Dch=6, dtype=torch.float64, init=True):
    inputs = dict(
        x=torch.randn(B, T, Dch, dtype=dtype),
        log_a=-8.0 * torch.rand(B, T, Dch, dtype=dtype) * torch.nn.functional.softplus(torch.randn(Dch, dtype=dtype)),
    )
    if init:
        inputs["initial_state"] = torch.randn(B, Dch, dtype=dtype)
    return inputs


def recurrence_by_steps(x, log_a, initial_state=None):
    state, hs = initial_state, []
    for t in range(x.shape[1]):
        h, state = step_linear_recurrence(x[:, t : t + 1], log_a[:, t : t + 1], state)
        hs.append(h)
    return torch.cat(hs, dim=1), state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
def test_recurrence_forms_agree(dtype, chunk_size):
    inputs = recurrence_inputs(dtype=dtype)
    cot = [torch.randn(2, 50, 6, dtype=dtype), torch.randn(2, 6, dtype=dtype)]
    ref = outputs_and_grads(lambda **a: naive_linear_recurrence(**a, output_final_state=True), inputs, cot)
    fast = outputs_and_grads(
        lambda **a: scan_linear_recurrence(**a, output_final_state=True, chunk_size=chunk_size), inputs, cot
    )
    for got, want in zip(fast, ref):
        assert_close(got, want, dtype)
    if chunk_size == 16:
        for got, want in zip(outputs_and_grads(recurrence_by_steps, inputs, cot), ref):
            assert_close(got, want, dtype)


@pytest.mark.parametrize("fn", [naive_linear_recurrence, scan_linear_recurrence])
def test_recurrence_optional_arguments(fn):
    inputs = recurrence_inputs(T=20, init=False)
    h, state = fn(**inputs)
    assert state is None and h.shape == (2, 20, 6)
    _, state = fn(**inputs, output_final_state=True)
    torch.testing.assert_close(state, h[:, -1], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_recurrence_state_carry(dtype):
    inputs = recurrence_inputs(T=77, dtype=dtype)
    full_h, full_state = scan_linear_recurrence(**inputs, output_final_state=True, chunk_size=16)
    t1 = 29
    h1, s1 = scan_linear_recurrence(inputs["x"][:, :t1], inputs["log_a"][:, :t1], inputs["initial_state"], True, 16)
    h2, s2 = scan_linear_recurrence(inputs["x"][:, t1:], inputs["log_a"][:, t1:], s1, True, 16)
    assert_close(torch.cat([h1, h2], dim=1), full_h, dtype)
    assert_close(s2, full_state, dtype)


def test_recurrence_gradcheck():
    inputs = recurrence_inputs(B=1, T=7, Dch=2)

    def fn(x, log_a, h0):
        return scan_linear_recurrence(x, log_a, h0, output_final_state=True, chunk_size=3)

    args = tuple(v.clone().requires_grad_(True) for v in inputs.values())
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("fn", [scan_linear_recurrence, linear_recurrence])
def test_recurrence_extreme_gates_long(fn):
    """T = 8192 in fp32; channels 0-1: decay ~0 (log_a = -80), 2-3: decay ~1 (log_a = -1e-7),
    4-7: log_a spread over 10 decades with 1% hard resets (log_a = -inf). ``linear_recurrence``
    runs the native kernel where it is built."""
    B, T, Dch = 2, 8192, 8
    x = torch.randn(B, T, Dch)
    log_a = -torch.exp(torch.empty(B, T, Dch).uniform_(-18.0, 5.0))
    log_a[..., 4:][torch.rand(B, T, 4) < 0.01] = float("-inf")
    log_a[..., :2], log_a[..., 2:4] = -80.0, -1e-7
    h0 = torch.randn(B, Dch)
    leaves = [v.clone().requires_grad_(True) for v in (x, log_a, h0)]
    h, state = fn(*leaves, output_final_state=True)
    (h.sum() + state.sum()).backward()
    assert all(torch.isfinite(v.grad).all() for v in leaves)
    h_ref, state_ref = naive_linear_recurrence(x, log_a, h0, output_final_state=True)
    for channel in range(Dch):
        assert_close(h.detach()[..., channel], h_ref[..., channel], torch.float32)
        assert_close(state.detach()[:, channel], state_ref[:, channel], torch.float32)


def test_recurrence_reset_drops_state_and_grads_agree():
    """log_a = -inf (a = 0) restarts the recurrence: naive, chunked and step agree, grads finite."""
    inputs = recurrence_inputs(T=40)
    inputs["log_a"][:, [0, 13, 16, 17, 39]] = float("-inf")
    cot = [torch.randn(2, 40, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)]
    ref = outputs_and_grads(lambda **a: naive_linear_recurrence(**a, output_final_state=True), inputs, cot)
    fast = outputs_and_grads(lambda **a: scan_linear_recurrence(**a, output_final_state=True, chunk_size=8),
                             inputs, cot)
    steps = outputs_and_grads(recurrence_by_steps, inputs, cot)
    for got, want, stepped in zip(fast, ref, steps):
        assert_close(got, want, torch.float64)
        assert_close(stepped, want, torch.float64)
    torch.testing.assert_close(ref[0][:, 13], inputs["x"][:, 13])  # state dropped at the reset


# ------------------------------------------------------------------------------------------
# RG-LRU gates vs transformers' RecurrentGemma
# ------------------------------------------------------------------------------------------


def _hf_rglru(width=8, heads=2):
    modeling = pytest.importorskip("transformers.models.recurrent_gemma.modeling_recurrent_gemma")
    from transformers import RecurrentGemmaConfig

    config = RecurrentGemmaConfig(lru_width=width, num_attention_heads=heads, hidden_size=width)
    layer = modeling.RecurrentGemmaRglru(config)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
        layer.recurrent_param[:2] = -20.0  # a ~ 1: exercises the clipped sqrt gradient
        layer.recurrent_param[2:4] = 4.0  # a ~ 0
    return layer


def _gate_logits(layer, x, weight, bias):
    """Block-diagonal linear of x [B, T, W] with weight [H, W/H, W/H], bias [H, W/H]."""
    B, T, W = x.shape
    H = weight.shape[0]
    blocks = x.reshape(B, T, H, W // H)  # [B, T, H, W/H]
    return (torch.einsum("bthi,hij->bthj", blocks, weight) + bias).reshape(B, T, W)  # [B, T, W]


@pytest.mark.parametrize("positions", ["fresh", "packed"])
def test_rglru_gates_match_recurrent_gemma(positions):
    layer = _hf_rglru()
    B, T, W = 2, 21, 8
    x = torch.randn(B, T, W, requires_grad=True)
    position_ids = torch.arange(T)[None].repeat(B, 1)
    if positions == "packed":
        position_ids[1, 9:] = torch.arange(T - 9)  # a second document starts at t = 9 in row 1
    layer.recurrent_states = None
    ref = layer(x, position_ids)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x] + list(layer.parameters()))

    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    names = [n for n, _ in layer.named_parameters()]
    p = dict(zip(names, params))
    gate_x = _gate_logits(layer, x, p["input_gate_weight"], p["input_gate_bias"])
    gate_a = _gate_logits(layer, x, p["recurrent_gate_weight"], p["recurrent_gate_bias"])
    normalized_x, log_a = rglru_gates(x, gate_x, gate_a, p["recurrent_param"], reset=position_ids == 0)
    h, _ = scan_linear_recurrence(normalized_x, log_a, chunk_size=4)
    torch.testing.assert_close(h, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(h.square().sum(), [x] + params)
    for name, got, want in zip(["x"] + names, grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")


def test_rglru_gates_without_reset_normalises_every_position():
    x, gx, ga = (torch.randn(1, 5, 3, dtype=torch.float64) for _ in range(3))
    lam = torch.randn(3, dtype=torch.float64)
    nx, log_a = rglru_gates(x, gx, ga, lam)
    expected_log_a = -8.0 * torch.sigmoid(ga) * torch.nn.functional.softplus(lam)
    torch.testing.assert_close(log_a, expected_log_a)
    torch.testing.assert_close(nx, x * torch.sigmoid(gx) * torch.sqrt(1 - torch.exp(2 * expected_log_a)))


def test_sqrt_gradient_is_clipped():
    v = torch.tensor([0.0, 1e-9, 0.25], dtype=torch.float64, requires_grad=True)
    nx, _ = rglru_gates(torch.ones(1, 3, 1, dtype=torch.float64), torch.full((1, 3, 1), 50.0, dtype=torch.float64),
                        torch.zeros(1, 3, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert torch.isfinite(nx).all()
    from nimblelm.ops.scan import _SqrtBoundDerivative

    (g,) = torch.autograd.grad(_SqrtBoundDerivative.apply(v).sum(), [v])
    torch.testing.assert_close(g, torch.tensor([1000.0, 1000.0, 1.0], dtype=torch.float64))


# ------------------------------------------------------------------------------------------
# Speed (deliberate runs only)
# ------------------------------------------------------------------------------------------


def _best_time(fn, repeats=3):
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()  # CPU time: robust to other processes sharing the machine
        fn()
        best = min(best, time.process_time() - start)
    return best


@pytest.mark.slow
def test_chunked_forms_are_faster_than_naive():
    torch.manual_seed(0)
    with torch.no_grad():
        sel = selective_inputs(B=1, T=4096, Dch=512, N=16, dtype=torch.float32, skip_gate=False, init=False)
        naive = _best_time(lambda: naive_selective_scan(**sel), repeats=1)
        chunk = _best_time(lambda: chunk_selective_scan(**sel))
        assert naive / chunk > 1.5, f"selective scan: naive {naive:.3f}s chunk {chunk:.3f}s"
        rec = recurrence_inputs(B=1, T=4096, Dch=512, dtype=torch.float32, init=False)
        naive = _best_time(lambda: naive_linear_recurrence(**rec))
        fast = _best_time(lambda: scan_linear_recurrence(**rec))
        assert naive / fast > 3, f"linear recurrence: naive {naive:.3f}s scan {fast:.3f}s"


def test_empty_sequence_returns_initial_state():
    sel = selective_inputs(T=0)
    for fn in (naive_selective_scan, chunk_selective_scan):
        y, state = fn(**sel, output_final_state=True)
        assert y.shape == (2, 0, 6)
        torch.testing.assert_close(state, sel["initial_state"])
    rec = recurrence_inputs(T=0)
    for fn in (naive_linear_recurrence, scan_linear_recurrence):
        h, state = fn(**rec, output_final_state=True)
        assert h.shape == (2, 0, 6)
        torch.testing.assert_close(state, rec["initial_state"])
