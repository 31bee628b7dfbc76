"""Mamba's selective scan (S6) and the RG-LRU recurrence through native C kernels, with backward.

:func:`selective_scan` and :func:`linear_recurrence` are what layers call: the native kernel
for float32 / float64 CPU tensors when it could be built (:mod:`nimblelm.native`), otherwise
the chunked PyTorch forms of :mod:`nimblelm.ops.scan`; all have the contracts of the naive
loops there (``naive_selective_scan``, ``naive_linear_recurrence``), the oracles the tests hold
them to.

The kernel runs the recurrence sequentially in time with the state of a block of channels held
in L1 cache, one pass over the inputs instead of PyTorch's many elementwise passes. The
forward keeps the state entering every ``_CHECKPOINT`` steps; the backward recomputes each
stretch from there and walks time backwards (no [T, Dch, N] activations are stored). Channels
are split across ``torch.get_num_threads()`` threads (ctypes releases the GIL). The RG-LRU
recurrence's states are its outputs, so its backward needs no checkpoints.

Inference-only fusions live here too (no backward; callers check :func:`native_inference_ok`):
the whole RG-LRU interior (:func:`native_rglru_forward`), the short causal convolution
(:func:`native_conv1d_forward`) and the gated RMSNorm of Mamba-2 / DeltaNet / GLA
(:func:`native_gated_rmsnorm`).
"""

from __future__ import annotations

import ctypes

import torch

from ..native.calls import checked_library, even_ranges, int64s, ptr, run_split
from .scan import _check_recurrence, _check_selective, chunk_selective_scan, scan_linear_recurrence

_CHECKPOINT = 32  # steps between stored states; the backward's recompute buffer is (32+1) x N x 64
_BLOCK = 64  # channels per kernel block (BLOCK in scan_kernels.c); thread splits align to it
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_ABI = 6  # must equal nl_scan_kernels_abi() in scan_kernels.c: the argument lists below match it
_FUNCTIONS = [f"{name}_{sfx}" for sfx in _SUFFIX.values() for name in (
    "nl_s6_forward", "nl_s6_backward", "nl_lr_forward", "nl_lr_backward", "nl_rglru_forward", "nl_conv_forward",
    "nl_gated_rmsnorm", "nl_taylor2_forward")]


def _library():
    return checked_library("scan_kernels", _ABI, _FUNCTIONS)


def native_scan_available(dtype: torch.dtype = torch.float32) -> bool:
    """True when the native kernels are built and handle ``dtype``."""
    return dtype in _SUFFIX and _library() is not None


def _channel_ranges(Dch: int) -> list[tuple[int, int]]:
    """Split channels into at most ``torch.get_num_threads()`` ranges aligned to _BLOCK."""
    return even_ranges(Dch, _BLOCK)


def _run(kernel, make_args, ranges: list[tuple[int, int]]) -> None:
    """Call ``kernel(*make_args(i), d0, d1)`` for every channel range i, in parallel when several."""
    run_split(kernel, make_args, ranges, "native scan")


