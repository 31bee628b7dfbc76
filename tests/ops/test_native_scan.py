"""The native scan kernels (S6, RG-LRU recurrence) against the naive loops (their oracles), and the build."""

import ctypes
import math
import warnings

import pytest
import torch

from nimblelm.native import build
from nimblelm.ops import native_scan
from nimblelm.ops.native_scan import linear_recurrence, native_linear_recurrence, native_selective_scan, selective_scan
from nimblelm.ops.scan import chunk_selective_scan, naive_linear_recurrence, naive_selective_scan

from ..threads_util import with_threads
from .test_scan import DTYPES, assert_close, outputs_and_grads, recurrence_inputs, selective_inputs

if build._compiler() is None or not build.native_enabled():
    pytest.skip("no C compiler (or NIMBLELM_NATIVE=0): the native kernels are not built", allow_module_level=True)


def assert_native_matches_naive(native, naive, inputs, cotangents, dtype, threads=1):
    """Outputs, final state and every input gradient of ``native`` (run on ``threads``) against ``naive``."""
    got = with_threads(threads, lambda: outputs_and_grads(lambda **a: native(**a, output_final_state=True),
                                                          inputs, cotangents))
    want = outputs_and_grads(lambda **a: naive(**a, output_final_state=True), inputs, cotangents)
    for g, w in zip(got, want):
        assert_close(g, w, dtype)


def test_kernel_builds_on_a_machine_with_a_compiler():
    assert native_scan.native_scan_available(torch.float32)
    assert native_scan.native_scan_available(torch.float64)
    assert not native_scan.native_scan_available(torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(2, 50, 6, 4), (1, 77, 150, 16), (3, 1, 70, 5), (1, 64, 128, 3)])
def test_native_matches_naive(dtype, threads, shape):
    """Outputs, final state and every gradient; channel counts off the 64-block and split across threads."""
    B, T, Dch, N = shape
    inputs = selective_inputs(B=B, T=T, Dch=Dch, N=N, dtype=dtype)
    cot = [torch.randn(B, T, Dch, dtype=dtype), torch.randn(B, Dch, N, dtype=dtype)]
    assert_native_matches_naive(native_selective_scan, naive_selective_scan, inputs, cot, dtype, threads)


@pytest.mark.parametrize("B,T", [(2, 45), (1, 40), (3, 1)])
def test_native_reads_a_strided_gate(B, T):
    """z given as a slice of a wider projection (Mamba's ``in_proj(x).chunk(2)``) is read in
    place through its row stride: outputs and every gradient equal the naive loop's on the
    same values, z's gradient included (it comes back contiguous)."""
    Dch, N = 70, 5
    inputs = selective_inputs(B=B, T=T, Dch=Dch, N=N)
    wide = torch.randn(B, T, 2 * Dch, dtype=torch.float64, requires_grad=True)
    cot = [torch.randn(B, T, Dch, dtype=torch.float64), torch.randn(B, Dch, N, dtype=torch.float64)]
    results = {}
    for name, fn in (("native", native_selective_scan), ("naive", naive_selective_scan)):
        z = wide[..., Dch:]  # rows Dch apart from their neighbours' starts: stride 2 Dch
        if name == "naive":
            z = z.contiguous()
        y, state = fn(**{**inputs, "z": z}, output_final_state=True)
        loss = (y * cot[0]).sum() + (state * cot[1]).sum()
        results[name] = [y.detach(), state.detach(), torch.autograd.grad(loss, wide)[0]]
    for got, want in zip(results["native"], results["naive"]):
        assert_close(got, want, torch.float64)


def test_native_gradcheck():
    inputs = selective_inputs(B=1, T=9, Dch=3, N=2)
    keys = ["u", "delta", "A", "Bmat", "Cmat", "initial_state"]
    leaves = [inputs[k].clone().requires_grad_(True) for k in keys]

    def fn(*args):
        return native_selective_scan(**dict(zip(keys, args)), output_final_state=True)

    assert torch.autograd.gradcheck(fn, leaves)


