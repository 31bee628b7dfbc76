"""Strategy ``"tree"``: EAGLE-2 dynamic draft trees from a draft language model."""

from __future__ import annotations

from typing import Iterator

import torch

from ...errors import GenerationError
from ..generate import GenerationRequest, StreamEvent, register_strategy
from .drafters.dynamic_tree import DynamicTreeDrafter
from .engine import speculative_rounds


@register_strategy("tree")
@torch.no_grad()
def dynamic_tree(request: GenerationRequest) -> Iterator[StreamEvent]:
    """drafter: a small nimblelm LanguageModel (wrapped as ``DynamicTreeDrafter(model)``:
    depth 5, top_k 8, 32 kept nodes) or a configured DynamicTreeDrafter."""
    drafter = request.drafter
    if drafter is None:
        raise GenerationError("strategy 'tree' needs drafter=<a small nimblelm LanguageModel sharing the vocabulary> "
                              "or a DynamicTreeDrafter")
    if not isinstance(drafter, DynamicTreeDrafter):
        if not hasattr(drafter, "make_cache"):
            raise GenerationError(f"strategy 'tree' needs a nimblelm LanguageModel or DynamicTreeDrafter as drafter, "
                                  f"got {type(drafter).__name__}")
        drafter = DynamicTreeDrafter(drafter)
    yield from speculative_rounds(request, drafter, "tree")
