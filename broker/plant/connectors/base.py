"""What every connector produces and the one interface it keeps (docs/specs/component.md)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from broker.plant.decode import RawValue
from broker.records import Quality


@dataclass(frozen=True, slots=True)
class RawSample:
    signal: str  # the policy's signal path
    raw: RawValue | None  # None when the read failed
    source_time: datetime
    quality: Quality


Emit = Callable[[list[RawSample]], Awaitable[None]]


class Connector(Protocol):
    """Reads the signals the policy names from one device, with read-only services only.

    Its counters are read for /metrics: whole scans, skipped scan slots, failed connections
    and reads, and the duration of the last scan.
    """

    scans: int
    overruns: int
    errors: int
    last_scan_s: float

    async def run(self, emit: Emit) -> None:
        """Scan until cancelled, passing each scan's samples to `emit`; never returns."""
        ...


class Backoff:
    """Exponential backoff with jitter for reconnects: the engine, not the device, waits."""

    def __init__(self, initial_s: float, max_s: float = 30.0) -> None:
        self._initial = initial_s
        self._max = max_s
        self._next = initial_s

    def delay(self) -> float:
        """The next wait in seconds; each call doubles the following one up to the cap."""
        current = self._next
        self._next = min(self._max, self._next * 2)
        return current * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not secrecy

    def reset(self) -> None:
        self._next = self._initial


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library swallowed.

    On Python 3.11, `asyncio.wait_for` (used inside protocol libraries) can swallow a
    cancellation that races with a response; the task's cancel request stays counted. Call
    this after each library await, so that a stop request never leaves a connector running.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
