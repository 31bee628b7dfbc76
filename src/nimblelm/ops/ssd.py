"""Mamba-2's state-space duality (SSD) with grouped B and C, chunkwise, for prefill.

Per head h (in group g = h // (H / G)), with a_t = dt_t A_h (log-decay <= 0):

    S_t = exp(a_t) S_{t-1} + (dt_t B_t)^T x_t         S [N, P]
    y_t = C_t S_t

This is :func:`nimblelm.ops.gla.chunk_gla` with q = C, k = dt * B, v = x, g = dt * A and
scale 1 (``naive_gla`` on those inputs is the oracle), but computed the way the SSD paper
intends: B and C are shared by all heads of a group, so the chunk's score matrix C B^T is
formed once per group, not per head, and every head of the group rides along as extra
columns of ONE matmul. Inside a chunk with cumulative log-decay b (b_t = sum of a up to t),

    y_t = exp(b_t - r) * sum_{s <= t} (C_t . B_s) * [exp(r - b_s) dt_s x_s]     (intra)
        + exp(b_t) * C_t S_start                                                (inter)

with a per-(chunk, head) reference r halfway along b, so both factors stay within e^(+-40)
when the chunk's decay span is at most 80 (the usual case). Chunks with a wider span
(strong decay) are recomputed with the exact pairwise decays exp(b_t - b_s), as in
``chunk_gla``. Layouts stay [.., group, time, heads * P]: the scaled copies of x are made
in that layout directly, and without autograd the chunk states and the output are written
into preallocated buffers (``out=``), the output straight into [B, T, H, P].

Shapes: x [B, T, H, P]; dt [B, T, H] (> 0, after softplus); A [H] (< 0); Bm, Cm
[B, T, G, N]; state [B, H, N, P]. Returns (y [B, T, H, P], final state or None).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .gla import FACTOR_CLAMP, SAFE_SPAN, exp_decay, naive_gla, needs_autograd


def _check(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [B, T, H, P], got {tuple(x.shape)}")
    Bz, T, H, P = x.shape
    if dt.shape != (Bz, T, H) or A.shape != (H,):
        raise ValueError(f"dt must be [B, T, H] = {(Bz, T, H)} and A [H]; got {tuple(dt.shape)}, {tuple(A.shape)}")
    if Bm.dim() != 4 or Bm.shape[:2] != (Bz, T) or Cm.shape != Bm.shape or H % Bm.shape[2]:
        raise ValueError(f"Bm and Cm must be [B, T, G, N] with G dividing H = {H}; "
                         f"got {tuple(Bm.shape)}, {tuple(Cm.shape)}")
    if state is not None and state.shape != (Bz, H, Bm.shape[3], P):
        raise ValueError(f"state must be [B, H, N, P] = {(Bz, H, Bm.shape[3], P)}, got {tuple(state.shape)}")


def _pad_chunks(t: Tensor, Nc: int, L: int) -> Tensor:
    """Zero-pad dim 1 (time) to Nc * L and split it into [.., Nc, L, ..]."""
    pad = Nc * L - t.shape[1]
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.unflatten(1, (Nc, L))


def chunk_ssd(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, initial_state: Tensor | None = None,
              output_final_state: bool = False, chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """Chunkwise SSD (module doc). Zero padding is inert (dt = 0: decay 1, no input)."""
    _check(x, dt, A, Bm, Cm, initial_state)
    Bz, T, H, P = x.shape
    G, N = Bm.shape[2], Bm.shape[3]
    Hg = H // G
    L = max(1, min(chunk_size, T))
    Nc = max(1, math.ceil(T / L))
    # without autograd, results are written straight into preallocated buffers (out=)
    in_place = not needs_autograd(x, dt, A, Bm, Cm, initial_state)

    def wide(t: Tensor) -> Tensor:  # [Bz,Nc,L,H(,1 or P)] -> view [Bz,Nc,G,L,Hg,(1 or P)]
        t = t.view(Bz, Nc, L, G, Hg, -1) if t.dim() == 5 else t.view(Bz, Nc, L, G, Hg, 1)
        return t.transpose(2, 3)

    # the scaled inputs in the wide layout [Bz,Nc,G,L,Hg,P], contiguous: the heads of a group
    # are the columns of one matmul. Per-(time, head) factors are [.., L, Hg, 1] broadcasts.
    x_pad = wide(_pad_chunks(x, Nc, L))
    dt_pad = wide(_pad_chunks(dt, Nc, L))
    b = wide(_pad_chunks(dt * A, Nc, L).cumsum(2))  # [Bz,Nc,G,L,Hg,1] cumulative log-decay inside each chunk
    Bc = _pad_chunks(Bm, Nc, L).transpose(2, 3)  # [Bz,Nc,G,L,N]
    Cc = _pad_chunks(Cm, Nc, L).transpose(2, 3)  # [Bz,Nc,G,L,N]

    def scaled_x(factor: Tensor) -> Tensor:  # x * factor [Bz,Nc,G,L,Hg,1] as contiguous [Bz,Nc,G,L,Hg*P]
        out = torch.empty(Bz, Nc, G, L, Hg, P, dtype=x.dtype, device=x.device)
        out = torch.mul(x_pad, factor, out=out) if in_place else out.copy_(x_pad * factor)
        return out.view(Bz, Nc, G, L, Hg * P)

    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    scores = (Cc @ Bc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [Bz,Nc,G,L,L] C_t . B_s, s <= t
    first, last = b[:, :, :, :1], b[:, :, :, -1:]  # [Bz,Nc,G,1,Hg,1]; b decreases along the chunk
    r = ((first + last) / 2).detach()  # cancels exactly: no gradient through it
    u = (b - r).clamp(-FACTOR_CLAMP, FACTOR_CLAMP).exp()  # [Bz,Nc,G,L,Hg,1]
    w = (r - b).clamp(-FACTOR_CLAMP, FACTOR_CLAMP).exp()
    shape6 = (Bz, Nc, G, L, Hg, P)
    intra = (scores @ scaled_x(dt_pad * w)).view(shape6).mul_(u)  # [Bz,Nc,G,L,Hg,P] intra-chunk part
    too_wide = (first - last).detach() > SAFE_SPAN  # [Bz,Nc,G,1,Hg,1]
    if bool(too_wide.any()):
        intra = _exact_intra(intra, scores, x_pad, dt_pad, b, too_wide)

    # each chunk's own contribution to the state at its end, and the carry across chunks
    U = Bc.transpose(-1, -2) @ scaled_x(dt_pad * exp_decay(last - b))  # [Bz,Nc,G,N,Hg*P]
    decay = exp_decay(last).expand(Bz, Nc, G, 1, Hg, P).reshape(Bz, Nc, G, 1, Hg * P)  # [Bz,Nc,G,1,Hg*P]
    S0 = initial_state if initial_state is not None else x.new_zeros(Bz, H, N, P)
    S = S0.view(Bz, G, Hg, N, P).transpose(2, 3).reshape(Bz, G, N, Hg * P)  # [Bz,G,N,Hg*P]
    if in_place:  # [Nc+1, Bz,G,N,Hg*P]: the state entering chunk n at n, the final state last
        states = torch.empty(Nc + 1, Bz, G, N, Hg * P, dtype=U.dtype, device=U.device)
        states[0] = S
        for n in range(Nc):
            torch.addcmul(U[:, n], decay[:, n], states[n], out=states[n + 1])
        S, S_start = states[Nc], states[:Nc].transpose(0, 1)
    else:
        starts = []
        for n in range(Nc):
            starts.append(S)
            S = torch.addcmul(U[:, n], decay[:, n], S)
        S_start = torch.stack(starts, dim=1)  # [Bz,Nc,G,N,Hg*P] state entering each chunk
    inter = (Cc @ S_start).view(shape6)  # [Bz,Nc,G,L,Hg,P]
    if in_place:  # y = intra + e^b * inter, written straight into the [B, T, H, P] layout
        y = torch.empty(Bz, Nc, L, G, Hg, P, dtype=x.dtype, device=x.device)
        torch.addcmul(intra, inter, exp_decay(b), out=y.transpose(2, 3))
    else:
        y = torch.addcmul(intra, inter, exp_decay(b)).transpose(2, 3)
    y = y.reshape(Bz, Nc * L, H, P)[:, :T]
    final = None
    if output_final_state:  # one copy into a fresh [Bz,H,N,P]: a view would keep the chunk-state buffer alive
        final = S.new_empty(Bz, H, N, P)
        final.view(Bz, G, Hg, N, P).copy_(S.view(Bz, G, N, Hg, P).transpose(2, 3))
    return y, final


def _exact_intra(intra: Tensor, scores: Tensor, x: Tensor, dt: Tensor, b: Tensor, too_wide: Tensor) -> Tensor:
    """Recompute the intra-chunk part of the (batch, chunk, group, head) cells in ``too_wide``
    [Bz,Nc,G,1,Hg,1] with exact pairwise decays exp(b_t - b_s) (exponents <= 0 where used).
    intra, x [Bz,Nc,G,L,Hg,P]; scores [Bz,Nc,G,L,L]; dt, b [Bz,Nc,G,L,Hg,1]."""
    bi, ni, gi, _, hi, _ = too_wide.nonzero(as_tuple=True)
    L = b.shape[3]
    causal = torch.ones(L, L, dtype=torch.bool, device=b.device).tril()
    bw = b[bi, ni, gi, :, hi, 0]  # [n, L]
    decays = exp_decay(bw[:, :, None] - bw[:, None, :], causal)  # [n, L, L] exp(b_t - b_s), 0 above
    xdt = x[bi, ni, gi, :, hi] * dt[bi, ni, gi, :, hi]  # [n, L, P]
    exact = (scores[bi, ni, gi] * decays) @ xdt  # [n, L, P]
    intra = intra.clone()
    intra[bi, ni, gi, :, hi] = exact
    return intra


def naive_ssd(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, initial_state: Tensor | None = None,
              output_final_state: bool = False) -> tuple[Tensor, Tensor | None]:
    """The oracle: :func:`nimblelm.ops.gla.naive_gla` (a loop over time) on the equivalent
    gated-linear-attention inputs, B and C repeated for every head of their group."""
    _check(x, dt, A, Bm, Cm, initial_state)
    per_group = x.shape[2] // Bm.shape[2]
    q = Cm.repeat_interleave(per_group, dim=2)  # [B,T,H,N]
    k = Bm.repeat_interleave(per_group, dim=2) * dt[..., None]
    return naive_gla(q, k, x, g=dt * A, scale=1.0, initial_state=initial_state,
                     output_final_state=output_final_state)
