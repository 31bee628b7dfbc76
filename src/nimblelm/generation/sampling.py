"""Logits processing and token choice as pure functions.

``probabilities(logits, temperature, top_k, top_p)`` is THE processed distribution p that
autoregressive sampling draws from; speculative verification uses the very same function.
temperature == 0 means greedy (argmax)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GenerationError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be a positive integer or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest (along the last dim) to -inf. Ties at the
    threshold are kept."""
    if k >= logits.shape[-1]:
        return logits
    threshold = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass
    reaches p (the most likely token is always kept)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already >= p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """temperature -> top-k -> top-p on logits [..., V] (temperature > 0)."""
    logits = logits / config.temperature
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p is not None:
        logits = top_p_filter(logits, config.top_p)
    return logits


def probabilities(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The processed distribution p [..., V]; one-hot at the argmax when greedy."""
    if config.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return process_logits(logits, config).softmax(-1)


def choose_tokens(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from logits [B, V] -> [B]."""
    if config.greedy:
        return logits.argmax(-1)
    probs = process_logits(logits.float() if logits.dtype != torch.float64 else logits, config).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
