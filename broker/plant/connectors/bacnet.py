"""BACnet/IP connector: present values, status flags and reliability of a device's objects,
read-only.

Read-only by construction: the only services this code base sends are in `SERVICES_USED`
(`bacnet_frames.py` builds no other request): a directed Who-Is, ReadProperty,
ReadPropertyMultiple, and SubscribeCOV only where the policy says `read: cov` (a
subscription changes the device's state). It never sends WriteProperty or any
device-management service, and reads only the objects the policy names.

It serves nothing and listens on nothing (docs/bacnet.md): its one UDP socket is connected
to the device's (host, port), so the kernel drops datagrams from anyone else, and no
bacpypes3 application or local device object exists to answer Who-Is, ReadProperty or
WriteProperty from the OT network; a request that reaches the socket is dropped unanswered.
An answer must match the one outstanding request (its invoke id and service); anything else
is dropped and counted (`stray`, `malformed`), never taken as data.

A session starts by confirming the device's identity (ReadProperty of the wildcard device
instance, or a directed Who-Is when the device refuses that) and reading its
max-apdu-length-accepted and the units of the analog objects; each scan then reads the
signals' properties, status-flags and reliability with ReadPropertyMultiple batches sized to
the device's APDU, one request at a time, spaced to `max_requests_per_s`. A timeout or a
socket error ends the session like a Modbus one: every signal `bad` in one batch, a backoff
with jitter, a new session.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, cast

import structlog
from bacpypes3.apdu import (
    APDU,
    AbortPDU,
    ComplexAckPDU,
    ConfirmedServiceChoice,
    ErrorPDU,
    IAmRequest,
    RejectPDU,
    SimpleAckPDU,
    UnconfirmedCOVNotificationRequest,
)
from bacpypes3.primitivedata import Boolean, Double, Enumerated, ObjectIdentifier

from broker.backoff import Backoff
from broker.errors import DeviceError
from broker.plant.connectors import bacnet_frames as frames
from broker.plant.connectors.bacnet_frames import SERVICES_USED, FrameError
from broker.plant.connectors.bacnet_units import our_unit, same_unit
from broker.plant.connectors.base import Emit, RawSample, ScanGrid, raise_if_cancelled
from broker.plant.connectors.modbus import Pace
from broker.plant.connectors.supervision import FIRST_RETRY_S, MAX_RETRY_S, STABLE_S
from broker.plant.decode import RawValue, float32_text
from broker.policy import BacnetDevice, Signal
from broker.policy.schema import BacnetSource
from broker.records import Quality

__all__ = ["SERVICES_USED", "BacnetConnector"]

INBOX: Final = 64  # datagrams held between two reads of the socket; a flood beyond is dropped
COV_LIFETIME_S: Final = 300  # a subscription lapses on its own if we vanish; renewed at 2/3
MIN_APDU: Final = 50  # the smallest max-apdu-length-accepted BACnet allows (clause 20.1.2.5)
_UNITS_OF = ("analog-input", "analog-output", "analog-value", "accumulator")
_PRESENT_VALUE = "present-value"
_STATUS = ("status-flags", "reliability")
_SERVICE = {name: int(ConfirmedServiceChoice(name)) for name in SERVICES_USED if name != "whoIs"}


@dataclass(frozen=True)
class _Read:
    signal: str
    obj: ObjectIdentifier
    object_type: str
    prop: str
    unit: str  # the policy's


class _Link(asyncio.DatagramProtocol):
    """The connected socket's receiving end: a bounded inbox, and the error that ended it."""

    def __init__(self) -> None:
        self.inbox: deque[bytes] = deque()
        self.flooded = 0  # datagrams dropped because the inbox was full
        self.arrived = asyncio.Event()
        self.error: Exception | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if len(self.inbox) >= INBOX:
            self.flooded += 1
        else:
            self.inbox.append(data)
        self.arrived.set()

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable
        self.error = exc
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc or ConnectionError("socket closed")
        self.arrived.set()


class _Refused(Exception):
    """The device answered a request with an error, a reject or an abort."""


