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

import torch
from torch import Tensor

from .gla import FACTOR_CLAMP, SAFE_SPAN, causal_mask, exp_decay, needs_autograd, reference_point
from .triangular import unit_lower_solve

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


def _to_chunks(x: Tensor, pad: int, C: int) -> Tensor:
    """[B,T,H,*D] -> [N,B,H,C,*D] (chunk index first), zero-padding T by `pad` steps."""
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
    B, T, H = x.shape[:3]
    x = x.reshape(B, T // C, C, H, *x.shape[3:])  # [B,N,C,H,*D]
    return x.transpose(2, 3).movedim(1, 0).contiguous()  # [N,B,H,C,*D]


def _chunk_terms(q, k, v, beta, g, scale, in_place):
    """Everything that does not depend on the carried state, for all chunks at once.

    Inputs in chunk layout: q, k [N,B,H,C,Dk], v [N,B,H,C,Dv], beta, g [N,B,H,C] (g None:
    no gate, every decay 1, and chunk_decay is returned as None). in_place: no autograd, so
    the solve's right-hand side is written into one buffer instead of concatenated.
    Within a chunk with cumulative log-decay gam_i, the delta-rule corrections
    d_i = beta_i (v_i - a_i S_{i-1}^T k_i) solve (I + A) d = beta V - beta Gamma K S_0
    with A_ij = beta_i (k_i . k_j) exp(gam_i - gam_j) for j < i, so d = u - w S_0.
    """
    if g is None:
        return _chunk_terms_ungated(q, k, v, beta, scale, in_place)
    gam = g.cumsum(-1)  # [N,B,H,C]
    scores = _ScalarDecayScores(k, gam)
    A = scores(k, beta, causal=False)  # [N,B,H,C,C]; the solve reads its strictly lower part only
    gam_exp = exp_decay(gam)  # decay from the chunk start, [N,B,H,C]
    rhs = _rhs(v, beta, k, beta * gam_exp, in_place)  # [beta v, beta gam_exp k]
    sol = unit_lower_solve(A, rhs)  # (I + strictly_lower(A))^-1 rhs
    u, w = sol.split([v.shape[-1], k.shape[-1]], dim=-1)  # [N,B,H,C,Dv], [N,B,H,C,Dk]
    attn = scores(q, scale, causal=True)  # [N,B,H,C,C], lower incl. diag
    q_in = q * (scale * gam_exp)[..., None]  # reads S_0, [N,B,H,C,Dk]
    k_out = k * exp_decay(gam[..., -1:] - gam)[..., None]  # writes S_C, [N,B,H,C,Dk]
    chunk_decay = gam_exp[..., -1]  # [N,B,H]
    return u, w, attn, q_in, k_out, chunk_decay


def _rhs(v: Tensor, v_weight: Tensor, k: Tensor, k_weight: Tensor, in_place: bool) -> Tensor:
    """[v_weight v, k_weight k] along the last dim, [N,B,H,C,Dv+Dk]; weights [N,B,H,C]."""
    if not in_place:
        return torch.cat([v * v_weight[..., None], k * k_weight[..., None]], dim=-1)
    Dv = v.shape[-1]
    out = v.new_empty(*v.shape[:-1], Dv + k.shape[-1])
    torch.mul(v, v_weight[..., None], out=out[..., :Dv])
    torch.mul(k, k_weight[..., None], out=out[..., Dv:])
    return out


class _ScalarDecayScores:
    """Decayed causal scores of several queries against one key tensor, for a scalar
    (per-head) cumulative log-decay: ``self(x, w)[i, j] = w_i x_i . k_j exp(gam_i - gam_j)``.

    k [N,B,H,C,Dk]; gam [N,B,H,C]. The decays enter through per-position factors
    exp(+-(gam - r)) around each chunk's mid-point r (gla's reference point), so k's factor
    is applied once for all queries; a chunk whose span exceeds gla's safe range takes the
    exact [C, C] decay matrix instead (every entry <= 1)."""

    def __init__(self, k: Tensor, gam: Tensor):
        r, span = reference_point(gam, -1)  # [N,B,H,1]
        self.factor = (gam - r).clamp(-FACTOR_CLAMP, FACTOR_CLAMP).exp()  # [N,B,H,C], within e^(+-44)
        self.k_ref_t = (k * (r - gam).clamp(-FACTOR_CLAMP, FACTOR_CLAMP).exp()[..., None]).transpose(-1, -2)
        self.wide = (span > SAFE_SPAN).squeeze(-1)  # [N,B,H]
        self.any_wide = bool(self.wide.any())
        if self.any_wide:  # the wide chunks' keys and exact decays, shared by all queries
            C, g = k.shape[-2], gam[self.wide]  # [n,C]
            self.k_wide_t = k[self.wide].transpose(-1, -2)  # [n,Dk,C]
            self.decay_wide = exp_decay(g[..., :, None] - g[..., None, :], keep=causal_mask(C, k).bool())

    def __call__(self, x: Tensor, w: Tensor | float, causal: bool) -> Tensor:
        """x [N,B,H,C,Dk], w [N,B,H,C] or a number -> [N,B,H,C,C]; above the diagonal zero
        when causal, else unspecified (finite)."""
        C = x.shape[-2]
        scores = (x * (self.factor * w)[..., None]) @ self.k_ref_t
        if causal:
            scores = scores * causal_mask(C, x)  # (faster than tril())
        if self.any_wide:
            wide = self.wide
            xw = x[wide] * (w[wide][..., None] if isinstance(w, Tensor) else w)  # [n,C,Dk]
            scores = scores.index_put((wide,), (xw @ self.k_wide_t) * self.decay_wide)
        return scores


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
    in_place = not needs_autograd(q, k, v, beta, g, initial_state)
    u, w, attn, q_in, k_out, chunk_decay = _chunk_terms(qc, kc, vc, bc, gc, scale, in_place)
    # only the state carry is sequential: d_n = u_n - w_n S_n, S_{n+1} = a_n S_n + k_out_n^T d_n,
    # on [B*H, ...] matrices so each is one fused baddbmm
    N, Dk, Dv = u.shape[0], q.shape[-1], v.shape[-1]
    u3, w3 = u.flatten(1, 2), w.flatten(1, 2)  # [N,B*H,C,Dv], [N,B*H,C,Dk]
    k_out_t = k_out.flatten(1, 2).transpose(-1, -2)  # [N,B*H,Dk,C]
    decay = None if chunk_decay is None else chunk_decay.reshape(N, B * H, 1, 1)
    S3 = S.reshape(B * H, Dk, Dv)
    if in_place:
        # no autograd: the states entering each chunk and the corrections go straight into
        # preallocated buffers (out=), with no per-chunk copies and no stacking
        states = S3.new_empty(N + 1, B * H, Dk, Dv)  # the state entering chunk n at n, the final last
        corrections = u3.new_empty(u3.shape)  # [N,B*H,C,Dv]
        states[0] = S3
        for n in range(N):
            torch.baddbmm(u3[n], w3[n], states[n], alpha=-1, out=corrections[n])
            if decay is None:
                torch.baddbmm(states[n], k_out_t[n], corrections[n], out=states[n + 1])
            else:
                torch.mul(states[n], decay[n], out=states[n + 1]).baddbmm_(k_out_t[n], corrections[n])
        # the final state is cloned: a view would keep the whole buffer alive in a cache
        S, states = states[N].reshape(B, H, Dk, Dv).clone(), states[:N]
    else:
        starts, ds = [], []
        for n in range(N):
            starts.append(S3)
            d = torch.baddbmm(u3[n], w3[n], S3, alpha=-1)  # [B*H,C,Dv]
            ds.append(d)
            S3 = torch.baddbmm(S3 if decay is None else S3 * decay[n], k_out_t[n], d)
        S, states, corrections = S3.reshape(B, H, Dk, Dv), torch.stack(starts), torch.stack(ds)
    # outputs of all chunks at once: o_n = q_in_n S_n + attn_n d_n
    o = q_in.flatten(0, 2) @ states.flatten(0, 1)  # [N*B*H,C,Dv]
    o = o.baddbmm_(attn.flatten(0, 2), corrections.flatten(0, 1)).unflatten(0, (N, B, H))
    o = o.permute(1, 0, 3, 2, 4).reshape(B, -1, H, o.shape[-1])[:, :T]  # [B,T,H,Dv]
    return o, (S if output_final_state else None)


def _chunk_terms_ungated(q, k, v, beta, scale, in_place):
    """`_chunk_terms` without a gate (plain DeltaNet): the same solve with every decay 1."""
    rhs = _rhs(v, beta, k, beta, in_place)  # [beta v, beta k], [N,B,H,C,Dv+Dk]
    A = rhs[..., v.shape[-1]:] @ k.transpose(-1, -2)  # [N,B,H,C,C], strictly lower part used
    sol = unit_lower_solve(A, rhs)  # (I + strictly_lower(A))^-1 rhs
    u, w = sol.split([v.shape[-1], k.shape[-1]], dim=-1)  # [N,B,H,C,Dv], [N,B,H,C,Dk]
    q = q * scale
    attn = (q @ k.transpose(-1, -2)) * causal_mask(q.shape[-2], q)  # [N,B,H,C,C], lower incl. diag
    return u, w, attn, q, k, None
