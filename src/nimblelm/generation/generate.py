"""``generate`` and ``stream``: one decoding loop per strategy, all sharing argument checks,
prompt batching (left padding), stop tokens and statistics.

A *target* is a nimblelm :class:`LanguageModel` or anything with the same calling protocol
(the transformers adapter in :mod:`nimblelm.integrations.hf`):
``config.vocab_size``, ``config.max_seq_len``, ``make_cache(batch, max_len)`` and
``target(tokens, positions, cache=..., tree=..., token_mask=..., logits_to_keep=...)``
returning an object with ``.logits`` (and ``.hidden``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..errors import GenerationError
from .sampling import SamplingConfig, choose_tokens
from .watermark.hooks import row_sessions, sample_watermarked


@dataclass
class GenerationStats:
    target_calls: int = 0
    draft_calls: int = 0
    new_tokens: int = 0  # over all rows, stop token included, padding excluded
    rounds: int = 0  # target calls that emitted tokens (a prefill of prompt[:-1] emits none)
    prefill_s: float = 0.0
    total_s: float = 0.0
    draft_s: float = 0.0  # wall time inside the drafter's propose() (speculative strategies)

    @property
    def accepted_per_call(self) -> float:
        """tau: tokens emitted per round (a target call that emitted tokens), bonus token
        included (Spec-Bench convention); exactly 1 for autoregressive, depth + 1 for a
        drafter that is always right."""
        return self.new_tokens / max(self.rounds, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decode_s = self.total_s - self.prefill_s
        return self.new_tokens / decode_s if decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"target_calls": self.target_calls, "draft_calls": self.draft_calls, "new_tokens": self.new_tokens,
                "rounds": self.rounds,
                "accepted_per_call": self.accepted_per_call, "tokens_per_s": self.tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s, "prefill_s": self.prefill_s, "draft_s": self.draft_s,
                "total_s": self.total_s}


@dataclass
class StreamEvent:
    """Tokens accepted in one round: ``tokens[b]`` for row b (empty once the row stopped);
    ``from_draft[b][i]`` says whether token i was a draft token the target accepted."""

    tokens: list[list[int]]
    from_draft: list[list[bool]]
    stats: GenerationStats


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, T_new] new tokens, rows that stopped early padded with pad_token_id
    lengths: list[int]  # new tokens per row (stop token included)
    stats: GenerationStats = field(default_factory=GenerationStats)

    def sequences(self) -> list[list[int]]:
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths)]


@dataclass
class GenerationRequest:
    """Validated arguments shared by every strategy."""

    target: object
    tokens: torch.Tensor  # [B, T] left-padded prompt
    token_mask: torch.Tensor  # [B, T] bool, False at padding
    max_new_tokens: int
    sampling: SamplingConfig
    generator: torch.Generator | None
    stop_tokens: frozenset[int]
    drafter: object = None
    watermark: object = None

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def prompt_positions(self) -> torch.Tensor:
        """Logical positions of the prompt tokens: 0 at each row's first real token."""
        return (self.token_mask.long().cumsum(-1) - 1).clamp(min=0)


