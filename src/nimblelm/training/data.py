"""Token streams for training: a corpus directory's ``{train,val,test}.bin`` (flat uint16 ids,
see :mod:`nimblelm.training.corpus`), memory-mapped.

Batches are pure functions of (seed, step, rank): training windows are drawn uniformly from
the train stream with a generator seeded by those three numbers, so a resumed run sees
exactly the batches the uninterrupted run would have, on any number of processes. Eval
windows are fixed and evenly spaced over the validation (or test) stream.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import NimbleError


class TokenData:
    """``train_batch`` / ``eval_batches`` return LongTensor [B, seq_len + 1]: inputs are
    ``batch[:, :-1]``, next-token labels ``batch[:, 1:]``."""

    def __init__(self, corpus_dir: str, seed: int = 0):
        self.corpus_dir, self.seed = corpus_dir, seed
        self.streams: dict[str, np.ndarray] = {}
        for split in ("train", "val", "test"):
            path = os.path.join(corpus_dir, f"{split}.bin")
            if os.path.isfile(path):
                self.streams[split] = np.memmap(path, dtype=np.uint16, mode="r")
        if "train" not in self.streams:
            raise NimbleError(f"{corpus_dir!r} has no train.bin; build a corpus with `nimblelm train corpus --out DIR`")

    @property
    def tokenizer_path(self) -> str | None:
        path = os.path.join(self.corpus_dir, "tokenizer.json")
        return path if os.path.isfile(path) else None

    def num_tokens(self, split: str = "train") -> int:
        return int(self.streams[split].size)

    def _windows(self, split: str, starts: np.ndarray, seq_len: int) -> torch.Tensor:
        stream = self.streams[split]
        rows = [np.asarray(stream[s: s + seq_len + 1], dtype=np.int64) for s in starts]
        return torch.from_numpy(np.stack(rows))

    def _check(self, split: str, seq_len: int) -> None:
        if split not in self.streams:
            raise NimbleError(f"{self.corpus_dir!r} has no {split}.bin")
        if self.num_tokens(split) <= seq_len + 1:
            raise NimbleError(f"{split}.bin has {self.num_tokens(split)} tokens, fewer than seq_len + 2 = {seq_len + 2}; "
                              "lower --seq-len")

    def train_batch(self, step: int, rank: int, world: int, batch_size: int, seq_len: int) -> torch.Tensor:
        """[batch_size, seq_len + 1] random windows, a pure function of (seed, step, rank)."""
        self._check("train", seq_len)
        rng = np.random.default_rng([self.seed, step, rank, world])
        starts = rng.integers(0, self.num_tokens("train") - seq_len - 1, size=batch_size)
        return self._windows("train", starts, seq_len)

    def eval_batches(self, num_batches: int, batch_size: int, seq_len: int, split: str = "val") -> list[torch.Tensor]:
        """``num_batches`` fixed [batch_size, seq_len + 1] windows evenly spaced over ``split``
        (as many as fit when the stream is short)."""
        self._check(split, seq_len)
        count = min(num_batches * batch_size, (self.num_tokens(split) - 1) // (seq_len + 1))
        starts = np.arange(count) * (seq_len + 1)
        return [self._windows(split, starts[i: i + batch_size], seq_len) for i in range(0, count, batch_size)]


def write_token_stream(path: str, ids) -> None:
    """Write ids as the uint16 stream format (tests and tools that make small corpora)."""
    array = np.asarray(ids, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() >= 65536):
        raise NimbleError("token ids must be in [0, 65536) for the uint16 corpus format")
    array.astype(np.uint16).tofile(path)
