"""Bounded history: a window's mean and max, a trend line's slope, as buckets open and expire."""

from __future__ import annotations

import pytest

from broker.plant.history import BUCKETS, TrendLine, Window

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


def test_a_trend_line_needs_three_buckets() -> None:
    line = TrendLine(3600)
    width = 3600 / BUCKETS
    line.add(T0, 1.0)
    line.add(T0 + width, 2.0)
    assert line.slope_per_h(T0 + width) is None
    line.add(T0 + 2 * width, 3.0)
    assert line.slope_per_h(T0 + 2 * width) == pytest.approx(1.0 / width * 3600)


def test_a_trend_line_counts_its_buckets_and_forgets_old_ones() -> None:
    line = TrendLine(3600)
    width = 3600 / BUCKETS
    for i in range(3):
        line.add(T0 + i * width, 5.0 + i)
    assert line.generation == 3
    line.add(T0 + 2 * width + 1, 100.0)  # same bucket: its mean moves, no new generation
    assert line.generation == 3 and line.level() == pytest.approx(53.5)
    for i in range(3):  # an hour later: only these three remain
        line.add(T0 + 3600 + 10 * width + i * width, 7.0)
    assert line.generation == 6
    assert line.slope_per_h(T0 + 3600 + 12 * width) == pytest.approx(0.0)


def test_a_trend_ends_when_its_values_are_older_than_the_window() -> None:
    line = TrendLine(3600)
    width = 3600 / BUCKETS
    for i in range(5):
        line.add(T0 + i * width, 10.0 * i)
    assert line.slope_per_h(T0 + 4 * width) == pytest.approx(10.0 / width * 3600)
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
