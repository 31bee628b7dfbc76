"""Test-time training layers (Sun et al. 2024): TTT-Linear and TTT-MLP.

Per head, an inner model f is trained online by gradient descent on the
self-supervised loss  l_t(W) = 0.5 * ||LN(g(k_t; W)) - (v_t - k_t)||^2, i.e. the
squared error of f(k_t) = k_t + LN(g(k_t; W)) against v_t, with
    TTT-Linear: g(x) = x W + b            (W [D, D], b [D])
    TTT-MLP:    g(x) = gelu(x W1 + b1) W2 + b2   (W1 [D, F], W2 [F, D], F = 4D usually;
                gelu is the tanh approximation, as in the official code)
and LN a LayerNorm (eps 1e-6, no bias correction) with per-head weight/bias [H, D].
The output is o_t = q_t + LN(g(q_t; W_t)).

Mini-batch gradient descent (mini-batch size b, positions i = 0..b-1 in a mini-batch
starting with weights W_0): every gradient is taken at W_0, and

    W_t = W_0 - s_i * sum_{j <= i} eta_j * grad l_j(W_0)

where eta [B, T, H] is the per-token inner learning rate (the layer computes it,
base lr / D included) and s = token_scale [b] an optional per-position factor (None
means 1; the official code uses s_i = max(1 / (i + 1) + learnable_i, 0)). With these,
outputs equal the official ttt-lm-pytorch dual form, whose eta matrix is
eta[i, j] = s_i * eta_j. The next mini-batch starts from W_{b-1}.

Forms: naive_* (per-token loop: explicit gradients at W_0, accumulated, W_t formed
explicitly), ttt_* (the dual form: everything that does not depend on the weights is
batched over all mini-batches, then one short batch of matmuls per mini-batch; the
bias is folded into the weights as an extra input row of ones) and step_* (one
token). T need not be a multiple of b, and a state may stop mid-mini-batch: the dual
form pads the sequence to whole mini-batches with eta = 0 tokens, which leave the
weights untouched.

State: a dict
    TTT-Linear: "W" [B,H,D,D], "b" [B,H,D]      weights at the current mini-batch start
                "grad_W" [B,H,D,D], "grad_b" [B,H,D]
                                   sum_j eta_j * grad l_j over the tokens seen so far in
                                   the current mini-batch (zeros at a boundary)
    TTT-MLP:    "W1" [B,H,D,F], "b1" [B,H,F], "W2" [B,H,F,D], "b2" [B,H,D] and
                "grad_W1", "grad_b1", "grad_W2", "grad_b2" of the same shapes
    both:       "offset" (int) tokens already seen in the current mini-batch, 0..b-1.
When initial_state is given, the W/b arguments are not used (the state holds them).

References: outputs and states match the official ttt-lm-pytorch `TTTLinear.ttt` /
`TTTMLP.ttt` to float64 round-off (TTT-MLP to ~3e-10: that code truncates sqrt(2/pi) to
0.79788456 in its GELU derivative); unlike it, a partial last mini-batch carries its
state. flash-linear-attention's naive TTT-Linear differs by design: its eta scales the
destination token (eta_i for row i), q is multiplied by a scale, and its output is
Z + LN(Z) rather than q + LN(Z); with eta constant per mini-batch and scale 1 its states
equal ours.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import gelu_tanh, gelu_tanh_and_grad

__all__ = [
    "naive_ttt_linear", "ttt_linear", "step_ttt_linear",
    "naive_ttt_mlp", "ttt_mlp", "step_ttt_mlp",
]

LINEAR_KEYS = ("W", "b")
MLP_KEYS = ("W1", "b1", "W2", "b2")



# ----------------------------------------------------------------------------- helpers

def _centered(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x - mean, biased variance [..., 1]) over the last dim. Two plain passes: torch's
    var_mean / var are 4-8x slower on CPU here for these small rows (61 us vs 14 us on
    [8, 16, 64]), and the primal loop calls this for every token."""
    xc = x - x.mean(-1, keepdim=True)
    return xc, (xc * xc).mean(-1, keepdim=True)


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim; weight/bias broadcast against x."""
    xc, var = _centered(x)
    return xc * torch.rsqrt(var + eps) * weight + bias


def _ln_l2_grad(z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """d/dz of 0.5 * ||LN(z) * weight + bias - target||^2 (per row), explicit form."""
    zc, var = _centered(z)
    std = torch.sqrt(var + eps)
    z_hat = zc / std
    g_hat = (weight * z_hat + bias - target) * weight  # d loss / d z_hat
    proj = (g_hat * z_hat).mean(-1, keepdim=True)
    return (g_hat - g_hat.mean(-1, keepdim=True) - z_hat * proj) / std


def _ln_l2_grad_scaled(z: Tensor, offset: Tensor, weight_sq: Tensor, eta: Tensor,
                       eps: float) -> Tensor:
    """eta * _ln_l2_grad with offset = (bias - target) * weight, weight_sq = weight^2
    precomputed: the same formula in fewer kernels, for the dual-form loop."""
    zc, var = _centered(z)
    rstd = torch.rsqrt(var + eps)
    z_hat = zc * rstd
    g_hat = torch.addcmul(offset, z_hat, weight_sq)
    proj = (g_hat * z_hat).mean(-1, keepdim=True)
    g = torch.addcmul(g_hat - g_hat.mean(-1, keepdim=True), z_hat, proj, value=-1)
    return g * (rstd * eta)


_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_grad(x: Tensor) -> Tensor:
    """Derivative of the tanh-approximated GELU (the token loops; the dual form uses
    activations.gelu_tanh_and_grad, so the two forms check each other)."""
    t = torch.tanh(_GELU_C * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x * x)


def _init_state(keys, params, B: int, initial_state: dict | None) -> dict:
    """Weights tiled over the batch ([H,...] -> [B,H,...]) with zero gradients."""
    if initial_state is not None:
        return dict(initial_state)
    st = {name: p.expand(B, *p.shape) for name, p in zip(keys, params)}
    st.update({f"grad_{name}": torch.zeros_like(st[name]) for name in keys})
    st["offset"] = 0
    return st


def _close_if_full(st: dict, keys, ts_last, mini_batch_size: int) -> dict:
    """At a mini-batch boundary, W_0 <- W_0 - s_{b-1} * grad and the gradients reset."""
    if st["offset"] < mini_batch_size:
        return st
    out = {"offset": 0}
    for name in keys:
        grad = st[f"grad_{name}"]
        out[name] = st[name] - ts_last * grad
        out[f"grad_{name}"] = torch.zeros_like(grad)
    return out


def _check_step(q: Tensor, name: str) -> None:
    if q.shape[1] != 1:
        raise ValueError(f"{name} takes one token (T == 1), got T={q.shape[1]}")


def _scalar_scale(token_scale: Tensor | None, position: int):
    return 1.0 if token_scale is None else token_scale[position]


def _outer(a: Tensor, b: Tensor) -> Tensor:
    """[B,H,M] x [B,H,N] -> [B,H,M,N]."""
    return a[..., :, None] * b[..., None, :]


def _vecmat(x: Tensor, W: Tensor) -> Tensor:
    """Row vector times matrix per (batch, head): [B,H,M] x [B,H,M,N] -> [B,H,N]."""
    return (x[..., None, :] @ W)[..., 0, :]


def _accumulate(st: dict, keys, grads: dict) -> dict:
    """Add one token's eta-weighted gradients to the state and advance the offset."""
    out = {name: st[name] for name in keys}
    out.update({f"grad_{name}": st[f"grad_{name}"] + grads[name] for name in keys})
    out["offset"] = st["offset"] + 1
    return out


