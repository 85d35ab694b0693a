# -*- test-case-name: tests.test_stats -*-
"""
The lab's statistics, in one place: the spread of a figure over its repeats,
the test behind C{echoplug-bench compare}, and the least-squares line of the
dead-connection curve.

  - L{spread}: median, min, max and a 95% percentile-bootstrap interval of
    the median. A shared machine's noise is not normal (a run either shares
    a core or it does not), so the interval assumes nothing about its shape;
    with 3 repeats it is the min-max range, which is all 3 runs can say.
  - L{ratio}: the ratio of two sets' medians, B/A, and a 95% bootstrap
    interval of it (each set resampled on its own). The interval, not a
    p-value, is the test: it excludes 1 or it does not.
  - L{fitLine}: ordinary least squares (C{scipy.stats.linregress}) with a
    95% interval of the slope from Student's t.

Every resampling draws from one generator seeded with L{SEED}, so the same
results give the same intervals: a report can be redrawn and diffed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and scipy come with the bench extra: imported when used
    import numpy as np

SEED = 862  # RFC 862; any fixed seed would do
RESAMPLES = 10_000
LEVEL = 0.95
MIN_FOR_INTERVAL = 3  # fewer repeats give no interval, only min and max


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float
    lo: float  # the 95% interval of the median, or NaN
    hi: float


NAN_SPREAD = Spread(math.nan, math.nan, math.nan, math.nan, math.nan)


def _finite(values: Sequence[float]) -> np.ndarray:
    import numpy as np

    array = np.asarray(values, dtype=float)
    return np.asarray(array[np.isfinite(array)])


def _bootMedians(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import numpy as np

    picks = rng.integers(0, len(values), size=(RESAMPLES, len(values)))
    return np.asarray(np.median(values[picks], axis=1))


def _interval(values: np.ndarray) -> tuple[float, float]:
    import numpy as np

    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def spread(values: Sequence[float]) -> Spread:
    """The median of C{values}, their range and the 95% interval of the median."""
    import numpy as np

    x = _finite(values)
    if not len(x):
        return NAN_SPREAD
    lo = hi = math.nan
    if len(x) >= MIN_FOR_INTERVAL:
        lo, hi = _interval(_bootMedians(x, np.random.default_rng(SEED)))
    return Spread(float(np.median(x)), float(x.min()), float(x.max()), lo, hi)


@dataclass(frozen=True)
class Ratio:
    ratio: float  # median(B) / median(A)
    lo: float
    hi: float

    def verdict(self, lowerIsBetter: bool = True, threshold: float = 0.0) -> str:
        """
        C{faster}, C{slower} or C{within noise}: B differs from A only if the
        interval excludes 1 and the ratio is further than C{threshold} (a
        fraction) from 1.
        """
        if math.isnan(self.ratio) or math.isnan(self.lo):
            return "within noise"
        if self.lo > 1 and self.ratio - 1 > threshold:
            higher = True
        elif self.hi < 1 and 1 - self.ratio > threshold:
            higher = False
        else:
            return "within noise"
        return "slower" if higher == lowerIsBetter else "faster"


def ratio(a: Sequence[float], b: Sequence[float]) -> Ratio:
    """B/A of the medians, with a 95% bootstrap interval (NaN with fewer than 2 each)."""
    import numpy as np

    x, y = _finite(a), _finite(b)
    if not len(x) or not len(y) or np.median(x) == 0:
        return Ratio(math.nan, math.nan, math.nan)
    point = float(np.median(y) / np.median(x))
    if len(x) < 2 or len(y) < 2:
        return Ratio(point, math.nan, math.nan)
    rng = np.random.default_rng(SEED)
    ax, by = _bootMedians(x, rng), _bootMedians(y, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = _interval(by / ax)
    return Ratio(point, lo, hi)


@dataclass(frozen=True)
class Fit:
    slope: float
    lo: float  # the 95% interval of the slope
    hi: float
    intercept: float
    r2: float
    n: int


def fitLine(x: Sequence[float], y: Sequence[float]) -> Fit:
    """Least squares of C{y} on C{x}; NaN where fewer than 3 points or one x."""
    from scipy import stats

    pairs = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2:
        return Fit(math.nan, math.nan, math.nan, math.nan, math.nan, len(pairs))
    xs, ys = zip(*pairs, strict=True)
    line = stats.linregress(xs, ys)
    half = float(stats.t.ppf(1 - (1 - LEVEL) / 2, len(pairs) - 2)) * float(line.stderr)
    return Fit(float(line.slope), float(line.slope) - half, float(line.slope) + half,
               float(line.intercept), float(line.rvalue) ** 2, len(pairs))
