"""DNP3 TCP connector: a read-only master of one outstation (docs/dnp3.md, ADR 0023).

Read-only by construction: the only application requests it can send are those of
`dnp3_objects.FUNCTIONS_SENT`, READ (1) and CONFIRM (0), and it confirms only what the
protocol requires: a response that asks for it (CON set), and an unsolicited response it
takes (`unsolicited: true`). It never writes (not even g80v1 to clear the restart
indication, which another master may depend on), never enables or disables unsolicited
responses, never syncs time, freezes, restarts or controls. `read: static` reads exactly
the points the signals name, in range reads over runs of adjacent indexes, never across a
gap (planned by `dnp3_plan.py`); `read: events` polls the event classes, with an integrity poll (class 0 and the event
classes) at the start of each session and every `integrity_every_s`, keeps the latest value
of the named points only and drops every other point at once.

One request is outstanding at a time on one TCP connection; a response is matched to it by
the application sequence number. Whatever does not line up (another sequence, a frame that
`dnp3_frames` refuses, a response that does not finish within `MAX_FRAGMENTS` fragments, more
than `MAX_BYTES_PER_REQUEST` received while waiting for one) means the connection can no
longer be trusted to pair requests and answers: it is dropped and the breaker trips, as on a
timeout (every signal `bad` in one batch, a reconnect after an exponential backoff).

Bounded against a flooding outstation: bytes are read only while a request waits, at most
`MAX_BYTES_PER_REQUEST` of them, and the task yields to the event loop after every chunk, so
an endless stream of link status requests or unsolicited responses costs this device a
timeout and its breaker, never the other devices their scan rate nor memory.
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
from broker.plant.connectors.base import Emit, RawSample, ScanGrid, raise_if_cancelled
from broker.plant.connectors.dnp3_frames import Channel, FrameError
from broker.plant.connectors.dnp3_objects import (
    Header,
    Point,
    Response,
    class_header,
    confirm,
    indications,
    parse_response,
    quality_of,
    read_request,
)
from broker.plant.connectors.dnp3_plan import static_reads
from broker.plant.connectors.supervision import FIRST_RETRY_S, MAX_RETRY_S, STABLE_S
from broker.policy import Dnp3Device, Dnp3Source, Signal

MAX_FRAGMENTS: Final = 32  # fragments of one response; a longer one never finishes
MAX_BYTES_PER_REQUEST: Final = 128 * 1024  # received while waiting for one response
_CHUNK = 4096
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


class _Latest(NamedTuple):
    point: Point
    received: datetime  # when the response that carried it came


class _Link:
    """One TCP connection to the outstation: the link channel, the application sequence,
    one request at a time."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connector: Dnp3Connector,
    ) -> None:
        device = connector.device
        self._reader = reader
        self._writer = writer
        self._connector = connector
        self._channel = Channel(device.master_address, device.outstation_address)
        self._timeout = device.timeout_s
        self._seq = 0
        self._apdus: list[bytes] = []  # received, not yet looked at (one chunk's worth)
        self._budget = 0

    def close(self) -> None:
        self._writer.close()

    async def ask(self, headers: Sequence[Header]) -> list[Response]:
        """READ these headers; the response's fragments, confirmed where they ask for it."""
        seq, self._seq = self._seq, (self._seq + 1) & 0x0F
        self._budget = MAX_BYTES_PER_REQUEST
        await self._send(self._channel.request(read_request(seq, headers)))
        fragments: list[Response] = []
        while len(fragments) < MAX_FRAGMENTS:
            # Each fragment within timeout_s, whatever comes between (unsolicited, link frames).
            deadline = asyncio.get_running_loop().time() + self._timeout
            response = await self._next_response(deadline)
            if response.seq != seq or response.first != (not fragments):
                raise DeviceError(
                    f"answered with sequence {response.seq} "
                    f"({'first' if response.first else 'not first'} fragment) "
                    f"where sequence {seq} was due"
                )
            fragments.append(response)
            if response.confirm:
                await self._send(self._channel.request(confirm(seq, unsolicited=False)))
            if response.final:
                return fragments
            seq = (seq + 1) & 0x0F  # the next fragment of a response takes the next sequence
        raise DeviceError(f"a response that did not finish within {MAX_FRAGMENTS} fragments")

    async def _next_response(self, deadline: float) -> Response:
        """The next solicited response; unsolicited ones are taken or ignored on the way."""
        while True:
            apdu = await self._next_apdu(deadline)
            try:
                response = parse_response(apdu)
            except FrameError as e:
                raise DeviceError(f"a response that cannot be read: {e}") from e
            if not response.unsolicited:
                return response
            if self._connector.unsolicited(response) and response.confirm:
                await self._send(self._channel.request(confirm(response.seq, unsolicited=True)))

    async def _next_apdu(self, deadline: float) -> bytes:
        while not self._apdus:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await self._reader.read(_CHUNK)
            except TimeoutError as e:
                raise DeviceError(f"no answer within {self._timeout} s") from e
            except OSError as e:
                raise DeviceError(f"connection lost: {e}") from e
            raise_if_cancelled()
            if not chunk:
                raise DeviceError("the outstation closed the connection")
            self._budget -= len(chunk)
            if self._budget < 0:
                raise DeviceError(
                    f"more than {MAX_BYTES_PER_REQUEST} bytes while waiting for one response "
                    "(a flood of link frames or unsolicited responses)"
                )
            try:
                self._apdus = self._channel.receive(chunk)
            except FrameError as e:
                raise DeviceError(f"a frame that is not DNP3: {e}") from e
            if owed := self._channel.replies():
                await self._send(owed)
            await asyncio.sleep(0)  # a flood shares the loop with the other devices
        return self._apdus.pop(0)

    async def _send(self, frames: bytes) -> None:
        try:
            self._writer.write(frames)
            async with asyncio.timeout(self._timeout):
                await self._writer.drain()
        except TimeoutError as e:
            raise DeviceError(f"the outstation took no request within {self._timeout} s") from e
        except OSError as e:
            raise DeviceError(f"connection lost: {e}") from e
        raise_if_cancelled()