# ----------------------------------------------------------------------------- primal form

def _linear_token(st: dict, q, k, v, eta, ln, s, b: int):
    """One token, primal form. q, k, v [B,H,D]; eta [B,H]; s scalar. -> (o [B,H,D], state)"""
    ln_w, ln_b, eps = ln
    z = _vecmat(k, st["W"]) + st["b"]  # [B,H,D]
    g = eta[..., None] * _ln_l2_grad(z, v - k, ln_w, ln_b, eps)  # [B,H,D]
    st = _accumulate(st, LINEAR_KEYS, {"W": _outer(k, g), "b": g})
    W_t = st["W"] - s * st["grad_W"]  # [B,H,D,D]
    b_t = st["b"] - s * st["grad_b"]  # [B,H,D]
    o = q + _layer_norm(_vecmat(q, W_t) + b_t, ln_w, ln_b, eps)
    return o, _close_if_full(st, LINEAR_KEYS, s, b)


def _mlp_token(st: dict, q, k, v, eta, ln, s, b: int):
    """One token, primal form. q, k, v [B,H,D]; eta [B,H]. -> (o [B,H,D], state)"""
    ln_w, ln_b, eps = ln
    z1 = _vecmat(k, st["W1"]) + st["b1"]  # [B,H,F]
    x2 = _gelu(z1)
    z2 = _vecmat(x2, st["W2"]) + st["b2"]  # [B,H,D]
    g2 = eta[..., None] * _ln_l2_grad(z2, v - k, ln_w, ln_b, eps)  # [B,H,D]
    g1 = _vecmat(g2, st["W2"].transpose(-1, -2)) * _gelu_grad(z1)  # [B,H,F]
    grads = {"W1": _outer(k, g1), "b1": g1, "W2": _outer(x2, g2), "b2": g2}
    st = _accumulate(st, MLP_KEYS, grads)
    W1, b1, W2, b2 = (st[n] - s * st[f"grad_{n}"] for n in MLP_KEYS)
    z = _vecmat(_gelu(_vecmat(q, W1) + b1), W2) + b2  # [B,H,D]
    o = q + _layer_norm(z, ln_w, ln_b, eps)
    return o, _close_if_full(st, MLP_KEYS, s, b)


