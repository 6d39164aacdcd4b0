"""The statistics that peftbench reports and gates on, in one place; pure Python (numpy for the
bootstrap, scipy for the rank and McNemar tests), importing nothing of the project.

- ``median_iqr``: median and interquartile range of repeated times (ms), the figures every
  timing is reported as (``peftbench.timing.stats`` is this function).
- ``Spread``: mean, sample standard deviation and standard error of a metric over seeds.
- ``binomial_se``: the standard error of one accuracy measured on N examples.
- ``combined_se``: the standard error of a difference of two independent means.
- ``mann_whitney_p``: one-sided rank test that one set of step times is slower than another.
- ``Paired`` and ``paired_bootstrap``: the difference of two methods' accuracies measured on the
  same eval examples, with a bootstrap interval and p-value that resample examples (paired
  between the methods) and each method's seeds.
- ``mcnemar_p``: exact McNemar test of two methods' 0/1 correctness on the same examples (one
  seed each).
- ``holm``: Holm-Bonferroni adjustment of several p-values tested together.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

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


@dataclass(frozen=True)
class Difference:
    """Method A's figure minus method B's (``diff``), the bounds of its interval (``low``,
    ``high``, same units) and the two-sided p-value that it is 0 (``p``)."""

    diff: float
    low: float
    high: float
    p: float

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether the difference is significant at level ``alpha`` (p < alpha)."""
        return self.p < alpha


@dataclass(frozen=True)
class Paired(Difference):
    """Method A against method B on the same eval examples (``paired_bootstrap``).

    ``diff`` is A's mean score minus B's, each averaged over seeds and examples (a fraction for
    accuracies: 0.06 is 6 points); ``low`` and ``high`` bound its bootstrap percentile interval
    (95% by default), in the same units; ``p`` is the two-sided p-value that the difference is 0;
    ``examples`` is the number of eval examples, ``seeds_a`` and ``seeds_b`` the seeds per method.
    """

    examples: int
    seeds_a: int
    seeds_b: int


def _score_rows(name: str, rows: Sequence[Sequence[float]]) -> np.ndarray:
    """``rows`` (per seed, per example scores) as a float array of shape (seeds, examples)."""
    lengths = sorted({len(row) for row in rows})
    if not lengths or lengths == [0]:
        raise ValueError(f"{name}: no scores; expected one list of per-example scores per seed")
    if len(lengths) > 1:
        raise ValueError(f"{name}: seeds scored on different numbers of examples: {lengths}")
    return np.asarray(rows, dtype=np.float64)


