"""BACnet/IP connector: present values, status flags and reliability of a device's objects,
read-only.

Read-only by construction: the only services this code base sends are in `SERVICES_USED`
(`bacnet_frames.py` builds no other request). The connector sends ReadProperty,
ReadPropertyMultiple, and SubscribeCOV (and its cancellation, the same service) only where
the policy says `read: cov` (a subscription changes the device's state). It never sends
WriteProperty or any device-management service, and reads only the objects the policy names.

It serves nothing and listens on nothing (docs/bacnet.md): `bacnet_link.py` owns its one
connected UDP socket and takes only the answer that matches the outstanding request.

A session starts by confirming the device's identity (ReadProperty of the object-identifier
of the policy's device instance) and reading its max-apdu-length-accepted and the units of
the analog objects; each scan then reads, per object, the signals' properties, status-flags
and reliability with ReadPropertyMultiple batches sized to the device's APDU (halved when
the device says an answer would not fit), one request at a time, spaced to
`max_requests_per_s`. With `read: cov`, present values are still read every scan; a
notification only brings a change sooner, with its time. A timeout or a socket error ends
the session like a Modbus one: every signal `bad` in one batch, our subscriptions cancelled
when the device can still be reached, a backoff with jitter, a new session.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

import structlog
from bacpypes3.apdu import (
    ReadPropertyACK,
    ReadPropertyMultipleACK,
    UnconfirmedCOVNotificationRequest,
)
from bacpypes3.primitivedata import ObjectIdentifier

from broker.backoff import Backoff
from broker.errors import DeviceError
from broker.plant.connectors import bacnet_frames as frames
from broker.plant.connectors import bacnet_values as values_
from broker.plant.connectors.bacnet_frames import SERVICES_USED, FrameError
from broker.plant.connectors.bacnet_link import INBOX, BacnetLink, Refused
from broker.plant.connectors.bacnet_units import our_unit, same_unit
from broker.plant.connectors.bacnet_values import PRESENT_VALUE, Read
from broker.plant.connectors.base import (
    Emit,
    Hysteresis,
    RawSample,
    ScanGrid,
    SessionBreaker,
)
from broker.plant.connectors.supervision import FIRST_RETRY_S, MAX_RETRY_S, STABLE_S
from broker.policy import BacnetDevice, Signal

__all__ = ["INBOX", "SERVICES_USED", "BacnetConnector"]

COV_LIFETIME_S: Final = 300  # a subscription lapses on its own if we vanish; renewed at 2/3
MIN_APDU: Final = 50  # the smallest max-apdu-length-accepted BACnet allows (clause 20.1.2.5)
_UNITS_OF = ("analog-input", "analog-output", "analog-value", "accumulator")

Values = dict[frames.Property, Any]
Errors = dict[frames.Property, str]


class BacnetConnector:
    def __init__(self, device: BacnetDevice, signals: Sequence[Signal]) -> None:
        self._device = device
        self._reads = [values_.read_of(signal) for signal in signals]
        self._objects = values_.scan_objects(self._reads)
        self.scans = 0
        self.overruns = 0  # scan slots skipped because the previous scan ran late
        self.errors = 0  # failed sessions and refused reads
        self.last_scan_s = 0.0
        self.cov_lifetime_s = COV_LIFETIME_S
        # Whether the device refuses a request, by request. A refused scan read is told when
        # it starts, its end once answered `Hysteresis.HOLD` times in a row (a read refused
        # every other poll is told once); a subscription, tried only at a session's start
        # or renewal, at each change.
        self._refused: Hysteresis[str, bool] = Hysteresis(False, start_at_once=True)
        self._unsubscribable: Hysteresis[str, bool] = Hysteresis(False, start_at_once=True, hold=1)
        self._log = structlog.get_logger("bacnet").bind(device=device.name)
        self._breaker = SessionBreaker(self._log, [r.signal for r in self._reads])
        self._grid = ScanGrid(device.poll_interval_s, self._log)
        self.link = BacnetLink(device, self._log, self._notified)
        # names our COV subscriptions: one per connector, so a new session renews them
        self._process_id = 1 + secrets.randbelow((1 << 22) - 1)
        # per session
        self._max_apdu = frames.MAX_APDU
        self._max_objects = len(self._objects)  # per batch: halved when the device refuses
        self._units: dict[str, str] = {}  # signal → why its unit differs
        self._subscribed: dict[ObjectIdentifier, float] = {}  # object → renewal due (monotonic)
        self._notes: dict[ObjectIdentifier, tuple[Any, datetime]] = {}  # latest notification
        self._fresh: set[ObjectIdentifier] = set()  # notified since the last batch
        self._status: dict[ObjectIdentifier, tuple[Any, Any, str | None]] = {}

    # counters of the link, for /metrics, the tests and the bench
    stray = property(lambda self: self.link.stray)
    malformed = property(lambda self: self.link.malformed)
    requests = property(lambda self: self.link.requests)
    local_address = property(lambda self: self.link.local_address)

    async def run(self, emit: Emit) -> None:
        backoff = Backoff(FIRST_RETRY_S, MAX_RETRY_S, fresh_after_s=STABLE_S)
        while True:
            self._breaker.opening()
            try:
                async with self.link.session():
                    try:
                        await self._start_session()
                        await self._scan_forever(emit)
                    except DeviceError:
                        # Its values go bad now, not after timeout_s of cancelling: the next
                        # session's subscriptions (same port and process id) replace these,
                        # and their lifetime bounds them meanwhile.
                        self._subscribed = {}
                        raise
                    finally:
                        await self._unsubscribe()
            except DeviceError as e:
                self.errors += 1
                await self._breaker.failed(e, backoff, emit)

    # ---- session start and end

    async def _start_session(self) -> None:
        self._units, self._notes, self._status, self._fresh = {}, {}, {}, set()
        self._max_objects = len(self._objects)
        await self._identity()
        me = ObjectIdentifier(("device", self._device.device_instance))
        try:
            answer = await self._read_property(me, "max-apdu-length-accepted")
            apdu = int(frames.value_of("device", "max-apdu-length-accepted", answer.propertyValue))
        except (Refused, FrameError, TypeError, ValueError):
            apdu = 480  # required of every device; a refusal is odd, so stay modest
        self._max_apdu = max(MIN_APDU, min(apdu, frames.MAX_APDU))
        await self._read_units()
        if self._device.read == "cov":
            await self._subscribe(time.monotonic(), renew=False)

    async def _identity(self) -> None:
        """The device at the address must be the policy's device instance: it answers a
        ReadProperty of its own object-identifier. One that does not is named, when it
        answers the wildcard instance (devices since 135-2004 do), and never read."""
        device = self._device
        me = ObjectIdentifier(("device", device.device_instance))
        try:
            answer = await self._read_property(me, "object-identifier")
            found = frames.value_of("device", "object-identifier", answer.propertyValue)
            if found == me:
                return
            why = f"it answered as {found[0]} {found[1]}"
        except (Refused, FrameError) as e:
            why = f"{e}"
        wildcard = ObjectIdentifier(("device", frames.WILDCARD_INSTANCE))
        try:
            answer = await self._read_property(wildcard, "object-identifier")
            found = frames.value_of("device", "object-identifier", answer.propertyValue)
            why = f"it is BACnet device {found[1]}"
        except (Refused, FrameError, TypeError, IndexError):
            pass  # nothing more to say about it
        raise DeviceError(
            f"{device.address} is not BACnet device {device.device_instance} as the policy "
            f"says ({why}): not read"
        )

    async def _read_property(self, obj: ObjectIdentifier, prop: str) -> Any:
        def matches(apdu: Any) -> bool:
            return (
                isinstance(apdu, ReadPropertyACK)
                and str(apdu.propertyIdentifier) == prop
                and (obj[1] == frames.WILDCARD_INSTANCE or apdu.objectIdentifier == obj)
            )

        return await self.link.confirmed(
            "readProperty", lambda i: frames.read_property(i, obj, prop), matches
        )

    async def _read_units(self) -> None:
        """Compare each analog signal's units with the policy's, once per session."""
        wanted = [
            r
            for r in self._reads
            if r.object_type in _UNITS_OF and r.prop == PRESENT_VALUE and r.unit
        ]
        found, _ = await self._read_batches([[(r.obj, "units")] for r in wanted])
        for r in wanted:
            value = found.get((r.obj, "units"))
            if value is None:
                continue  # a refused or missing units property says nothing against the policy
            if same_unit(value.attr, r.unit):
                continue
            said = our_unit(value.attr, str(value))
            self._units[r.signal] = f"BACnet units: {said}, the policy says {r.unit}"
            self._log.warning(
                "device_units_differ", signal=r.signal, device_units=said, policy_unit=r.unit
            )

    async def _subscribe(self, now: float, *, renew: bool) -> None:
        """SubscribeCOV for each object read for its present-value (renewed at 2/3 of the
        lifetime); an object the device will not subscribe is only polled."""
        objects = dict.fromkeys(r.obj for r in self._reads if r.prop == PRESENT_VALUE)
        lifetime = self.cov_lifetime_s
        for obj in objects:
            due = self._subscribed.get(obj)
            if renew and (due is None or due > now):
                continue
            key = f"subscribeCOV {obj}"
            build = partial(
                frames.subscribe_cov, process_id=self._process_id, obj=obj, lifetime_s=lifetime
            )
            try:
                await self.link.confirmed("subscribeCOV", build)
            except Refused as e:
                signals = [r.signal for r in self._reads if r.obj == obj]
                self._refused_once(self._unsubscribable, key, str(e), signals)
                self._subscribed.pop(obj, None)
                continue
            self._recovered(self._unsubscribable, key)
            self._subscribed[obj] = time.monotonic() + lifetime * 2 / 3
            self.link.notifications = True

    async def _unsubscribe(self) -> None:
        """Cancel our subscriptions (session end, stop) while the device answers; within
        timeout_s in all, so a stop never waits longer."""
        if not self._subscribed:
            return
        objects, self._subscribed = list(self._subscribed), {}
        self.link.notifications, self.link.closing = False, True
        deadline = asyncio.get_running_loop().time() + self._device.timeout_s
        try:
            for obj in objects:
                build = partial(frames.cancel_cov, process_id=self._process_id, obj=obj)
                await self.link.confirmed("subscribeCOV", build, deadline=deadline)
        except (DeviceError, Refused) as e:
            self._log.info("cov_cancel_failed", error=str(e), objects=len(objects))
        finally:
            self.link.closing = False

    # ---- scans

    async def _scan_forever(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        next_scan = loop.time()
        while True:
            samples = await self._scan()
            device = self._device
            self._breaker.scanned(
                host=device.host,
                port=device.port,
                device_instance=device.device_instance,
                max_apdu=self._max_apdu,
            )
            await emit(samples)
            next_scan, missed = self._grid.next_slot(next_scan, loop.time(), self.last_scan_s)
            self.overruns += missed
            while (left := next_scan - loop.time()) > 0:
                await self.link.wait(left)  # notifications between scans
                if self._fresh:
                    await emit(self._notified_samples())

    async def _scan(self) -> list[RawSample]:
        started = time.monotonic()
        if self._subscribed:
            await self._subscribe(started, renew=True)
        found, errors = await self._read_batches(self._objects)
        self.scans += 1
        self.last_scan_s = time.monotonic() - started
        now = datetime.now(UTC)
        for props in self._objects:
            obj = props[0][0]
            flags_key, reliability_key = (obj, "status-flags"), (obj, "reliability")
            self._status[obj] = (
                found.get(flags_key),
                found.get(reliability_key),
                errors.get(flags_key, "no answer"),
            )
        samples = [self._sample(r, found, errors, now) for r in self._reads]
        self._fresh = set()
        return samples

    async def _read_batches(
        self, objects: Sequence[list[frames.Property]]
    ) -> tuple[Values, Errors]:
        """Each property's value, or why there is none: ReadPropertyMultiple batches whose
        answers fit the device's APDU, one at a time; a batch the device says is too big is
        halved (down to one object), and the smaller size kept for the session."""
        found: Values = {}
        errors: Errors = {}
        todo = values_.batches(objects, self._max_apdu, self._max_objects)
        while todo:
            batch = todo.pop(0)
            count = len({obj for obj, _ in batch})
            key = "readPropertyMultiple " + ", ".join(sorted({str(o) for o, _ in batch}))
            try:
                answer = await self.link.confirmed(
                    "readPropertyMultiple",
                    partial(frames.read_property_multiple, wanted=batch),
                    lambda apdu: isinstance(apdu, ReadPropertyMultipleACK),
                )
            except Refused as e:
                if e.too_big and count > 1:
                    self._max_objects = min(self._max_objects, count // 2)
                    mine = [p for p in objects if p[0] in batch]
                    todo[:0] = values_.batches(mine, self._max_apdu, self._max_objects)
                    continue
                reads = set(batch)
                signals = [r.signal for r in self._reads if (r.obj, r.prop) in reads]
                self._refused_once(self._refused, key, str(e), signals)
                errors.update(dict.fromkeys(batch, f"BACnet: the device refused the read ({e})"))
                continue
            self._recovered(self._refused, key)
            try:
                values_.take(answer, batch, found, errors)
            except (AttributeError, TypeError, IndexError, ValueError) as e:
                # decoded, but not shaped as an ACK is: the device's bytes, never a crash
                unread = f"BACnet: an answer that could not be read ({type(e).__name__})"
                errors.update((p, unread) for p in batch if p not in found)
        return found, errors

    def _sample(self, r: Read, found: Values, errors: Errors, now: datetime) -> RawSample:
        value = found.get((r.obj, r.prop))
        if value is None:
            why = errors.get((r.obj, r.prop), "BACnet: no value")
            return RawSample(r.signal, None, now, "bad", reason=why)
        source_time = now
        note = self._notes.get(r.obj)
        if r.prop == PRESENT_VALUE and note is not None and note[0] == value:
            source_time = note[1]  # the change's time, as the notification brought it
        return self._judged(r, value, source_time, now)

    def _judged(self, r: Read, value: Any, source_time: datetime, now: datetime) -> RawSample:
        try:
            raw = values_.raw_of(r.object_type, r.prop, value)
        except (TypeError, ValueError) as e:
            return RawSample(r.signal, None, now, "bad", reason=f"BACnet: {e}")
        quality, reason = values_.quality_of(*self._status.get(r.obj, (None, None, "no scan")))
        if quality == "good" and r.signal in self._units:
            quality, reason = "uncertain", self._units[r.signal]
        read_time = now if source_time != now else None
        return RawSample(r.signal, raw, source_time, quality, read_time, reason)

    # ---- COV notifications

    def _notified(self, apdu: Any) -> bool:
        """Take a COV notification of one of our subscriptions: our process id, a subscribed
        object, from the policy's device instance; False for anything else."""
        if not isinstance(apdu, UnconfirmedCOVNotificationRequest):
            return False
        obj = apdu.monitoredObjectIdentifier
        device = ObjectIdentifier(("device", self._device.device_instance))
        if (
            apdu.subscriberProcessIdentifier != self._process_id
            or obj not in self._subscribed
            or apdu.initiatingDeviceIdentifier != device
        ):
            return False
        for item in apdu.listOfValues or ():
            if str(item.propertyIdentifier) != PRESENT_VALUE:
                continue
            try:
                value = frames.value_of(str(obj[0]), PRESENT_VALUE, item.value)
            except FrameError:
                return False
            if obj not in self._notes or self._notes[obj][0] != value:
                self._notes[obj] = (value, datetime.now(UTC))
                self._fresh.add(obj)
        return True

    def _notified_samples(self) -> list[RawSample]:
        """The notified present values (with the status of the last scan): a change
        reaches the pipeline before the next scan reads it again."""
        fresh, self._fresh = self._fresh, set()
        now = datetime.now(UTC)
        return [
            self._judged(r, self._notes[r.obj][0], self._notes[r.obj][1], now)
            for r in self._reads
            if r.prop == PRESENT_VALUE and r.obj in fresh
        ]

    # ---- events

    def _refused_once(
        self, refused: Hysteresis[str, bool], key: str, reason: str, signals: list[str]
    ) -> None:
        self.errors += 1
        if refused.seen(key, True):
            self._log.warning("device_read_refused", request=key, reason=reason, signals=signals)

    def _recovered(self, refused: Hysteresis[str, bool], key: str) -> None:
        if refused.seen(key, False):
            self._log.info("device_read_recovered", request=key)
