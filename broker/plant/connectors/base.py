"""What every connector produces and the one interface it keeps (docs/specs/component.md)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Generic, Protocol, TypeVar

import msgspec
from structlog.typing import FilteringBoundLogger

from broker.backoff import Backoff
from broker.errors import DeviceError
from broker.plant.decode import RawValue
from broker.records import Quality


class RawSample(msgspec.Struct, frozen=True, gc=False):
    """One value as a device gave it. Not tracked by the cyclic garbage collector: it holds
    no cycles, and thousands are made per second."""

    signal: str  # the policy's signal path
    raw: RawValue | None  # None when the read failed
    source_time: datetime  # the device's time for the value, or when the response came
    quality: Quality
    # When the broker received it, if not source_time: an OPC UA source timestamp may be
    # the time of the value's last change, but a flatline or a gap is judged by the reads.
    read_time: datetime | None = None
    # Why the device marked it `uncertain` or `bad`, in the device's own words (a DNP3 flag,
    # a BACnet reliability): the record's `device_status` quality issue. None: not said.
    reason: str | None = None


Emit = Callable[[list[RawSample]], Awaitable[None]]


class Connector(Protocol):
    """Reads the signals the policy names from one device, with read-only services only.

    Its counters are read for /metrics: whole scans, skipped scan slots, failed connections
    and reads, and the duration of the last scan.

    It may raise anything from `run`: the plant half runs each connector under
    `supervision.SupervisedDevice`, which keeps the failure to its device
    (docs/specs/component.md).
    """

    scans: int
    overruns: int
    errors: int
    last_scan_s: float

    async def run(self, emit: Emit) -> None:
        """Scan until cancelled, passing each scan's samples to `emit`; never returns. A
        scan may be passed in several batches (Modbus hands each request's samples on when
        it is answered), but the signals that share a modelled asset's state always come in
        one batch (registry.shared_state): the pipeline builds a batch's context once all
        of it is observed."""
        ...


class Pace:
    """Spaces request starts at least 1/rate apart, across all of a device's connections
    (Modbus) or on its one socket (BACnet)."""

    def __init__(self, per_s: float) -> None:
        self._gap = 1.0 / per_s
        self._next = 0.0

    async def wait(self) -> None:
        now = asyncio.get_running_loop().time()
        start = max(now, self._next)
        self._next = start + self._gap  # reserved before sleeping: concurrent callers queue up
        await asyncio.sleep(start - now)


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library swallowed.

    On Python 3.11, `asyncio.wait_for` (used inside protocol libraries) can swallow a
    cancellation that races with a response; the task's cancel request stays counted. Call
    this after each library await, so that a stop request never leaves a connector running.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class ScanGrid:
    """Scans start on a fixed grid of the poll interval and never overlap: a scan that ran
    late skips the slots it missed instead of queueing them. The first overrun of a streak
    is logged (and audited), as is the streak's end; the overruns between are only counted,
    so a device that stays slow does not flood the log.

    A streak ends only after `ON_TIME_TO_END` scans in a row kept their time (hysteresis):
    a scan whose length jitters around the poll interval (round trips of 30-70 ms against a
    0.1 s interval) would otherwise start and end a streak every few scans. One late scan
    among them keeps the streak going, and the countdown starts again."""

    ON_TIME_TO_END = 10

    def __init__(self, interval_s: float, log: FilteringBoundLogger) -> None:
        self._interval = interval_s
        self._log = log
        self._streak = 0  # slots skipped since the streak began; 0: no streak
        self._on_time = 0  # scans in a row that kept their time during a streak

    def next_slot(self, planned: float, now: float, scan_s: float) -> tuple[float, int]:
        """The next start time after the one `planned`, and how many slots were skipped."""
        following = planned + self._interval
        if now <= following:
            if self._streak:
                self._on_time += 1
                if self._on_time >= self.ON_TIME_TO_END:
                    self._log.info("scan_overrun_ended", skipped_scans=self._streak)
                    self._streak = self._on_time = 0
            return following, 0
        missed = math.ceil((now - following) / self._interval)
        if not self._streak:
            self._log.warning(
                "scan_overrun",
                skipped_scans=missed,
                scan_s=round(scan_s, 3),
                poll_interval_s=self._interval,
            )
        self._streak += missed
        self._on_time = 0
        return following + missed * self._interval, missed


K = TypeVar("K")  # what a state is kept for: a request, a read, a device's indications
S = TypeVar("S")  # the state: what a device says of it


class Hysteresis(Generic[K, S]):
    """Which change of a per-answer state to log (and audit): the state last told, per key,
    and the one that would replace it (docs/specs/component.md, "Events").

    A new state is told once it has held for `HOLD` answers in a row, so a device whose
    answers flip between two states (an indication toggled at every answer, a request
    refused every other poll) is told once, not at the poll rate; a state that lasts is told
    `HOLD` answers late. With `start_at_once`, leaving the `quiet` state (a refusal
    starting) is told at the first answer that shows it; the return to it (the recovery),
    and any other change, still waits out `HOLD` answers. Only the events wait: each
    answer's values are judged as they come. Keeps nothing for a key that is quiet and not
    changing. `hold=1` tells every change: for a state seen far less often than at each
    poll (a BACnet subscription, renewed every few minutes)."""

    HOLD = 3

    def __init__(self, quiet: S, *, start_at_once: bool, hold: int = HOLD) -> None:
        self._quiet = quiet
        self._start_at_once = start_at_once
        self._hold = hold
        self._told: dict[K, S] = {}  # the state last told, when not quiet
        self._coming: dict[K, tuple[S, int]] = {}  # another state, and answers it has held

    def seen(self, key: K, state: S) -> bool:
        """One answer said `state` for `key`: True when the caller is to tell it now."""
        told = self._told.get(key, self._quiet)
        if state == told:
            self._coming.pop(key, None)
            return False
        coming, held = self._coming.get(key, (state, 0))
        held = held + 1 if coming == state else 1
        if held < self._hold and not (self._start_at_once and told == self._quiet):
            self._coming[key] = (state, held)
            return False
        self._coming.pop(key, None)
        if state == self._quiet:
            del self._told[key]
        else:
            self._told[key] = state
        return True


class SessionBreaker:
    """Whether a connector's session with its device answers, told once per change: the
    breaker of a connector that drops its session on a `DeviceError` and connects again
    (Modbus, DNP3, BACnet; docs/specs/component.md, "Behaviour toward devices").

    `device_session_up` is logged (and audited) at the first good scan after start or an
    outage, `device_session_down` when a session fails; a retry that fails while the device
    stays down is `device_reconnect_failed`, in the process log only. The backoff starts
    afresh only after a session that scanned well for its `fresh_after_s`: a device that
    answers one scan and then fails is reconnected at a slowing rate, not once per scan.
    """

    def __init__(self, log: FilteringBoundLogger, signals: Sequence[str]) -> None:
        self._log = log
        self._signals = signals  # the device's signal paths: all `bad` while it is down
        self._answering: bool | None = None  # None until a first good scan or failure
        self._good_since: float | None = None  # when this session first scanned whole

    def opening(self) -> None:
        """A new session is being opened: its good time starts at its own first good scan."""
        self._good_since = None

    def scanned(self, **fields: object) -> None:
        """A scan went well; when the device was not answering, say so with `fields`."""
        if self._good_since is None:
            self._good_since = time.monotonic()
        if not self._answering:
            self._answering = True
            self._log.info("device_session_up", **fields)

    async def failed(self, error: DeviceError, backoff: Backoff, emit: Emit) -> None:
        """The session failed: log it, mark every signal `bad` in one batch, and wait out
        the backoff before the caller connects again. `backoff` is the caller's, made afresh
        at each `run` from its module's retry constants (which tests may shorten)."""
        good = self._good_since
        retry_in_s = backoff.after(0.0 if good is None else time.monotonic() - good)
        event = "device_reconnect_failed" if self._answering is False else "device_session_down"
        self._answering = False
        self._log.warning(event, error=str(error), retry_in_s=round(retry_in_s, 3))
        now = datetime.now(UTC)
        await emit([RawSample(path, None, now, "bad") for path in self._signals])
        await asyncio.sleep(retry_in_s)
