"""Which positions are watermarked, and the watermark applied during generation.

The rule (the same in generation and detection). Response position k (0 = the first
generated token) is predicted from the H = ngram_len - 1 tokens before it in prompt +
response. It is **watermarked** iff

* at least H tokens precede it (prompt included), and
* it is not a *repeated context*: when k >= H (its context lies inside the response), its
  context must differ from the context of every earlier position j with H <= j < k.

Positions k < H take part of their context from the prompt; they are watermarked but never
count as "seen" (a detector given only the response cannot know them), so a detector given
the response alone reproduces the generation-time mask exactly on positions k >= H, and a
detector given the prompt too reproduces it everywhere.

:class:`WatermarkSession` holds, per sequence, the accepted tokens and the set of contexts
seen so far. It is advanced with accepted tokens only (:meth:`sync`), so rejected draft
tokens never leave a trace; draft-tree nodes are evaluated against the seen set plus the
contexts along their own ancestor path (:meth:`distributions`), which is what sequential
decoding would have seen had that path been accepted.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .config import SynthID, WatermarkError
from .hashing import g_values
from .tournament import tournament


def watermark_mask(response: Sequence[int], config: SynthID, prompt: Sequence[int] | None = None) -> list[bool]:
    """Detection-side mask: per response position, whether generation watermarked it (the
    rule in the module docstring). Without ``prompt`` positions k < H are False (unknown)."""
    h = config.context_len
    tail = list(prompt[-h:]) if prompt is not None else None
    full = (tail or []) + list(response)
    offset = len(tail) if tail is not None else 0
    seen: set[tuple[int, ...]] = set()
    mask = []
    for k in range(len(response)):
        i = offset + k  # index of position k in ``full``
        if k < h:
            mask.append(tail is not None and i >= h)
            continue
        context = tuple(full[i - h:i])
        mask.append(context not in seen)
        seen.add(context)
    return mask


class WatermarkSession:
    """The watermark state of one sequence: accepted tokens and the contexts seen so far."""

    def __init__(self, config: SynthID, prompt: Sequence[int]):
        self.config = config
        self.tokens: list[int] = list(prompt)
        self.prompt_len = len(self.tokens)
        self.seen: set[tuple[int, ...]] = set()
        self.mask: list[bool] = []  # per accepted response position: watermarked or not

    def _position_state(self, tokens: Sequence[int], end: int, seen) -> tuple[bool, tuple[int, ...] | None]:
        """(watermarked?, context to mark as seen or None) for the position right after
        ``tokens[:end]`` (response position ``end - prompt_len``)."""
        h = self.config.context_len
        if end < h:
            return False, None
        if end - self.prompt_len < h:
            return True, None
        context = tuple(tokens[end - h:end])
        return context not in seen, context

    def sync(self, context: Sequence[int]) -> None:
        """Accept ``context[len(self.tokens):]`` (the caller's accepted context only grows)."""
        for token in context[len(self.tokens):]:
            marked, ctx = self._position_state(self.tokens, len(self.tokens), self.seen)
            self.mask.append(marked)
            if ctx is not None:
                self.seen.add(ctx)
            self.tokens.append(int(token))

    def node_states(self, paths: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[bool]]:
        """For rows continuing the accepted tokens with ``paths[i]``: contexts [n, H] long
        (zeros where unused) and whether each row's next position is watermarked."""
        h = self.config.context_len
        base = len(self.tokens)
        shift = max(0, base - h)  # tail[j] is position shift + j of the full sequence
        contexts, marked = torch.zeros(len(paths), h, dtype=torch.long), []
        for i, path in enumerate(paths):
            tail = self.tokens[shift:] + list(path)
            on_path: set[tuple[int, ...]] = set()  # contexts of the path's own positions count as seen
            for end in range(base, base + len(path) + 1):
                if end < h:
                    row_marked, ctx = False, None
                elif end - self.prompt_len < h:
                    row_marked, ctx = True, None
                else:
                    ctx = tuple(tail[end - shift - h:end - shift])
                    row_marked = ctx not in self.seen and ctx not in on_path
                    on_path.add(ctx)
            marked.append(row_marked)
            if row_marked:
                contexts[i] = torch.tensor(tail[len(tail) - h:])
        return contexts, marked

    def distributions(self, probs: torch.Tensor, paths: Sequence[Sequence[int]]) -> torch.Tensor:
        """Watermark probs [n, V] (row i: the processed next-token distribution after the
        accepted tokens + ``paths[i]``); rows that are not watermarked come back unchanged."""
        contexts, marked = self.node_states(paths)
        return apply_watermark(self.config, probs, contexts, marked)


def apply_watermark(config: SynthID, probs: torch.Tensor, contexts: torch.Tensor, marked: Sequence[bool]) -> torch.Tensor:
    """Tournament transform of the rows of probs [n, V] where ``marked``, with contexts [n, H].
    g-values are computed only for tokens some marked row can emit (p > 0: top-k / top-p
    make this much smaller than V); tokens with p = 0 stay at 0 whatever their g."""
    rows = torch.tensor(marked, dtype=torch.bool, device=probs.device)
    if not bool(rows.any()):
        return probs
    chosen = contexts[rows]
    hashes = config.context_cache(chosen).to(probs.device)  # [r, m]
    work = probs[rows].double()  # [r, V]
    support = (work > 0).any(0).nonzero()[:, 0]  # [S] candidate ids
    full = support.numel() == probs.shape[-1]
    g = g_values(config.seeds, chosen, support, hashes=hashes)  # [r, m, S]
    out = probs.double().clone()
    if full:  # no top-k / top-p: every token is a candidate
        out[rows] = tournament(work, g, config.num_competitors)
    else:
        out[rows] = 0.0
        out[rows.nonzero()[:, 0][:, None], support[None, :]] = tournament(work[:, support], g, config.num_competitors)
    return out.to(probs.dtype)


def check_watermark(watermark, sampling) -> SynthID | None:
    """Validate ``generate(..., watermark=...)`` before any work."""
    if watermark is None:
        return None
    if not isinstance(watermark, SynthID):
        raise WatermarkError(f"watermark must be a nimblelm.watermark.SynthID, got {type(watermark).__name__}")
    if sampling.greedy:
        raise WatermarkError("SynthID watermarking changes how tokens are sampled, and greedy decoding does not "
                             "sample: pass temperature > 0 with watermark=..., or watermark=None for greedy")
    return watermark
