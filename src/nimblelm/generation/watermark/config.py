"""The SynthID-Text watermark configuration (Dathathri et al., Nature 2024).

``SynthID(keys=[...], ngram_len=5)``: one tournament layer per key (the paper uses 30); the
g-values of a position depend on the ``ngram_len - 1`` tokens before it (the context window
H). ``num_competitors=2`` is the non-distortionary tournament; more competitors per match is
the distortionary mode (a stronger watermark, but the average over keys is no longer p).

``speculative`` picks how a speculative strategy composes with the watermark:

* ``"high_detectability"`` (default): the target's p at every draft-tree node and the
  drafter's q are watermarked with that node's own context (accepted prefix + the node's
  ancestor path); verification runs on the watermarked distributions, so the output is
  distributed exactly as watermarked autoregressive sampling and detects exactly as well.
  Default because it keeps contract 4 of DESIGN.md (speculative output has exactly the
  processed distribution, watermark included): switching strategy changes speed, never the
  text distribution or its detectability.
* ``"fast"``: acceptance is decided on the unwatermarked p and q (acceptance rate unchanged);
  only the token drawn at the end of each round (bonus or correction) is drawn from the
  watermarked distribution. Per token, the average over keys is still the unwatermarked p,
  but only about 1 token in tau carries the watermark, so detection needs longer texts.

Keys are secrets: ``repr`` hides them and no nimblelm code prints or logs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from ...errors import NimbleError
from .hashing import ContextHashCache, layer_seeds

SPECULATIVE_MODES = ("high_detectability", "fast")


class WatermarkError(NimbleError):
    """A watermark configuration, key file or text to detect is unusable."""


@dataclass(frozen=True)
class SynthID:
    """keys: one integer per tournament layer (m = len(keys), 30 in the paper).
    ngram_len: H + 1, where H tokens of context seed the g-values (default 5, H = 4).
    num_competitors: tokens per tournament match; 2 = non-distortionary.
    eos_token_id: detection ignores this token and everything after it.
    speculative: "high_detectability" (default) or "fast" (see the module docstring)."""

    keys: tuple[int, ...] = field(repr=False)
    ngram_len: int = 5
    num_competitors: int = 2
    eos_token_id: int | None = None
    speculative: str = "high_detectability"

    def __post_init__(self) -> None:
        keys = self.keys
        if isinstance(keys, (str, bytes)) or not hasattr(keys, "__iter__"):
            raise WatermarkError("SynthID keys must be a list of integers (one per tournament layer)")
        keys = tuple(keys)
        if not keys or not all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
            raise WatermarkError(f"SynthID keys must be a non-empty list of integers; got {len(keys)} entries of "
                                 "which some are not integers" if keys else "SynthID keys must not be empty")
        object.__setattr__(self, "keys", keys)
        if not isinstance(self.ngram_len, int) or self.ngram_len < 2:
            raise WatermarkError(f"ngram_len must be an integer >= 2 (context window ngram_len - 1 >= 1), "
                                 f"got {self.ngram_len!r}")
        if not isinstance(self.num_competitors, int) or self.num_competitors < 2:
            raise WatermarkError(f"num_competitors must be an integer >= 2, got {self.num_competitors!r}")
        if self.speculative not in SPECULATIVE_MODES:
            raise WatermarkError(f"speculative must be one of {SPECULATIVE_MODES}, got {self.speculative!r}")

    @property
    def context_len(self) -> int:
        """H: the number of tokens before a position that seed its g-values."""
        return self.ngram_len - 1

    @property
    def depth(self) -> int:
        """m: tournament layers = number of keys."""
        return len(self.keys)

    @property
    def non_distortionary(self) -> bool:
        return self.num_competitors == 2

    @cached_property
    def seeds(self) -> tuple[int, ...]:
        """32-bit per-layer seeds derived from the keys (hashing.layer_seeds)."""
        return tuple(layer_seeds(self.keys))

    @cached_property
    def context_cache(self) -> ContextHashCache:
        """Memoised per-context hashes shared by everything that uses this config."""
        return ContextHashCache(self.seeds)
