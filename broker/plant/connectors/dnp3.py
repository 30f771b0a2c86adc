"""DNP3 TCP connector: a read-only master of one outstation (docs/dnp3.md, ADR 0023).

Read-only by construction: the only application requests it can send are those of
`dnp3_objects.FUNCTIONS_SENT`, READ (1) and CONFIRM (0), through the session of
`dnp3_link.py`, which confirms only what the protocol requires. It never writes (not even
g80v1 to clear the restart indication, which another master may depend on), never enables
or disables unsolicited responses, never syncs time, freezes, restarts or controls.
`read: static` reads exactly the points the signals name, in range reads over runs of
adjacent indexes, never across a gap (planned by `dnp3_plan.py`), and keeps each answer
under the variation its READ asked for; `read: events` polls the event classes, with an
integrity poll (class 0 and the event classes) at the start of each session, every
`integrity_every_s`, and at the next scan after the outstation says it lost events
(EVENT_BUFFER_OVERFLOW) or restarted (DEVICE_RESTART turning on); it keeps the latest value
of the named points only and drops every other point at once. It never claims a value is
unchanged when the outstation refused the event poll: those values are `uncertain`.

Whatever the session cannot pair or read (`dnp3_link.py`) is a DeviceError: the connection
is dropped and the breaker trips, as on a timeout (every signal `bad` in one batch, a
reconnect after an exponential backoff).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final, NamedTuple

import structlog

from broker.backoff import Backoff
from broker.errors import DeviceError
from broker.plant.connectors.base import (
    Emit,
    Hysteresis,
    RawSample,
    ScanGrid,
    SessionBreaker,
    raise_if_cancelled,
)
from broker.plant.connectors.dnp3_link import Link
from broker.plant.connectors.dnp3_objects import (
    Header,
    Point,
    Response,
    class_header,
    indications,
    quality_of,
)
from broker.plant.connectors.dnp3_plan import static_reads
from broker.plant.connectors.supervision import FIRST_RETRY_S, MAX_RETRY_S, STABLE_S
from broker.policy import Dnp3Device, Dnp3Source, Signal

# Indications worth an audit event when they change (contract: device_status_reported).
NOTABLE: Final = frozenset(
    {
        "DEVICE_RESTART",
        "DEVICE_TROUBLE",
        "LOCAL_CONTROL",
        "EVENT_BUFFER_OVERFLOW",
        "NEED_TIME",
        "CONFIG_CORRUPT",
    }
)
# IIN2 bits by which an outstation refuses (part of) a request.
REFUSALS: Final = frozenset({"NO_FUNC_CODE_SUPPORT", "OBJECT_UNKNOWN", "PARAMETER_ERROR"})
# Indications turning on that mean events were lost: an integrity poll at the next scan.
EVENTS_LOST: Final = frozenset({"EVENT_BUFFER_OVERFLOW", "DEVICE_RESTART"})


class _Latest(NamedTuple):
    point: Point
    received: datetime  # when the response that carried it came


class Dnp3Connector:
    def __init__(self, device: Dnp3Device, signals: Sequence[Signal]) -> None:
        self.device = device
        self._sources: list[tuple[str, Dnp3Source]] = []
        for signal in signals:
            if not isinstance(signal.source, Dnp3Source):  # the policy's checks forbid it
                raise TypeError(f"signal {signal.path}: not a DNP3 source")
            self._sources.append((signal.path, signal.source))
        self._named = {(source.group, source.index) for _, source in self._sources}
        self.reads = static_reads([source for _, source in self._sources])
        self.scans = 0
        self.overruns = 0  # scan slots skipped because the previous scan ran late
        self.errors = 0  # failed connections and refused reads
        self.last_scan_s = 0.0
        # (group, index) → variation → the latest value, the one taken last at the end. Static
        # reads key it by the variation the READ asked for (0: the outstation's default).
        self._latest: dict[tuple[int, int], dict[int, _Latest]] = {}
        self._skipped: set[str] = set()  # what the parser could not read, told once
        self._lost: frozenset[str] = frozenset()  # EVENTS_LOST bits of the last response
        self._indications: Hysteresis[None, frozenset[str]] = Hysteresis(
            frozenset(), start_at_once=False
        )
        self._integrity_due = False  # events were lost: an integrity poll at the next scan
        # read number → what the outstation said in refusing it (None: it answered)
        self._refused: Hysteresis[int, str | None] = Hysteresis(None, start_at_once=True)
        self._unsolicited_told = False  # device_unsolicited_ignored, once per session
        self._log = structlog.get_logger("dnp3").bind(device=device.name)
        self._breaker = SessionBreaker(self._log, [s.path for s in signals])
        self._grid = ScanGrid(device.poll_interval_s, self._log)

    async def run(self, emit: Emit) -> None:
        backoff = Backoff(FIRST_RETRY_S, MAX_RETRY_S, fresh_after_s=STABLE_S)
        while True:
            self._breaker.opening()
            self._unsolicited_told = False
            self._latest.clear()  # a new session starts from an integrity poll or a read
            try:
                link = await self._connect()
                try:
                    await self._scan_forever(link, emit)
                finally:
                    link.close()
            except DeviceError as e:
                self.errors += 1
                await self._breaker.failed(e, backoff, emit)

    async def _connect(self) -> Link:
        device = self.device
        try:
            async with asyncio.timeout(device.timeout_s):
                reader, writer = await asyncio.open_connection(device.host, device.port)
        except TimeoutError as e:
            raise DeviceError(
                f"cannot connect to {device.address} within {device.timeout_s} s"
            ) from e
        except OSError as e:
            raise DeviceError(f"cannot connect to {device.address}: {e}") from e
        raise_if_cancelled()
        return Link(reader, writer, device, self.unsolicited)

    async def _scan_forever(self, link: Link, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        next_scan = loop.time()
        integrity_every = self.device.integrity_every_s
        next_integrity = loop.time()
        while True:
            started = time.monotonic()
            if integrity_every is None:
                samples = await self._static_scan(link)
            else:
                integrity = loop.time() >= next_integrity or self._integrity_due
                if integrity:
                    next_integrity = loop.time() + integrity_every
                samples = await self._event_scan(link, integrity=integrity)
            self.scans += 1
            self.last_scan_s = time.monotonic() - started
            self._breaker.scanned(host=self.device.host, port=self.device.port)
            await emit(samples)  # waits while the spool is behind: a late scan skips, not queues
            next_scan, missed = self._grid.next_slot(next_scan, loop.time(), self.last_scan_s)
            self.overruns += missed
            await asyncio.sleep(next_scan - loop.time())

    async def _static_scan(self, link: Link) -> list[RawSample]:
        """Each read of the plan once; the signals' values from exactly these answers."""
        self._latest.clear()  # a point not in this scan's answers is missing, not old
        missing_reason: dict[tuple[int, int, int], str] = {}
        for number, headers in enumerate(self.reads):
            refused, _ = self._take(await link.ask(headers), headers)
            self._refusal_seen(number, headers, refused)
            if refused:
                for header in headers:
                    for index in range(header.start, header.stop + 1):
                        missing_reason[header.group, header.variation, index] = (
                            f"the outstation refused the read: {', '.join(refused)}"
                        )
        now = datetime.now(UTC)
        samples = []
        for path, source in self._sources:
            latest = self._find(source)
            if latest is None:
                reason = missing_reason.get(
                    (source.group, source.variation, source.index),
                    "not in the outstation's answer",
                )
                samples.append(RawSample(path, None, now, "bad", reason=reason))
            else:
                samples.append(self._sample(path, latest, now))
        return samples

    async def _event_scan(self, link: Link, *, integrity: bool) -> list[RawSample]:
        classes = self.device.classes_polled
        headers = [class_header(c) for c in classes] + ([class_header(0)] if integrity else [])
        refused, received = self._take(await link.ask(headers), headers)
        if integrity:
            self._integrity_due = False  # this poll read what an overflow or restart lost
        self._refusal_seen(0, headers, refused)
        now = datetime.now(UTC)
        samples = []
        for path, source in self._sources:
            latest = self._find(source)
            if latest is None:
                reason = "not reported by the outstation yet"
                samples.append(RawSample(path, None, now, "bad", reason=reason))
            elif refused and latest.received < received:
                # No event is "unchanged" only when the poll was answered in full.
                doubt = f"the event poll was refused ({', '.join(refused)}): changes not known"
                samples.append(self._sample(path, latest, now, doubt))
            else:
                samples.append(self._sample(path, latest, now))
        return samples

    def _find(self, source: Dnp3Source) -> _Latest | None:
        """The latest value of a signal's point: a static read's answer to the signal's
        variation (0 included, whatever variation the outstation answered it in); with
        events, whose variations the outstation chooses, the one taken last."""
        by_variation = self._latest.get((source.group, source.index))
        if not by_variation:
            return None
        if self.device.read == "static":
            return by_variation.get(source.variation)
        return next(reversed(by_variation.values()))

    @staticmethod
    def _sample(path: str, latest: _Latest, now: datetime, doubt: str | None = None) -> RawSample:
        """The sample of a kept value; `doubt` makes a good one `uncertain` and says why."""
        point = latest.point
        quality, reason = quality_of(point)
        if doubt is not None and quality != "bad":
            quality, reason = "uncertain", doubt if reason is None else f"{reason}; {doubt}"
        source_time = point.time or latest.received
        return RawSample(path, point.value, source_time, quality, read_time=now, reason=reason)

    def _take(
        self, fragments: Sequence[Response], headers: Sequence[Header]
    ) -> tuple[list[str], datetime]:
        """Keep the named points of the answer to a READ of `headers`; the refusals its last
        IIN says, and when it came."""
        received = datetime.now(UTC)
        asked = {  # point → the variation a range header asked it in (static reads only)
            (h.group, index): h.variation
            for h in headers
            if h.group != 60  # a class read's points come in the variations they are sent in
            for index in range(h.start, h.stop + 1)
        }
        for response in fragments:
            self._keep(response, received, asked)
        return [name for name in indications(fragments[-1].iin) if name in REFUSALS], received

    def _keep(
        self, response: Response, received: datetime, asked: dict[tuple[int, int], int]
    ) -> None:
        self._indications_seen(response.iin)
        for point in response.points:
            key = (point.group, point.index)
            if key in self._named:  # any other point is dropped here
                variation = asked.get(key, point.variation)
                by_variation = self._latest.setdefault(key, {})
                by_variation.pop(variation, None)  # to the end: the one taken last
                by_variation[variation] = _Latest(point, received)
        for skipped in response.skipped:
            if skipped not in self._skipped and len(self._skipped) < 100:  # told once, bounded
                self._skipped.add(skipped)
                self._log.warning("device_objects_skipped", skipped=skipped)

    def unsolicited(self, response: Response) -> bool:
        """Whether an unsolicited response with objects is taken (and so confirmed): only by
        policy. (A null one is confirmed by the session and never comes here.)"""
        if self.device.unsolicited:
            self._keep(response, datetime.now(UTC), {})
            return True
        if not self._unsolicited_told:
            self._unsolicited_told = True
            self._log.warning("device_unsolicited_ignored", seq=response.seq)
        return False

    def _indications_seen(self, iin: int) -> None:
        """Audit the notable indications once a change has held (`Hysteresis`); never clear
        them (read-only). Events lost call for an integrity poll at once, on the first
        response that shows the bit turning on."""
        notable = frozenset(indications(iin)) & NOTABLE
        lost = notable & EVENTS_LOST
        if lost - self._lost:
            self._integrity_due = True
        self._lost = lost
        if self._indications.seen(None, notable):
            self._log.warning("device_status_reported", indications=sorted(notable))

    def _refusal_seen(self, number: int, headers: Sequence[Header], refused: list[str]) -> None:
        """Log (and so audit) a read's refusal when it starts, a change of it or its end once
        that has held (`Hysteresis`): a read refused every other poll is told once."""
        said = ", ".join(refused) or None
        if not self._refused.seen(number, said):
            return
        if said is None:
            self._log.info("device_read_recovered", read=_describe(headers))
            return
        self.errors += 1
        self._log.warning("device_read_refused", read=_describe(headers), indications=refused)


def _describe(headers: Sequence[Header]) -> list[str]:
    """Headers as an operator reads them: g30v5 0..3, g60v2 (class 1)."""
    return [
        f"g{h.group}v{h.variation}" + ("" if h.qualifier == 0x06 else f" {h.start}..{h.stop}")
        for h in headers
    ]
