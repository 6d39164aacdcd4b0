"""The statistics behind the report and the gate, pinned to numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from peftbench import stats, timing


def test_mean_sample_std_and_n_pinned():
    spread = stats.Spread.of([0.80, 0.82, 0.78])
    assert (spread.mean, spread.std, spread.n) == (pytest.approx(0.80), pytest.approx(0.02), 3)
    assert spread.se == pytest.approx(0.011547005, abs=1e-9)  # 0.02 / sqrt(3)
    assert spread.text() == "0.8 ± 0.02 (n=3)"
    one = stats.Spread.of([0.8])
    assert one.n == 1 and math.isnan(one.std) and math.isnan(one.se)
    assert one.text() == "0.8 (n=1)"


def test_binomial_and_combined_standard_errors_pinned():
    assert stats.binomial_se(0.5, 100) == pytest.approx(0.05)  # sqrt(0.25 / 100)
    # the binomial standard error of one accuracy of 0.8 on 1,066 examples: 1.2 points
    assert stats.binomial_se(0.8, 1066) == pytest.approx(0.012251278, abs=1e-9)
    assert stats.binomial_se(1.0, 10) == 0.0
    assert stats.binomial_se(0.8, None) is None and stats.binomial_se(80.0, 1066) is None
    assert stats.binomial_se(0.8, 0) is None and stats.binomial_se(math.nan, 10) is None
    assert stats.combined_se(0.03, 0.04) == pytest.approx(0.05)


def test_median_and_iqr_pinned():
    # inclusive quartiles of 1, 2, 3, 4: 1.75 and 3.25
    assert stats.median_iqr([4.0, 1.0, 3.0, 2.0]) == {"median": 2.5, "iqr": pytest.approx(1.5)}
    assert stats.median_iqr([1.0, 2.0, 3.0, 4.0, 100.0]) == {"median": 3.0, "iqr": pytest.approx(2.0)}
    assert stats.median_iqr([5.0]) == {"median": 5.0, "iqr": 0.0}
    assert all(math.isnan(v) for v in stats.median_iqr([]).values())
    assert timing.stats is stats.median_iqr  # the name the timing code calls


def test_rank_test_pinned():
    # every current time above every baseline time: p = 1 / C(10, 5) = 1 / 252 (exact test)
    assert stats.mann_whitney_p([1.0, 2, 3, 4, 5], [6.0, 7, 8, 9, 10]) == pytest.approx(1 / 252)
    assert stats.mann_whitney_p([6.0, 7, 8, 9, 10], [1.0, 2, 3, 4, 5]) == pytest.approx(1.0)
    assert stats.mann_whitney_p([1.0, 2, 3, 4], [6.0, 7, 8, 9, 10]) is None  # fewer than MIN_SAMPLES
