"""Confidence intervals over seeds or episodes, and a paired comparison of two backbones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

VERDICTS = ("A better", "B better", "no significant difference")


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and its Student-t confidence interval ``(mean, low, high)``; the interval is NaN for one value."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need a non-empty 1-D sequence of values, got shape {x.shape}.")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


@dataclass
class PairedComparison:
    """A paired t-test of A against B on the same seeds/episodes; ``mean_diff`` is mean(A - B)."""

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_low: float
    ci_high: float
    t: float
    p_value: float
    alpha: float
    verdict: str

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def paired_comparison(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, alpha: float = 0.05
) -> PairedComparison:
    """Compare backbone A with B on the same seeds or episodes (scores in the same order).

    Pairing removes the between-episode variance both share (an easy episode is easy for both), so
    it detects differences an unpaired test misses. The ``1 - alpha`` interval of the mean difference
    excludes 0 exactly when the test's p-value is below ``alpha``.

    Returns:
        the comparison, with ``verdict`` one of ``"A better"``, ``"B better"`` or
        ``"no significant difference"``.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores need two 1-D sequences of the same length, got {x.shape} and {y.shape}.")
    if len(x) < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {len(x)}.")
    diff = x - y
    mean, low, high = mean_ci(diff, 1 - alpha)
    if np.all(diff == diff[0]):  # no spread: scipy's t is undefined (0/0) or infinite
        t = math.copysign(math.inf, diff[0]) if diff[0] else 0.0
        p = 0.0 if diff[0] else 1.0
    else:
        result = stats.ttest_rel(x, y)
        t, p = float(result.statistic), float(result.pvalue)
    verdict = VERDICTS[2] if p >= alpha else VERDICTS[0] if mean > 0 else VERDICTS[1]
    return PairedComparison(len(x), float(x.mean()), float(y.mean()), mean, low, high, t, p, alpha, verdict)