def test_native_without_initial_state_or_final_state_gradient():
    inputs = selective_inputs(T=40, skip_gate=False, init=False)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, state = native_selective_scan(**leaves)
    assert state is None
    y.square().sum().backward()
    ref = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    naive_selective_scan(**ref)[0].square().sum().backward()
    for k in inputs:
        torch.testing.assert_close(leaves[k].grad, ref[k].grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("drop", ["D", "z"])
def test_native_skip_or_gate_alone(drop):
    """The skip and the gate are fused into the kernel: each one alone, gradients included."""
    inputs = selective_inputs(T=37, Dch=70)
    del inputs[drop]
    cot = [torch.randn(2, 37, 70, dtype=torch.float64), torch.randn(2, 70, 4, dtype=torch.float64)]
    assert_native_matches_naive(native_selective_scan, naive_selective_scan, inputs, cot, torch.float64)


def test_positive_A_is_refused_and_the_dispatcher_uses_the_chunked_form():
    inputs = selective_inputs(T=20)
    inputs["A"] = inputs["A"].abs()
    with pytest.raises(ValueError, match="A <= 0"):
        native_selective_scan(**inputs)
    for g, w in zip(selective_scan(**inputs, output_final_state=True),
                    naive_selective_scan(**inputs, output_final_state=True)):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


def test_native_extreme_gates_long():
    """T = 8192 in fp32 with decay ~0 (delta * A = -1000) and ~1 (delta * A = -1e-6): finite, as chunked."""
    B, T, Dch, N = 1, 8192, 3, 4
    g = torch.Generator().manual_seed(0)
    delta = torch.ones(B, T, Dch)
    A = -torch.ones(Dch, N)
    A[0], A[1], A[2] = 1000.0 * A[0], 1e-6 * A[1], 0.5 * A[2]
    args = dict(u=torch.randn(B, T, Dch, generator=g), delta=delta, A=A, Bmat=torch.randn(B, T, N, generator=g),
                Cmat=torch.randn(B, T, N, generator=g), output_final_state=True)
    y, state = native_selective_scan(**args)
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    y_ref, state_ref = chunk_selective_scan(**args)
    assert_close(y, y_ref, torch.float32)
    assert_close(state, state_ref, torch.float32)


@pytest.mark.parametrize("variant", ["upto", "any"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-7), (torch.float64, 5e-16)])
def test_kernel_exponential(dtype, rtol, variant):
    """The kernels' own exp: within a few ulp on [-700, 80]; exactly 0 below the underflow
    threshold; the clamped variant saturates (finite) above it."""
    lib = build.load_library("scan_kernels")
    ctype = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
    fn = getattr(lib, f"nl_exp_{variant}_" + ("f32" if dtype == torch.float32 else "f64"))
    fn.restype, fn.argtypes = ctype, [ctype]
    lo = -80.0 if dtype == torch.float32 else -700.0
    xs = torch.linspace(lo, 80.0, 2001, dtype=dtype).tolist() + [-1e-7, -0.3465, 0.3465]
    for x in xs:
        assert math.isclose(fn(x), math.exp(x), rel_tol=rtol), x
    assert fn(-1e4) == 0.0 and fn(-math.inf) == 0.0
    if variant == "any":
        assert math.isfinite(fn(1e4)) and fn(1e4) > 1e38


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-7), (torch.float64, 5e-16)])
def test_kernel_base_2_exponential(dtype, rtol):
    """The selective scan's decays are 2^x: within a few ulp down to the smallest normal
    number (x = -126 / -1022, reached by x = delta A log2(e) at delta A = -87 / -708); exactly
    0 below it, -inf included."""
    lib = build.load_library("scan_kernels")
    ctype = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
    fn = getattr(lib, "nl_exp2_upto_" + ("f32" if dtype == torch.float32 else "f64"))
    fn.restype, fn.argtypes = ctype, [ctype]
    lo = -125.0 if dtype == torch.float32 else -1021.0
    xs = torch.linspace(lo, 120.0, 4001, dtype=dtype).tolist() + [-1e-7, -0.5, 0.49999, 0.5, 1e-7]
    for x in xs:
        assert math.isclose(fn(x), 2.0 ** x, rel_tol=rtol), x
    assert fn(-1e4) == 0.0 and fn(-math.inf) == 0.0


