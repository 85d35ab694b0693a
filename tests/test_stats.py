"""
The lab's statistics on data whose answer is known: the spread of a few
repeats, the verdicts of the ratio test (identical sets are within noise,
2x is slower, half is faster) and a least-squares slope.
"""

from __future__ import annotations

import math

import pytest

from echoplug.lab import stats


def test_spread_of_three_is_their_range() -> None:
    s = stats.spread([12.0, 10.0, 11.0])
    assert (s.median, s.min, s.max) == (11.0, 10.0, 12.0)
    assert (s.lo, s.hi) == (10.0, 12.0)  # all 3 runs can say


def test_spread_narrows_with_more_repeats_and_is_repeatable() -> None:
    values = [10.0, 10.2, 9.9, 10.1, 10.0, 30.0, 10.05]  # one run shared a core
    s = stats.spread(values)
    assert s.min == 9.9 and s.max == 30.0
    assert 9.9 <= s.lo <= s.median <= s.hi < 30.0  # the outlier does not widen it
    assert stats.spread(values) == s  # a fixed seed: the same interval every time


@pytest.mark.parametrize("values", [[], [math.nan], [5.0]])
def test_spread_without_an_interval(values) -> None:
    s = stats.spread(values)
    assert math.isnan(s.lo) and math.isnan(s.hi)
    if values == [5.0]:
        assert (s.median, s.min, s.max) == (5.0, 5.0, 5.0)


A = [20.1, 19.8, 20.4, 20.0, 19.9]


def test_identical_sets_are_within_noise() -> None:
    r = stats.ratio(A, A)
    assert r.ratio == 1.0 and r.lo <= 1 <= r.hi
    assert r.verdict() == "within noise"


def test_twice_the_cpu_is_slower_and_half_is_faster() -> None:
    double = stats.ratio(A, [2 * x for x in A])
    assert double.ratio == pytest.approx(2.0) and double.lo > 1
    assert double.verdict() == "slower"
    assert double.verdict(lowerIsBetter=False) == "faster"  # twice the messages per second
    half = stats.ratio(A, [x / 2 for x in A])
    assert half.verdict() == "faster"


def test_a_small_but_clear_change_is_noise_under_the_threshold() -> None:
    r = stats.ratio(A, [x * 1.04 for x in A])
    assert r.lo > 1
    assert r.verdict(threshold=0.0) == "slower"
    assert r.verdict(threshold=0.10) == "within noise"


def test_overlapping_sets_are_within_noise() -> None:
    assert stats.ratio([10.0, 14.0, 12.0], [13.0, 11.0, 12.5]).verdict() == "within noise"


def test_too_few_runs_have_no_interval() -> None:
    r = stats.ratio([10.0], [20.0])
    assert r.ratio == 2.0 and math.isnan(r.lo)
    assert r.verdict() == "within noise"


def test_fit_finds_a_known_slope() -> None:
    xs = [0, 0, 5000, 5000, 10000, 10000, 15000, 15000]
    ys = [20 + 0.0003 * x + (0.05 if i % 2 else -0.05) for i, x in enumerate(xs)]
    fit = stats.fitLine(xs, ys)
    assert fit.slope == pytest.approx(0.0003, rel=0.01)
    assert fit.lo < 0.0003 < fit.hi
    assert fit.intercept == pytest.approx(20, abs=0.1) and fit.r2 > 0.99
    assert math.isnan(stats.fitLine([0, 0, 0], [1, 2, 3]).slope)  # one x: no line
