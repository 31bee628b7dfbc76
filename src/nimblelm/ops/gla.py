"""Gated linear attention: linear attention, RetNet, Mamba-2 (SSD) and GLA in one op.

Recurrence per head, with the state S of shape [Dk, Dv]:

    S_t = diag(a_t) S_{t-1} + k_t^T v_t          (the state decays BEFORE k_t v_t is added)
    o_t = scale * q_t S_t

The decay a_t = exp(log-decay) is given in log space, and selects the family:

    g=None, gk=None   a_t = 1: plain (Katharopoulos) linear attention
    g  [B, T, H]      one scalar per head and token: RetNet (constant
                      g = log(gamma_h), see `retnet_log_decay`), Mamba-2 / SSD
                      (g = dt * A, with k = dt * B, q = C, v = x and scale=1.0)
    gk [B, T, H, Dk]  one decay per key dimension: GLA (gk = logsigmoid(...) / tau)
    both              the log-decays add: a_t = exp(g_t + gk_t)

Log-decays must be finite and <= 0; decay near 0 (gk down to about -20 per step and
beyond) and near 1 are both safe in float32 over T = 8192: log-decays are summed only
inside a chunk, and only differences of them with exponents in [-44, 44] are ever
exponentiated (see `chunk_gla`). A product of decays below 1e-19 (float32; 1e-154 in
float64) may be rounded up to that value in `chunk_gla`, far below rounding error.

Optional normaliser (`normalize=True`, Katharopoulos linear attention, Based):

    z_t = a_t * z_{t-1} + k_t                    z [B, H, Dk], decayed like S
    o_t = (scale * q_t S_t) / (scale * q_t z_t + eps)

and the state is then the tuple (S [B, H, Dk, Dv], z [B, H, Dk]), as input and output
(the same convention as flash-linear-attention's linear_attn, which uses eps=1e-10).

Shapes: q, k [B, T, H, Dk]; v [B, T, H, Dv]; o [B, T, H, Dv]; state S [B, H, Dk, Dv].
scale defaults to Dk ** -0.5 (pass scale=1.0 for none); it multiplies q.

Forms: `naive_gla` (a loop over time, the oracle), `chunk_gla` (chunkwise form for prefill
and training) and `step_gla` (one token, for decoding). All are differentiable and keep
the inputs' dtype.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["naive_gla", "chunk_gla", "step_gla", "retnet_log_decay", "decayed_causal_scores", "exp_decay",
           "causal_mask", "needs_autograd", "reference_point", "SAFE_SPAN", "FACTOR_CLAMP"]

State = Tensor | tuple[Tensor, Tensor]
SUB_CHUNK = 8  # chunk_gla's default sub-chunk (wide per-dim chunks; short inputs round up to it)


def retnet_log_decay(num_heads: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """RetNet's fixed per-head log-decay log(1 - 2^(-5-h)), shape [H].

    Broadcast it to g [B, T, H] with `log_decay.expand(B, T, H)`.
    """
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.log1p(-(2.0 ** (-5.0 - h))).to(dtype)


# ----------------------------------------------------------------------------- helpers


def _scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _log_decay(q: Tensor, g: Tensor | None, gk: Tensor | None) -> Tensor | None:
    """Combined log-decay [B, T, H, 1] (scalar) or [B, T, H, Dk] (per key dim), or None."""
    if g is not None and tuple(g.shape) != tuple(q.shape[:3]):
        raise ValueError(f"g must have shape [B, T, H] = {tuple(q.shape[:3])}, "
                         f"got {tuple(g.shape)}")
    if gk is not None and gk.shape != q.shape:
        raise ValueError(f"gk must have q's shape {tuple(q.shape)}, got {tuple(gk.shape)}")
    if gk is None:
        return None if g is None else g[..., None]
    return gk if g is None else gk + g[..., None]


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "expected q, k [B, T, H, Dk] (same shape) and v [B, T, H, Dv], got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _split_state(state: State | None, q: Tensor, v: Tensor,
                 normalize: bool) -> tuple[Tensor, Tensor | None]:
    """(S [B, H, Dk, Dv], z [B, H, Dk] or None) from the user's state, in q's dtype."""
    B, _, H, Dk = q.shape
    if state is None:
        S = q.new_zeros(B, H, Dk, v.shape[-1])
        return S, (q.new_zeros(B, H, Dk) if normalize else None)
    if normalize != isinstance(state, tuple):
        raise ValueError("with normalize=True the state is a tuple (S [B,H,Dk,Dv], z [B,H,Dk]); "
                         "with normalize=False it is the tensor S [B,H,Dk,Dv]")
    S, z = state if normalize else (state, None)
    if S.shape != (B, H, Dk, v.shape[-1]):
        raise ValueError(f"state S must have shape {(B, H, Dk, v.shape[-1])}, got {tuple(S.shape)}")
    return S.to(q.dtype), (None if z is None else z.to(q.dtype))


def _pack(S: Tensor, z: Tensor | None) -> State:
    return S if z is None else (S, z)


def _recurrent_step(S: Tensor, z: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                    a_log: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """One token. S [B,H,Dk,Dv]; z [B,H,Dk]; q (scaled), k [B,H,Dk]; v [B,H,Dv];
    a_log [B,H,1] or [B,H,Dk]. Returns (o [B,H,Dv], S, z)."""
    if a_log is not None:
        a = a_log.exp()  # [B,H,1|Dk]
        S = S * a[..., None]
        z = None if z is None else z * a
    S = S + k[..., :, None] * v[..., None, :]  # [B,H,Dk,Dv]
    o = torch.einsum("bhk,bhkv->bhv", q, S)
    if z is not None:
        z = z + k
        o = o / ((q * z).sum(-1, keepdim=True) + eps)
    return o, S, z


def exp_decay(x: Tensor, keep: Tensor | None = None) -> Tensor:
    """exp(x) for log-decays x <= 0 (clamped there), and exactly 0 where `keep` is False.

    Decays below sqrt(smallest normal number) (1e-19 in float32, 1e-154 in float64) are
    rounded up to it: on CPU, exp of -inf or of a result near or below the normal range is
    10-50x slower, and products of two such decays stay normal (denormals slow matmuls).
    """
    floor = 0.5 * math.log(torch.finfo(x.dtype).tiny)  # -43.7 in float32, -354.2 in float64
    w = x.clamp(floor, 0.0).exp()  # finite, so multiplying by the mask is safe (and fast)
    return w if keep is None else w * keep.to(w.dtype)


def needs_autograd(*tensors: Tensor | None) -> bool:
    """True when autograd must track this call (grad mode on and some tensor requires grad);
    the chunk forms write into preallocated buffers (out=) only when it is False."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def causal_mask(C: int, like: Tensor) -> Tensor:
    """[C, C] lower triangle (diagonal included) of ones in ``like``'s dtype and device:
    multiplying by it is 3-4x faster than ``tril()`` on CPU and differentiable."""
    return torch.ones(C, C, dtype=torch.bool, device=like.device).tril().to(like.dtype)


