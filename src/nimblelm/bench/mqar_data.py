"""Multi-query associative recall (MQAR) data, with the semantics of Zoology's ``multiquery_ar``
(Arora, Eyuboglu et al. 2023, "Zoology: measuring and improving recall in efficient LMs").

One example of length ``seq_len`` with ``num_kv_pairs`` = k:

* positions [0, 2k): key, value, key, value, ... Keys are drawn from the lower half of the
  vocabulary ``1 .. V//2 - 1`` and values from the upper half ``V//2 .. V - 1``, without
  repetition inside an example (keys AND values distinct, as Zoology).
* the rest is a query region of ``space = (seq_len - 2k) // 2`` even slots. Each key is
  queried exactly once, at slot 2 * gap, the k gaps drawn without replacement from
  0 .. space-1 with probability proportional to (gap + 1) ** (power_a - 1) (a power law:
  short gaps are most likely; power_a = 0.01 as Zoology).
* every other position holds a token drawn uniformly from the whole vocabulary
  (Zoology's ``random_non_queries=True``).
* labels are -100 (ignored) everywhere except AT a query position, whose label is the value
  paired with the queried key: the model predicts the value while reading the key.

Everything is drawn from one ``numpy.random.Generator(seed)``, so a (seed, sizes) pair always
gives the same tensors. Sampling without replacement uses the Gumbel-top-k trick (the same
distribution as sequential draws, e.g. ``np.random.choice(..., replace=False, p=p)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

IGNORE = -100


@dataclass
class MQARBatch:
    inputs: torch.Tensor  # [N, seq_len] int64 token ids
    labels: torch.Tensor  # [N, seq_len] int64, IGNORE except at query positions


def check_sizes(vocab_size: int, seq_len: int, num_kv_pairs: int) -> None:
    """Raise ConfigError naming the option to change when the sizes cannot make an example."""
    if seq_len % 2:
        raise ConfigError(f"MQAR seq_len must be even, got {seq_len}")
    if num_kv_pairs < 1:
        raise ConfigError(f"MQAR needs at least one key-value pair, got {num_kv_pairs}")
    if 4 * num_kv_pairs > seq_len:
        raise ConfigError(f"MQAR with {num_kv_pairs} kv pairs needs seq_len >= {4 * num_kv_pairs} "
                          f"(2k context + k query slots of 2), got {seq_len}")
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ConfigError(f"MQAR vocab_size {vocab_size} has fewer than {num_kv_pairs} keys in its lower half; "
                          "raise vocab_size")


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
    """p[g] proportional to (g + 1) ** (power_a - 1) for g in 0..space-1 (Zoology's power law)."""
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def _distinct_rows(rng: np.random.Generator, num: int, low: int, high: int, k: int) -> np.ndarray:
    """[num, k] integers in [low, high), distinct within each row, uniform over such rows."""
    if high - low <= 4 * k:  # dense: a full permutation per row
        return np.argsort(rng.random((num, high - low)), axis=1)[:, :k] + low
    out = rng.integers(low, high, size=(num, k))
    while True:  # rejection: redraw the rows that contain a duplicate
        srt = np.sort(out, axis=1)
        bad = np.nonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))[0]
        if bad.size == 0:
            return out
        out[bad] = rng.integers(low, high, size=(bad.size, k))


def _power_law_gaps(rng: np.random.Generator, num: int, space: int, k: int, power_a: float) -> np.ndarray:
    """[num, k] distinct gaps per row, sequential-without-replacement power-law draws (Gumbel-top-k)."""
    scores = np.log(gap_probabilities(space, power_a))[None, :] + rng.gumbel(size=(num, space))
    return np.argsort(-scores, axis=1)[:, :k]


def multiquery_ar(num_examples: int, vocab_size: int = 8192, seq_len: int = 64, num_kv_pairs: int = 4,
                  power_a: float = 0.01, seed: int = 0) -> MQARBatch:
    """``num_examples`` MQAR examples (see the module docstring). inputs/labels [N, seq_len]."""
    check_sizes(vocab_size, seq_len, num_kv_pairs)
    rng = np.random.default_rng(seed)
    k, half = num_kv_pairs, vocab_size // 2
    context = 2 * k
    space = (seq_len - context) // 2
    keys = _distinct_rows(rng, num_examples, 1, half, k)  # [N, k]
    values = _distinct_rows(rng, num_examples, half, vocab_size, k)  # [N, k]
    gaps = _power_law_gaps(rng, num_examples, space, k, power_a)  # [N, k], key i queried at gap i
    inputs = rng.integers(0, vocab_size, size=(num_examples, seq_len))  # noise everywhere first
    labels = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_pos = context + 2 * gaps  # [N, k]
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    np.put_along_axis(labels, query_pos, values, axis=1)
    return MQARBatch(torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(labels))
