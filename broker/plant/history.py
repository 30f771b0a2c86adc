"""Bounded summaries of a value's recent history: windowed mean/max and trend.

Both keep a fixed number of time buckets, whatever the sample rate: a 24 h window of a 1 Hz
signal costs 30 buckets, not 86,400 samples. Times are seconds (any monotonic epoch). A
trend says nothing until its history spans half its window without a long gap: a slope
fitted to the first minute of a 10 min window, or to two short runs either side of a long
outage, is noise (or a step) extrapolated to an hour.
"""

from __future__ import annotations

import itertools
import math
from array import array

from broker.policy.precision import Precision
from broker.records import WindowStats

BUCKETS = 30
# A trend is reported once its buckets with values span half the window, and are at least
# this many (a slope through two or three points is whatever their noise says).
TREND_MIN_SPAN = BUCKETS // 2  # in buckets, from the oldest bucket's start to the newest's
TREND_MIN_BUCKETS = 5
# ...and no run of empty buckets between two holding values is longer than this: a quarter
# of the window without values (a device offline) is a step, not a slope. Once the values
# before the gap leave the window, the trend comes back when the new ones span half of it.
TREND_MAX_GAP = BUCKETS // 4  # in empty buckets
_EMPTY = WindowStats(mean=None, max=None)
# The columns of every line without buckets, shared and never changed (a measure that never
# gives a number, a bool, never has one): the first bucket gives a line columns of its own.
_NO_FLOATS = array("d")
_NO_COUNTS = array("q")


class _Buckets:
    """Values kept in BUCKETS time buckets of equal width over the last `seconds`.

    The buckets are columns of plain numbers, oldest first, not an object each: a signal's
    history costs a few hundred bytes, which at 100,000 signals is the plant half's memory.
    """

    __slots__ = ("_counts", "_next_start", "_seconds", "_starts", "_totals", "_width")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._width = seconds / BUCKETS
        self._starts = _NO_FLOATS  # each bucket's start
        self._counts = _NO_COUNTS  # how many values it holds
        self._totals = _NO_FLOATS  # and their sum
        self._next_start = -math.inf  # when the newest bucket is over

    def _open(self, t: float) -> float:
        """Open the bucket that holds `t` (callers check `_next_start` first, so that adding
        to the newest bucket costs no call); its start."""
        start = t - t % self._width
        if not self._starts:
            self._starts, self._counts, self._totals = array("d"), array("q"), array("d")
        self._starts.append(start)
        self._counts.append(0)
        self._totals.append(0.0)
        self._next_start = start + self._width
        return start

    def _drop(self, oldest: int) -> None:
        """Forget the `oldest` buckets."""
        del self._starts[:oldest], self._counts[:oldest], self._totals[:oldest]

    def _expire(self, now: float) -> bool:
        """Drop the buckets wholly before the window ending at `now`; whether any was."""
        starts, oldest, width = self._starts, now - self._seconds, self._width
        if not starts or starts[0] + width > oldest:
            return False
        gone = 1
        while gone < len(starts) and starts[gone] + width <= oldest:
            gone += 1
        self._drop(gone)
        if not starts:  # the next value, however late, opens a bucket of its own
            self._next_start = -math.inf
        return True

    def changes_at(self) -> float:
        """When the oldest bucket leaves the window (what was derived from it goes stale)."""
        return self._starts[0] + self._width + self._seconds if self._starts else math.inf


class Window(_Buckets):
    """Mean and max of the values seen in the last `seconds` (to one bucket's precision);
    the mean rounded to `precision`, the max as it was seen."""

    __slots__ = ("_count", "_older_peak", "_peaks", "_round", "_total")

    def __init__(self, seconds: float, precision: Precision | None = None) -> None:
        super().__init__(seconds)
        # Each bucket's largest value as it was seen: an integer stays one (not a column of
        # floats), so a max reads as the device said it.
        self._peaks: list[float] = []
        self._round = (precision or Precision()).round
        self._count = 0  # over all buckets: a mean costs no loop
        self._total = 0.0
        self._older_peak: float | None = None  # of all buckets but the newest; None: unknown

    def _open(self, t: float) -> float:
        self._peaks.append(-math.inf)
        return super()._open(t)

    def _drop(self, oldest: int) -> None:
        super()._drop(oldest)
        del self._peaks[:oldest]

    def add(self, t: float, value: float) -> None:
        if t >= self._next_start:
            self._open(t)
            self._older_peak = None
        # a late value counts in the newest bucket
        self._counts[-1] += 1
        self._totals[-1] += value
        peaks = self._peaks
        if value > peaks[-1]:  # noqa: PLR1730 - max() is a call, for every value
            peaks[-1] = value
        self._count += 1
        self._total += value

    def stats(self, now: float) -> WindowStats:
        """Mean and max over the window ending at `now`; both None without values, the mean
        None when the values' sum is beyond a float."""
        starts = self._starts  # _expire's own first test, without its call at every scan
        if starts and starts[0] + self._width <= now - self._seconds and self._expire(now):
            # Summed afresh, not by subtraction: a huge value gone must leave nothing behind.
            self._count = sum(self._counts)
            self._total = sum(self._totals)  # inf, not an error, at the limit
            self._older_peak = None
        if self._count == 0:
            return _EMPTY
        peaks = self._peaks
        if self._older_peak is None:  # once per bucket, not at every scan
            self._older_peak = max(itertools.islice(peaks, len(peaks) - 1), default=-math.inf)
        mean = self._total / self._count
        return WindowStats(
            mean=self._round(mean) if math.isfinite(mean) else None,
            max=max(self._older_peak, peaks[-1]),
        )


class TrendLine(_Buckets):
    """Least-squares slope per hour over the bucket means of the last `seconds`."""

    __slots__ = ("_slope", "generation")

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self._slope: float | None = None  # cached until the next bucket opens
        self.generation = 0  # counts opened buckets: what was derived from the line is stale

    def add(self, t: float, value: float) -> None:
        if t >= self._next_start:
            self._expire(self._open(t) + self._width)
            self._slope = None
            self.generation += 1
        self._counts[-1] += 1
        self._totals[-1] += value

    def level(self) -> float:
        """The mean of the newest bucket (call after slope_per_h() gave a slope)."""
        return self._totals[-1] / self._counts[-1]

    def slope_per_h(self, now: float) -> float | None:
        """Over the window ending at `now`: a measure that stopped giving good values has
        no trend once they are older than the window. None until the buckets holding values
        span half the window, are at least TREND_MIN_BUCKETS and have no gap longer than
        TREND_MAX_GAP empty buckets, or when the values are beyond a float's range."""
        if self._expire(now):
            self._slope = None
            self.generation += 1
        if self._slope is None and self._long_enough():
            xs = self._starts.tolist()
            ys = [total / count for total, count in zip(self._totals, self._counts, strict=True)]
            x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
            spread = sum((x - x_mean) ** 2 for x in xs)
            covariance = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True))
            slope = covariance / spread * 3600
            self._slope = slope if math.isfinite(slope) else None
        return self._slope

    def _long_enough(self) -> bool:
        starts = self._starts
        if len(starts) < TREND_MIN_BUCKETS:
            return False
        width = self._width  # starts are whole widths apart
        if (starts[-1] - starts[0]) / width < TREND_MIN_SPAN - 0.5:
            return False
        longest = max(later - earlier for earlier, later in itertools.pairwise(starts))
        return longest / width < TREND_MAX_GAP + 1.5  # neighbours are 1 width apart
