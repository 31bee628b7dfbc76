"""Causal depthwise short convolution: F.conv1d form vs naive loop vs step, and transformers parity."""

import pytest
import torch

from nimblelm.ops.short_conv import causal_conv1d, naive_causal_conv1d, step_causal_conv1d

DTYPES = [torch.float64, torch.float32]


def assert_close(actual, expected, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)
    else:
        ratio = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
        assert ratio <= 5e-3, f"RMS ratio {ratio:.2e}"


def conv_inputs(B=2, T=23, C=5, K=4, dtype=torch.float64, bias=True):
    return dict(
        x=torch.randn(B, T, C, dtype=dtype),
        weight=torch.randn(C, K, dtype=dtype),
        bias=torch.randn(C, dtype=dtype) if bias else None,
        initial_state=torch.randn(B, C, K - 1, dtype=dtype),
    )


def conv_by_steps(x, weight, bias=None, activation=None, initial_state=None):
    state, ys = initial_state, []
    for t in range(x.shape[1]):
        y, state = step_causal_conv1d(x[:, t : t + 1], weight, bias, activation, state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def outputs_and_grads(fn, inputs, activation):
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    y, state = fn(**leaves, activation=activation)
    g = torch.Generator().manual_seed(7)  # same cotangents for every form, whatever the strides
    cot_y = torch.randn(y.shape, generator=g, dtype=y.dtype)
    loss = (y * cot_y).sum() + (state * torch.randn(state.shape, generator=g, dtype=y.dtype)).sum()
    wrt = [v for v in leaves.values() if v is not None]
    return [y.detach(), state.detach()] + list(torch.autograd.grad(loss, wrt, allow_unused=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_forms_agree(dtype, K, activation):
    inputs = conv_inputs(K=K, dtype=dtype)
    ref = outputs_and_grads(lambda **a: naive_causal_conv1d(**a, output_final_state=True), inputs, activation)
    fast = outputs_and_grads(lambda **a: causal_conv1d(**a, output_final_state=True), inputs, activation)
    steps = outputs_and_grads(conv_by_steps, inputs, activation)
    for got, stepped, want in zip(fast, steps, ref):
        if want is None or want.numel() == 0:  # K = 1: the state is empty
            continue
        assert_close(got, want, dtype)
        assert_close(stepped, want, dtype)


@pytest.mark.parametrize("fn", [causal_conv1d, naive_causal_conv1d])
def test_conv_zero_initial_state_and_no_bias(fn):
    inputs = conv_inputs(bias=False)
    y, state = fn(inputs["x"], inputs["weight"])
    assert state is None
    zeros = torch.zeros_like(inputs["initial_state"])
    y_ref, _ = naive_causal_conv1d(inputs["x"], inputs["weight"], None, None, zeros, True)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t1", [1, 2, 9])  # 1, 2 < K - 1: the state mixes old and new inputs
def test_conv_state_carry(dtype, t1):
    inputs = conv_inputs(K=4, dtype=dtype)
    x, w, b, s0 = inputs["x"], inputs["weight"], inputs["bias"], inputs["initial_state"]
    full_y, full_state = causal_conv1d(x, w, b, "silu", s0, True)
    y1, s1 = causal_conv1d(x[:, :t1], w, b, "silu", s0, True)
    y2, s2 = causal_conv1d(x[:, t1:], w, b, "silu", s1, True)
    assert_close(torch.cat([y1, y2], dim=1), full_y, dtype)
    assert_close(s2, full_state, dtype)
    torch.testing.assert_close(full_state, x[:, -3:].transpose(1, 2))  # state = last K-1 inputs


def test_conv_gradcheck():
    inputs = conv_inputs(B=1, T=5, C=2, K=3)
    args = tuple(v.clone().requires_grad_(True) for v in inputs.values())

    def fn(x, w, b, s0):
        return causal_conv1d(x, w, b, "silu", s0, True)

    assert torch.autograd.gradcheck(fn, args)


def test_conv_matches_transformers_mamba():
    """transformers' Mamba torch path: causal_conv1d_fn for prefill, causal_conv1d_update for decoding."""
    modeling_mamba = pytest.importorskip("transformers.models.mamba.modeling_mamba")
    inputs = conv_inputs(T=11, dtype=torch.float32)
    x, w, b = inputs["x"], inputs["weight"], inputs["bias"]
    ref = modeling_mamba.causal_conv1d_fn(x.transpose(1, 2), w, b, activation="silu")
    y, state = causal_conv1d(x, w, b, "silu", output_final_state=True)
    torch.testing.assert_close(y, ref.transpose(1, 2), atol=1e-6, rtol=1e-6)
    conv_layer = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3)
    with torch.no_grad():
        conv_layer.weight.copy_(w[:, None])
        conv_layer.bias.copy_(b)
        torch.testing.assert_close(causal_conv1d(x, w, b)[0], conv_layer(x.transpose(1, 2))[..., :11].transpose(1, 2))
    # transformers keeps K inputs (the current one last); ours keeps the K-1 before the next token
    hf_state = torch.cat([torch.zeros(2, 5, 1), state], dim=2)
    x_next = torch.randn(2, 1, 5)
    ref_next = modeling_mamba.causal_conv1d_update(x_next.transpose(1, 2), hf_state, w, b, activation="silu")
    y_next, state_next = step_causal_conv1d(x_next, w, b, "silu", state)
    torch.testing.assert_close(y_next, ref_next.transpose(1, 2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state_next, hf_state[:, :, 1:])


def test_conv_errors():
    inputs = conv_inputs()
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(inputs["x"], inputs["weight"], activation="relu")
    with pytest.raises(ValueError, match="K-1"):
        causal_conv1d(inputs["x"], inputs["weight"], initial_state=inputs["initial_state"][..., :1])
    with pytest.raises(ValueError, match="one token"):
        step_causal_conv1d(inputs["x"], inputs["weight"])


@pytest.mark.parametrize("fn", [causal_conv1d, naive_causal_conv1d])
def test_conv_empty_sequence_keeps_state(fn):
    inputs = conv_inputs(T=0)
    y, state = fn(**inputs, output_final_state=True)
    assert y.shape == (2, 0, 5)
    torch.testing.assert_close(state, inputs["initial_state"])
