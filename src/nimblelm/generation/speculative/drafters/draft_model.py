"""Speculative sampling with a small draft language model (Chen et al. 2023; Leviathan et
al. 2023): the draft LM proposes a chain of ``num_tokens`` tokens, each sampled from its own
processed distribution q (same temperature / top-k / top-p as the target; argmax when greedy)."""

from __future__ import annotations

import torch

from ...sampling import probabilities
from ...watermark.speculative import draft_session
from ..tree import DraftTree


class DraftModelDrafter:
    """Chain drafts from any nimblelm LanguageModel sharing the target's vocabulary. The draft
    model keeps its own cache of the emitted context; drafted tokens are rolled back with a
    cache snapshot after every proposal."""

    def __init__(self, model, num_tokens: int = 4):
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self.model, self.num_tokens = model, num_tokens
        self.calls = 0

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def max_tree_size(self) -> int:
        return self.num_tokens + 1

    def begin(self, prompt: list[int], request) -> None:
        self.sampling, self.generator = request.sampling, request.generator
        self.cache = self.model.make_cache(1, len(prompt) + request.max_new_tokens + self.max_tree_size)
        self.seen = 0
        self.calls = 0
        self.watermark = draft_session(request, prompt)  # high-detectability watermark: q watermarked too

    @torch.no_grad()
    def propose(self, context: list[int]) -> DraftTree:
        out = self.model(torch.tensor([context[self.seen:]]), cache=self.cache, logits_to_keep=1)
        self.seen = len(context)
        saved = self.cache.snapshot()
        tokens, dists = [context[-1]], []
        if self.watermark is not None:
            self.watermark.sync(context)
        for i in range(self.num_tokens):
            q = probabilities(out.logits[0, -1].double(), self.sampling)  # [V]
            if self.watermark is not None:  # the same transform the target's p gets at this node
                q = self.watermark.distributions(q[None], [tokens[1:]])[0]
            token = int(q.argmax()) if self.sampling.greedy else int(torch.multinomial(q, 1, generator=self.generator))
            tokens.append(token)
            dists.append(q)
            if i + 1 < self.num_tokens:
                out = self.model(torch.tensor([[token]]), cache=self.cache, logits_to_keep=1)
        self.calls += self.num_tokens
        self.cache.restore(saved)
        dists.append(torch.full_like(dists[0], 1.0 / dists[0].numel()))  # the leaf has no children
        return DraftTree.chain(tokens, None if self.sampling.greedy else torch.stack(dists))

    def accept(self, context: list[int], emission) -> None:
        pass
