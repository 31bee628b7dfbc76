"""Delta rule (DeltaNet) and gated delta rule (Gated DeltaNet).

Recurrence per head, with the state S of shape [Dk, Dv]:

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
    o_t = scale * S_t^T q_t

a_t = exp(g_t) is the optional decay (gated DeltaNet; g=None means a_t = 1, plain
DeltaNet) and b_t = beta_t in (0, 1) the writing strength. q and k are expected to be
L2-normalised by the caller. scale defaults to Dk ** -0.5 (applied to the output, i.e.
to q, exactly as flash-linear-attention does).

Shapes: q, k [B, T, H, Dk]; v [B, T, H, Dv]; beta, g [B, T, H]; state [B, H, Dk, Dv].

Forms: `naive_delta_rule` (loop over time, the oracle), `chunk_delta_rule` (chunkwise
WY / UT-transform form for prefill and training) and `step_delta_rule` (one token).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["naive_delta_rule", "chunk_delta_rule", "step_delta_rule"]


def _scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _init_state(q: Tensor, v: Tensor, initial_state: Tensor | None) -> Tensor:
    """Zero state [B, H, Dk, Dv] or the given one, in q's dtype."""
    B, _, H, Dk = q.shape
    if initial_state is None:
        return q.new_zeros(B, H, Dk, v.shape[-1])
    return initial_state.to(q.dtype)


def _recurrent_update(S: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor,
                      g: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """One time step. S [B,H,Dk,Dv]; q, k [B,H,Dk]; v [B,H,Dv]; beta, g [B,H]."""
    if g is not None:
        S = S * g.exp()[..., None, None]
    pred = torch.einsum("bhk,bhkv->bhv", k, S)  # S^T k, [B,H,Dv]
    delta = beta[..., None] * (v - pred)  # [B,H,Dv]
    S = S + k[..., :, None] * delta[..., None, :]  # [B,H,Dk,Dv]
    o = scale * torch.einsum("bhk,bhkv->bhv", q, S)  # [B,H,Dv]
    return o, S


def naive_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None,
                     scale: float | None = None, initial_state: Tensor | None = None,
                     output_final_state: bool = False) -> tuple[Tensor, Tensor | None]:
    """Reference loop over time. Returns (o [B,T,H,Dv], state [B,H,Dk,Dv] or None)."""
    scale = _scale(q, scale)
    S = _init_state(q, v, initial_state)
    outs = []
    for t in range(q.shape[1]):
        g_t = None if g is None else g[:, t]
        o_t, S = _recurrent_update(S, q[:, t], k[:, t], v[:, t], beta[:, t], g_t, scale)
        outs.append(o_t)
    o = torch.stack(outs, dim=1)  # [B,T,H,Dv]
    return o, (S if output_final_state else None)


def step_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None,
                    scale: float | None = None,
                    state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One decoding step: q, k [B,1,H,Dk], v [B,1,H,Dv], beta, g [B,1,H];
    state [B,H,Dk,Dv] (None = zeros). Returns (o [B,1,H,Dv], new state)."""
    if q.shape[1] != 1:
        raise ValueError(f"step_delta_rule takes one token (T == 1), got T={q.shape[1]}")
    S = _init_state(q, v, state)
    g_0 = None if g is None else g[:, 0]
    o, S = _recurrent_update(S, q[:, 0], k[:, 0], v[:, 0], beta[:, 0], g_0, _scale(q, scale))
    return o[:, None], S


def _safe_exp(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """exp(x) for x <= 0, with x first clamped to [half the log of the smallest normal
    float, 0] (exp >= ~1e-19 in fp32, ~1e-154 in fp64: far below the dtype's resolution next
    to O(1) terms, and no denormals, which slow CPUs 3-4x); 0 outside `mask`. The mask is
    applied after the exponential: every argument is finite, so nothing overflows (the masked
    entries may hold large positive x) and no gradient is NaN, and exp(-inf) would take CPU
    exp's slow path for half of a [C, C] block."""
    w = x.clamp(0.5 * math.log(torch.finfo(x.dtype).tiny), 0.0).exp()
    return w if mask is None else w * mask.to(w.dtype)