# ----------------------------------------------------------------------------- naive + step


def naive_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, gk: Tensor | None = None,
              scale: float | None = None, initial_state: State | None = None,
              output_final_state: bool = False, normalize: bool = False,
              eps: float = 1e-6) -> tuple[Tensor, State | None]:
    """Reference loop over time (the oracle). Returns (o [B,T,H,Dv], state or None);
    state is S [B,H,Dk,Dv], or (S, z [B,H,Dk]) when normalize=True."""
    _check_qkv(q, k, v)
    a_log = _log_decay(q, g, gk)
    S, z = _split_state(initial_state, q, v, normalize)
    q = q * _scale(q, scale)
    outs = []
    for t in range(q.shape[1]):
        a_t = None if a_log is None else a_log[:, t]
        o_t, S, z = _recurrent_step(S, z, q[:, t], k[:, t], v[:, t], a_t, eps)
        outs.append(o_t)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)  # [B,T,H,Dv]
    return o, (_pack(S, z) if output_final_state else None)


def step_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, gk: Tensor | None = None,
             scale: float | None = None, state: State | None = None, normalize: bool = False,
             eps: float = 1e-6) -> tuple[Tensor, State]:
    """One decoding step: q, k [B,1,H,Dk], v [B,1,H,Dv], g [B,1,H], gk [B,1,H,Dk].
    Returns (o [B,1,H,Dv], new state) with the state as in `naive_gla`."""
    _check_qkv(q, k, v)
    if q.shape[1] != 1:
        raise ValueError(f"step_gla takes one token (T == 1), got T = {q.shape[1]}; "
                         "use chunk_gla for longer inputs")
    a_log = _log_decay(q, g, gk)
    S, z = _split_state(state, q, v, normalize)
    a_0 = None if a_log is None else a_log[:, 0]
    o, S, z = _recurrent_step(S, z, q[:, 0] * _scale(q, scale), k[:, 0], v[:, 0], a_0, eps)
    return o[:, None], _pack(S, z)  # o [B,1,H,Dv]


