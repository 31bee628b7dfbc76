"""Drafters propose a DraftTree per round. Interface (duck-typed):

``max_tree_size`` (int): most nodes a proposal may have (root included), for cache sizing.
``vocab_size`` (int | None): the vocabulary the drafts come from, checked against the target.
``calls`` (int): draft model calls so far (0 for model-free drafters).
``begin(prompt, request)``: start a new sequence. ``propose(context) -> DraftTree`` with
``context[-1]`` as root. ``accept(context, emission)``: the round's emitted tokens.
"""

from .draft_model import DraftModelDrafter
from .lookup import PromptLookupDrafter

__all__ = ["DraftModelDrafter", "PromptLookupDrafter"]