def _to_chunks(x: Tensor, pad: int, C: int) -> Tensor:
    """[B,T,H,*D] -> [N,B,H,C,*D] (chunk index first), zero-padding T by `pad` steps."""
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
    B, T, H = x.shape[:3]
    x = x.reshape(B, T // C, C, H, *x.shape[3:])  # [B,N,C,H,*D]
    return x.transpose(2, 3).movedim(1, 0).contiguous()  # [N,B,H,C,*D]


def _chunk_terms(q, k, v, beta, g, scale):
    """Everything that does not depend on the carried state, for all chunks at once.

    Inputs in chunk layout: q, k [N,B,H,C,Dk], v [N,B,H,C,Dv], beta, g [N,B,H,C] (g None:
    no gate, every decay 1, and chunk_decay is returned as None).
    Within a chunk with cumulative log-decay gam_i, the delta-rule corrections
    d_i = beta_i (v_i - a_i S_{i-1}^T k_i) solve (I + A) d = beta V - beta Gamma K S_0
    with A_ij = beta_i (k_i . k_j) exp(gam_i - gam_j) for j < i, so d = u - w S_0.
    """
    if g is None:
        return _chunk_terms_ungated(q, k, v, beta, scale)
    C = q.shape[-2]
    gam = g.cumsum(-1)  # [N,B,H,C]
    diff = gam[..., :, None] - gam[..., None, :]  # gam_i - gam_j, [N,B,H,C,C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # mask BEFORE exp: the upper triangle holds large positive differences
    decay = _safe_exp(diff, causal)  # [N,B,H,C,C], <= 1
    A = (((beta[..., None] * k) @ k.transpose(-1, -2)) * decay).tril(-1)  # [N,B,H,C,C]
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    gam_exp = _safe_exp(gam)  # decay from the chunk start, [N,B,H,C]
    rhs = torch.cat([beta[..., None] * v, (beta * gam_exp)[..., None] * k], dim=-1)
    sol = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    u, w = sol.split([v.shape[-1], k.shape[-1]], dim=-1)  # [N,B,H,C,Dv], [N,B,H,C,Dk]
    attn = ((q * scale) @ k.transpose(-1, -2)) * decay  # [N,B,H,C,C], lower incl. diag
    q_in = q * (gam_exp * scale)[..., None]  # reads S_0, [N,B,H,C,Dk]
    k_out = k * _safe_exp(gam[..., -1:] - gam)[..., None]  # writes S_C, [N,B,H,C,Dk]
    chunk_decay = gam_exp[..., -1]  # [N,B,H]
    return u, w, attn, q_in, k_out, chunk_decay


def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None,
                     scale: float | None = None, initial_state: Tensor | None = None,
                     output_final_state: bool = False,
                     chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """Chunkwise (WY / UT transform) delta rule; same contract as `naive_delta_rule`.

    The per-chunk triangular solve and all intra-chunk products are batched over chunks;
    only the state carry loops over the T / chunk_size chunks."""
    B, T, H, _ = q.shape
    scale = _scale(q, scale)
    S = _init_state(q, v, initial_state)
    C = max(1, min(chunk_size, T))
    pad = (-T) % C
    qc, kc, vc = (_to_chunks(x, pad, C) for x in (q, k, v))  # [N,B,H,C,D]
    bc = _to_chunks(beta.to(q.dtype), pad, C)  # [N,B,H,C]
    gc = None if g is None else _to_chunks(g.to(q.dtype), pad, C)  # no gate: no decays to compute
    u, w, attn, q_in, k_out, chunk_decay = _chunk_terms(qc, kc, vc, bc, gc, scale)
    outs = []
    for n in range(u.shape[0]):
        d = u[n] - w[n] @ S  # [B,H,C,Dv]
        outs.append(q_in[n] @ S + attn[n] @ d)  # [B,H,C,Dv]
        decayed = S if chunk_decay is None else chunk_decay[n, ..., None, None] * S
        S = decayed + k_out[n].transpose(-1, -2) @ d
    o = torch.stack(outs, dim=1)  # [B,N,H,C,Dv]
    o = o.transpose(2, 3).reshape(B, -1, H, o.shape[-1])[:, :T]  # [B,T,H,Dv]
    return o, (S if output_final_state else None)


def _chunk_terms_ungated(q, k, v, beta, scale):
    """`_chunk_terms` without a gate (plain DeltaNet): the same solve with every decay 1."""
    C = q.shape[-2]
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    A = ((beta[..., None] * k) @ k.transpose(-1, -2)).tril(-1)  # [N,B,H,C,C]
    rhs = torch.cat([beta[..., None] * v, beta[..., None] * k], dim=-1)
    sol = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    u, w = sol.split([v.shape[-1], k.shape[-1]], dim=-1)  # [N,B,H,C,Dv], [N,B,H,C,Dk]
    attn = ((q * scale) @ k.transpose(-1, -2)).tril()  # [N,B,H,C,C], lower incl. diag
    return u, w, attn, q * scale, k, None
