"""Shared connector machinery: backoff, and stopping even when a library swallows a cancel."""

from __future__ import annotations

import asyncio

import pytest

from broker.plant.connectors.base import Backoff, raise_if_cancelled


def test_backoff_doubles_up_to_the_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(initial_s=0.5, max_s=4.0)
    delays = [backoff.delay() for _ in range(6)]
    for delay, nominal in zip(delays, [0.5, 1, 2, 4, 4, 4], strict=True):
        assert 0.8 * nominal <= delay <= 1.2 * nominal
    backoff.reset()
    assert backoff.delay() <= 0.6


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
