"""Prompt lookup (n-gram) drafting: no model. The draft continues the most recent earlier
occurrence of the context's last n-gram (longest n first)."""

from __future__ import annotations

from ..tree import DraftTree


class PromptLookupDrafter:
    """Propose up to ``num_tokens`` tokens copied from after the latest earlier match of the
    context's final ``max_ngram``..``min_ngram`` tokens (transformers' prompt_lookup_num_tokens)."""

    vocab_size = None
    calls = 0

    def __init__(self, num_tokens: int = 10, max_ngram: int = 3, min_ngram: int = 1):
        if num_tokens < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError("need num_tokens >= 1 and 1 <= min_ngram <= max_ngram")
        self.num_tokens, self.max_ngram, self.min_ngram = num_tokens, max_ngram, min_ngram

    @property
    def max_tree_size(self) -> int:
        return self.num_tokens + 1

    def begin(self, prompt: list[int], request) -> None:
        pass

    def propose(self, context: list[int]) -> DraftTree:
        return DraftTree.chain([context[-1]] + self.lookup(context))

    def lookup(self, context: list[int]) -> list[int]:
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            suffix = context[n_ctx - n:]
            for start in range(n_ctx - n - 1, -1, -1):  # latest earlier occurrence first
                if context[start:start + n] == suffix:
                    return context[start + n:start + n + self.num_tokens]
        return []

    def accept(self, context: list[int], emission) -> None:
        pass