# ----------------------------------------------------------------------------- chunkwise


def chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, gk: Tensor | None = None,
              scale: float | None = None, initial_state: State | None = None,
              output_final_state: bool = False, chunk_size: int = 64, normalize: bool = False,
              eps: float = 1e-6, sub_chunk_size: int = SUB_CHUNK) -> tuple[Tensor, State | None]:
    """Chunkwise form: exact (up to rounding) equal of `naive_gla`, same arguments and outputs.

    Within a chunk the scores are dense matmuls; chunks are chained by their states.
    Scalar decay: exact [C, C] decay matrix exp(b_t - b_s). Per-key-dim decay (gk): a chunk
    whose cumulative log-decay spans <= 80 uses one reference point (one matmul); a wider
    chunk is split into sub-chunks of `sub_chunk_size` (must divide chunk_size): sub-chunk
    pairs use the boundary between them as reference, diagonal sub-blocks exact pairwise
    decays. No exponent used ever exceeds 44, so nothing overflows.
    """
    _check_qkv(q, k, v)
    if chunk_size < 1 or chunk_size % min(sub_chunk_size, chunk_size):
        raise ValueError(f"sub_chunk_size={sub_chunk_size} must divide chunk_size={chunk_size}")
    a_log = _log_decay(q, g, gk)
    return chunk_form(q * _scale(q, scale), k, v, a_log, initial_state, output_final_state, chunk_size,
                      min(sub_chunk_size, chunk_size), normalize, eps)


IntraScores = Callable[[int, int], Tensor]  # (N, C) -> causal intra-chunk scores [B, H, N, C, C]


def chunk_form(q: Tensor, k: Tensor, v: Tensor, a_log: Tensor | None, initial_state: State | None,
               output_final_state: bool, chunk_size: int, sub: int, normalize: bool, eps: float,
               intra: IntraScores | None = None) -> tuple[Tensor, State | None]:
    """`chunk_gla` after its checks, on q already scaled and a_log [B,T,H,1|Dk] or None.
    intra (no decay only): computes the intra-chunk scores q k^T (masked) of the N chunks of
    C steps another way, e.g. Based's from the raw q.k (see `ops.based`); they must equal
    q k^T below the diagonal (and on it) for the real steps."""
    if intra is not None and a_log is not None:
        raise ValueError("intra scores replace q k^T only without decay")
    S, z = _split_state(initial_state, q, v, normalize)
    o, S, den, z = _chunk_core(q, k, v, a_log, S, chunk_size, sub, intra, z)  # z: None unless normalize
    if normalize:
        o = o / (den + eps)
    return o, (_pack(S, z) if output_final_state else None)


def _to_chunks(x: Tensor, N: int, C: int) -> Tensor:
    """[B, T, H, D] -> zero-padded [B, H, N, C, D] with N * C >= T."""
    B, T, H, D = x.shape
    if N * C > T:
        x = F.pad(x, (0, 0, 0, 0, 0, N * C - T))  # [B, N*C, H, D]
    return x.reshape(B, N, C, H, D).permute(0, 3, 1, 2, 4).contiguous()


