"""Tournament sampling as a distribution transform (SynthID-Text, Dathathri et al. 2024).

A tournament draws N^m candidates i.i.d. from p, plays m layers of matches of N candidates
(layer l keeps the candidate with the largest g_l, ties broken uniformly) and emits the
winner. Winners of a layer are i.i.d. again, so the winner's distribution is the one-layer
map applied m times. One layer, with G1 = E_p[g_l] and G0 = 1 - G1:

    p'(x) = p(x) (1 - G0^N) / G1    if g_l(x) = 1
    p'(x) = p(x) G0^(N - 1)         if g_l(x) = 0

For N = 2 this is p'(x) = p(x) (1 + g_l(x) - G1): linear in g, so averaging over random
g-values gives back p (non-distortionary). For N > 2 it is not (distortionary mode).

The transform is a pure function of (p, g): the speculative engine applies the same function
to draft and target positions. Tokens with p = 0 keep p = 0, so it composes with top-k and
top-p (it is applied after temperature / top-k / top-p).
"""

from __future__ import annotations

import numpy as np
import torch


def tournament_layer(p: torch.Tensor, g: torch.Tensor, num_competitors: int = 2) -> torch.Tensor:
    """One layer. p [..., V] (rows sum to 1), g [..., V] in {0, 1} (any dtype) -> p' [..., V].
    Rounding can leave values of order -1e-16 where p' = 0 exactly; :func:`tournament` clamps."""
    g = g.to(p.dtype)
    g1 = (p * g).sum(-1, keepdim=True)  # [..., 1] = E_p[g]
    if num_competitors == 2:
        return p * (g + (1.0 - g1))
    g1 = g1.clamp(0.0, 1.0)
    g0 = 1.0 - g1
    win_one = (1.0 - g0 ** num_competitors) / g1.clamp_min(torch.finfo(p.dtype).tiny)
    return p * torch.where(g > 0, win_one, g0 ** (num_competitors - 1))


def tournament(p: torch.Tensor, g: torch.Tensor, num_competitors: int = 2) -> torch.Tensor:
    """All layers. p [..., V], g [..., m, V] in {0, 1} -> the winner's distribution [..., V]."""
    if num_competitors == 2 and p.device.type == "cpu" and p.dtype == torch.float64:
        return _tournament_numpy(p, g)
    g = g.to(p.dtype)
    if num_competitors == 2:  # tournament_layer with fewer tensor ops: p <- p * ((1 + g_l) - E_p[g_l])
        one_plus_g = g + 1.0
        for layer in range(g.shape[-2]):
            p = p * (one_plus_g[..., layer, :] - (p * g[..., layer, :]).sum(-1, keepdim=True))
    else:
        for layer in range(g.shape[-2]):
            p = tournament_layer(p, g[..., layer, :], num_competitors)
    p = p.clamp_min(0.0)
    return p / p.sum(-1, keepdim=True)


def _tournament_numpy(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The 2-competitor loop of :func:`tournament` in numpy (CPU float64): the same
    arithmetic, with a fraction of torch's per-op overhead on the small rows of decoding."""
    work = p.numpy().copy()
    bits = g.numpy().astype(np.float64)
    one_plus_g = bits + 1.0
    for layer in range(bits.shape[-2]):
        work *= one_plus_g[..., layer, :] - (work * bits[..., layer, :]).sum(-1, keepdims=True)
    np.maximum(work, 0.0, out=work)
    work /= work.sum(-1, keepdims=True)
    return torch.from_numpy(work)


def tournament_reference(p: list[float], g: list[list[int]], num_competitors: int = 2) -> list[float]:
    """The winner's distribution by direct enumeration of one match per layer (the oracle):
    for every N-tuple of competitors drawn from the current distribution, the winner is
    uniform among those with the largest g. p: [V] floats; g: [m][V] bits. Tiny V only."""
    import itertools

    for layer_g in g:
        nxt = [0.0] * len(p)
        for draw in itertools.product(range(len(p)), repeat=num_competitors):
            weight = 1.0
            for token in draw:
                weight *= p[token]
            if weight == 0.0:
                continue
            best = max(layer_g[t] for t in draw)
            winners = [t for t in draw if layer_g[t] == best]
            for t in winners:
                nxt[t] += weight / len(winners)
        p = nxt
    return p
