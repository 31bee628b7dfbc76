"""Shared helpers for the watermark tests: a KS test against U(0, 1) (no scipy here)."""

from __future__ import annotations

import math


def ks_uniform_p_value(samples: list[float]) -> float:
    """Two-sided Kolmogorov-Smirnov test of samples against U(0, 1): asymptotic p-value of
    sqrt(n) D (Kolmogorov distribution, with Stephens' small-sample correction)."""
    xs = sorted(samples)
    n = len(xs)
    d = max(max((i + 1) / n - x, x - i / n) for i, x in enumerate(xs))
    t = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    return max(0.0, min(1.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * t * t) for k in range(1, 101))))
