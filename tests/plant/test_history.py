"""Bounded history: a window's mean and max, a trend line's slope, as buckets open and expire."""

from __future__ import annotations

import pytest

from broker.plant.history import (
    BUCKETS,
    TREND_MAX_GAP,
    TREND_MIN_BUCKETS,
    TREND_MIN_SPAN,
    TrendLine,
    Window,
)
from broker.policy.precision import Precision

T0 = 1_700_000_000.0  # a bucket boundary for both widths used here
WIDTH = 900 / BUCKETS  # 15 min window: 30 s buckets


def test_a_window_without_values_has_no_mean_or_max() -> None:
    stats = Window(900).stats(T0)
    assert (stats.mean, stats.max) == (None, None)


def test_a_window_gives_the_mean_and_max_of_its_values() -> None:
    window = Window(900)
    for i, value in enumerate([10.0, 30.0, 20.0, 5.0]):
        window.add(T0 + i * WIDTH, value)  # one bucket each
    stats = window.stats(T0 + 3 * WIDTH)
    assert (stats.mean, stats.max) == (16.25, 30.0)


def test_the_max_falls_when_the_bucket_that_held_it_expires() -> None:
    window = Window(900)
    window.add(T0, 50.0)
    window.add(T0 + WIDTH, 10.0)
    assert window.stats(T0 + WIDTH).max == 50.0  # the older buckets' max is now remembered
    window.add(T0 + 900 + WIDTH, 12.0)
    stats = window.stats(T0 + 900 + WIDTH)  # the 50's bucket ended 15 min ago
    assert (stats.mean, stats.max) == (11.0, 12.0)


def test_the_max_rises_within_the_newest_bucket() -> None:
    window = Window(900)
    window.add(T0, 40.0)
    window.add(T0 + WIDTH, 10.0)
    assert window.stats(T0 + WIDTH).max == 40.0
    window.add(T0 + WIDTH + 1, 70.0)
    assert window.stats(T0 + WIDTH + 1).max == 70.0


def test_a_late_value_counts_in_the_newest_bucket() -> None:
    window = Window(900)
    window.add(T0 + 5 * WIDTH, 10.0)
    window.add(T0, 30.0)  # older than the newest bucket: still counted, never lost
    assert window.stats(T0 + 5 * WIDTH).mean == 20.0


def test_everything_expires_after_a_silence_longer_than_the_window() -> None:
    window = Window(900)
    window.add(T0, 10.0)
    assert window.stats(T0 + 2000).mean is None


def test_a_trend_says_nothing_until_its_history_spans_half_its_window() -> None:
    """Issue 15: the first minute of a 10 min window gave 63 bar/h."""
    line = TrendLine(3600)
    width = 3600 / BUCKETS
    slopes = []
    for i in range(TREND_MIN_SPAN + 1):  # a bucket each: 2 min apart, up to 30 min
        line.add(T0 + i * width, 1.0 + i)
        slopes.append(line.slope_per_h(T0 + i * width))
    assert TREND_MIN_SPAN == BUCKETS // 2
    assert slopes[:-1] == [None] * TREND_MIN_SPAN  # up to 28 min of a 60 min window
    assert slopes[-1] == pytest.approx(1.0 / width * 3600)  # 30 min: half the window


def test_a_trend_needs_enough_points_however_long_its_span() -> None:
    line = TrendLine(3600)
    width = 3600 / BUCKETS
    gap = TREND_MAX_GAP + 1  # as far apart as they may be
    starts = [0, gap, 2 * gap]  # spanning more than half
    assert 2 * gap > TREND_MIN_SPAN
    for i in starts:
        line.add(T0 + i * width, float(i))
    assert line.slope_per_h(T0 + starts[-1] * width) is None  # three points: no trend
    for i in range(starts[-1] + 1, starts[-1] + TREND_MIN_BUCKETS - len(starts) + 1):
        line.add(T0 + i * width, float(i))
    assert line.slope_per_h(T0 + i * width) == pytest.approx(1.0 / width * 3600)


def test_a_trend_line_counts_its_buckets_and_forgets_old_ones() -> None:
    line = TrendLine(3600)
    width = 3600 / BUCKETS
    for i in range(3):
        line.add(T0 + i * width, 5.0 + i)
    assert line.generation == 3
    line.add(T0 + 2 * width + 1, 100.0)  # same bucket: its mean moves, no new generation
    assert line.generation == 3 and line.level() == pytest.approx(53.5)
    for i in range(16):  # an hour later: only these sixteen remain
        line.add(T0 + 3600 + 10 * width + i * width, 7.0)
    assert line.generation == 19
    assert line.slope_per_h(T0 + 3600 + 25 * width) == pytest.approx(0.0)


def test_a_trend_ends_when_its_values_are_older_than_the_window() -> None:
    line = TrendLine(3600)
    width = 3600 / BUCKETS
    for i in range(16):
        line.add(T0 + i * width, 10.0 * i)
    assert line.slope_per_h(T0 + 15 * width) == pytest.approx(10.0 / width * 3600)
    generation = line.generation
    assert line.slope_per_h(T0 + 3 * 3600) is None  # no good value for hours: no trend
    assert line.generation > generation  # what was derived from the old line is stale