Strategy = Callable[[GenerationRequest], Iterator[StreamEvent]]
STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str) -> Callable[[Strategy], Strategy]:
    def add(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return add


def stream(model, prompt_ids, max_new_tokens: int = 64, strategy: str = "autoregressive", drafter=None,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           watermark=None, stop_tokens=None, token_mask: torch.Tensor | None = None) -> Iterator[StreamEvent]:
    """Yield a :class:`StreamEvent` per decoding round. Arguments as :func:`generate`.
    All arguments are checked before any model call."""
    request = _make_request(model, prompt_ids, max_new_tokens, strategy, drafter, temperature, top_k, top_p,
                            seed, watermark, stop_tokens, token_mask)
    return STRATEGIES[strategy](request)


def generate(model, prompt_ids, max_new_tokens: int = 64, strategy: str = "autoregressive", drafter=None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             watermark=None, stop_tokens=None, token_mask: torch.Tensor | None = None,
             pad_token_id: int = 0) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    model: a nimblelm LanguageModel or a transformers causal LM.
    prompt_ids: list[int], list[list[int]] (ragged prompts are left-padded), or LongTensor
        [T] / [B, T] (with ``token_mask`` [B, T], False at left padding).
    temperature 0 = greedy; top_k / top_p filter the sampled distribution; ``seed`` makes
    sampling reproducible. Generation of a row stops after any of ``stop_tokens``.
    """
    rows: list[list[int]] | None = None
    stats = GenerationStats()
    for event in stream(model, prompt_ids, max_new_tokens, strategy, drafter, temperature, top_k, top_p, seed,
                        watermark, stop_tokens, token_mask):
        if rows is None:
            rows = [[] for _ in event.tokens]
        for row, new in zip(rows, event.tokens):
            row.extend(new)
        stats = event.stats
    if rows is None:  # max_new_tokens == 0
        batch = _prompt_batch_size(prompt_ids)
        rows = [[] for _ in range(batch)]
    width = max((len(r) for r in rows), default=0)
    tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return GenerationResult(tokens=tokens, lengths=[len(r) for r in rows], stats=stats)


# -- argument handling ---------------------------------------------------------------------
def _prompt_batch_size(prompt_ids) -> int:
    if isinstance(prompt_ids, torch.Tensor):
        return 1 if prompt_ids.dim() == 1 else prompt_ids.shape[0]
    return len(prompt_ids) if prompt_ids and isinstance(prompt_ids[0], (list, tuple)) else 1


def as_target(model):
    """A nimblelm model as is; a transformers causal LM wrapped by the HF adapter."""
    if type(model).__module__.startswith("transformers"):
        from ..integrations.hf import HFTarget

        return HFTarget(model)
    if not hasattr(model, "make_cache"):
        raise GenerationError(f"cannot generate with a {type(model).__name__}; pass a nimblelm LanguageModel "
                              "or a transformers causal LM")
    return model


def prompt_tensor(prompt_ids, token_mask: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise prompts to (tokens [B, T] long, token_mask [B, T] bool), left-padding ragged lists."""
    if isinstance(prompt_ids, torch.Tensor):
        tokens = prompt_ids[None] if prompt_ids.dim() == 1 else prompt_ids
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise GenerationError(f"prompt_ids must be an integer tensor [B, T], got {tuple(prompt_ids.shape)} {prompt_ids.dtype}")
        mask = torch.ones_like(tokens, dtype=torch.bool) if token_mask is None else token_mask.to(torch.bool)
        if mask.shape != tokens.shape:
            raise GenerationError(f"token_mask shape {tuple(mask.shape)} differs from prompt shape {tuple(tokens.shape)}")
        return tokens.long().to(device), mask.to(device)
    rows = [list(prompt_ids)] if not prompt_ids or not isinstance(prompt_ids[0], (list, tuple)) else [list(r) for r in prompt_ids]
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        if not all(isinstance(t, int) for t in row):
            raise GenerationError("prompt_ids must contain Python ints")
        if row:
            tokens[b, width - len(row):] = torch.tensor(row)
            mask[b, width - len(row):] = True
    return tokens.to(device), mask.to(device)


def _make_request(model, prompt_ids, max_new_tokens, strategy, drafter, temperature, top_k, top_p, seed,
                  watermark, stop_tokens, token_mask) -> GenerationRequest:
    if strategy not in STRATEGIES:
        raise GenerationError(f"unknown strategy {strategy!r}; available: {', '.join(sorted(STRATEGIES))}")
    target = as_target(model)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    device = next(iter(target.parameters())).device if hasattr(target, "parameters") else "cpu"
    tokens, mask = prompt_tensor(prompt_ids, token_mask, device)
    lengths = mask.sum(-1)
    if int(lengths.min()) == 0:
        raise GenerationError("every prompt needs at least one token")
    vocab = target.config.vocab_size
    if int(tokens[mask].min()) < 0 or int(tokens[mask].max()) >= vocab:
        bad = tokens[mask][(tokens[mask] < 0) | (tokens[mask] >= vocab)][0].item()
        raise GenerationError(f"token id {bad} is out of range for a vocabulary of {vocab} (ids 0..{vocab - 1})")
    context = target.config.max_seq_len
    if tokens.shape[1] > context:
        raise GenerationError(f"prompt of {tokens.shape[1]} tokens is longer than the model's context of {context}; shorten the prompt")
    if tokens.shape[1] + max_new_tokens > context:
        raise GenerationError(f"prompt ({tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                              f"context of {context}; use max_new_tokens <= {context - tokens.shape[1]}")
    sampling = SamplingConfig(temperature, top_k, top_p)
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=tokens.device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    stops = frozenset([stop_tokens] if isinstance(stop_tokens, int) else (stop_tokens or []))
    return GenerationRequest(target, tokens, mask, max_new_tokens, sampling, generator, stops, drafter, watermark)


# -- autoregressive --------------------------------------------------------------------------
@register_strategy("autoregressive")
@torch.no_grad()
def autoregressive(request: GenerationRequest) -> Iterator[StreamEvent]:
    """One target call per token; with a watermark, each row samples from its tournament
    distribution (generation/watermark/hooks.py)."""
    sessions = row_sessions(request)
    if request.max_new_tokens == 0:
        return
    target, stats = request.target, GenerationStats()
    start = time.perf_counter()
    cache = target.make_cache(request.batch, request.tokens.shape[1] + request.max_new_tokens)
    positions = request.prompt_positions()
    out = target(request.tokens, positions, cache=cache, token_mask=request.token_mask, logits_to_keep=1)
    stats.target_calls += 1
    stats.prefill_s = time.perf_counter() - start
    next_pos = positions[:, -1:] + 1
    finished = torch.zeros(request.batch, dtype=torch.bool)
    for step in range(request.max_new_tokens):
        if sessions is None:
            chosen = choose_tokens(out.logits[:, -1], request.sampling, request.generator)
        else:
            chosen = sample_watermarked(sessions, out.logits[:, -1], request.sampling, request.generator)
        stats.rounds += 1
        new = [[] if done else [tok] for tok, done in zip(chosen.tolist(), finished.tolist())]
        stats.new_tokens += sum(len(t) for t in new)
        finished |= torch.tensor([bool(t) and t[0] in request.stop_tokens for t in new])
        last = bool(finished.all()) or step == request.max_new_tokens - 1
        if not last:
            out = target(chosen[:, None], next_pos, cache=cache, logits_to_keep=1)
            stats.target_calls += 1
            next_pos = next_pos + 1
        stats.total_s = time.perf_counter() - start
        yield StreamEvent(tokens=new, from_draft=[[False] * len(t) for t in new], stats=stats)
        if last:
            return