def test_selective_scan_falls_back_without_the_kernel(monkeypatch):
    inputs = selective_inputs(T=30)
    want = naive_selective_scan(**inputs, output_final_state=True)
    monkeypatch.setattr(native_scan, "_library", lambda: None)
    got = selective_scan(**inputs, output_final_state=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    with pytest.raises(RuntimeError, match="native selective scan needs"):
        native_selective_scan(**inputs)


def test_selective_scan_mixed_dtypes_use_the_chunked_form():
    inputs = selective_inputs(T=12, dtype=torch.float32)
    inputs["A"] = inputs["A"].double()
    with pytest.raises(ValueError, match="share one dtype"):
        native_selective_scan(**inputs)


def test_empty_sequence_returns_the_initial_state():
    inputs = selective_inputs(T=0)
    y, state = native_selective_scan(**inputs, output_final_state=True)
    assert y.shape == (2, 0, 6)
    torch.testing.assert_close(state, inputs["initial_state"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(2, 50, 6), (1, 33, 150), (3, 1, 70)])
def test_native_recurrence_matches_naive(dtype, threads, shape):
    B, T, Dch = shape
    inputs = recurrence_inputs(B=B, T=T, Dch=Dch, dtype=dtype)
    inputs["log_a"][:, T // 2] = float("-inf")  # a hard reset in the middle
    cot = [torch.randn(B, T, Dch, dtype=dtype), torch.randn(B, Dch, dtype=dtype)]
    assert_native_matches_naive(native_linear_recurrence, naive_linear_recurrence, inputs, cot, dtype, threads)


def test_native_recurrence_gradcheck_and_optional_arguments():
    inputs = recurrence_inputs(B=1, T=7, Dch=2)
    args = tuple(v.clone().requires_grad_(True) for v in inputs.values())
    assert torch.autograd.gradcheck(lambda x, la, h0: native_linear_recurrence(x, la, h0, True), args)
    no_init = recurrence_inputs(T=20, init=False)
    h, state = native_linear_recurrence(**no_init)
    assert state is None
    torch.testing.assert_close(h, naive_linear_recurrence(**no_init)[0], atol=1e-12, rtol=1e-12)
    empty = recurrence_inputs(T=0)
    h, state = native_linear_recurrence(**empty, output_final_state=True)
    assert h.shape == (2, 0, 6)
    torch.testing.assert_close(state, empty["initial_state"])


def test_linear_recurrence_falls_back_without_the_kernel(monkeypatch):
    inputs = recurrence_inputs(T=30)
    want = naive_linear_recurrence(**inputs, output_final_state=True)
    monkeypatch.setattr(native_scan, "_library", lambda: None)
    for g, w in zip(linear_recurrence(**inputs, output_final_state=True), want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    with pytest.raises(RuntimeError, match="native linear recurrence needs"):
        native_linear_recurrence(**inputs)


def test_build_cache_and_failure(tmp_path, monkeypatch):
    """A fresh cache builds the library once; a broken compiler warns and returns None."""
    monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path / "cache"))
    build.load_library.cache_clear()
    try:
        assert build.load_library("scan_kernels") is not None
        built = list((tmp_path / "cache" / "native").glob("scan_kernels-*.so"))
        assert len(built) == 1 and not list((tmp_path / "cache" / "native").glob("*.tmp.so"))
        build.load_library.cache_clear()
        monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path / "cache2"))
        monkeypatch.setenv("NIMBLELM_CC", "false")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert build.load_library("scan_kernels") is None
        assert any("could not build the native kernels" in str(w.message) for w in caught)
        build.load_library.cache_clear()
        monkeypatch.setenv("NIMBLELM_NATIVE", "0")
        assert build.load_library("scan_kernels") is None
    finally:
        build.load_library.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_reset,with_branch,with_init", [(True, True, True), (False, True, False),
                                                              (True, False, False), (False, False, True)])
