"""Detection: the g-values of a text, scores with exact null distributions, and verdicts.

Under the null (text not generated with these keys) every scored g-value is an independent
fair bit: distinct contexts give independent hashes (repeated contexts are masked, see
:func:`session.watermark_mask`), and layers use independent keys. So with n scored positions
and m layers:

* ``mean``: S = sum of the n*m bits ~ Binomial(n*m, 1/2) exactly; score = S / (n m); the
  p-value P(Binomial >= S) is exact (and conservative: P(p <= alpha) <= alpha).
* ``weighted_mean``: score = sum_t sum_l w_l g_tl / (n sum w); null mean 1/2 and variance
  sum(w^2) / (4 n (sum w)^2); the p-value is the normal tail with that variance. Default
  weights w_l decrease linearly from 10 (layer 1) to 1 (layer m), as in the paper: later
  layers see a peakier distribution and carry less signal.
* ``bayesian``: :class:`bayesian.BayesianDetector` (log-likelihood ratio; p-value and
  thresholds from simulated null bits).

``threshold(...)`` calibrates the score threshold per number of scored tokens for a target
false-positive rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import SynthID, WatermarkError
from .hashing import g_values
from .session import watermark_mask

DETECTORS = ("mean", "weighted_mean")


@dataclass
class Detection:
    score: float
    p_value: float
    is_watermarked: bool
    scored_tokens: int
    detector: str

    def as_dict(self) -> dict:
        return {"score": self.score, "p_value": self.p_value, "is_watermarked": self.is_watermarked,
                "scored_tokens": self.scored_tokens, "detector": self.detector}


def as_token_list(tokens) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise WatermarkError(f"detect takes one text: a 1-D token tensor, got shape {tuple(tokens.shape)}")
        return [int(t) for t in tokens.tolist()]
    return [int(t) for t in tokens]


def text_g_values(tokens, config: SynthID, prompt: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """g-values of the emitted tokens [n, m] (uint8) and the scoring mask [n] (bool): the
    watermark mask (session.watermark_mask) without the EOS token and everything after it."""
    tokens = as_token_list(tokens)
    h = config.context_len
    tail = list(prompt[-h:]) if prompt is not None else []
    full = torch.tensor(tail + tokens, dtype=torch.long)
    n = len(tokens)
    mask = torch.tensor(watermark_mask(tokens, config, prompt), dtype=torch.bool)
    if config.eos_token_id is not None and config.eos_token_id in tokens:
        mask[tokens.index(config.eos_token_id):] = False
    contexts = torch.zeros(n, h, dtype=torch.long)
    for k in range(n):
        i = len(tail) + k
        if i >= h:
            contexts[k] = full[i - h:i]
    g = g_values(config.seeds, contexts, full[len(tail):, None])[..., 0]  # [n, m]
    return g, mask


def layer_weights(depth: int) -> torch.Tensor:
    """Weighted-mean weights [m]: linear from 10 down to 1 (all 1 when m == 1)."""
    return torch.linspace(10.0, 1.0, depth, dtype=torch.float64) if depth > 1 else torch.ones(1, dtype=torch.float64)


def mean_score(g: torch.Tensor, mask: torch.Tensor) -> float:
    n = int(mask.sum())
    return float(g[mask].double().sum()) / (n * g.shape[-1]) if n else float("nan")


def weighted_mean_score(g: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    weights = layer_weights(g.shape[-1]) if weights is None else weights.double()
    n = int(mask.sum())
    return float((g[mask].double() * weights).sum()) / (n * float(weights.sum())) if n else float("nan")


def binomial_tail(successes: int, trials: int) -> float:
    """P(Binomial(trials, 1/2) >= successes), exact up to float64 rounding (log-space sum)."""
    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    k = torch.arange(successes, trials + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(trials + 1) - torch.lgamma(k + 1) - torch.lgamma(trials - k + 1)
               - trials * math.log(2.0))
    return min(1.0, float(torch.logsumexp(log_pmf, 0).exp()))


def normal_tail(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def weighted_mean_null_std(scored: int, weights: torch.Tensor) -> float:
    return math.sqrt(float((weights ** 2).sum()) / (4.0 * scored)) / float(weights.sum())


def p_value(detector: str, score: float, scored: int, depth: int) -> float:
    """Null p-value of a mean / weighted-mean score over ``scored`` positions and ``depth`` layers."""
    if scored == 0:
        return 1.0
    if detector == "mean":
        return binomial_tail(round(score * scored * depth), scored * depth)
    weights = layer_weights(depth)
    return normal_tail((score - 0.5) / weighted_mean_null_std(scored, weights))


def threshold(detector: str, scored: int, depth: int, fpr: float) -> float:
    """Smallest score whose null p-value is <= fpr, for ``scored`` positions: a text is
    flagged iff score >= threshold. Exact for ``mean`` (binomial), normal for ``weighted_mean``."""
    if not 0 < fpr < 1:
        raise WatermarkError(f"fpr must be in (0, 1), got {fpr}")
    if detector == "mean":
        trials = scored * depth
        lo, hi = 0, trials + 1  # binary search the smallest S with tail(S) <= fpr
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if binomial_tail(mid, trials) <= fpr else (mid + 1, hi)
        return lo / trials
    z = _normal_quantile(1.0 - fpr)
    return 0.5 + z * weighted_mean_null_std(scored, layer_weights(depth))


def _normal_quantile(q: float) -> float:
    """Inverse standard normal CDF by bisection on erfc (ample precision for thresholds)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1.0 - normal_tail(mid) < q else (lo, mid)
    return (lo + hi) / 2


def detect(tokens, config: SynthID, detector="mean", fpr: float = 0.01,
           prompt: Sequence[int] | None = None) -> Detection:
    """Score one text (token ids: list or 1-D tensor, e.g. ``res.tokens[0]``) for the watermark
    of ``config``. detector: "mean" (exact binomial p-value), "weighted_mean", or a trained
    :class:`BayesianDetector`. ``is_watermarked`` iff p_value <= fpr. ``prompt`` (optional)
    lets the first ngram_len - 1 tokens be scored too."""
    if not 0 < fpr < 1:
        raise WatermarkError(f"fpr must be in (0, 1), got {fpr}")
    tokens = as_token_list(tokens)
    if not tokens:
        raise WatermarkError("the text to detect is empty; pass the generated token ids")
    g, mask = text_g_values(tokens, config, prompt)
    scored = int(mask.sum())
    if scored == 0:
        raise WatermarkError(f"no token of this {len(tokens)}-token text can be scored (it needs more than "
                             f"ngram_len - 1 = {config.context_len} tokens, with distinct contexts)")
    if not isinstance(detector, str):
        score, p = detector.score(g, mask), detector.p_value(g, mask)
        name = "bayesian"
    elif detector in DETECTORS:
        score = mean_score(g, mask) if detector == "mean" else weighted_mean_score(g, mask)
        p, name = p_value(detector, score, scored, config.depth), detector
    else:
        raise WatermarkError(f"unknown detector {detector!r}; use one of {DETECTORS} or a BayesianDetector")
    return Detection(score=score, p_value=p, is_watermarked=p <= fpr, scored_tokens=scored, detector=name)
