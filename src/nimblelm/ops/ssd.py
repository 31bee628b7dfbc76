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
``chunk_gla``. Layouts stay [.., time, group, heads * P]: no head-major permutes of x.

Shapes: x [B, T, H, P]; dt [B, T, H] (> 0, after softplus); A [H] (< 0); Bm, Cm
[B, T, G, N]; state [B, H, N, P]. Returns (y [B, T, H, P], final state or None).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .gla import naive_gla

_SAFE_SPAN = 80.0  # widest in-chunk log-decay span scored with the factored form
_CLAMP = 44.0


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
    xdt = _pad_chunks(x * dt[..., None], Nc, L)  # [Bz,Nc,L,H,P]
    b = _pad_chunks(dt * A, Nc, L).cumsum(2)  # [Bz,Nc,L,H] cumulative log-decay inside each chunk
    Bc = _pad_chunks(Bm, Nc, L).transpose(2, 3)  # [Bz,Nc,G,L,N]
    Cc = _pad_chunks(Cm, Nc, L).transpose(2, 3)  # [Bz,Nc,G,L,N]

    def wide(t: Tensor) -> Tensor:  # [Bz,Nc,L,H,P] -> [Bz,Nc,G,L,Hg*P] (heads of a group as columns)
        return t.reshape(Bz, Nc, L, G, Hg * P).transpose(2, 3)

    def heads(t: Tensor) -> Tensor:  # inverse of wide
        return t.transpose(2, 3).reshape(Bz, Nc, L, H, P)

    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    scores = (Cc @ Bc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [Bz,Nc,G,L,L] C_t . B_s, s <= t
    first, last = b[:, :, :1], b[:, :, -1:]  # [Bz,Nc,1,H]; b decreases along the chunk
    r = ((first + last) / 2).detach()  # cancels exactly: no gradient through it
    u = (b - r).clamp(-_CLAMP, _CLAMP).exp()  # [Bz,Nc,L,H]
    w = (r - b).clamp(-_CLAMP, _CLAMP).exp()
    y = heads(scores @ wide(xdt * w[..., None])) * u[..., None]  # [Bz,Nc,L,H,P] intra-chunk part
    span = (first - last)[:, :, 0]  # [Bz,Nc,H]
    too_wide = span.detach() > _SAFE_SPAN
    if bool(too_wide.any()):
        y = _exact_intra(y, scores, xdt, b, too_wide, Hg)

    # each chunk's own contribution to the state at its end, and the carry across chunks
    to_end = (last - b).exp()  # [Bz,Nc,L,H] (<= 1)
    U = Bc.transpose(-1, -2) @ wide(xdt * to_end[..., None])  # [Bz,Nc,G,N,Hg*P]
    chunk_decay = last[:, :, 0].exp()  # [Bz,Nc,H]
    S0 = initial_state if initial_state is not None else x.new_zeros(Bz, H, N, P)
    S = S0.view(Bz, G, Hg, N, P).transpose(2, 3).reshape(Bz, G, N, Hg * P)  # [Bz,G,N,Hg*P]
    decay_cols = chunk_decay.view(Bz, Nc, G, 1, Hg, 1).expand(Bz, Nc, G, 1, Hg, P).reshape(Bz, Nc, G, 1, Hg * P)
    starts = []
    for n in range(Nc):
        starts.append(S)
        S = torch.addcmul(U[:, n], decay_cols[:, n], S)
    S_start = torch.stack(starts, dim=1)  # [Bz,Nc,G,N,Hg*P] state entering each chunk
    y = torch.addcmul(y, heads(Cc @ S_start), b.exp()[..., None])  # inter-chunk part
    y = y.reshape(Bz, Nc * L, H, P)[:, :T]
    final = S.view(Bz, G, N, Hg, P).transpose(2, 3).reshape(Bz, H, N, P) if output_final_state else None
    return y, final


def _exact_intra(y: Tensor, scores: Tensor, xdt: Tensor, b: Tensor, too_wide: Tensor, Hg: int) -> Tensor:
    """Recompute the intra-chunk part of the (batch, chunk, head) triples in ``too_wide``
    with exact pairwise decays exp(b_t - b_s) (exponents <= 0 where used)."""
    bi, ni, hi = too_wide.nonzero(as_tuple=True)
    L = b.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool, device=b.device).tril()
    bw = b[bi, ni, :, hi]  # [n, L]
    diff = (bw[:, :, None] - bw[:, None, :]).masked_fill(~causal, -math.inf)
    exact = (scores[bi, ni, hi // Hg] * diff.clamp_max(0.0).exp()) @ xdt[bi, ni, :, hi]  # [n, L, P]
    y = y.clone()
    y[bi, ni, :, hi] = exact
    return y


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
