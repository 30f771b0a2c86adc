"""Shared connector machinery: backoff, the scan grid, the events' hysteresis, and stopping even when a library
swallows a cancel."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable

import pytest
import structlog
from structlog.testing import capture_logs

from broker.plant.connectors.base import Hysteresis, ScanGrid, raise_if_cancelled


async def test_a_cancel_swallowed_by_wait_for_is_raised_again() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def library_call_then_check() -> str:
        await asyncio.wait_for(future, 10)  # Python 3.11 loses a cancel racing the result here
        raise_if_cancelled()
        return "kept running"

    task = asyncio.create_task(library_call_then_check())
    await asyncio.sleep(0)
    future.set_result(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_no_cancel_means_no_raise() -> None:
    raise_if_cancelled()  # outside any cancellation: returns quietly
    assert asyncio.current_task().cancelling() == 0


def _overrun_events(interval_s: float, scan_lengths: Iterable[float]) -> list[str]:
    """The events a grid logs for scans of these lengths, each started at its slot."""
    grid = ScanGrid(interval_s, structlog.get_logger("test"))
    planned = 0.0
    with capture_logs() as logs:
        for length in scan_lengths:
            planned, _ = grid.next_slot(planned, planned + length, length)
    return [entry["event"] for entry in logs]


def test_scans_jittering_around_the_interval_make_one_streak_not_one_per_scan() -> None:
    """Two requests every 0.1 s at 20/s with round trips of 30-70 ms: each scan takes 80 to
    120 ms, about every other one late. That is one slow stretch, not dozens of streaks."""
    jitter = random.Random(12)
    lengths = [0.05 + 2 * jitter.uniform(0.015, 0.035) for _ in range(60)]  # 6 s of scans

    events = _overrun_events(0.1, lengths)

    assert events == ["scan_overrun"]


def test_a_streak_ends_after_enough_scans_in_a_row_kept_their_time() -> None:
    on_time = ScanGrid.ON_TIME_TO_END
    late, fast = 0.15, 0.05
    almost = [fast] * (on_time - 1)

    assert _overrun_events(0.1, [late, *almost]) == ["scan_overrun"]
    assert _overrun_events(0.1, [late, *almost, fast]) == ["scan_overrun", "scan_overrun_ended"]
    # one late scan in the countdown keeps the streak, and the countdown starts again
    assert _overrun_events(0.1, [late, *almost, late, *almost]) == ["scan_overrun"]
    assert _overrun_events(0.1, [late, *almost, late, *almost, fast, late]) == [
        "scan_overrun",
        "scan_overrun_ended",
        "scan_overrun",
    ]


def test_the_end_of_a_streak_counts_every_slot_it_skipped() -> None:
    grid = ScanGrid(0.1, structlog.get_logger("test"))
    planned = 0.0
    with capture_logs() as logs:
        for length in [0.25, 0.05, 0.15] + [0.05] * ScanGrid.ON_TIME_TO_END:
            planned, _ = grid.next_slot(planned, planned + length, length)

    assert [(e["event"], e["skipped_scans"]) for e in logs] == [
        ("scan_overrun", 2),
        ("scan_overrun_ended", 3),
    ]


def told(hysteresis: Hysteresis[str, str | None], answers: Iterable[str | None]) -> list[object]:
    """The states told, in order, for one key's answers."""
    return [state for state in answers if hysteresis.seen("read", state)]


def test_a_refusal_is_told_at_once_and_its_recovery_once_it_has_held() -> None:
    refusals: Hysteresis[str, str | None] = Hysteresis(None, start_at_once=True)
    flapping = ["busy", None] * 50 + ["busy"]
    assert told(refusals, flapping) == ["busy"]  # not a refusal and a recovery per two polls
    assert told(refusals, [None] * (Hysteresis.HOLD - 1)) == []
    assert told(refusals, [None]) == [None]  # it held: the recovery is told
    assert told(refusals, ["busy", "busy", "gone", "gone", "gone"]) == ["busy", "gone"]


def test_a_state_is_told_only_once_it_has_held_for_hold_answers() -> None:
    states: Hysteresis[str, str | None] = Hysteresis(None, start_at_once=False)
    assert told(states, ["restart", "trouble"] * 50) == []
    assert told(states, ["restart"] * 10) == ["restart"]  # at its HOLDth answer, once
    assert told(states, ["restart", None, None, "restart", None, None, None]) == [None]
    every: Hysteresis[str, str | None] = Hysteresis(None, start_at_once=False, hold=1)
    assert told(every, ["a", None, "a"]) == ["a", None, "a"]
