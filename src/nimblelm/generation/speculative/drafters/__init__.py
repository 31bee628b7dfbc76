"""Drafters propose a DraftTree per round. Interface (duck-typed):

``max_tree_size`` (int): most nodes a proposal may have (root included), for cache sizing.
``vocab_size`` (int | None): the vocabulary the drafts come from, checked against the target.
``calls`` (int): draft model calls so far (0 for model-free drafters).
``begin(prompt, request)``: start a new sequence. ``propose(context) -> DraftTree`` with
``context[-1]`` as root. ``accept(context, emission)``: the round's emitted tokens.
``observe_features(hidden)`` (optional, for drafters that read the target's features):
``hidden`` [n, D] are the target's final hidden states of the n tokens that just entered
its cache (after the prefill: prompt[:-1]; after each round: the committed path), called
before ``accept``.
"""

from .draft_model import DraftModelDrafter
from .eagle import Eagle2Drafter, EagleDrafter, EagleHead
from .hydra import HydraDrafter, HydraHeads
from .lookup import PromptLookupDrafter
from .medusa import MedusaDrafter, MedusaHeads

__all__ = ["DraftModelDrafter", "PromptLookupDrafter", "MedusaHeads", "MedusaDrafter", "HydraHeads", "HydraDrafter",
           "EagleHead", "EagleDrafter", "Eagle2Drafter"]