def _token_loop(token_fn, st: dict, q, k, v, eta, ln, token_scale, b: int):
    """Run token_fn over time. q, k, v [B,T,H,D]; eta [B,T,H]. -> (o [B,T,H,D], state)"""
    outs = []
    for t in range(q.shape[1]):
        s = _scalar_scale(token_scale, st["offset"])
        o, st = token_fn(st, q[:, t], k[:, t], v[:, t], eta[:, t], ln, s, b)
        outs.append(o)
    return torch.stack(outs, dim=1), st


# ----------------------------------------------------------------------------- dual form

def _prepare(q, k, v, eta, ln_weight, ln_bias, token_scale, b: int, offset: int, eps):
    """Weight-independent terms for all mini-batches at once, heads flattened (G = B*H).

    The sequence is padded with `offset` eta=0 tokens in front (the part of the current
    mini-batch already seen) and eta=0 tokens at the end up to whole mini-batches, N in all.
    Returns a dict of tensors shaped [N, G, ...] plus the per-position scales."""
    B, T, H, D = q.shape
    front, back = offset, (-(offset + T)) % b

    def blocks(x):  # [B,T,H,*] -> [N,G,b,*], zero-padded in time
        x = x.transpose(1, 2).reshape(B * H, T, *x.shape[3:])  # [G,T,*]
        pad = [0, 0] * (x.dim() - 2) + [front, back]
        x = F.pad(x, pad)  # [G,front+T+back,*]
        return x.reshape(B * H, -1, b, *x.shape[2:]).transpose(0, 1).contiguous()

    ones = q.new_ones(B, T, H, 1)
    q_aug, k_aug = blocks(torch.cat([q, ones], -1)), blocks(torch.cat([k, ones], -1))
    if token_scale is None:
        ts, ts_last = 1.0, 1.0
    else:
        ts, ts_last = token_scale.to(q.dtype)[:, None], token_scale[b - 1].to(q.dtype)
    ln_w = ln_weight.repeat(B, 1)[:, None]  # [G,1,D]
    return {
        "kq": torch.cat([k_aug, q_aug], dim=2),  # keys then queries, [N,G,2b,D+1]
        "att": ts * (q_aug @ k_aug.transpose(-1, -2)).tril(),  # s_i (q_i.k_j + 1), [N,G,b,b]
        "k_last": (ts_last * k_aug).transpose(-1, -2),  # [N,G,D+1,b]
        "ln_shift": (ln_bias.repeat(B, 1)[:, None] - blocks(v - k)) * ln_w,  # [N,G,b,D]
        "w_sq": ln_w * ln_w, "eta": blocks(eta[..., None]), "eps": eps,  # eta [N,G,b,1]
        "ts": ts, "ts_last": ts_last, "causal": ts * q.new_ones(b, b).tril(),
    }