class BacnetConnector:
    def __init__(self, device: BacnetDevice, signals: Sequence[Signal]) -> None:
        self._device = device
        self._reads = [_read(signal) for signal in signals]
        self.scans = 0
        self.overruns = 0  # scan slots skipped because the previous scan ran late
        self.errors = 0  # failed sessions and refused reads
        self.last_scan_s = 0.0
        self.stray = 0  # datagrams that answered no outstanding request: dropped
        self.malformed = 0  # datagrams that were not BACnet/IP for us: dropped
        self.requests = 0  # requests sent (a budget check for the tests and the bench)
        self.cov_lifetime_s = COV_LIFETIME_S
        self.local_address: tuple[str, int] | None = None  # the session's socket, for tests
        self._pace = Pace(device.max_requests_per_s)
        self._refused: set[str] = set()  # requests the device currently refuses
        self._answering: bool | None = None
        self._good_since: float | None = None
        self._log = structlog.get_logger("bacnet").bind(device=device.name)
        self._grid = ScanGrid(device.poll_interval_s, self._log)
        self._invoke = secrets.randbelow(256)
        self._process_id = 1 + secrets.randbelow((1 << 22) - 1)  # names our COV subscriptions
        self._last_drop = ""
        # per session
        self._max_apdu = frames.MAX_APDU
        self._units: dict[str, str] = {}  # signal → why its unit differs
        self._subscribed: dict[ObjectIdentifier, float] = {}  # object → renewal due (monotonic)
        self._cov_values: dict[ObjectIdentifier, tuple[Any, datetime]] = {}

    async def run(self, emit: Emit) -> None:
        breaker = Backoff(FIRST_RETRY_S, MAX_RETRY_S, fresh_after_s=STABLE_S)
        while True:
            self._good_since = None
            try:
                async with self._connected() as link:
                    await self._start_session(link)
                    await self._scan_forever(link, emit)
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

    @asynccontextmanager
    async def _connected(self) -> AsyncIterator[_Link]:
        """A UDP socket connected to the device: the kernel delivers only its datagrams."""
        device = self._device
        try:
            _, link = await asyncio.get_running_loop().create_datagram_endpoint(
                _Link, remote_addr=(device.host, device.port)
            )
        except OSError as e:
            raise DeviceError(f"cannot open a UDP socket to {device.address}: {e}") from e
        transport = link.transport
        self.local_address = transport.get_extra_info("sockname") if transport else None
        try:
            raise_if_cancelled()
            yield link
        finally:
            if link.transport is not None:
                link.transport.close()

    # ---- session start

    async def _start_session(self, link: _Link) -> None:
        self._units = {}
        self._subscribed = {}
        self._cov_values = {}
        device = self._device
        found = await self._identity(link)
        if found != device.device_instance:
            raise DeviceError(
                f"{device.address} is BACnet device {found}, not device "
                f"{device.device_instance} as the policy says: not read"
            )
        me = ObjectIdentifier(("device", found))
        try:
            answer = await self._confirmed(
                link,
                "readProperty",
                lambda i: frames.read_property(i, me, "max-apdu-length-accepted"),
            )
            apdu = int(frames.value_of("device", "max-apdu-length-accepted", answer.propertyValue))
        except (_Refused, FrameError):
            apdu = 480  # required of every device; a refusal is odd, so stay modest
        self._max_apdu = max(MIN_APDU, min(apdu, frames.MAX_APDU))
        await self._read_units(link)
        if device.read == "cov":
            await self._subscribe(link, time.monotonic(), renew=False)

    async def _identity(self, link: _Link) -> int:
        """The device instance of whatever answers at the address."""
        wildcard = ObjectIdentifier(("device", frames.WILDCARD_INSTANCE))
        try:
            answer = await self._confirmed(
                link,
                "readProperty",
                lambda i: frames.read_property(i, wildcard, "object-identifier"),
            )
            found = frames.value_of("device", "object-identifier", answer.propertyValue)
            if str(found[0]) == "device":
                return int(found[1])
        except (_Refused, FrameError):
            pass
        # bacpypes3 devices answer the wildcard with unknown-object: ask with a directed Who-Is
        await self._send(link, frames.who_is())
        answer = await self._receive(
            link, lambda apdu: isinstance(apdu, IAmRequest), "a directed Who-Is"
        )
        try:
            return int(answer.iAmDeviceIdentifier[1])
        except (TypeError, IndexError, ValueError) as e:
            raise DeviceError(f"{self._device.address}: an I-Am without a device: {e}") from e

    async def _read_units(self, link: _Link) -> None:
        """Compare each analog signal's units with the policy's, once per session."""
        wanted = [
            r
            for r in self._reads
            if r.object_type in _UNITS_OF and r.prop == _PRESENT_VALUE and r.unit
        ]
        values, _ = await self._read_batches(link, [(r.obj, "units") for r in wanted])
        for r in wanted:
            value = values.get((r.obj, "units"))
            if value is None:
                continue  # a refused or missing units property says nothing against the policy
            if same_unit(value.attr, r.unit):
                continue
            said = our_unit(value.attr, str(value))
            self._units[r.signal] = f"BACnet units: {said}, the policy says {r.unit}"
            self._log.warning(
                "device_units_differ", signal=r.signal, device_units=said, policy_unit=r.unit
            )

    async def _subscribe(self, link: _Link, now: float, *, renew: bool) -> None:
        """SubscribeCOV for each object read for its present-value (renewed at 2/3 of the
        lifetime); an object the device will not subscribe is polled instead."""
        objects = dict.fromkeys(r.obj for r in self._reads if r.prop == _PRESENT_VALUE)
        lifetime = self.cov_lifetime_s
        for obj in objects:
            due = self._subscribed.get(obj)
            if renew and (due is None or due > now):
                continue
            key = f"subscribeCOV {obj}"
            try:
                await self._confirmed(
                    link,
                    "subscribeCOV",
                    partial(
                        frames.subscribe_cov,
                        process_id=self._process_id,
                        obj=obj,
                        lifetime_s=lifetime,
                    ),
                )
            except _Refused as e:
                self._refused_once(key, str(e), [r.signal for r in self._reads if r.obj == obj])
                self._subscribed.pop(obj, None)
                self._cov_values.pop(obj, None)
                continue
            self._recovered(key)
            self._subscribed[obj] = time.monotonic() + lifetime * 2 / 3

    # ---- scans

    async def _scan_forever(self, link: _Link, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        next_scan = loop.time()
        while True:
            samples = await self._scan(link)
            if self._good_since is None:
                self._good_since = time.monotonic()
            if not self._answering:
                self._answering = True
                device = self._device
                self._log.info(
                    "device_session_up",
                    host=device.host,
                    port=device.port,
                    device_instance=device.device_instance,
                    max_apdu=self._max_apdu,
                )
            await emit(samples)
            next_scan, missed = self._grid.next_slot(next_scan, loop.time(), self.last_scan_s)
            self.overruns += missed
            await asyncio.sleep(next_scan - loop.time())

    async def _scan(self, link: _Link) -> list[RawSample]:
        started = time.monotonic()
        if self._subscribed:
            await self._subscribe(link, started, renew=True)
        wanted: dict[tuple[ObjectIdentifier, str], None] = {}
        for r in self._reads:
            if not (r.prop == _PRESENT_VALUE and r.obj in self._cov_values):
                wanted[(r.obj, r.prop)] = None
            for prop in _STATUS:
                wanted[(r.obj, prop)] = None
        values, errors = await self._read_batches(link, list(wanted))
        self.scans += 1
        self.last_scan_s = time.monotonic() - started
        now = datetime.now(UTC)
        return [self._sample(r, values, errors, now) for r in self._reads]

    async def _read_batches(
        self, link: _Link, wanted: list[frames.Property]
    ) -> tuple[dict[frames.Property, Any], dict[frames.Property, str]]:
        """Each property's value, or why there is none: ReadPropertyMultiple batches whose
        answers fit the device's APDU, one at a time."""
        values: dict[frames.Property, Any] = {}
        errors: dict[frames.Property, str] = {}
        for batch in self._batches(wanted):
            key = "readPropertyMultiple " + ", ".join(sorted({str(o) for o, _ in batch}))
            try:
                answer = await self._confirmed(
                    link,
                    "readPropertyMultiple",
                    partial(frames.read_property_multiple, wanted=batch),
                )
            except _Refused as e:
                reads = set(batch)
                self._refused_once(
                    key, str(e), [r.signal for r in self._reads if (r.obj, r.prop) in reads]
                )
                errors.update(dict.fromkeys(batch, f"BACnet: the device refused the read ({e})"))
                continue
            self._recovered(key)
            try:
                self._take(answer, batch, values, errors)
            except (AttributeError, TypeError, IndexError, ValueError) as e:
                # decoded, but not shaped as an ACK is: the device's bytes, never a crash
                unread = f"BACnet: an answer that could not be read ({type(e).__name__})"
                errors.update((p, unread) for p in batch if p not in values)
        return values, errors

    def _batches(self, wanted: list[frames.Property]) -> list[list[frames.Property]]:
        batches: list[list[frames.Property]] = []
        for item in wanted:
            if batches and frames.answer_size([*batches[-1], item]) <= self._max_apdu:
                batches[-1].append(item)
            else:
                batches.append([item])
        return batches

    @staticmethod
    def _take(
        answer: Any,
        batch: list[frames.Property],
        values: dict[frames.Property, Any],
        errors: dict[frames.Property, str],
    ) -> None:
        """The results of a ReadPropertyMultiple-ACK; what it leaves out is an error too."""
        asked = set(batch)
        for result in answer.listOfReadAccessResults or ():
            obj = result.objectIdentifier
            object_type = str(obj[0])
            for element in result.listOfResults or ():
                key = (obj, str(element.propertyIdentifier))
                if key not in asked:
                    continue  # not asked for: never data
                error = element.readResult.propertyAccessError
                if error is not None:
                    errors[key] = (
                        f"BACnet: {object_type} {obj[1]} has no {key[1]} "
                        f"({error.errorClass}: {error.errorCode})"
                    )
                    continue
                try:
                    values[key] = frames.value_of(
                        object_type, key[1], element.readResult.propertyValue
                    )
                except FrameError as e:
                    errors[key] = f"BACnet: {e}"
        for key in asked - values.keys() - errors.keys():
            errors[key] = f"BACnet: {key[0]} {key[1]} missing from the answer"

    def _sample(
        self,
        r: _Read,
        values: dict[frames.Property, Any],
        errors: dict[frames.Property, str],
        now: datetime,
    ) -> RawSample:
        source_time, read_time = now, None
        if r.prop == _PRESENT_VALUE and r.obj in self._cov_values:
            value, source_time = self._cov_values[r.obj]
            read_time = now  # unchanged since the notification: not stale
        else:
            value = values.get((r.obj, r.prop))
            if value is None:
                why = errors.get((r.obj, r.prop), "BACnet: no value")
                return RawSample(r.signal, None, now, "bad", reason=why)
        try:
            raw = _raw(r.object_type, r.prop, value)
        except (TypeError, ValueError) as e:
            return RawSample(r.signal, None, now, "bad", reason=f"BACnet: {e}")
        quality, reason = _quality(
            values.get((r.obj, "status-flags")), values.get((r.obj, "reliability"))
        )
        if quality == "good" and r.signal in self._units:
            quality, reason = "uncertain", self._units[r.signal]
        return RawSample(r.signal, raw, source_time, quality, read_time, reason)

    # ---- one request, one answer

    def _next_invoke(self) -> int:
        self._invoke = (self._invoke + 1) % 256
        return self._invoke

    async def _send(self, link: _Link, datagram: bytes) -> None:
        await self._pace.wait()
        raise_if_cancelled()
        if link.error is not None:
            raise DeviceError(f"{self._device.address}: {link.error}")
        assert link.transport is not None
        link.transport.sendto(datagram)
        self.requests += 1

    async def _confirmed(self, link: _Link, service: str, build: Callable[[int], bytes]) -> Any:
        """The device's answer to one confirmed request; `_Refused` for an error, a reject
        or an abort."""
        invoke = self._next_invoke()
        number = _SERVICE[service]

        def ours(apdu: APDU) -> bool:
            if not isinstance(apdu, ComplexAckPDU | SimpleAckPDU | ErrorPDU | RejectPDU | AbortPDU):
                return False
            if apdu.apduInvokeID != invoke:
                return False
            if isinstance(apdu, RejectPDU | AbortPDU):
                return True
            return bool(apdu.apduService == number)

        await self._send(link, build(invoke))
        answer = await self._receive(link, ours, service)
        if isinstance(answer, ErrorPDU):
            raise _Refused(
                f"error {getattr(answer, 'errorClass', '?')}: {getattr(answer, 'errorCode', '?')}"
            )
        if isinstance(answer, RejectPDU):
            raise _Refused(f"reject {answer.apduAbortRejectReason}")
        if isinstance(answer, AbortPDU):
            raise _Refused(f"abort {answer.apduAbortRejectReason}")
        return answer

    async def _receive(self, link: _Link, ours: Callable[[APDU], bool], what: str) -> Any:
        """The first datagram that `ours` accepts within the timeout; COV notifications are
        taken on the way, anything else is dropped and counted."""
        loop = asyncio.get_running_loop()
        timeout = self._device.timeout_s
        deadline = loop.time() + timeout
        flooded = link.flooded
        while True:
            while link.inbox:
                if loop.time() > deadline:  # a flood must not hold us past the timeout
                    break
                datagram = link.inbox.popleft()
                try:
                    apdu = frames.parse(datagram)
                except FrameError as e:
                    self.malformed += 1
                    self._last_drop = str(e)
                    continue
                if ours(apdu):
                    return apdu
                if not self._notified(apdu):
                    self.stray += 1
                    self._last_drop = f"{type(apdu).__name__} that answers no outstanding request"
            if link.error is not None:
                raise DeviceError(f"{self._device.address}: {link.error}")
            left = deadline - loop.time()
            if left <= 0:
                dropped = link.flooded - flooded
                detail = f"; dropped: the last {self._last_drop}" if self._last_drop else ""
                if dropped:
                    detail += f"; {dropped} datagrams over the inbox limit"
                raise DeviceError(
                    f"{self._device.address}: no answer to {what} within {timeout:g} s{detail}"
                )
            link.arrived.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(link.arrived.wait(), left)
            raise_if_cancelled()

    def _notified(self, apdu: APDU) -> bool:
        """Take a COV notification of one of our subscriptions; False for anything else."""
        if not isinstance(apdu, UnconfirmedCOVNotificationRequest):
            return False
        obj = apdu.monitoredObjectIdentifier
        if apdu.subscriberProcessIdentifier != self._process_id or obj not in self._subscribed:
            return False
        for item in apdu.listOfValues or ():
            if str(item.propertyIdentifier) != _PRESENT_VALUE:
                continue
            try:
                value = frames.value_of(str(obj[0]), _PRESENT_VALUE, item.value)
            except FrameError as e:
                self._last_drop = str(e)
                return False
            self._cov_values[obj] = (value, datetime.now(UTC))
        return True

    # ---- events

    def _refused_once(self, key: str, reason: str, signals: list[str]) -> None:
        self.errors += 1
        if key in self._refused:
            return
        self._refused.add(key)
        self._log.warning("device_read_refused", request=key, reason=reason, signals=signals)

    def _recovered(self, key: str) -> None:
        if key in self._refused:
            self._refused.discard(key)
            self._log.info("device_read_recovered", request=key)

    def _all_bad(self) -> list[RawSample]:
        now = datetime.now(UTC)
        return [RawSample(r.signal, None, now, "bad") for r in self._reads]


def _read(signal: Signal) -> _Read:
    source = signal.source
    if not isinstance(source, BacnetSource):
        raise TypeError(f"{signal.path}: not a BACnet source")
    obj = ObjectIdentifier((source.object_type, source.instance))
    return _Read(signal.path, obj, source.object_type, source.property, signal.unit)


def _raw(object_type: str, prop: str, value: Any) -> RawValue:  # noqa: PLR0911 - one per type
    """A property value as the pipeline takes it: a binary present-value as bool, a REAL at
    its float32 precision, an enumeration by its BACnet name, a number as it came."""
    if prop == _PRESENT_VALUE and object_type.startswith("binary"):
        return int(value) == 1  # active
    if isinstance(value, Enumerated):
        return str(value)
    if isinstance(value, Boolean):
        return bool(value)
    if isinstance(value, Double):
        return float(value)
    if isinstance(value, float):
        return float(float32_text(value)) if math.isfinite(value) else float(value)
    if isinstance(value, int):
        return int(value)
    return str(value)


def _quality(flags: Any, reliability: Any) -> tuple[Quality, str | None]:
    """Status-flags and reliability (clause 12) → quality: a fault or an unreliable value is
    `bad`, out of service or overridden `uncertain`, in alarm alone stays `good`."""
    reliable = reliability is None or str(reliability) == "no-fault-detected"
    if not reliable:
        return "bad", f"BACnet reliability: {reliability}"
    bits = list(flags) if flags is not None else [0, 0, 0, 0]
    bits += [0] * (4 - len(bits))
    if bits[1]:
        return "bad", "BACnet status-flags: fault"
    if bits[3]:
        return "uncertain", "BACnet: out of service, the value is not from the sensor"
    if bits[2]:
        return "uncertain", "BACnet: overridden, the value is not from the sensor"
    return "good", None
