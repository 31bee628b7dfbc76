"""The speculative strategies registered with :func:`nimblelm.generate`."""

from __future__ import annotations

from typing import Iterator

import torch

from ...errors import GenerationError
from ..generate import GenerationRequest, StreamEvent, register_strategy
from .drafters import (DraftModelDrafter, Eagle2Drafter, EagleDrafter, EagleHead, HydraDrafter, HydraHeads,
                       MedusaDrafter, MedusaHeads, PromptLookupDrafter)
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


def head_drafter(request: GenerationRequest, strategy: str, head_cls: type, drafter_cls: type):
    """The request's drafter as a ``drafter_cls``: a configured instance as is, bare heads
    (``head_cls``, e.g. from :func:`nimblelm.load_drafter`) wrapped with the defaults."""
    drafter = request.drafter
    if isinstance(drafter, drafter_cls) and drafter.kind == drafter_cls.kind:  # not Eagle2Drafter for eagle
        return drafter
    if isinstance(drafter, head_cls):
        return drafter_cls(drafter)
    kind = head_cls.kind
    raise GenerationError(f"strategy {strategy!r} needs drafter=<{head_cls.__name__}> (e.g. "
                          f"nl.load_drafter(model_dir, kind={kind!r})) or a {drafter_cls.__name__}, got "
                          f"{type(drafter).__name__}")


@register_strategy("medusa")
@torch.no_grad()
def medusa(request: GenerationRequest) -> Iterator[StreamEvent]:
    """Medusa heads; drafter: MedusaHeads (static tree of 20 nodes) or a MedusaDrafter."""
    yield from speculative_rounds(request, head_drafter(request, "medusa", MedusaHeads, MedusaDrafter), "medusa")


@register_strategy("hydra")
@torch.no_grad()
def hydra(request: GenerationRequest) -> Iterator[StreamEvent]:
    """Hydra heads; drafter: HydraHeads (static tree of 20 nodes) or a HydraDrafter."""
    yield from speculative_rounds(request, head_drafter(request, "hydra", HydraHeads, HydraDrafter), "hydra")


@register_strategy("eagle")
@torch.no_grad()
def eagle(request: GenerationRequest) -> Iterator[StreamEvent]:
    """EAGLE with a static tree; drafter: an EagleHead (20 nodes, depth 5) or an EagleDrafter."""
    yield from speculative_rounds(request, head_drafter(request, "eagle", EagleHead, EagleDrafter), "eagle")


@register_strategy("eagle2")
@torch.no_grad()
def eagle2(request: GenerationRequest) -> Iterator[StreamEvent]:
    """EAGLE-2 dynamic trees; drafter: an EagleHead (depth 5, top_k 4, 16 kept nodes) or an
    Eagle2Drafter (e.g. total_tokens='auto')."""
    yield from speculative_rounds(request, head_drafter(request, "eagle2", EagleHead, Eagle2Drafter), "eagle2")
