"""Lossless speculative decoding: draft trees, verification, drafters and the strategies."""

from . import strategies  # noqa: F401  (registers the strategies with generate)
from .tree import DraftTree
from .verify import VerifyResult, verify

__all__ = ["DraftTree", "verify", "VerifyResult"]