def _linear_block(W, P: dict, n: int, prior, want_raw: bool):
    """One mini-batch of TTT-Linear. W = (W_aug [G,D+1,D],) with the bias as last row;
    prior: gradients accumulated before this mini-batch (first one only) or None.
    Returns (z [G,b,D] before LayerNorm, weights at the next start, raw grads or None)."""
    (W_aug,) = W
    b = P["eta"].shape[2]
    Z = P["kq"][n] @ W_aug  # [G,2b,D]
    g = _ln_l2_grad_scaled(Z[:, :b], P["ln_shift"][n], P["w_sq"], P["eta"][n], P["eps"])
    z = torch.baddbmm(Z[:, b:], P["att"][n], g, alpha=-1)  # [G,b,D]
    W_next = torch.baddbmm(W_aug, P["k_last"][n], g, alpha=-1)
    raw = (P["kq"][n][:, :b].transpose(-1, -2) @ g,) if want_raw else None
    if prior is not None:
        z = z - P["ts"] * (P["kq"][n][:, b:] @ prior[0])
        W_next = W_next - P["ts_last"] * prior[0]
    return z, (W_next,), raw


def _mlp_block(W, P: dict, n: int, prior, want_raw: bool):
    """One mini-batch of TTT-MLP; W = (W1_aug [G,D+1,F], W2 [G,F,D], b2 [G,1,D]).
    Same contract as `_linear_block`."""
    W1, W2, b2 = W
    b = P["eta"].shape[2]
    Z1 = P["kq"][n] @ W1  # [G,2b,F]
    x2, x2_grad = gelu_tanh_and_grad(Z1[:, :b])  # [G,b,F] x2
    z2 = torch.baddbmm(b2, x2, W2)  # [G,b,D]
    g2 = _ln_l2_grad_scaled(z2, P["ln_shift"][n], P["w_sq"], P["eta"][n], P["eps"])
    g1 = (g2 @ W2.transpose(-1, -2)) * x2_grad  # [G,b,F]
    pre = torch.baddbmm(Z1[:, b:], P["att"][n], g1, alpha=-1)  # [G,b,F]
    if prior is not None:
        pre = pre - P["ts"] * (P["kq"][n][:, b:] @ prior[0])
    h = gelu_tanh(pre)
    att2 = torch.baddbmm(P["causal"].new_ones(()), h, x2.transpose(-1, -2)) * P["causal"]
    z = torch.baddbmm(torch.baddbmm(b2, h, W2), att2, g2, alpha=-1)  # [G,b,D]
    g2_last = P["ts_last"] * g2
    W_next = (torch.baddbmm(W1, P["k_last"][n], g1, alpha=-1),
              torch.baddbmm(W2, x2.transpose(-1, -2), g2_last, alpha=-1),
              b2 - g2_last.sum(1, keepdim=True))
    if prior is not None:
        z = z - P["ts"] * (h @ prior[1] + prior[2])
        W_next = tuple(w - P["ts_last"] * p for w, p in zip(W_next, prior))
    raw = None
    if want_raw:
        raw = (P["kq"][n][:, :b].transpose(-1, -2) @ g1, x2.transpose(-1, -2) @ g2,
               g2.sum(1, keepdim=True))
    return z, W_next, raw


