"""The statistics that peftbench reports and gates on, in one place; pure Python (scipy for the
rank test), importing nothing of the project.

- ``median_iqr``: median and interquartile range of repeated times (ms), the figures every
  timing is reported as (``peftbench.timing.stats`` is this function).
- ``Spread``: mean, sample standard deviation and standard error of a metric over seeds.
- ``binomial_se``: the standard error of one accuracy measured on N examples.
- ``combined_se``: the standard error of a difference of two independent means.
- ``mann_whitney_p``: one-sided rank test that one set of step times is slower than another.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Optional

MIN_SAMPLES = 5  # per side, for the rank test


def is_finite_number(x: Any) -> bool:
    """Whether ``x`` is an int or float (not a bool) that is neither infinite nor NaN."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def median_iqr(ms: list[float]) -> dict[str, float]:
    """Median and interquartile range (p75 - p25) of times in ms."""
    if not ms:
        return {"median": float("nan"), "iqr": float("nan")}
    if len(ms) == 1:
        return {"median": ms[0], "iqr": 0.0}
    q = statistics.quantiles(ms, n=4, method="inclusive")
    return {"median": statistics.median(ms), "iqr": q[2] - q[0]}


@dataclass(frozen=True)
class Spread:
    """A quality metric over the runs of one group (records that differ only in seed): mean,
    sample standard deviation (ddof=1; NaN for one value) and the number of values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        n = len(values)
        mean = math.fsum(values) / n
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n >= 2 else math.nan
        return cls(mean, std, n)

    @property
    def se(self) -> float:
        """Standard error of the mean over seeds, std / sqrt(n) (NaN for n = 1)."""
        return self.std / math.sqrt(self.n) if self.n >= 2 else math.nan

    def text(self) -> str:
        return f"{self.mean:.4g} ± {self.std:.2g} (n={self.n})" if self.n >= 2 else f"{self.mean:.4g} (n=1)"


def binomial_se(accuracy: float, examples: Any) -> Optional[float]:
    """Standard error of one accuracy (a fraction) measured on ``examples`` eval examples,
    sqrt(p (1 - p) / N), or None when N is not a positive number or p is not in [0, 1]."""
    if not (is_finite_number(examples) and examples > 0 and is_finite_number(accuracy) and 0 <= accuracy <= 1):
        return None
    return math.sqrt(accuracy * (1 - accuracy) / examples)


def combined_se(se1: float, se2: float) -> float:
    """Standard error of the difference of two independent means: sqrt(se1^2 + se2^2)."""
    return math.hypot(se1, se2)


def mann_whitney_p(base: list[float], cur: list[float]) -> Optional[float]:
    """One-sided p-value that ``cur`` tends to be larger (slower) than ``base``; None when
    either side has fewer than ``MIN_SAMPLES`` values."""
    if len(base) < MIN_SAMPLES or len(cur) < MIN_SAMPLES:
        return None
    from scipy.stats import mannwhitneyu  # heavy: only when two step-time series are compared

    return float(mannwhitneyu(cur, base, alternative="greater").pvalue)
