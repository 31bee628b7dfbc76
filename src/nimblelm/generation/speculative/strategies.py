"""The speculative strategies registered with :func:`nimblelm.generate`."""

from __future__ import annotations

from typing import Iterator

import torch

from ...errors import GenerationError
from ..generate import GenerationRequest, StreamEvent, register_strategy
from .drafters import DraftModelDrafter, PromptLookupDrafter
from .drafters.dynamic_tree import DynamicTreeDrafter
from .engine import speculative_rounds


def model_drafter(request: GenerationRequest, strategy: str, drafter_cls: type):
    """The request's drafter as a ``drafter_cls``: a configured instance as is, a nimblelm
    LanguageModel wrapped with the class's defaults; anything else is a clear error."""
    drafter = request.drafter
    if drafter is None:
        raise GenerationError(f"strategy {strategy!r} needs drafter=<a small nimblelm LanguageModel sharing the "
                              f"vocabulary> or a {drafter_cls.__name__}")
    if isinstance(drafter, drafter_cls):
        return drafter
    if not hasattr(drafter, "make_cache"):
        raise GenerationError(f"strategy {strategy!r} needs a nimblelm LanguageModel or {drafter_cls.__name__} as "
                              f"drafter, got {type(drafter).__name__}")
    return drafter_cls(drafter)


@register_strategy("sps")
@torch.no_grad()
def speculative_sampling(request: GenerationRequest) -> Iterator[StreamEvent]:
    """drafter: a small LanguageModel (4 draft tokens per round) or a DraftModelDrafter."""
    yield from speculative_rounds(request, model_drafter(request, "sps", DraftModelDrafter), "sps")


@register_strategy("tree")
@torch.no_grad()
def dynamic_tree(request: GenerationRequest) -> Iterator[StreamEvent]:
    """EAGLE-2 dynamic draft trees; drafter: a small LanguageModel (wrapped as
    ``DynamicTreeDrafter(model)``: depth 5, top_k 8, 32 kept nodes) or a DynamicTreeDrafter."""
    yield from speculative_rounds(request, model_drafter(request, "tree", DynamicTreeDrafter), "tree")


@register_strategy("lookup")
@torch.no_grad()
def prompt_lookup(request: GenerationRequest) -> Iterator[StreamEvent]:
    """Prompt lookup decoding; drafter: None (defaults) or a PromptLookupDrafter."""
    drafter = request.drafter if request.drafter is not None else PromptLookupDrafter()
    if not isinstance(drafter, PromptLookupDrafter):
        raise GenerationError(f"strategy 'lookup' takes drafter=None or a PromptLookupDrafter, got {type(drafter).__name__}")
    yield from speculative_rounds(request, drafter, "lookup")