def _dual_form(block_fn, W, prior, offset: int, q, k, v, eta, ln_weight, ln_bias, b: int,
               token_scale, eps: float):
    """Loop over the padded mini-batches. W, prior: tuples of [G,...] tensors (weights at
    the current mini-batch start; gradients already accumulated in it, or None).
    Returns (o [B,T,H,D], weights, raw grads): when the sequence ends mid-mini-batch, the
    weights at its start and its accumulated gradients; else the next weights and None."""
    B, T, H, D = q.shape
    P = _prepare(q, k, v, eta, ln_weight, ln_bias, token_scale, b, offset, eps)
    N, partial = P["eta"].shape[0], (offset + T) % b != 0
    zs, raw = [], None
    for n in range(N):
        ends_partial = partial and n == N - 1
        z, W_next, raw = block_fn(W, P, n, prior if n == 0 else None, ends_partial)
        zs.append(z)
        if ends_partial and n == 0 and prior is not None:
            raw = tuple(r + p for r, p in zip(raw, prior))
        if not ends_partial:
            W = W_next
    z = torch.stack(zs)  # [N,G,b,D]
    z = z.transpose(0, 1).reshape(B, H, N * b, D)[:, :, offset:offset + T]  # [B,H,T,D]
    o = q + _layer_norm(z.transpose(1, 2), ln_weight, ln_bias, eps)  # [B,T,H,D]
    return o, W, raw


def _flat(x: Tensor) -> Tensor:
    """[B,H,*] -> [B*H,*]."""
    return x.reshape(-1, *x.shape[2:])


def _with_bias_row(W: Tensor, bias: Tensor) -> Tensor:
    """[B,H,M,N], [B,H,N] -> [B*H,M+1,N]: the bias as the weight of a constant-1 input."""
    return _flat(torch.cat([W, bias[..., None, :]], dim=-2))


def _check_nonempty(q: Tensor) -> None:
    if q.shape[1] == 0:
        raise ValueError("the sequence is empty (T == 0)")


# ----------------------------------------------------------------------------- TTT-Linear

def naive_ttt_linear(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln_weight: Tensor,
                     ln_bias: Tensor, W: Tensor, b: Tensor, mini_batch_size: int = 16,
                     initial_state: dict | None = None, output_final_state: bool = False, *,
                     token_scale: Tensor | None = None, eps: float = 1e-6):
    """Reference per-token loop. q, k, v [B,T,H,D]; eta [B,T,H]; ln_weight, ln_bias [H,D];
    W [H,D,D]; b [H,D]; token_scale [mini_batch_size] or None.
    Returns (o [B,T,H,D], state dict or None); see the module docstring."""
    st = _init_state(LINEAR_KEYS, (W, b), q.shape[0], initial_state)
    o, st = _token_loop(_linear_token, st, q, k, v, eta, (ln_weight, ln_bias, eps),
                        token_scale, mini_batch_size)
    return o, (st if output_final_state else None)


def step_ttt_linear(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln_weight: Tensor,
                    ln_bias: Tensor, W: Tensor, b: Tensor, mini_batch_size: int = 16,
                    state: dict | None = None, *, token_scale: Tensor | None = None,
                    eps: float = 1e-6):
    """One decoding step: q, k, v [B,1,H,D], eta [B,1,H]; state as in the module docstring
    (None = start of a sequence with weights W, b). Returns (o [B,1,H,D], new state)."""
    _check_step(q, "step_ttt_linear")
    st = _init_state(LINEAR_KEYS, (W, b), q.shape[0], state)
    return _token_loop(_linear_token, st, q, k, v, eta, (ln_weight, ln_bias, eps),
                       token_scale, mini_batch_size)


def ttt_linear(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln_weight: Tensor,
               ln_bias: Tensor, W: Tensor, b: Tensor, mini_batch_size: int = 16,
               initial_state: dict | None = None, output_final_state: bool = False, *,
               token_scale: Tensor | None = None, eps: float = 1e-6):
    """Mini-batch dual form of TTT-Linear; same contract as `naive_ttt_linear`."""
    _check_nonempty(q)
    B, T, H, D = q.shape
    st = _init_state(LINEAR_KEYS, (W, b), B, initial_state)
    weights = (_with_bias_row(st["W"], st["b"]),)  # [G,D+1,D]
    prior = None if initial_state is None else (_with_bias_row(st["grad_W"], st["grad_b"]),)
    o, weights, raw = _dual_form(_linear_block, weights, prior, st["offset"], q, k, v, eta,
                                 ln_weight, ln_bias, mini_batch_size, token_scale, eps)
    if not output_final_state:
        return o, None
    W_aug = weights[0].reshape(B, H, D + 1, D)
    G_aug = torch.zeros_like(W_aug) if raw is None else raw[0].reshape(B, H, D + 1, D)
    return o, {"W": W_aug[..., :D, :], "b": W_aug[..., D, :], "grad_W": G_aug[..., :D, :],
               "grad_b": G_aug[..., D, :], "offset": (st["offset"] + T) % mini_batch_size}


