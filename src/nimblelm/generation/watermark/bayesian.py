"""The Bayesian detector (SynthID-Text, Dathathri et al. 2024, Supplementary: the likelihood
model of g-values), trained on CPU with torch.

Unwatermarked text: every g-value is a fair bit, P_u(g) = 1/2. Watermarked text: at layer l
of a tournament with 2 competitors, the match had two distinct tokens with some probability
c_l (then the winner has g = 1 with probability 3/4), else one token (g is a fair bit), so
P_w(g_l = 1) = 1/2 + c_l / 4. The paper lets c_l depend on the position's earlier g-values
(they carry the entropy of the distribution): c_l = sigmoid(beta_l + sum_{k<l} delta_lk g_k).

score = log-likelihood ratio sum_{scored t} sum_l [log P_w(g_tl | g_t,<l) - log 1/2]: the
posterior log-odds of "watermarked" minus the prior log-odds. Parameters are fit by maximum
likelihood on g-values of watermarked text (:meth:`BayesianDetector.fit`). p-values and
thresholds per number of scored tokens come from simulated null g-values (exact model of the
null: independent fair bits), so they are calibrated without unwatermarked text.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import torch

from .config import WatermarkError


class BayesianDetector:
    """depth: m, the tournament layers of the watermark it scores."""

    def __init__(self, depth: int, null_samples: int = 2000, seed: int = 0):
        self.depth, self.null_samples, self.seed = depth, null_samples, seed
        self.beta = torch.full((depth,), -1.0, dtype=torch.float64)
        self.delta = torch.zeros(depth, depth, dtype=torch.float64)
        self._null: dict[int, torch.Tensor] = {}

    # -- the likelihood model -----------------------------------------------------------------
    @staticmethod
    def _log_likelihood_ratio(g: torch.Tensor, beta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Per-position LLR [...]: g [..., m] in {0, 1}."""
        g = g.double()
        logits = beta + g @ torch.tril(delta, diagonal=-1).T  # [..., m]: beta_l + sum_{k<l} delta_lk g_k
        p_one = 0.5 + 0.25 * torch.sigmoid(logits)
        log_p = torch.where(g > 0, p_one.log(), (1.0 - p_one).log())
        return (log_p - math.log(0.5)).sum(-1)

    def score(self, g: torch.Tensor, mask: torch.Tensor) -> float:
        """Log-likelihood ratio of one text: g [n, m], mask [n] bool (scored positions)."""
        self._check(g)
        return float(self._log_likelihood_ratio(g[mask], self.beta, self.delta).sum())

    def posterior(self, g: torch.Tensor, mask: torch.Tensor, prior: float = 0.5) -> float:
        """P(watermarked | g) for a prior probability of watermarked text."""
        return float(torch.sigmoid(torch.tensor(self.score(g, mask) + math.log(prior / (1 - prior)))))

    def fit(self, samples: Sequence[tuple[torch.Tensor, torch.Tensor]], steps: int = 300, lr: float = 0.05,
            l2: float = 1e-3) -> float:
        """Maximum likelihood on watermarked texts ``samples`` = [(g [n, m], mask [n]), ...]
        (Adam, float64, an L2 penalty on delta). Returns the final mean negative log-likelihood
        per scored position."""
        if not samples:
            raise WatermarkError("the Bayesian detector needs watermarked texts to train on")
        g = torch.cat([gi[mi] for gi, mi in samples]).double()
        self._check(g)
        beta = self.beta.clone().requires_grad_(True)
        delta = self.delta.clone().requires_grad_(True)
        opt = torch.optim.Adam([beta, delta], lr=lr)
        loss = torch.zeros(())
        for _ in range(steps):
            opt.zero_grad()
            nll = -self._log_likelihood_ratio(g, beta, delta).mean() - self.depth * math.log(0.5)
            loss = nll + l2 * (delta ** 2).sum()
            loss.backward()
            opt.step()
        self.beta, self.delta = beta.detach(), delta.detach()
        self._null.clear()
        return float(loss.detach())

    # -- calibration under the null ------------------------------------------------------------
    def null_scores(self, scored: int) -> torch.Tensor:
        """Sorted LLRs [null_samples] of simulated unwatermarked texts with ``scored`` positions."""
        if scored not in self._null:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + scored)
            g = torch.randint(0, 2, (self.null_samples, scored, self.depth), generator=gen)
            self._null[scored] = self._log_likelihood_ratio(g, self.beta, self.delta).sum(-1).sort().values
        return self._null[scored]

    def p_value(self, g: torch.Tensor, mask: torch.Tensor) -> float:
        """Monte Carlo p-value (1 + #null >= score) / (1 + null_samples)."""
        null = self.null_scores(int(mask.sum()))
        above = int((null >= self.score(g, mask)).sum())
        return (1 + above) / (1 + null.numel())

    def threshold(self, scored: int, fpr: float) -> float:
        """Score threshold for ``scored`` positions at false-positive rate ``fpr``: the
        (1 - fpr) quantile of the simulated null scores (a text is flagged iff score > it)."""
        if not 0 < fpr < 1:
            raise WatermarkError(f"fpr must be in (0, 1), got {fpr}")
        null = self.null_scores(scored)
        return float(null[min(null.numel() - 1, math.ceil((1.0 - fpr) * null.numel()) - 1)])

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"depth": self.depth, "beta": self.beta.tolist(), "delta": self.delta.tolist()}, fh)

    @classmethod
    def load(cls, path: str) -> "BayesianDetector":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            detector = cls(int(data["depth"]))
            detector.beta = torch.tensor(data["beta"], dtype=torch.float64)
            detector.delta = torch.tensor(data["delta"], dtype=torch.float64)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WatermarkError(f"cannot read a Bayesian detector from {path}: {type(exc).__name__}") from None
        if detector.beta.shape != (detector.depth,) or detector.delta.shape != (detector.depth, detector.depth):
            raise WatermarkError(f"{path}: beta / delta shapes do not match depth {detector.depth}")
        return detector

    def _check(self, g: torch.Tensor) -> None:
        if g.shape[-1] != self.depth:
            raise WatermarkError(f"this Bayesian detector was built for {self.depth} layers, the g-values have "
                                 f"{g.shape[-1]}: train it with the same keys")
