"""Diagonal state-space scans: Mamba's selective scan (S6) and the RG-LRU linear recurrence.

Both are diagonal linear recurrences ``h_t = a_t * h_{t-1} + x_t`` with ``0 <= a_t <= 1``:

* Mamba (S6): ``a_t = exp(delta_t * A)`` and ``x_t = delta_t * B_t * u_t`` per (channel, state)
  pair, read out with ``y_t = C_t . h_t + D * u_t``, then ``y_t *= silu(z_t)``.
* Hawk / Griffin RG-LRU: ``a_t = exp(log_a_t)`` per channel, read out as ``h_t`` itself.

Each family has three forms with one signature: a naive loop over time (the oracle), a chunked
form for prefill / training and a one-token step for decoding.

The chunked form splits time into chunks of ``chunk_size`` steps and works in three stages:

1. *local ends*: the recurrence runs from a zero state inside every chunk but the last, all
   chunks at once (a loop over the ``L`` positions of a chunk, each step one tensor op over
   all chunks); only the state each chunk ends in is kept;
2. *carry*: a loop over chunks, ``start_{c+1} = exp(sum_chunk_c log a) * start_c + end_c``,
   with the chunk's total log-decay (a sum of ``log a <= 0``);
3. *rerun*: the recurrence runs again inside every chunk at once, now from the chunk's true
   start state, and produces the outputs and the final state.

Only exponentials of non-positive numbers appear, so nothing can overflow and ``log a = -inf``
(a hard reset, ``a = 0``) is allowed; inside a chunk the arithmetic is the naive loop's. The
Python loops run ``2 L + T / L`` times instead of ``T``, each op over all chunks at once. A
parallel in-chunk form is slower on CPU: the Mamba decay differs per (channel, state) pair,
so the pairwise in-chunk decays ``exp(cs_t - cs_s)`` would hold ``T * L * Dch * N`` numbers,
and the factored form ``exp(cs_t) * exp(-cs_s)`` (a matmul) overflows for strong decays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MAX_SQRT_GRADIENT = 1000.0  # gradient clip of the RG-LRU input normaliser (as in Griffin)


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad dimension 1 (time) of ``t`` at the end by ``pad`` steps."""
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[1] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=1)


def _chunk_layout(T: int, chunk_size: int) -> tuple[int, int, int]:
    """Return (L, n_chunks, pad) for splitting ``T`` steps into chunks of at most ``chunk_size``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    L = max(1, min(chunk_size, T))
    n_chunks = max(1, -(-T // L))  # T = 0 still gets one (all-padding) chunk
    return L, n_chunks, n_chunks * L - T


def _carry_states(chunk_decay: torch.Tensor, local_end: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Carry states across chunks.

    chunk_decay, local_end: [B, C-1, ...] (decay over each chunk but the last, and the state
    it ends in from a zero start); first: [B, ...] state entering chunk 0.
    Returns starts [B, C, ...], the state entering each chunk.
    """
    state, starts = first, [first]
    # unbind (not indexing) so that backward is one stack, not one full-size zero tensor per step
    for end_c, decay_c in zip(local_end.unbind(1), chunk_decay.unbind(1)):
        state = torch.addcmul(end_c, decay_c, state)
        starts.append(state)
    return torch.stack(starts, dim=1)


# --------------------------------------------------------------------------------------------
# Mamba (S6) selective scan
# --------------------------------------------------------------------------------------------