class Dnp3Connector:
    def __init__(self, device: Dnp3Device, signals: Sequence[Signal]) -> None:
        self.device = device
        self._signals = [s.path for s in signals]
        self._sources: list[tuple[str, Dnp3Source]] = []
        for signal in signals:
            if not isinstance(signal.source, Dnp3Source):  # the policy's checks forbid it
                raise TypeError(f"signal {signal.path}: not a DNP3 source")
            self._sources.append((signal.path, signal.source))
        self._named = {(source.group, source.index) for _, source in self._sources}
        self._asked: dict[tuple[int, int], set[int]] = {}  # point → the variations named
        for _, source in self._sources:
            if source.variation:
                self._asked.setdefault((source.group, source.index), set()).add(source.variation)
        self.reads = static_reads([source for _, source in self._sources])
        self.scans = 0
        self.overruns = 0  # scan slots skipped because the previous scan ran late
        self.errors = 0  # failed connections and refused reads
        self.last_scan_s = 0.0
        # (group, index) → variation → the latest value, the one taken last at the end
        self._latest: dict[tuple[int, int], dict[int, _Latest]] = {}
        self._skipped: set[str] = set()  # what the parser could not read, told once
        self._indications: frozenset[str] = frozenset()  # the notable ones last seen
        self._refused: dict[int, str] = {}  # read number → what the outstation said
        self._unsolicited_told = False  # device_unsolicited_ignored, once per session
        self._answering: bool | None = None
        self._good_since: float | None = None
        self._log = structlog.get_logger("dnp3").bind(device=device.name)
        self._grid = ScanGrid(device.poll_interval_s, self._log)

    async def run(self, emit: Emit) -> None:
        breaker = Backoff(FIRST_RETRY_S, MAX_RETRY_S, fresh_after_s=STABLE_S)
        while True:
            self._good_since = None
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
                good = self._good_since
                retry_in_s = breaker.after(0.0 if good is None else time.monotonic() - good)
                down = self._answering is False
                event = "device_reconnect_failed" if down else "device_session_down"
                self._answering = False
                self._log.warning(event, error=str(e), retry_in_s=round(retry_in_s, 3))
                await emit(self._all_bad())
                await asyncio.sleep(retry_in_s)

    async def _connect(self) -> _Link:
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
        return _Link(reader, writer, self)

    async def _scan_forever(self, link: _Link, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        next_scan = loop.time()
        integrity_every = self.device.integrity_every_s
        next_integrity = loop.time()
        while True:
            started = time.monotonic()
            if integrity_every is None:
                samples = await self._static_scan(link)
            else:
                integrity = loop.time() >= next_integrity
                if integrity:
                    next_integrity = loop.time() + integrity_every
                samples = await self._event_scan(link, integrity=integrity)
            self.scans += 1
            self.last_scan_s = time.monotonic() - started
            if self._good_since is None:
                self._good_since = time.monotonic()
            if not self._answering:
                self._answering = True
                device = self.device
                self._log.info("device_session_up", host=device.host, port=device.port)
            await emit(samples)  # waits while the spool is behind: a late scan skips, not queues
            next_scan, missed = self._grid.next_slot(next_scan, loop.time(), self.last_scan_s)
            self.overruns += missed
            await asyncio.sleep(next_scan - loop.time())

    async def _static_scan(self, link: _Link) -> list[RawSample]:
        """Each read of the plan once; the signals' values from exactly these answers."""
        self._latest.clear()  # a point not in this scan's answers is missing, not old
        missing_reason: dict[tuple[int, int, int], str] = {}
        for number, headers in enumerate(self.reads):
            fragments = await link.ask(headers)
            refused = self._take(fragments)
            if refused:
                self._refused_once(number, headers, refused)
                for header in headers:
                    for index in range(header.start, header.stop + 1):
                        missing_reason[header.group, header.variation, index] = (
                            f"the outstation refused the read: {', '.join(refused)}"
                        )
            elif number in self._refused:
                del self._refused[number]
                self._log.info("device_read_recovered", read=_describe(headers))
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

    async def _event_scan(self, link: _Link, *, integrity: bool) -> list[RawSample]:
        classes = self.device.classes_polled
        headers = [class_header(c) for c in classes] + ([class_header(0)] if integrity else [])
        refused = self._take(await link.ask(headers))
        if refused:
            self._refused_once(0, headers, refused)
        elif 0 in self._refused:
            del self._refused[0]
            self._log.info("device_read_recovered", read=_describe(headers))
        now = datetime.now(UTC)
        samples = []
        for path, source in self._sources:
            latest = self._find(source)
            if latest is None:
                reason = "not reported by the outstation yet"
                samples.append(RawSample(path, None, now, "bad", reason=reason))
            else:
                samples.append(self._sample(path, latest, now))
        return samples

    def _find(self, source: Dnp3Source) -> _Latest | None:
        """The latest value of a signal's point: a static read's of the signal's variation;
        otherwise (variation 0, or events, whose variations the outstation chooses) the one
        taken last."""
        by_variation = self._latest.get((source.group, source.index))
        if not by_variation:
            return None
        if self.device.read == "static":
            if source.variation:
                return by_variation.get(source.variation)
            # Variation 0 was answered in the outstation's default: one no signal asked for.
            asked = self._asked.get((source.group, source.index), set())
            defaults = [v for variation, v in by_variation.items() if variation not in asked]
            return defaults[-1] if defaults else None
        return next(reversed(by_variation.values()))

    @staticmethod
    def _sample(path: str, latest: _Latest, now: datetime) -> RawSample:
        point = latest.point
        quality, reason = quality_of(point)
        source_time = point.time or latest.received
        return RawSample(path, point.value, source_time, quality, read_time=now, reason=reason)

    def _take(self, fragments: Sequence[Response]) -> list[str]:
        """Keep the named points of a response; the refusals its last IIN says."""
        received = datetime.now(UTC)
        for response in fragments:
            self._keep(response, received)
        return [name for name in indications(fragments[-1].iin) if name in REFUSALS]

    def _keep(self, response: Response, received: datetime) -> None:
        self._indications_seen(response.iin)
        for point in response.points:
            if (point.group, point.index) in self._named:  # any other point is dropped here
                by_variation = self._latest.setdefault((point.group, point.index), {})
                by_variation.pop(point.variation, None)  # to the end: the one taken last
                by_variation[point.variation] = _Latest(point, received)
        for skipped in response.skipped:
            if skipped not in self._skipped and len(self._skipped) < 100:  # told once, bounded
                self._skipped.add(skipped)
                self._log.warning("device_objects_skipped", skipped=skipped)

    def unsolicited(self, response: Response) -> bool:
        """Whether an unsolicited response is taken (and so confirmed): only by policy."""
        if self.device.unsolicited:
            self._keep(response, datetime.now(UTC))
            return True
        if not self._unsolicited_told:
            self._unsolicited_told = True
            self._log.warning("device_unsolicited_ignored", seq=response.seq)
        return False

    def _indications_seen(self, iin: int) -> None:
        """Audit the notable indications when they change (never clear them: read-only)."""
        notable = frozenset(indications(iin)) & NOTABLE
        if notable != self._indications:
            self._indications = notable
            self._log.warning("device_status_reported", indications=sorted(notable))

    def _refused_once(self, number: int, headers: Sequence[Header], refused: list[str]) -> None:
        said = ", ".join(refused)
        if self._refused.get(number) == said:
            return
        self._refused[number] = said
        self.errors += 1
        self._log.warning("device_read_refused", read=_describe(headers), indications=refused)

    def _all_bad(self) -> list[RawSample]:
        now = datetime.now(UTC)
        return [RawSample(path, None, now, "bad") for path in self._signals]


def _describe(headers: Sequence[Header]) -> list[str]:
    """Headers as an operator reads them: g30v5 0..3, g60v2 (class 1)."""
    return [
        f"g{h.group}v{h.variation}" + ("" if h.qualifier == 0x06 else f" {h.start}..{h.stop}")
        for h in headers
    ]