def test_fused_rglru_matches_gates_and_naive_recurrence(dtype, with_reset, with_branch, with_init):
    from nimblelm.ops.native_scan import native_rglru_forward
    from nimblelm.ops.scan import rglru_gates

    B, T, Dch = 2, 45, 70
    g = torch.Generator().manual_seed(1)
    x, gx, ga, yb = (torch.randn(B, T, Dch, generator=g, dtype=dtype) * 3 for _ in range(4))
    a_param = torch.randn(Dch, generator=g, dtype=dtype)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0], reset[1, 20] = True, True
    reset = reset if with_reset else None
    h0 = torch.randn(B, Dch, generator=g, dtype=dtype) if with_init else None
    normalized, log_a = rglru_gates(x, gx, ga, a_param, reset=reset)
    h, last = naive_linear_recurrence(normalized, log_a, h0, output_final_state=True)
    want = h * torch.nn.functional.gelu(yb, approximate="tanh") if with_branch else h
    got, got_last = native_rglru_forward(x, gx, ga, a_param, yb if with_branch else None, reset=reset,
                                         initial_state=h0)
    assert_close(got, want, dtype)
    assert_close(got_last, last, dtype)


def test_fused_rglru_refuses_gradients():
    from nimblelm.ops.native_scan import native_rglru_forward

    x = torch.randn(1, 4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        native_rglru_forward(x, x, x, torch.zeros(8))


def test_a_library_with_another_abi_is_not_used(monkeypatch):
    """A kernel library whose argument lists differ from this module's is refused (fallback)."""
    monkeypatch.setattr(native_scan, "_ABI", -1)
    assert not native_scan.native_scan_available(torch.float32)
    inputs = selective_inputs(T=10)
    for g, w in zip(selective_scan(**inputs, output_final_state=True),
                    naive_selective_scan(**inputs, output_final_state=True)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,T", [(4, 37), (4, 2), (2, 9), (1, 5), (3, 1)])
@pytest.mark.parametrize("bias,activation,with_state", [(True, "silu", True), (False, None, False),
                                                        (True, None, True), (False, "silu", False)])
def test_native_short_conv_matches_naive(dtype, K, T, bias, activation, with_state):
    """Without gradients causal_conv1d runs the native kernel: outputs and final state as the loop."""
    from nimblelm.ops.short_conv import causal_conv1d, naive_causal_conv1d

    B, C = 2, 70
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, C, generator=g, dtype=dtype)
    w = torch.randn(C, K, generator=g, dtype=dtype)
    b = torch.randn(C, generator=g, dtype=dtype) if bias else None
    s = torch.randn(B, C, K - 1, generator=g, dtype=dtype) if with_state else None
    want = naive_causal_conv1d(x, w, b, activation, s, output_final_state=True)
    for threads in (1, 2):
        with torch.no_grad():
            got = with_threads(threads, lambda: causal_conv1d(x, w, b, activation, s, output_final_state=True))
        for g_, w_ in zip(got, want):
            assert_close(g_, w_, dtype)


def test_short_conv_with_gradients_uses_the_pytorch_form(monkeypatch):
    from nimblelm.ops import short_conv

    monkeypatch.setattr(short_conv, "native_conv1d_forward", lambda *a, **k: pytest.fail("native path under grad"))
    x = torch.randn(1, 8, 4, requires_grad=True)
    y, _ = short_conv.causal_conv1d(x, torch.randn(4, 4), None, "silu")
    y.sum().backward()
    assert x.grad is not None


def gated_rmsnorm_reference(o, weight, eps, group, z=None, gate_first=False, v=None, d_skip=None):
    """The PyTorch expressions the native gated RMSNorm replaces."""
    C = o.shape[-1]
    p = o if v is None else o + v * d_skip.repeat_interleave(C // d_skip.numel())
    if z is not None and gate_first:
        p = p * torch.nn.functional.silu(z)
    y = torch.nn.functional.rms_norm(p.unflatten(-1, (C // group, group)), (group,), eps=eps)
    y = (y * weight if weight.numel() == group else y.flatten(-2) * weight).reshape(o.shape)
    return y * torch.nn.functional.silu(z) if z is not None and not gate_first else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["mamba2", "mamba2_groups", "head_gate", "head_no_gate", "weight_per_channel"])
def test_native_gated_rmsnorm_matches_pytorch(dtype, case):
    """Mamba-2's form (D skip, gate before the norm, one or two groups) and the DeltaNet / GLA
    head norms (gate after, per-head weight), with z and v strided views of a wider projection."""
    g = torch.Generator().manual_seed(3)
    B, T, C = 2, 23, 96
    proj = torch.randn(B, T, 3 * C + 5, generator=g, dtype=dtype) * 3
    o = torch.randn(B, T, C, generator=g, dtype=dtype)
    z, v = proj[..., :C], proj[..., C + 5:2 * C + 5]
    kw = {"mamba2": dict(group=C, z=z, gate_first=True, v=v, d_skip=torch.randn(6, generator=g, dtype=dtype)),
          "mamba2_groups": dict(group=C // 2, z=z, gate_first=True, v=v, d_skip=torch.randn(6, generator=g, dtype=dtype)),
          "head_gate": dict(group=16, z=z), "head_no_gate": dict(group=16),
          "weight_per_channel": dict(group=32, z=z)}[case]
    weight = torch.randn(C if case == "weight_per_channel" else kw["group"], generator=g, dtype=dtype)
    want = gated_rmsnorm_reference(o, weight, 1e-5, **kw)
    for threads in (1, 2):
        got = with_threads(threads, lambda: native_scan.native_gated_rmsnorm(o, weight, 1e-5, **kw))
        assert got.shape == o.shape and got.is_contiguous()
        assert_close(got, want, dtype)


def test_native_gated_rmsnorm_refuses_mismatched_sizes():
    o = torch.randn(1, 4, 12)
    with pytest.raises(ValueError, match="group 5 must divide"):
        native_scan.native_gated_rmsnorm(o, torch.ones(5), 1e-5, group=5)
    with pytest.raises(ValueError, match="v needs d_skip"):
        native_scan.native_gated_rmsnorm(o, torch.ones(12), 1e-5, v=o)


@pytest.mark.parametrize("mixer", ["mamba2", "gated_deltanet", "gla"])
def test_layers_output_norm_native_equals_pytorch(mixer, monkeypatch):
    """A layer's inference output through the native gated RMSNorm equals its PyTorch form."""
    from nimblelm.layers import MIXERS, mamba2, norms
    from nimblelm.models.config import ModelConfig

    config = ModelConfig(hidden_size=64, num_heads=4, chunk_size=8, extra={"mamba_head_dim": 16}, state_size=8)
    torch.manual_seed(0)
    layer = MIXERS[mixer](config, 0).double().eval()
    x = torch.randn(2, 13, 64, dtype=torch.float64)
    positions = torch.arange(13)[None]
    with torch.no_grad():
        native = layer.sequence_forward(x, None, positions)[0]
        for module in (mamba2, norms):
            monkeypatch.setattr(module, "native_inference_ok", lambda *t: False)
        pytorch = layer.sequence_forward(x, None, positions)[0]
    assert_close(native, pytorch, torch.float64)
