"""g-values from pure integer hashing: identical on every device, batch size and call order.

``g_l(context, candidate)`` is one pseudo-random bit per (key of layer l, the last H context
tokens, candidate token, layer index l). Everything is 32-bit integer arithmetic done in
int64 with no overflow (32-bit values times constants below 2^30), so the same code
runs on Python ints (:func:`g_value_reference`, the oracle) and on int64 tensors of any
device (:func:`g_values`) and gives the same bits. No torch random generator is involved.

The mixer is a two-round xor-shift-multiply hash (:func:`mix32`). Layer seed
``s_l = mix(mix(mix(key_lo ^ SALT) ^ key_hi) ^ mix(l + LAYER_SALT))``, context fold
``c = mix(c ^ mix(token ^ TOKEN_SALT))`` over the H context tokens (oldest first) from
``c = CONTEXT_SALT``, per-layer context hash ``h_l = mix(s_l ^ c)``, and
``g = bit 31 of (h_l ^ mix(candidate ^ CANDIDATE_SALT)) * K mod 2^32`` (:func:`pair_bit`).
"""

from __future__ import annotations

from typing import Sequence

import torch

MASK32 = 0xFFFFFFFF
_SALT, _LAYER_SALT, _TOKEN_SALT, _CANDIDATE_SALT = 0x5EED1D01, 0x1A7E55ED, 0x70CE11AB, 0x0CA4D1DA
_CONTEXT_SALT = 0x3C6EF372


def mix32(x):
    """A bijective 32-bit xor-shift-multiply mixer (constants 0x2C1B3C6D, 0x297A2D39 from
    Wellons' hash-prospector). x: int or int64 tensor with values in [0, 2^32); both
    multipliers are below 2^30, so no product leaves int64."""
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & MASK32
    x = x ^ (x >> 12)
    x = (x * 0x297A2D39) & MASK32
    return x ^ (x >> 15)


def pair_bit(x):
    """The g bit of ``x = h_l ^ c`` (both already fully mixed): bit 31 of x * K mod 2^32,
    which depends on every bit of x. One multiply instead of a full :func:`mix32`: this is
    the only step done per (row, layer, candidate), so it sets the cost on large vocabularies."""
    return ((x * 0x2C1B3C6D) & MASK32) >> 31


def layer_seeds(keys: Sequence[int]) -> list[int]:
    """One 32-bit seed per layer from the user's integer keys (any size, negatives allowed:
    taken modulo 2^64)."""
    seeds = []
    for layer, key in enumerate(keys):
        key64 = int(key) & 0xFFFFFFFFFFFFFFFF
        seed = mix32(mix32((key64 & MASK32) ^ _SALT) ^ (key64 >> 32))
        seeds.append(mix32(seed ^ mix32((layer + _LAYER_SALT) & MASK32)))
    return seeds


def fold_context(context: Sequence[int]) -> int:
    """One 32-bit hash of the context tokens (oldest first), in Python ints."""
    c = _CONTEXT_SALT
    for token in context:
        c = mix32(c ^ mix32((int(token) & MASK32) ^ _TOKEN_SALT))
    return c


def context_hashes(seeds: Sequence[int], contexts: torch.Tensor) -> torch.Tensor:
    """contexts [..., H] non-negative token ids -> hashes [..., m] (int64 in [0, 2^32)):
    ``mix(seed_l ^ fold(context))``."""
    tokens = mix32((contexts.long() & MASK32) ^ _TOKEN_SALT)  # [..., H]
    c = torch.full(contexts.shape[:-1], _CONTEXT_SALT, dtype=torch.long, device=contexts.device)
    for i in range(contexts.shape[-1]):
        c = mix32(c ^ tokens[..., i])
    seeds_t = torch.tensor(list(seeds), dtype=torch.long, device=contexts.device)
    return mix32(seeds_t ^ c[..., None])


class ContextHashCache:
    """Memoised :func:`context_hashes` in Python ints: context tuple -> per-layer hashes.
    Cheaper than tensor ops for the few contexts of a decoding step, and draft and target
    positions share contexts. Holds at most ``max_entries`` contexts (then starts over)."""

    def __init__(self, seeds: Sequence[int], max_entries: int = 1 << 16):
        self.seeds, self.max_entries = list(seeds), max_entries
        self.table: dict[tuple[int, ...], list[int]] = {}

    def _python_hashes(self, context: tuple[int, ...]) -> list[int]:
        c = fold_context(context)
        return [mix32(seed ^ c) for seed in self.seeds]

    def __call__(self, contexts: torch.Tensor) -> torch.Tensor:
        """contexts [n, H] -> hashes [n, m] int64, equal to ``context_hashes(seeds, contexts)``.
        New contexts are hashed in Python ints when few (cheaper than tensor ops for one or
        two), else with :func:`context_hashes`."""
        keys = [tuple(row) for row in contexts.tolist()]
        missing = list(dict.fromkeys(k for k in keys if k not in self.table))
        if len(self.table) + len(missing) > self.max_entries:
            self.table.clear()
            missing = list(dict.fromkeys(keys))
        if len(missing) <= 2:
            fresh = [self._python_hashes(k) for k in missing]
        else:
            fresh = context_hashes(self.seeds, torch.tensor(missing, dtype=torch.long)).tolist()
        self.table.update(zip(missing, fresh))
        rows = [self.table[k] for k in keys]
        return torch.tensor(rows, dtype=torch.long, device=contexts.device).reshape(len(rows), len(self.seeds))


def candidate_hashes(candidates: torch.Tensor) -> torch.Tensor:
    """Token ids [...] -> their 32-bit hashes (the per-candidate half of a g-value)."""
    return mix32((candidates.long() & MASK32) ^ _CANDIDATE_SALT)


def g_values(seeds: Sequence[int], contexts: torch.Tensor, candidates: torch.Tensor,
             hashes: torch.Tensor | None = None) -> torch.Tensor:
    """g-values in {0, 1} (uint8) of shape [..., m, C].

    contexts: [..., H] long, the H tokens before the scored position (oldest first).
    candidates: [C] (the same candidates for every row, e.g. ``arange(V)``) or [..., C]
        (per-row candidates, e.g. the tokens actually emitted, C = 1).
    hashes: the contexts' :func:`context_hashes` [..., m] when already known (a cache).
    """
    h = (context_hashes(seeds, contexts) if hashes is None else hashes)[..., :, None]  # [..., m, 1]
    c = candidate_hashes(candidates)
    c = c[None, :] if candidates.dim() == 1 else c[..., None, :]  # [1, C] or [..., 1, C]
    return (pair_bit(h ^ c)).to(torch.uint8)


def g_value_reference(key: int, layer: int, context: Sequence[int], candidate: int) -> int:
    """The same bit as :func:`g_values`, in plain Python ints, one at a time (the oracle)."""
    h = mix32(layer_seeds([0] * layer + [key])[layer] ^ fold_context(context))
    return pair_bit(h ^ mix32((int(candidate) & MASK32) ^ _CANDIDATE_SALT))