def _optional(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


class _NativeSelectiveScan(torch.autograd.Function):
    """(u, delta, A, Bmat, Cmat, D, z, initial_state; D, z, initial_state may be None)
    -> (y [B, T, Dch] with skip and gate applied, final state [B, Dch, N])."""

    @staticmethod
    def forward(ctx, u, delta, A, Bmat, Cmat, D, z, initial_state):
        Bsz, T, Dch = u.shape
        N = A.shape[1]
        u, delta, Bmat, Cmat = (t.contiguous() for t in (u, delta, Bmat, Cmat))
        D, (z, ldz) = _optional(D), _rows(z, Dch)  # z's rows may be a slice of in_proj(x): read in place
        At = A.t().contiguous()  # [N, Dch]
        h0 = (initial_state.transpose(1, 2).contiguous() if initial_state is not None
              else u.new_zeros(Bsz, N, Dch))  # [B, N, Dch]
        y = torch.empty_like(u)
        hs = u.new_empty(Bsz, -(-T // _CHECKPOINT) + 1, N, Dch)  # states every _CHECKPOINT steps + final
        kernel = getattr(_library(), f"nl_s6_forward_{_SUFFIX[u.dtype]}")
        args = [ptr(t) for t in (u, delta, At, Bmat, Cmat, D, z, h0, y, hs)] + int64s(Bsz, T, Dch, N, ldz,
                                                                                       _CHECKPOINT)
        _run(kernel, lambda i: args, _channel_ranges(Dch))
        ctx.save_for_backward(u, delta, At, Bmat, Cmat, D, z, hs)
        ctx.has_initial_state, ctx.ldz = initial_state is not None, ldz
        return y, hs[:, -1].transpose(1, 2).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_final):
        u, delta, At, Bmat, Cmat, D, z, hs = ctx.saved_tensors
        Bsz, T, Dch = u.shape
        N = At.shape[0]
        grad_y = grad_y.contiguous() if grad_y is not None else torch.zeros_like(u)
        g_final = grad_final.transpose(1, 2).contiguous() if grad_final is not None else None
        ranges = _channel_ranges(Dch)
        gu, g_delta = torch.empty_like(u), torch.empty_like(u)
        gA, g_h0 = u.new_empty(Bsz, N, Dch), u.new_empty(Bsz, N, Dch)
        gD = u.new_empty(Bsz, Dch) if D is not None else None
        gz = torch.empty_like(u) if z is not None else None
        gB = u.new_zeros(len(ranges), Bsz, T, N)  # per-range partial sums over channels
        gC = u.new_zeros(len(ranges), Bsz, T, N)
        kernel = getattr(_library(), f"nl_s6_backward_{_SUFFIX[u.dtype]}")
        shared = [ptr(t) for t in (u, delta, At, Bmat, Cmat, D, z, hs, grad_y, g_final, gu, g_delta, gA, gD, gz)]
        sizes = int64s(Bsz, T, Dch, N, ctx.ldz, _CHECKPOINT)
        _run(kernel, lambda i: shared + [ptr(gB[i]), ptr(gC[i]), ptr(g_h0)] + sizes, ranges)
        return (gu, g_delta, gA.sum(0).t(), gB.sum(0), gC.sum(0), gD.sum(0) if gD is not None else None, gz,
                g_h0.transpose(1, 2) if ctx.has_initial_state else None)


def _check_native_selective(u, delta, A, Bmat, Cmat, D, z, initial_state) -> None:
    """Shapes, as ``_check_selective`` plus the skip and gate the kernel fuses."""
    _check_selective(u, delta, A, Bmat, Cmat, initial_state)
    if D is not None and D.shape != (u.shape[2],):
        raise ValueError(f"D must be [Dch={u.shape[2]}]; got {tuple(D.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must be [B, T, Dch] = {tuple(u.shape)}; got {tuple(z.shape)}")


def _selective_refusal(u, delta, A, Bmat, Cmat, D, z, initial_state) -> Exception | None:
    """Why the native selective scan cannot run these inputs (the error to raise), or None."""
    if u.device.type != "cpu" or not native_scan_available(u.dtype):
        return RuntimeError(f"the native selective scan needs float32/float64 CPU tensors and a C compiler "
                            f"(got {u.dtype} on {u.device}); use nimblelm.ops.native_scan.selective_scan")
    tensors = [t for t in (u, delta, A, Bmat, Cmat, D, z, initial_state) if t is not None]
    if any(t.dtype != u.dtype for t in tensors):
        return ValueError(f"selective scan inputs must share one dtype; got {sorted({str(t.dtype) for t in tensors})}")
    if bool((A > 0).any()):
        return ValueError("the native selective scan needs A <= 0 (Mamba's A = -exp(A_log)); "
                          "use chunk_selective_scan for other A")
    return None


def _native_selective(u, delta, A, Bmat, Cmat, D, z, initial_state, output_final_state):
    """The kernel call, on inputs the callers have checked."""
    if u.shape[1] == 0:
        return chunk_selective_scan(u, delta, A, Bmat, Cmat, D, z, initial_state, output_final_state)
    y, final = _NativeSelectiveScan.apply(u, delta, A, Bmat, Cmat, D, z, initial_state)
    return y, (final if output_final_state else None)


def native_selective_scan(u, delta, A, Bmat, Cmat, D=None, z=None, initial_state=None, output_final_state=False,
                          chunk_size=None):
    """Selective scan through the native kernel; contract of :func:`naive_selective_scan`.

    u, delta, z: [B, T, Dch]; A: [Dch, N] (<= 0, as Mamba's ``-exp(A_log)``); Bmat, Cmat:
    [B, T, N]; D: [Dch]; initial_state: [B, Dch, N]. The skip ``D`` and the gate ``silu(z)``
    run inside the kernel. ``chunk_size`` is accepted for the chunked form's signature and
    unused. Raises RuntimeError when the kernel is unavailable for ``u.dtype`` (use
    :func:`selective_scan` to fall back automatically), ValueError for mixed dtypes or A > 0.
    """
    _check_native_selective(u, delta, A, Bmat, Cmat, D, z, initial_state)
    refusal = _selective_refusal(u, delta, A, Bmat, Cmat, D, z, initial_state)
    if refusal is not None:
        raise refusal
    return _native_selective(u, delta, A, Bmat, Cmat, D, z, initial_state, output_final_state)


def selective_scan(u, delta, A, Bmat, Cmat, D=None, z=None, initial_state=None, output_final_state=False,
                   chunk_size=64):
    """Fastest available selective scan: the native kernel on CPU when built (float32/float64,
    one dtype, A <= 0), else the chunked form."""
    if _selective_refusal(u, delta, A, Bmat, Cmat, D, z, initial_state) is None:
        _check_native_selective(u, delta, A, Bmat, Cmat, D, z, initial_state)
        return _native_selective(u, delta, A, Bmat, Cmat, D, z, initial_state, output_final_state)
    return chunk_selective_scan(u, delta, A, Bmat, Cmat, D, z, initial_state, output_final_state, chunk_size)


class _NativeLinearRecurrence(torch.autograd.Function):
    """(x, log_a, initial_state or None) -> (h [B, T, Dch], final state [B, Dch])."""

    @staticmethod
    def forward(ctx, x, log_a, initial_state):
        Bsz, T, Dch = x.shape
        x, log_a = x.contiguous(), log_a.contiguous()
        h0 = initial_state.contiguous() if initial_state is not None else x.new_zeros(Bsz, Dch)
        h = torch.empty_like(x)
        kernel = getattr(_library(), f"nl_lr_forward_{_SUFFIX[x.dtype]}")
        args = [ptr(t) for t in (x, log_a, h0, h)] + int64s(Bsz, T, Dch)
        _run(kernel, lambda i: args, _channel_ranges(Dch))
        ctx.save_for_backward(log_a, h0, h)
        ctx.has_initial_state = initial_state is not None
        return h, h[:, -1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h, grad_final):
        log_a, h0, h = ctx.saved_tensors
        Bsz, T, Dch = h.shape
        grad_h = grad_h.contiguous() if grad_h is not None else torch.zeros_like(h)
        g_final = grad_final.contiguous() if grad_final is not None else None
        gx, g_log_a, g_h0 = torch.empty_like(h), torch.empty_like(h), h.new_empty(Bsz, Dch)
        kernel = getattr(_library(), f"nl_lr_backward_{_SUFFIX[h.dtype]}")
        args = [ptr(t) for t in (log_a, h0, h, grad_h, g_final, gx, g_log_a, g_h0)] + int64s(Bsz, T, Dch)
        _run(kernel, lambda i: args, _channel_ranges(Dch))
        return gx, g_log_a, (g_h0 if ctx.has_initial_state else None)


def _recurrence_refusal(x, log_a, initial_state) -> Exception | None:
    """Why the native linear recurrence cannot run these inputs (the error to raise), or None."""
    if x.device.type != "cpu" or not native_scan_available(x.dtype):
        return RuntimeError(f"the native linear recurrence needs float32/float64 CPU tensors and a C compiler "
                            f"(got {x.dtype} on {x.device}); use nimblelm.ops.native_scan.linear_recurrence")
    if log_a.dtype != x.dtype or (initial_state is not None and initial_state.dtype != x.dtype):
        return ValueError("linear recurrence inputs must share one dtype")
    return None


def _native_recurrence(x, log_a, initial_state, output_final_state):
    """The kernel call, on inputs the callers have checked."""
    if x.shape[1] == 0:
        return scan_linear_recurrence(x, log_a, initial_state, output_final_state)
    h, final = _NativeLinearRecurrence.apply(x, log_a, initial_state)
    return h, (final if output_final_state else None)


def native_linear_recurrence(x, log_a, initial_state=None, output_final_state=False, chunk_size=None):
    """``h_t = exp(log_a_t) h_{t-1} + x_t`` through the native kernel; contract of ``naive_linear_recurrence``.

    x, log_a: [B, T, Dch] (log_a <= 0; -inf resets); initial_state: [B, Dch]. ``chunk_size``
    is accepted for the chunked form's signature and unused. Returns (h [B, T, Dch], final
    state [B, Dch] or None). Raises RuntimeError when the kernel is unavailable for ``x.dtype``.
    """
    _check_recurrence(x, log_a, initial_state)
    refusal = _recurrence_refusal(x, log_a, initial_state)
    if refusal is not None:
        raise refusal
    return _native_recurrence(x, log_a, initial_state, output_final_state)


def linear_recurrence(x, log_a, initial_state=None, output_final_state=False, chunk_size=64):
    """Fastest available linear recurrence: native kernel on CPU when built, else the chunked scan."""
    if _recurrence_refusal(x, log_a, initial_state) is None:
        _check_recurrence(x, log_a, initial_state)
        return _native_recurrence(x, log_a, initial_state, output_final_state)
    return scan_linear_recurrence(x, log_a, initial_state, output_final_state, chunk_size)


def native_rglru_forward(x, gate_x, gate_a, a_param, y_branch=None, c=8.0, reset=None, initial_state=None):
    """Inference-only fused RG-LRU interior: :func:`~nimblelm.ops.scan.rglru_gates`, the
    recurrence and ``h * gelu_tanh(y_branch)`` in one pass of the native kernel.

    x, gate_x, gate_a, y_branch: [B, T, Dch] (the conv branch, the two gate logits with their
    biases, the pre-activation output branch; ``y_branch=None`` returns h itself); a_param:
    [Dch]; reset: bool [B, T] (or broadcastable to it) or None; initial_state: [B, Dch] (zeros when None).
    Returns (out [B, T, Dch], final state [B, Dch]). There is no backward: raises RuntimeError
    when a gradient is wanted or the kernel is unavailable for ``x.dtype``.
    """
    refusal = _inference_refusal("native_rglru_forward", x, gate_x, gate_a, a_param, y_branch, initial_state)
    if refusal is not None:
        raise refusal
    Bsz, T, Dch = x.shape
    for name, t in (("gate_x", gate_x), ("gate_a", gate_a), ("y_branch", y_branch)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} must be [B, T, Dch] = {tuple(x.shape)}; got {tuple(t.shape)}")
    _check_recurrence(x, x, initial_state)
    x, gate_x, gate_a = x.contiguous(), gate_x.contiguous(), gate_a.contiguous()
    y_branch = _optional(y_branch)
    softplus = torch.nn.functional.softplus(a_param).contiguous()
    flags = reset.expand(Bsz, T).to(torch.uint8).contiguous() if reset is not None else None
    h0 = initial_state.contiguous() if initial_state is not None else x.new_zeros(Bsz, Dch)
    out, last = torch.empty_like(x), x.new_empty(Bsz, Dch)
    kernel = getattr(_library(), f"nl_rglru_forward_{_SUFFIX[x.dtype]}")
    real = ctypes.c_float if x.dtype == torch.float32 else ctypes.c_double
    args = [ptr(t) for t in (x, gate_x, gate_a, softplus, flags, h0, y_branch)] + [real(c), ptr(out), ptr(last)]
    args += int64s(Bsz, T, Dch)
    _run(kernel, lambda i: args, _channel_ranges(Dch))
    return out, last


def _inference_refusal(name: str, *tensors: torch.Tensor | None) -> Exception | None:
    """Why an inference-only kernel cannot run on these tensors (the error to raise), or None."""
    present = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return RuntimeError(f"{name} has no backward; training runs the PyTorch forms")
    first = present[0]
    if first.device.type != "cpu" or not native_scan_available(first.dtype) or any(
            t.dtype != first.dtype for t in present):
        return RuntimeError(f"{name} needs float32/float64 CPU tensors of one dtype and a C compiler "
                            f"(got {sorted({str(t.dtype) for t in present})} on {first.device})")
    return None


def native_inference_ok(*tensors: torch.Tensor | None) -> bool:
    """True when the inference-only kernels (:func:`native_rglru_forward`,
    :func:`native_conv1d_forward`) can run on these tensors: no gradient wanted, one dtype."""
    return _inference_refusal("", *tensors) is None


def native_conv1d_forward(x, weight, bias=None, activation=None, state=None):
    """Inference-only causal depthwise convolution in one native pass (no final state).

    x: [B, T, C]; weight: [C, K]; bias: [C] or None; activation: 'silu' / 'swish' or None;
    state: [B, C, K-1] (zeros when None), as :func:`~nimblelm.ops.short_conv.causal_conv1d`.
    Returns y [B, T, C]. Callers check :func:`native_inference_ok` first.
    """
    Bsz, T, C = x.shape
    K = weight.shape[1]
    x = x.contiguous()
    taps = weight.t().contiguous()  # [K, C]
    bias = _optional(bias)
    state_tm = state.transpose(1, 2).contiguous() if state is not None and K > 1 else None  # [B, K-1, C]
    y = torch.empty_like(x)
    kernel = getattr(_library(), f"nl_conv_forward_{_SUFFIX[x.dtype]}")
    args = [ptr(t) for t in (x, taps, bias, state_tm)] + int64s(int(activation is not None))
    args += [ptr(y)] + int64s(Bsz, T, C, K)
    _run(kernel, lambda i: args, _channel_ranges(C))
    return y


def _rows(t: torch.Tensor | None, C: int) -> tuple[torch.Tensor | None, int]:
    """``t`` [..., C] as rows [R, C] with contiguous channels (a view when possible: rows of a
    wider projection keep their stride) and that row stride."""
    if t is None:
        return None, 0
    rows = t.reshape(-1, C)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, rows.stride(0)


def native_gated_rmsnorm(o, weight, eps, group=None, z=None, gate_first=False, v=None, d_skip=None):
    """Inference-only gated RMSNorm in one native pass: per group of ``group`` channels (all C
    when None), ``p = o + d_skip * v`` (optional; one D per block of C // len(d_skip) channels,
    Mamba-2's per-head skip), then ``rms_norm(p * silu(z)) * weight`` (``gate_first``, Mamba-2)
    or ``rms_norm(p) * weight * silu(z)`` (DeltaNet / GLA head norms; z optional).

    o, z, v: [..., C] (rows may be strided views of a wider projection); weight: [group] (the
    same for every group) or [C]. Returns out [..., C], contiguous. Callers check
    :func:`native_inference_ok` first.
    """
    C = o.shape[-1]
    group = C if group is None else group
    if C % group or weight.numel() not in (group, C):
        raise ValueError(f"group {group} must divide C={C} and weight must have {group} or {C} entries")
    if v is not None and (d_skip is None or C % d_skip.numel() or group % (C // d_skip.numel())):
        raise ValueError("v needs d_skip, with one entry per block of channels that divides the group")
    period = group if v is None else C // d_skip.numel()  # the kernel walks each group in blocks of it
    (o2, o_stride), (v2, v_stride), (z2, z_stride) = _rows(o, C), _rows(v, C), _rows(z, C)
    out = o.new_empty(o2.shape[0], C)
    kernel = getattr(_library(), f"nl_gated_rmsnorm_{_SUFFIX[o.dtype]}")
    real = ctypes.c_float if o.dtype == torch.float32 else ctypes.c_double
    args = [ptr(o2), ctypes.c_int64(o_stride), ptr(v2), ctypes.c_int64(v_stride), ptr(_optional(d_skip)),
            ctypes.c_int64(period), ptr(z2), ctypes.c_int64(z_stride), ptr(weight.contiguous()),
            ctypes.c_int64(int(weight.numel() == group)), real(eps), ctypes.c_int64(int(gate_first)), ptr(out)]
    args += int64s(C, group)
    run_split(kernel, lambda i: args, even_ranges(out.shape[0]), "gated rmsnorm")
    return out.view(o.shape)


def native_taylor2_forward(x: torch.Tensor) -> torch.Tensor:
    """Inference-only :func:`~nimblelm.ops.feature_maps.taylor_second_order` in one native
    pass: x [..., D] -> [..., 1 + D + D(D+1)/2]. Callers check :func:`native_inference_ok`."""
    D = x.shape[-1]
    rows = x.reshape(-1, D).contiguous()
    out = rows.new_empty(rows.shape[0], 1 + D + D * (D + 1) // 2)
    if rows.shape[0] == 0:
        return out.view(*x.shape[:-1], out.shape[-1])
    kernel = getattr(_library(), f"nl_taylor2_forward_{_SUFFIX[x.dtype]}")
    args = [ptr(rows), ptr(out)] + int64s(D)
    run_split(kernel, lambda i: args, even_ranges(rows.shape[0]), "taylor2 feature map")
    return out.view(*x.shape[:-1], out.shape[-1])