def _example_counts(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``resamples`` draws of ``n`` with
    replacement: an array of shape (resamples, n) whose rows sum to ``n``."""
    idx = rng.integers(0, n, size=(resamples, n))
    flat = (idx + n * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def paired_bootstrap(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Paired:
    """Difference of method A's and method B's mean scores on the same eval examples, with a
    bootstrap percentile interval and two-sided p-value.

    ``a[s][i]`` is method A's score (e.g. 0/1 correctness) with seed ``s`` on example ``i``, and
    likewise ``b``; both were evaluated on the same examples in the same order, so every row of
    ``a`` and ``b`` has one length. The statistic is the mean over seeds and examples of ``a``
    minus that of ``b``. Each of ``resamples`` resamples draws the examples with replacement, the
    same draw for both methods (paired over examples), and each method's seeds with replacement,
    independently (seeds are not paired between methods; one seed is kept as it is). The interval
    is the central ``confidence`` fraction of the resampled differences; the p-value shifts the
    bootstrap distribution to the null, (1 + #{|d* - d| >= |d|}) / (1 + resamples). ``seed``
    seeds the generator made here, so the result is the same on every call.
    """
    if resamples < 1:
        raise ValueError(f"resamples={resamples}: expected at least 1")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: expected a fraction between 0 and 1")
    sa, sb = _score_rows("a", a), _score_rows("b", b)
    if sa.shape[1] != sb.shape[1]:
        raise ValueError(f"a is scored on {sa.shape[1]} examples and b on {sb.shape[1]}: expected the same examples")
    (na, n), nb = sa.shape, sb.shape[0]
    # A minus B as one fraction, so that 0/1 scores give the exact ratio (800 - 740) / 1000
    diff = float((nb * sa.sum() - na * sb.sum()) / (na * nb * n))

    rng = np.random.default_rng(seed)
    chunk = max(1, 2**20 // n)  # resamples at a time: arrays of about 2**20 values (8 MiB)
    diffs = np.empty(resamples)
    for start in range(0, resamples, chunk):
        c = min(chunk, resamples - start)
        counts = _example_counts(rng, c, n)  # (c, n)
        # a seed drawn k times counts k times; one seed is kept without drawing
        wa = _example_counts(rng, c, na) if na > 1 else np.ones((c, 1))  # (c, na)
        wb = _example_counts(rng, c, nb) if nb > 1 else np.ones((c, 1))  # (c, nb)
        tot_a = (wa * (counts @ sa.T)).sum(axis=1)  # (c,) sum over the drawn seeds and examples
        tot_b = (wb * (counts @ sb.T)).sum(axis=1)
        diffs[start : start + c] = (nb * tot_a - na * tot_b) / (na * nb * n)

    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    p = (1 + int(np.count_nonzero(np.abs(diffs - diff) >= abs(diff)))) / (1 + resamples)
    return Paired(diff, float(low), float(high), min(1.0, p), n, na, nb)


def mcnemar_p(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Exact two-sided McNemar p-value that two methods are equally accurate, from their 0/1
    (or bool) correctness on the same examples in the same order, one seed each: a binomial test
    with p = 0.5 on the examples that exactly one method got right; 1.0 when there are none."""
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} examples and b has {len(b)}: expected the same examples")
    if any(x not in (0, 1) for x in (*a, *b)):
        raise ValueError("mcnemar_p: expected 0/1 (or bool) correctness per example")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    if only_a + only_b == 0:
        return 1.0
    from scipy.stats import binomtest  # heavy: only when two methods are compared

    return min(1.0, float(binomtest(only_a, only_a + only_b, 0.5).pvalue))


@dataclass(frozen=True)
class OverSeeds(Difference):
    """Method A against method B from one figure per seed each (``welch``), for a figure whose
    per-example scores are not kept (a perplexity): ``diff`` is A's mean over its seeds minus
    B's, in the figure's units; ``low`` and ``high`` bound Welch's 95% interval (by default);
    ``p`` is the two-sided p-value that the difference is 0; ``df`` the Welch-Satterthwaite
    degrees of freedom; ``seeds_a`` and ``seeds_b`` the seeds per method. The test data's own
    sampling noise is not in it: every seed of every method is scored on the same data."""

    df: float
    seeds_a: int
    seeds_b: int


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Optional[OverSeeds]:
    """Welch's t-test of mean(a) - mean(b), one value per seed on each side (unequal variances);
    None with fewer than 2 values on a side, or when neither side varies (no noise to judge by)."""
    if len(a) < 2 or len(b) < 2:
        return None
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: expected a fraction between 0 and 1")
    from scipy.stats import t as student  # heavy: only when a continuous figure is compared

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return None
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(student.ppf(0.5 + confidence / 2, df)) * se
    p = float(2 * student.sf(abs(diff) / se, df))
    return OverSeeds(diff, diff - half, diff + half, min(1.0, p), df, len(a), len(b))


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values of several tests made together, under the same keys: the
    k-th smallest of m raw p-values is multiplied by m - k + 1, each adjusted value is at least
    the one before it (in the order of the raw p-values), and none exceeds 1."""
    bad = {k: p for k, p in pvalues.items() if not (is_finite_number(p) and 0 <= p <= 1)}
    if bad:
        raise ValueError(f"holm: p-values must be numbers in [0, 1], got {bad}")
    m = len(pvalues)
    adjusted: dict[str, float] = {}
    running = 0.0
    for rank, (key, p) in enumerate(sorted(pvalues.items(), key=lambda kv: kv[1])):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[key] = running
    return {key: adjusted[key] for key in pvalues}