def _chunk_core(q: Tensor, k: Tensor, v: Tensor, a_log: Tensor | None, S0: Tensor,
                chunk_size: int, sub: int, intra: IntraScores | None = None,
                z0: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """q (scaled), k [B,T,H,Dk]; v [B,T,H,Dv]; a_log [B,T,H,1|Dk] or None; S0 [B,H,Dk,Dv];
    intra as in `chunk_form`; z0 [B,H,Dk]: also carry the normaliser, the state of a value
    column of ones, apart from v (a 65th column would slow every matmul by up to 40% on
    this CPU; its own products are row sums and matrix-vector products).
    Returns (o [B,T,H,Dv], final S [B,H,Dk,Dv], normaliser [B,T,H,1] and final z [B,H,Dk]
    or None, None). Zero padding is inert (k = 0, a = 1; padded rows of the scores only
    reach padded outputs)."""
    B, T, H, Dk = q.shape
    C = min(chunk_size, max(sub, math.ceil(T / sub) * sub))  # short inputs: smaller chunk
    N = math.ceil(T / C)
    qc, kc, vc = (_to_chunks(x, N, C) for x in (q, k, v))  # [B,H,N,C,D]
    b = None if a_log is None else _to_chunks(a_log, N, C).cumsum(-2)  # [B,H,N,C,1|Dk]
    scores, q_in, k_out = _chunk_local(qc, kc, b, sub, None if intra is None else intra(N, C))
    # scores [B,H,N,C,C] causal, q_in [B,H,N,C,Dk] decayed from the chunk start, k_out
    # [B,H,N,C,Dk] decayed to the chunk end
    decay = None if b is None else exp_decay(b[..., -1, :])  # [B,H,N,1|Dk] over a whole chunk

    def outputs(values: Tensor | None, U: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """values [B,H,N,C,Dv] (None: ones, Dv = 1), U = k_out^T values -> (o [B,T,H,Dv], final)."""
        o = scores.sum(-1, keepdim=True) if values is None else scores @ values  # [B,H,N,C,Dv]
        S_prev, final = _carry_states(state, U, decay)  # [B,H,N,Dk,Dv] state entering each chunk
        o = o.flatten(0, 2).baddbmm_(q_in.flatten(0, 2), S_prev.flatten(0, 2)).view(o.shape)  # += q_in S_prev
        return o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, -1)[:, :T], final

    o, S = outputs(vc, k_out.transpose(-1, -2) @ vc, S0)
    if z0 is None:
        return o, S, None, None
    den, z = outputs(None, k_out.sum(-2)[..., None], z0[..., None])
    return o, S, den, z[..., 0]


def _chunk_local(q: Tensor, k: Tensor, b: Tensor | None, sub: int,
                 scores: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Everything inside chunks: q, k [B,H,N,C,Dk]; b [B,H,N,C,1|Dk] or None;
    scores: the causal q k^T [B,H,N,C,C] when the caller has them (no decay only).
    Returns (the causal decayed scores [B,H,N,C,C], q decayed from the chunk start
    [B,H,N,C,Dk], k decayed to the chunk end [B,H,N,C,Dk]: a chunk's own state contribution
    is U = k_out^T v)."""
    if b is None:
        return (_intra_scores(q, k, b, sub) if scores is None else scores), q, k
    ref = _scored_references(q, k, b, sub)
    # q e^b = q_ref e^r and k e^(last - b) = k_ref e^(last - r): one product each, exact where
    # the reference form is (chunks not wide, r >= -40, so no factor or product leaves
    # float32's normal range); the other chunks take the exponentials
    last = b[..., -1:, :]  # [B,H,N,1,1|Dk] cumulative log-decay of the whole chunk (its minimum)
    q_in = ref.q_ref * ref.r.exp()
    k_out = ref.k_ref * (last - ref.r).exp()
    exact = ref.wide | (ref.r < -SAFE_SPAN / 2).flatten(-2).any(-1)  # [B,H,N]
    if bool(exact.any()):
        b_x = b[exact]
        q_in = q_in.index_put((exact,), q[exact] * exp_decay(b_x))
        k_out = k_out.index_put((exact,), k[exact] * exp_decay(last[exact] - b_x))
    return ref.scores, q_in, k_out


def _carry_states(S0: Tensor, U: Tensor, decay: Tensor | None) -> tuple[Tensor, Tensor]:
    """S0 [B,H,Dk,Dv]; U [B,H,N,Dk,Dv]; decay [B,H,N,1|Dk] or None.
    Returns (states entering each chunk [B,H,N,Dk,Dv], final state [B,H,Dk,Dv]).
    A loop of small adds (cumsum over dim 2 is ~10x slower on CPU); without autograd they
    write straight into the result (out=) instead of being stacked."""
    N = U.shape[2]
    step = (lambda S, n, out=None: torch.add(S, U[:, :, n], out=out)) if decay is None else \
        (lambda S, n, out=None: torch.addcmul(U[:, :, n], S, decay[:, :, n, :, None], out=out))
    if needs_autograd(S0, U, decay):
        prev, S = [], S0
        for n in range(N):
            prev.append(S)
            S = step(S, n)
        return torch.stack(prev, dim=2), S
    prev = U.new_empty(U.shape)
    prev[:, :, 0] = S0
    for n in range(N - 1):
        step(prev[:, :, n], n, out=prev[:, :, n + 1])
    return prev, step(prev[:, :, N - 1], N - 1)  # the final state: a fresh tensor, no view of prev


def _intra_scores(q: Tensor, k: Tensor, b: Tensor | None, sub: int) -> Tensor:
    """Decayed causal scores inside each chunk, A[t, s] = sum_d q_t k_s exp(b_t - b_s), s <= t.
    q, k [B,H,N,C,Dk]; b [B,H,N,C,1|Dk] cumulative log-decay or None. Returns [B,H,N,C,C]."""
    if b is not None:
        return decayed_causal_scores(q, k, b, sub)  # scalar decay (b [..., 1]) broadcasts over Dk
    return (q @ k.transpose(-1, -2)) * causal_mask(q.shape[-2], q)


# a chunk whose cumulative log-decay spans at most SAFE_SPAN (in every key dim) is scored
# with one reference point at the middle of that span: every factor lies in e^(+-40), so
# in float32 nothing overflows and no product of two factors is subnormal; wider chunks
# are sub-chunked (their clamped scores from the one-reference form are discarded)
SAFE_SPAN = 80.0
FACTOR_CLAMP = 44.0


def reference_point(b: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(r, span) of the cumulative log-decay b along the chunk dimension ``dim`` (keepdim):
    r the middle of b's range there, without gradient (it cancels exactly in
    exp(b_t - r) exp(r - b_s)), and span = max - min (> SAFE_SPAN: the chunk is wide)."""
    hi, lo = b.amax(dim, keepdim=True).detach(), b.amin(dim, keepdim=True).detach()
    return (hi + lo) / 2, hi - lo


class _References(NamedTuple):
    """`_scored_references`' results: the scores and what `_chunk_local` reuses."""
    scores: Tensor  # [..., C, C]
    q_ref: Tensor  # q exp(b - r), clamped to e^(+-44) (exact unless the chunk is wide), [..., C, Dk]
    k_ref: Tensor  # k exp(r - b), likewise
    r: Tensor  # the reference point (no gradient), [..., 1, Dk|1]
    wide: Tensor  # [...] bool: chunks whose span exceeds SAFE_SPAN (scores sub-chunked)


def decayed_causal_scores(q: Tensor, k: Tensor, b: Tensor, sub: int = SUB_CHUNK) -> Tensor:
    """A[t, s] = sum_d q_t k_s exp(b_t - b_s) for s <= t, 0 above; q, k [..., C, Dk], b
    [..., C, Dk] (per-key-dim) or [..., C, 1] (scalar) cumulative log-decay, non-increasing
    along C. Returns [..., C, C]. One dense matmul per chunk when the chunk's decay span is
    small (usual gates; a scalar decay then needs no [C, C] exponentials at all),
    `_intra_scores_sub_chunked` (sub-chunks of `sub`, which must divide C) for the other chunks."""
    return _scored_references(q, k, b, sub).scores


def _scored_references(q: Tensor, k: Tensor, b: Tensor, sub: int) -> _References:
    """`decayed_causal_scores` with its reference-point factors (see `_References`)."""
    C = q.shape[-2]
    r, span = reference_point(b, -2)  # [B,H,N,1,Dk]
    factor = (b - r).clamp(-FACTOR_CLAMP, FACTOR_CLAMP).exp()  # [B,H,N,C,Dk], within e^(+-44)
    q_ref = q * factor
    if torch.is_grad_enabled() and b.requires_grad:  # d(k / factor) would reach e^88: overflow
        k_ref = k * (r - b).clamp(-FACTOR_CLAMP, FACTOR_CLAMP).exp()
    else:  # inference: one exponential fewer, k / factor = k exp(r - b) with the same clamp
        k_ref = k * factor.reciprocal()  # (a reciprocal and a product beat a division here)
    A = (q_ref @ k_ref.transpose(-1, -2)) * causal_mask(C, q)  # [B,H,N,C,C] (faster than tril())
    wide = (span > SAFE_SPAN).any(-1).squeeze(-1)  # [B,H,N] chunks needing sub-chunks
    if bool(wide.any()):  # their (clamped, finite) scores above are replaced
        A = A.index_put((wide,), _sub_chunked_in_groups(q[wide], k[wide], b[wide], sub))
    return _References(A, q_ref, k_ref, r, wide)


_GROUP_ELEMENTS = 1 << 22  # largest intermediate of one group of wide chunks (16 MiB in fp32)


def _sub_chunked_in_groups(q: Tensor, k: Tensor, b: Tensor, sub: int) -> Tensor:
    """`_intra_scores_sub_chunked` on q, k, b [n, C, Dk], a few chunks at a time so that its
    [.., C, sub + C/sub, Dk]-sized intermediates stay in cache. Returns [n, C, C]."""
    n, C, Dk = q.shape
    G = max(1, _GROUP_ELEMENTS // (C * (sub + C // sub) * Dk))
    parts = [_intra_scores_sub_chunked(q[i:i + G], k[i:i + G], b[i:i + G], sub)
             for i in range(0, n, G)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]  # [n, C, C]


def _intra_scores_sub_chunked(q: Tensor, k: Tensor, b: Tensor, sub: int) -> Tensor:
    """`_intra_scores` for per-key-dim decay, stable for any log-decay <= 0.

    Sub-chunk i against earlier sub-chunks: reference r_i = b just before sub-chunk i, so
    q_t exp(b_t - r_i) and k_s exp(r_i - b_s) both have exponents <= 0. Sub-chunk i against
    itself: exact pairwise exp(b_t - b_s) over [c, c, Dk]. q, k [..., C, Dk];
    b [..., C, Dk]. Returns [..., C, C].
    """
    C, M = q.shape[-2], q.shape[-2] // sub
    qs, ks, bs = (x.unflatten(-2, (M, sub)) for x in (q, k, b))  # [...,M,c,Dk]
    r = torch.cat([torch.zeros_like(b[..., :1, :]), b[..., sub - 1:C - 1:sub, :]], dim=-2)
    # r [...,M,Dk]: b at the last position before sub-chunk i (0 before the first)
    q_ref = qs * exp_decay(bs - r[..., None, :])  # [...,M,c,Dk]
    pos = torch.arange(C, device=q.device)
    before = pos[None, :] < (pos[:M] * sub)[:, None]  # [M, C]: s lies before sub-chunk i
    e = exp_decay(r[..., None, :] - b[..., None, :, :], before[..., None])  # [...,M,C,Dk]
    k_ref = k[..., None, :, :] * e  # zero where s is not before sub-chunk i
    A = (q_ref @ k_ref.transpose(-1, -2)).unflatten(-1, (M, sub))  # [...,M,c,M,c]
    tri = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril()
    d = exp_decay(bs[..., :, None, :] - bs[..., None, :, :], tri[..., None])
    w = d * ks[..., None, :, :]  # [...,M,c(t),c(s),Dk]
    A_diag = (w @ qs[..., :, :, None]).squeeze(-1)  # [...,M,c,c]
    eye = torch.eye(M, dtype=q.dtype, device=q.device)
    A = A + A_diag[..., :, :, None, :] * eye[:, None, :, None]  # [...,M,c,M,c]
    return A.flatten(-4, -3).flatten(-2, -1)  # [...,C,C]