def _check_selective(u, delta, A, Bmat, Cmat, state) -> None:
    """Raise ValueError when the selective-scan inputs do not have consistent shapes."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be [B, T, Dch]; got {tuple(u.shape)}, {tuple(delta.shape)}")
    Bsz, T, Dch = u.shape
    if A.dim() != 2 or A.shape[0] != Dch:
        raise ValueError(f"A must be [Dch={Dch}, N]; got {tuple(A.shape)}")
    if Bmat.shape != (Bsz, T, A.shape[1]) or Cmat.shape != Bmat.shape:
        raise ValueError(
            f"Bmat and Cmat must be [B, T, N] = {(Bsz, T, A.shape[1])}; got {tuple(Bmat.shape)}, {tuple(Cmat.shape)}"
        )
    if state is not None and state.shape != (Bsz, Dch, A.shape[1]):
        raise ValueError(f"state must be [B, Dch, N] = {(Bsz, Dch, A.shape[1])}; got {tuple(state.shape)}")


def _skip_and_gate(y, u, D, z):
    """Apply the skip ``y + D * u`` and the gate ``y * silu(z)`` (each when given)."""
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * F.silu(z)
    return y


def _selective_step(h, u_t, delta_t, A, B_t, C_t):
    """One S6 step. h: [B, Dch, N]; u_t, delta_t: [B, Dch]; B_t, C_t: [B, N]. Returns (y_t [B, Dch], h)."""
    decay = torch.exp(delta_t[:, :, None] * A)  # [B, Dch, N]
    h = decay * h + (delta_t * u_t)[:, :, None] * B_t[:, None, :]
    y_t = torch.einsum("bdn,bn->bd", h, C_t)
    return y_t, h


def naive_selective_scan(
    u, delta, A, Bmat, Cmat, D=None, z=None, initial_state=None, output_final_state=False
):
    """Mamba selective scan as a plain loop over time (the oracle).

    u, delta, z: [B, T, Dch] (delta > 0, already softplus'ed); A: [Dch, N] (negative);
    Bmat, Cmat: [B, T, N]; D: [Dch]; initial_state: [B, Dch, N] (zeros when None).
    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = (C_t . h_t + D u_t) * silu(z_t)``.
    Returns (y [B, T, Dch], final state [B, Dch, N] or None).
    """
    _check_selective(u, delta, A, Bmat, Cmat, initial_state)
    Bsz, _, Dch = u.shape
    h = initial_state if initial_state is not None else u.new_zeros(Bsz, Dch, A.shape[1])
    ys = []
    for u_t, delta_t, B_t, C_t in zip(u.unbind(1), delta.unbind(1), Bmat.unbind(1), Cmat.unbind(1)):
        y_t, h = _selective_step(h, u_t, delta_t, A, B_t, C_t)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(Bsz, 0, Dch)
    return _skip_and_gate(y, u, D, z), (h if output_final_state else None)


def step_selective_scan(u, delta, A, Bmat, Cmat, D=None, z=None, state=None):
    """One decoding step of the selective scan.

    u, delta, z: [B, 1, Dch]; Bmat, Cmat: [B, 1, N]; A: [Dch, N]; D: [Dch];
    state: [B, Dch, N] (zeros when None). Returns (y [B, 1, Dch], new state [B, Dch, N]).
    """
    if u.dim() != 3 or u.shape[1] != 1:
        raise ValueError(f"step_selective_scan takes one token: u must be [B, 1, Dch], got {tuple(u.shape)}")
    _check_selective(u, delta, A, Bmat, Cmat, state)
    h = state if state is not None else u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    y_t, h = _selective_step(h, u[:, 0], delta[:, 0], A, Bmat[:, 0], Cmat[:, 0])
    return _skip_and_gate(y_t[:, None], u, D, z), h


def _selective_chunks(dv, xv, A, Bv, Cv, h0, with_output):
    """The S6 recurrence inside every chunk at once, each chunk from its own start state.

    dv, xv (= delta * u): [B, C, L, Dch]; A: [Dch, N]; Bv, Cv: [B, C, L, N];
    h0: [B, C, Dch, N]. Returns (outputs [B, C, L, Dch] or None, end states [B, C, Dch, N]).
    """
    h, ys = h0, []
    for d_j, x_j, B_j, C_j in zip(dv.unbind(2), xv.unbind(2), Bv.unbind(2), Cv.unbind(2)):
        decay = torch.exp(d_j[..., None] * A)  # [B, C, Dch, N]
        h = torch.addcmul(x_j[..., None] * B_j[:, :, None, :], decay, h)
        if with_output:
            ys.append(torch.einsum("bcdn,bcn->bcd", h, C_j))
    return (torch.stack(ys, dim=2) if with_output else None), h


def chunk_selective_scan(
    u, delta, A, Bmat, Cmat, D=None, z=None, initial_state=None, output_final_state=False, chunk_size=64
):
    """Chunked selective scan: same contract and result as :func:`naive_selective_scan`.

    Chunk-local end states, carry across chunks with ``exp(A * sum_chunk(delta))``, then a
    rerun of every chunk from its true start state (module doc). ``chunk_size``: steps per
    chunk. Returns (y [B, T, Dch], final state [B, Dch, N] or None).
    """
    _check_selective(u, delta, A, Bmat, Cmat, initial_state)
    Bsz, T, Dch = u.shape
    N = A.shape[1]
    L, n_chunks, pad = _chunk_layout(T, chunk_size)
    # zero padding: delta = 0 gives decay 1 and input 0, so the state passes through unchanged
    dv = _pad_time(delta, pad).reshape(Bsz, n_chunks, L, Dch)  # [B, C, L, Dch]
    xv = _pad_time(delta * u, pad).reshape(Bsz, n_chunks, L, Dch)  # [B, C, L, Dch]
    Bv = _pad_time(Bmat, pad).reshape(Bsz, n_chunks, L, N)  # [B, C, L, N]
    Cv = _pad_time(Cmat, pad).reshape(Bsz, n_chunks, L, N)  # [B, C, L, N]
    first = initial_state if initial_state is not None else u.new_zeros(Bsz, Dch, N)
    if n_chunks > 1:
        zeros = u.new_zeros(Bsz, n_chunks - 1, Dch, N)
        _, local_end = _selective_chunks(dv[:, :-1], xv[:, :-1], A, Bv[:, :-1], Cv[:, :-1], zeros, False)
        chunk_decay = torch.exp(dv[:, :-1].sum(dim=2)[..., None] * A)  # [B, C-1, Dch, N]
        starts = _carry_states(chunk_decay, local_end, first)  # [B, C, Dch, N]
    else:
        starts = first[:, None]  # [B, 1, Dch, N]
    y, ends = _selective_chunks(dv, xv, A, Bv, Cv, starts, True)
    y = y.reshape(Bsz, n_chunks * L, Dch)[:, :T]  # [B, T, Dch]
    return _skip_and_gate(y, u, D, z), (ends[:, -1] if output_final_state else None)


# --------------------------------------------------------------------------------------------
# RG-LRU (Hawk / Griffin) diagonal linear recurrence
# --------------------------------------------------------------------------------------------


def _check_recurrence(x, log_a, state) -> None:
    """Raise ValueError when the linear-recurrence inputs do not have consistent shapes."""
    if x.dim() != 3 or log_a.shape != x.shape:
        raise ValueError(f"x and log_a must both be [B, T, Dch]; got {tuple(x.shape)}, {tuple(log_a.shape)}")
    if state is not None and state.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"state must be [B, Dch] = {(x.shape[0], x.shape[2])}; got {tuple(state.shape)}")


def naive_linear_recurrence(x, log_a, initial_state=None, output_final_state=False):
    """``h_t = exp(log_a_t) * h_{t-1} + x_t`` elementwise, as a plain loop (the oracle).

    x, log_a: [B, T, Dch] (log_a <= 0; -inf resets the state); initial_state: [B, Dch]
    (zeros when None). Returns (h [B, T, Dch], final state [B, Dch] or None).
    """
    _check_recurrence(x, log_a, initial_state)
    h = initial_state if initial_state is not None else x.new_zeros(x.shape[0], x.shape[2])
    hs = []
    for x_t, log_a_t in zip(x.unbind(1), log_a.unbind(1)):
        h = torch.exp(log_a_t) * h + x_t
        hs.append(h)
    out = torch.stack(hs, dim=1) if hs else x.new_zeros(x.shape)
    return out, (h if output_final_state else None)


def step_linear_recurrence(x, log_a, state=None):
    """One decoding step. x, log_a: [B, 1, Dch]; state: [B, Dch] (zeros when None).

    Returns (h [B, 1, Dch], new state [B, Dch]).
    """
    if x.dim() != 3 or x.shape[1] != 1:
        raise ValueError(f"step_linear_recurrence takes one token: x must be [B, 1, Dch], got {tuple(x.shape)}")
    _check_recurrence(x, log_a, state)
    h = torch.exp(log_a[:, 0]) * state + x[:, 0] if state is not None else x[:, 0]
    return h[:, None], h


def _recurrence_chunks(decay, xv, h0, with_output):
    """``h = a * h + x`` inside every chunk at once, each chunk from its own start state.

    decay, xv: [B, C, L, Dch]; h0: [B, C, Dch].
    Returns (states [B, C, L, Dch] or None, end states [B, C, Dch]).
    """
    h, hs = h0, []
    for x_j, a_j in zip(xv.unbind(2), decay.unbind(2)):
        h = torch.addcmul(x_j, a_j, h)
        if with_output:
            hs.append(h)
    return (torch.stack(hs, dim=2) if with_output else None), h


def scan_linear_recurrence(x, log_a, initial_state=None, output_final_state=False, chunk_size=64):
    """Chunked linear recurrence: same contract and result as :func:`naive_linear_recurrence`.

    Chunk-local end states, carry across chunks with ``exp(sum_chunk(log_a))``, then a rerun
    of every chunk from its true start state (module doc). ``chunk_size``: steps per chunk.
    Returns (h [B, T, Dch], final state [B, Dch] or None).
    """
    _check_recurrence(x, log_a, initial_state)
    Bsz, T, Dch = x.shape
    L, n_chunks, pad = _chunk_layout(T, chunk_size)
    # zero padding: log_a = 0 gives decay 1 and input 0, so the state passes through unchanged
    lv = _pad_time(log_a, pad).reshape(Bsz, n_chunks, L, Dch)  # [B, C, L, Dch]
    xv = _pad_time(x, pad).reshape(Bsz, n_chunks, L, Dch)  # [B, C, L, Dch]
    decay = torch.exp(lv)
    first = initial_state if initial_state is not None else x.new_zeros(Bsz, Dch)
    if n_chunks > 1:
        zeros = x.new_zeros(Bsz, n_chunks - 1, Dch)
        _, local_end = _recurrence_chunks(decay[:, :-1], xv[:, :-1], zeros, False)
        chunk_decay = torch.exp(lv[:, :-1].sum(dim=2))  # [B, C-1, Dch]
        starts = _carry_states(chunk_decay, local_end, first)  # [B, C, Dch]
    else:
        starts = first[:, None]  # [B, 1, Dch]
    out, ends = _recurrence_chunks(decay, xv, starts, True)
    out = out.reshape(Bsz, n_chunks * L, Dch)[:, :T]  # [B, T, Dch]
    return out, (ends[:, -1] if output_final_state else None)


class _SqrtBoundDerivative(torch.autograd.Function):
    """``sqrt(x)`` whose gradient is ``g / sqrt(max(4x, 1 / 1000**2))`` (at most ``1000 g``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output / torch.sqrt(torch.clamp(4.0 * x, min=1.0 / _MAX_SQRT_GRADIENT**2))


def rglru_gates(x, gate_x, gate_a, a_param, c=8.0, reset=None):
    """Griffin's RG-LRU gate math, as in transformers' ``RecurrentGemmaRglru.forward``.

    x: [B, T, Dch] (the conv branch); gate_x, gate_a: [B, T, Dch] pre-sigmoid logits of the
    input gate and the recurrence gate (the layer's block-diagonal linear maps of x, bias
    included); a_param: [Dch] (Lambda, ``recurrent_param``); reset: optional bool [B, T], True
    where a sequence starts (transformers uses ``position_ids == 0``). Computes, in order:

    * ``i_t = sigmoid(gate_x)``, ``r_t = sigmoid(gate_a)``;
    * ``log_a = (-c * r_t) * softplus(a_param)``, i.e. ``a_t = a^(c r_t)`` with
      ``a = exp(-softplus(a_param)) = sigmoid(-a_param)`` (c = 8);
    * ``a_t^2`` as ``exp(2 * log_a)`` (not ``a_t * a_t``), multiplier ``sqrt(1 - a_t^2)``
      whose backward is clipped to at most ``1000 * grad`` (``SqrtBoundDerivative``);
    * at reset positions the multiplier is 1 (the input is not normalised) and the recurrence
      gate is 0: there ``log_a = -inf`` so the previous state is dropped;
    * ``normalized_x = (x * i_t) * multiplier``.

    Pass ``reset`` for parity with transformers: without it the first token of a fresh sequence
    is scaled by ``sqrt(1 - a_t^2)`` too. transformers accumulates the scan in float32 whatever
    the input dtype; here every step stays in the input dtype (float32 or float64).

    Returns (normalized_x [B, T, Dch], log_a [B, T, Dch]) for :func:`scan_linear_recurrence`.
    """
    input_gate = torch.sigmoid(gate_x)
    recurrence_gate = torch.sigmoid(gate_a)
    log_a = -c * recurrence_gate * F.softplus(a_param)
    a_square = torch.exp(2 * log_a)
    multiplier = _SqrtBoundDerivative.apply(1 - a_square)
    if reset is not None:
        at_reset = reset[:, :, None]  # [B, T, 1]
        multiplier = torch.where(at_reset, torch.ones_like(multiplier), multiplier)
        log_a = log_a.masked_fill(at_reset, float("-inf"))
    return (x * input_gate) * multiplier, log_a