def test_a_huge_value_leaves_the_mean_whole_once_it_expires() -> None:
    window = Window(900)
    window.add(T0, 1e30)  # swallows small values in a running sum
    for i in range(1, 40):
        window.add(T0 + i * WIDTH, 20.0)
        window.stats(T0 + i * WIDTH)
    stats = window.stats(T0 + 39 * WIDTH)
    assert (stats.mean, stats.max) == (20.0, 20.0)


def test_a_mean_beyond_a_float_is_no_mean() -> None:
    window = Window(900)
    window.add(T0, 1.7e308)
    window.add(T0 + 1, 1.7e308)  # the sum is infinite
    stats = window.stats(T0 + 1)
    assert (stats.mean, stats.max) == (None, 1.7e308)


def test_a_late_value_after_everything_expired_opens_a_bucket_of_its_own() -> None:
    window, line = Window(900), TrendLine(900)
    for history in (window, line):
        history.add(T0 + 100, 5.0)
    assert window.stats(T0 + 2000).mean is None  # everything expired on reading
    assert line.slope_per_h(T0 + 2000) is None
    for history in (window, line):
        history.add(T0 + 100, 7.0)  # a value stamped earlier than the last: no crash
    assert window.stats(T0 + 100).mean == 7.0


def test_values_summing_beyond_a_float_as_buckets_expire_give_no_mean() -> None:
    window = Window(900)
    for minute, value in ((0, 20.0), (1, 1.7e308), (2, 1.7e308), (16, 20.0)):
        window.add(T0 + minute * 60, value)
        stats = window.stats(T0 + minute * 60)  # at 16: the first bucket leaves, a re-sum
    assert (stats.mean, stats.max) == (None, 1.7e308)


def test_a_windows_mean_never_shows_float_noise_and_keeps_its_precision() -> None:
    """(0.1 + 0.2) / 2 is 0.15000000000000002 in floats; 5 / 3 is 1.67 to two decimals."""
    plain, rounded = Window(900), Window(900, Precision(2))
    for history in (plain, rounded):
        for i, value in enumerate((0.1, 0.2)):
            history.add(T0 + i, value)
    assert (plain.stats(T0 + 1).mean, rounded.stats(T0 + 1).mean) == (0.15, 0.15)
    for history in (plain, rounded):
        history.add(T0 + 2, 4.7)
    assert plain.stats(T0 + 2).mean == 1.66666666667  # no precision: 12 significant digits
    stats = rounded.stats(T0 + 2)
    assert (stats.mean, stats.max) == (1.67, 4.7)  # the max: as it was seen


def test_no_trend_across_a_gap_longer_than_a_quarter_of_the_window() -> None:
    """Review: 4 min of 100, 26 min offline, then 110 gave 19.2/h "rising" from a step."""
    line, width = TrendLine(3600), 3600 / BUCKETS  # 2 min buckets
    for minute in (0, 2, 30, 32, 34):  # five buckets spanning 17 widths, 13 empty between
        line.add(T0 + minute * 60, 100.0 if minute < 30 else 110.0)
    assert line.slope_per_h(T0 + 34 * 60) is None

    short = TrendLine(3600)  # the same span, with an outage of TREND_MAX_GAP buckets
    before = range(0, 8)
    after = range(8 + TREND_MAX_GAP, 8 + TREND_MAX_GAP + 4)
    for i in (*before, *after):
        short.add(T0 + i * width, float(i))
    assert short.slope_per_h(T0 + after[-1] * width) == pytest.approx(1.0 / width * 3600)
    short.add(T0 + (after[-1] + TREND_MAX_GAP + 2) * width, 30.0)  # one bucket too many empty
    assert short.slope_per_h(T0 + (after[-1] + TREND_MAX_GAP + 2) * width) is None


# Columns of plain numbers (ADR 0035): what they must not change


def test_lines_and_windows_without_values_share_nothing_that_values_change() -> None:
    lines, windows = [TrendLine(3600), TrendLine(3600)], [Window(900), Window(900)]
    for i in range(BUCKETS):
        lines[0].add(T0 + i * 120, float(i))
        windows[0].add(T0 + i * WIDTH, float(i))
    end = T0 + (BUCKETS - 1) * 120

    assert lines[0].slope_per_h(end) == 30.0  # one per 2 min bucket
    assert (lines[1].slope_per_h(end), lines[1].changes_at()) == (None, float("inf"))
    assert windows[0].stats(T0 + (BUCKETS - 1) * WIDTH).max == BUCKETS - 1
    assert windows[1].stats(T0 + (BUCKETS - 1) * WIDTH) == Window(900).stats(T0)
    windows[1].add(T0, 4.0)
    assert windows[1].stats(T0).mean == 4.0


def test_a_windows_max_of_integers_is_the_integer_as_it_was_seen() -> None:
    window = Window(900)
    window.add(T0, 2**62 + 1)  # more digits than a float holds
    window.add(T0 + WIDTH, 7)

    largest = window.stats(T0 + WIDTH).max
    assert largest == 2**62 + 1
    assert type(largest) is int
