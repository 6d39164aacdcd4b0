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


def _right_on(k: int, n: int = 1000) -> list[int]:
    """0/1 correctness on ``n`` examples, right on the first ``k``."""
    return [1] * k + [0] * (n - k)


def test_identical_methods_differ_by_exactly_nothing():
    one = [_right_on(800)]
    for a in (one, one * 3):  # one seed, and three seeds that predict alike
        result = stats.paired_bootstrap(a, a, resamples=2000)
        assert (result.diff, result.low, result.high, result.p) == (0.0, 0.0, 0.0, 1.0)
        assert (result.examples, result.seeds_a, result.seeds_b) == (1000, len(a), len(a))
        assert not result.significant()
    # seeds that differ give a nonzero spread, but a difference of 0 is never significant
    seeds = [_right_on(780), _right_on(800), _right_on(820)]
    result = stats.paired_bootstrap(seeds, seeds, resamples=2000)
    assert (result.diff, result.p) == (0.0, 1.0) and result.low < 0 < result.high


def test_sixty_more_right_of_a_thousand_is_significant_both_ways():
    # A right on the first 800, B on the first 740: 60 pairs discordant one way
    forward = stats.paired_bootstrap([_right_on(800)], [_right_on(740)])
    assert forward.diff == 0.06
    # no resample comes near 0 (8 standard errors away): the smallest p the test can give
    assert forward.p == 1 / 10_001 and forward.significant(0.01)
    # the normal interval of a paired difference: 0.06 ± 1.96 sqrt(0.06 (1 - 0.06) / 1000)
    half = 1.96 * math.sqrt(0.06 * 0.94 / 1000)  # 0.0147
    assert (forward.low, forward.high) == (pytest.approx(0.06 - half, abs=0.003), pytest.approx(0.06 + half, abs=0.003))
    assert 0 < forward.low < 0.06 < forward.high
    reverse = stats.paired_bootstrap([_right_on(740)], [_right_on(800)])
    assert reverse.diff == -0.06 and reverse.p == forward.p
    assert (reverse.low, reverse.high) == (pytest.approx(-forward.high), pytest.approx(-forward.low))


def test_three_more_right_of_a_thousand_is_not_significant():
    result = stats.paired_bootstrap([_right_on(803)], [_right_on(800)])
    assert result.diff == 0.003
    # about P(Poisson(3) = 0 or >= 6) = 0.13: the interval reaches 0
    assert result.p > 0.05 and not result.significant() and result.low <= 0 < result.high


def test_bootstrap_is_deterministic_and_resamples_seeds():
    seeds = [_right_on(780), _right_on(800), _right_on(820)]
    b = [_right_on(760)]
    result = stats.paired_bootstrap(seeds, b, resamples=2000)
    assert result == stats.paired_bootstrap(seeds, b, resamples=2000)
    assert result != stats.paired_bootstrap(seeds, b, resamples=2000, seed=1)
    assert result.diff == pytest.approx(0.04)
    # the same per-example mean with no spread over seeds: the same examples are drawn (same
    # generator, same number of seeds), so only the seed draws can make the first interval wider
    mean_row = [sum(col) / 3 for col in zip(*seeds)]
    flat = stats.paired_bootstrap([mean_row] * 3, b, resamples=2000)
    assert flat.diff == pytest.approx(result.diff)
    assert result.high - result.low > flat.high - flat.low + 0.01


def test_bootstrap_rejects_mismatched_or_empty_scores():
    with pytest.raises(ValueError, match="999"):
        stats.paired_bootstrap([_right_on(800)], [_right_on(740, n=999)])
    with pytest.raises(ValueError, match="different numbers of examples"):
        stats.paired_bootstrap([_right_on(800), _right_on(800, n=999)], [_right_on(740)])
    with pytest.raises(ValueError, match="no scores"):
        stats.paired_bootstrap([], [_right_on(740)])
    with pytest.raises(ValueError, match="no scores"):
        stats.paired_bootstrap([[]], [[]])


def test_mcnemar_exact_p_pinned():
    # 60 discordant pairs all one way: p = 2 * 0.5**60
    assert stats.mcnemar_p(_right_on(800), _right_on(740)) == pytest.approx(2 * 0.5**60, rel=1e-9)
    assert stats.mcnemar_p(_right_on(740), _right_on(800)) == pytest.approx(2 * 0.5**60, rel=1e-9)
    # 30 discordant each way: as balanced as it can be
    a = _right_on(800)
    b = [0] * 30 + [1] * 770 + [1] * 30 + [0] * 170
    assert stats.mcnemar_p(a, b) == 1.0
    assert stats.mcnemar_p(a, [bool(x) for x in a]) == 1.0  # no discordant pairs
    with pytest.raises(ValueError, match="999"):
        stats.mcnemar_p(a, _right_on(800, n=999))


def test_holm_adjustment_pinned():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1: 0.03, 0.06, 0.04 -> 0.06 (never below the one before)
    assert stats.holm({"x": 0.01, "y": 0.04, "z": 0.03}) == {
        "x": pytest.approx(0.03),
        "y": pytest.approx(0.06),
        "z": pytest.approx(0.06),
    }
    # 2 * 0.6 = 1.2 is capped at 1, and 0.7 is raised to the 1 before it
    assert stats.holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}
    assert stats.holm({"a": 0.6, "b": 0.01}) == {"a": 0.6, "b": pytest.approx(0.02)}
    assert stats.holm({"only": 0.04}) == {"only": 0.04} and stats.holm({}) == {}
    assert list(stats.holm({"y": 0.5, "x": 0.1})) == ["y", "x"]  # the caller's key order


def test_welch_gives_the_textbook_answer():
    """1, 2, 3 against 4, 5, 6: difference -3, standard error sqrt(2/3), 4 degrees of freedom,
    t = -3.674, two-sided p = 0.0213 and the interval -3 +- 2.776 x 0.8165 (t tables)."""
    w = stats.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert w.diff == -3.0 and w.df == pytest.approx(4.0) and (w.seeds_a, w.seeds_b) == (3, 3)
    assert w.p == pytest.approx(0.02131, abs=5e-5) and w.significant()
    assert (w.low, w.high) == (pytest.approx(-5.2669, abs=1e-3), pytest.approx(-0.7331, abs=1e-3))
    same = stats.welch([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same.diff == 0 and same.p == 1.0 and not same.significant()


def test_welch_needs_two_seeds_a_side_and_some_noise():
    assert stats.welch([1.0], [2.0, 3.0]) is None
    assert stats.welch([1.0, 1.0], [2.0, 2.0]) is None  # nothing varies: no noise to judge by
    with pytest.raises(ValueError, match="confidence"):
        stats.welch([1.0, 2.0], [2.0, 3.0], confidence=1.5)
