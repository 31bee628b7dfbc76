"""The watermark in the speculative engine, for any drafter and strategy.

The hook is a function of (context tokens, p): :meth:`WatermarkSession.distributions` turns
the processed distribution after "accepted tokens + a node's ancestor path" into its
watermarked version. Two modes (``SynthID.speculative``, see config.py):

* high_detectability: every tree node's target p is watermarked with its own context, the
  drafter's q likewise (:func:`draft_session`), and :func:`verify` runs on the watermarked
  distributions, so the emitted tokens have exactly the watermarked autoregressive
  distribution (verify is lossless for any p and q).
* fast: verification runs on the unwatermarked p (acceptance unchanged); the token drawn at
  the end of the walk (bonus or correction, from the residual r at the last accepted node)
  is drawn from the tournament transform of r with that node's context instead.

The session advances with accepted tokens only (:meth:`SpeculativeWatermark.sync`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..speculative.tree import DraftTree
from ..speculative.verify import VerifyResult, as_randomness, verify
from .session import WatermarkSession, check_watermark


def node_paths(tree: DraftTree) -> list[list[int]]:
    """Per node, the draft tokens from below the root down to the node (root: [])."""
    tokens = tree.token_list
    return [[tokens[j] for j in tree.path_to(i)[1:]] for i in range(len(tree))]


class _DeferredDraw:
    """Randomness whose coins are real but whose one categorical draw is only recorded."""

    def __init__(self, rng):
        self.rng, self.residual = rng, None

    def coin(self, prob: float) -> bool:
        return self.rng.coin(prob)

    def categorical(self, probs: torch.Tensor) -> int:
        self.residual = probs
        return 0


class SpeculativeWatermark:
    def __init__(self, session: WatermarkSession):
        self.session = session
        self.config = session.config

    def verify(self, tree: DraftTree, target_probs: torch.Tensor, generator=None) -> VerifyResult:
        """Verify ``tree`` against the target's processed (unwatermarked) probs [n, V] with
        the watermark of the configured mode; ``generator`` as for :func:`verify`."""
        paths = node_paths(tree)
        if self.config.speculative == "high_detectability":
            return verify(tree, self.session.distributions(target_probs, paths), generator)
        rng = as_randomness(generator)
        deferred = _DeferredDraw(rng)
        result = verify(tree, target_probs, deferred)
        residual = self.session.distributions(deferred.residual[None], [paths[result.path[-1]]])[0]
        return VerifyResult(path=result.path, accepted=result.accepted, next_token=rng.categorical(residual))

    def sync(self, context: Sequence[int]) -> None:
        self.session.sync(context)


def speculative_watermark(request, prompt: Sequence[int]) -> SpeculativeWatermark | None:
    config = check_watermark(request.watermark, request.sampling)
    return None if config is None else SpeculativeWatermark(WatermarkSession(config, prompt))


def draft_session(request, prompt: Sequence[int]) -> WatermarkSession | None:
    """The session a sampling drafter watermarks its q with (high-detectability mode only;
    None otherwise). The drafter calls ``sync(context)`` then ``distributions(q, paths)``."""
    config = check_watermark(request.watermark, request.sampling)
    if config is None or config.speculative != "high_detectability":
        return None
    return WatermarkSession(config, prompt)