# ----------------------------------------------------------------------------- TTT-MLP

def naive_ttt_mlp(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln_weight: Tensor,
                  ln_bias: Tensor, W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor,
                  mini_batch_size: int = 16, initial_state: dict | None = None,
                  output_final_state: bool = False, *, token_scale: Tensor | None = None,
                  eps: float = 1e-6):
    """Reference per-token loop for TTT-MLP. q, k, v [B,T,H,D]; eta [B,T,H];
    ln_weight, ln_bias [H,D]; W1 [H,D,F]; b1 [H,F]; W2 [H,F,D]; b2 [H,D].
    Returns (o [B,T,H,D], state dict or None); see the module docstring."""
    st = _init_state(MLP_KEYS, (W1, b1, W2, b2), q.shape[0], initial_state)
    o, st = _token_loop(_mlp_token, st, q, k, v, eta, (ln_weight, ln_bias, eps),
                        token_scale, mini_batch_size)
    return o, (st if output_final_state else None)


def step_ttt_mlp(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln_weight: Tensor,
                 ln_bias: Tensor, W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor,
                 mini_batch_size: int = 16, state: dict | None = None, *,
                 token_scale: Tensor | None = None, eps: float = 1e-6):
    """One decoding step of TTT-MLP: q, k, v [B,1,H,D], eta [B,1,H].
    Returns (o [B,1,H,D], new state)."""
    _check_step(q, "step_ttt_mlp")
    st = _init_state(MLP_KEYS, (W1, b1, W2, b2), q.shape[0], state)
    return _token_loop(_mlp_token, st, q, k, v, eta, (ln_weight, ln_bias, eps),
                       token_scale, mini_batch_size)


def _mlp_to_flat(st: dict, prefix: str) -> tuple:
    """State dict -> (W1_aug [G,D+1,F], W2 [G,F,D], b2 [G,1,D]) of weights or gradients."""
    p = prefix
    return (_with_bias_row(st[p + "W1"], st[p + "b1"]), _flat(st[p + "W2"]),
            _flat(st[p + "b2"])[:, None])


def _mlp_from_flat(flat: tuple, B: int, H: int, prefix: str) -> dict:
    W1_aug, W2, b2 = (x.reshape(B, H, *x.shape[1:]) for x in flat)
    return {prefix + "W1": W1_aug[..., :-1, :], prefix + "b1": W1_aug[..., -1, :],
            prefix + "W2": W2, prefix + "b2": b2[..., 0, :]}


def ttt_mlp(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln_weight: Tensor,
            ln_bias: Tensor, W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor,
            mini_batch_size: int = 16, initial_state: dict | None = None,
            output_final_state: bool = False, *, token_scale: Tensor | None = None,
            eps: float = 1e-6):
    """Mini-batch dual form of TTT-MLP; same contract as `naive_ttt_mlp`."""
    _check_nonempty(q)
    B, T, H, _ = q.shape
    st = _init_state(MLP_KEYS, (W1, b1, W2, b2), B, initial_state)
    prior = None if initial_state is None else _mlp_to_flat(st, "grad_")
    o, weights, raw = _dual_form(_mlp_block, _mlp_to_flat(st, ""), prior, st["offset"],
                                 q, k, v, eta, ln_weight, ln_bias, mini_batch_size,
                                 token_scale, eps)
    if not output_final_state:
        return o, None
    raw = tuple(torch.zeros_like(w) for w in weights) if raw is None else raw
    out = _mlp_from_flat(weights, B, H, "")
    out.update(_mlp_from_flat(raw, B, H, "grad_"))
    out["offset"] = (st["offset"] + T) % mini_batch_size
    return o, out
