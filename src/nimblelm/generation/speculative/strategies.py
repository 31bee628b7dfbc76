"""The speculative strategies registered with :func:`nimblelm.generate`."""

from __future__ import annotations

from typing import Iterator

import torch

from ...errors import GenerationError
from ..generate import GenerationRequest, StreamEvent, register_strategy
from .drafters import DraftModelDrafter, PromptLookupDrafter
from .engine import speculative_rounds


@register_strategy("sps")
@torch.no_grad()
def speculative_sampling(request: GenerationRequest) -> Iterator[StreamEvent]:
    """drafter: a small LanguageModel (4 draft tokens per round) or a DraftModelDrafter."""
    drafter = request.drafter
    if drafter is None:
        raise GenerationError("strategy 'sps' needs drafter=<a small nimblelm LanguageModel sharing the vocabulary>")
    if not isinstance(drafter, DraftModelDrafter):
        if not hasattr(drafter, "make_cache"):
            raise GenerationError(f"strategy 'sps' needs a nimblelm LanguageModel or DraftModelDrafter as drafter, "
                                  f"got {type(drafter).__name__}")
        drafter = DraftModelDrafter(drafter)
    yield from speculative_rounds(request, drafter, "sps")


@register_strategy("lookup")
@torch.no_grad()
def prompt_lookup(request: GenerationRequest) -> Iterator[StreamEvent]:
    """Prompt lookup decoding; drafter: None (defaults) or a PromptLookupDrafter."""
    drafter = request.drafter if request.drafter is not None else PromptLookupDrafter()
    if not isinstance(drafter, PromptLookupDrafter):
        raise GenerationError(f"strategy 'lookup' takes drafter=None or a PromptLookupDrafter, got {type(drafter).__name__}")
    yield from speculative_rounds(request, drafter, "lookup")
