"""BACnet/IP in a capture: what a poller asked a device, what the device answered and said
about its objects, and what the poller wrote, from the UDP datagrams (capture.Packet).

Datagrams are decoded by bacnet_frames.parse (bacpypes3) and the requests it leaves whole
by bacpypes3's own decoder. A ReadProperty or ReadPropertyMultiple that asks for objects'
present-value (or all their properties) is one Request per object; its ComplexACK, matched
to it by invoke id and the pair of addresses, gives Values of each present-value and a
Description of the object-name, units (in the policy's spelling, bacnet_units) and
description it carries, and nothing it was not asked for. Reads of other properties give
Descriptions, and no Request: they poll no value. COV notifications are Values. I-Am, a
COV notification or an answer about a device object tells which device instance an address
is (`unit`; UNKNOWN_UNIT until then). WriteProperty(Multiple) is Request(write=True) with the
Values written; every other confirmed service that may change a device (create, delete,
reinitialize, communication control, file writes, private transfers, ...) is
Request(write=True); services that only read or subscribe give no Request.

The device is told by the service, not by the port (both ends often use 47808): a confirmed
request goes to it, an answer or a notification comes from it. Nothing here sends a
datagram. Bad input is never an exception: it is one warning.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final, NamedTuple

from bacpypes3.apdu import (
    AbortPDU,
    APCISequence,
    ConfirmedCOVNotificationRequest,
    ConfirmedRequestPDU,
    ConfirmedRequestSequence,
    ErrorPDU,
    IAmRequest,
    ReadPropertyACK,
    ReadPropertyMultipleACK,
    ReadPropertyMultipleRequest,
    ReadPropertyRequest,
    RejectPDU,
    UnconfirmedCOVNotificationRequest,
    WritePropertyMultipleRequest,
    WritePropertyRequest,
)
from bacpypes3.primitivedata import Null, ObjectIdentifier

from broker.passive.capture import Packet
from broker.passive.observations import (
    UNKNOWN_UNIT,
    Description,
    Observation,
    Peer,
    Request,
    Value,
    Values,
    Warnings,
)
from broker.plant.connectors import bacnet_frames as frames
from broker.plant.connectors.bacnet_frames import FrameError
from broker.plant.connectors.bacnet_units import our_unit
from broker.plant.connectors.bacnet_values import PRESENT_VALUE, raw_of

MAX_PENDING: Final = 4_096  # confirmed requests awaiting their answer; the oldest go first
MAX_DEVICES: Final = 65_536  # addresses whose device instance is remembered

# Confirmed services that only read, subscribe or notify: they change no device.
READ_ONLY: Final = frozenset({
    "ReadProperty", "ReadPropertyMultiple", "ReadRange", "AtomicReadFile", "GetAlarmSummary",
    "GetEnrollmentSummary", "GetEventInformation", "SubscribeCOV", "SubscribeCOVProperty",
    "ConfirmedCOVNotification", "ConfirmedEventNotification",
})  # fmt: skip
_ANY_PROPERTY = frozenset({"all", "required", "optional"})  # the special property ids
_DESCRIBING = ("object-name", "units", "description")
_BVLL_FORWARDED = 0x04  # Forwarded-NPDU: a BBMD relays a broadcast with its sender's address
_BVLL_DISTRIBUTE = 0x09  # Distribute-Broadcast-To-Network: a foreign device's broadcast
_MESSAGES = (0x0A, 0x0B)  # original unicast and broadcast (what the two above become)

Object = tuple[str, int]  # object type as the policy writes it, instance
Wanted = dict[Object, frozenset[str] | None]  # the properties asked of each object (None: any)


class _Asked(NamedTuple):
    service: str
    wanted: Wanted


class BacnetReader:
    """Requests, Values and Descriptions from the BACnet/IP datagrams of a capture."""

    def __init__(self, warnings: Warnings) -> None:
        self._warnings = warnings
        self._pending: OrderedDict[tuple[Peer, Peer, int], _Asked] = OrderedDict()
        self._instances: dict[Peer, int] = {}

    def instance_of(self, device: Peer) -> int:
        """The device instance the capture showed at this address, else UNKNOWN_UNIT: what
        was observed before the instance was learned carries UNKNOWN_UNIT."""
        return self._instances.get(device, UNKNOWN_UNIT)

    def feed(self, packet: Packet, to_server: bool) -> list[Observation]:
        """What one datagram says. `to_server` is not needed: the service says who the
        device is (both ends of BACnet/IP often use the same port)."""
        decoded = self._decode(packet)
        if decoded is None:
            return []
        apdu, src = decoded
        if isinstance(apdu, IAmRequest):
            self._learn(packet, src, apdu.iAmDeviceIdentifier)
            return []
        if isinstance(apdu, UnconfirmedCOVNotificationRequest | ConfirmedCOVNotificationRequest):
            self._learn(packet, src, apdu.initiatingDeviceIdentifier)
            return self._notified(packet, src, apdu)
        if isinstance(apdu, ConfirmedRequestSequence):
            return self._request(packet, src, apdu)
        return self._answer(packet, src, apdu)

    def _answer(self, packet: Packet, device: Peer, apdu: Any) -> list[Observation]:
        """An answer from the device to the request it matches (by invoke id and addresses)."""
        invoke_id: int | None = getattr(apdu, "apduInvokeID", None)
        asked = None
        if invoke_id is not None:  # 0 is an invoke id too
            asked = self._pending.pop((packet.dst, device, invoke_id), None)
        if isinstance(apdu, ReadPropertyACK | ReadPropertyMultipleACK):
            if asked is None:  # capture started after the request, or not an answer to one
                self._warnings.add("BACnet answer to no request seen", f"packet {packet.number}")
                return []
            return self._answered(packet, device, apdu, asked)
        if isinstance(apdu, ErrorPDU | RejectPDU | AbortPDU):
            refusal = {ErrorPDU: "error", RejectPDU: "reject", AbortPDU: "abort"}
            said = next(v for k, v in refusal.items() if isinstance(apdu, k))
            to = asked.service if asked else "a request not seen"
            self._warnings.add(f"BACnet {said} answering {to}", f"packet {packet.number}")
        return []  # a simple ACK, a segment ACK, other services: nothing to observe

    def _decode(self, packet: Packet) -> tuple[Any, Peer] | None:
        """The decoded APDU and its BACnet/IP sender; None (warned if it is wrong) for what
        carries no application message."""
        found = self._message(packet)
        if found is None:
            return None
        data, src = found
        where = f"packet {packet.number}"
        try:
            apdu = frames.parse(data)
            if isinstance(apdu, ConfirmedRequestPDU):  # parse leaves a request undecoded
                if apdu.apduSeg:
                    raise FrameError("a segmented request (not reassembled)")
                apdu = APCISequence.decode(apdu)
        except FrameError as e:
            self._warnings.add("BACnet datagram malformed", f"{where}: {e}")
            return None
        except Exception as e:  # bacpypes3 raises assorted errors on odd input
            said = f"{type(e).__name__}: {e}"[:200]
            self._warnings.add("BACnet request malformed", f"{where}: {said}")
            return None
        return apdu, src

    def _message(self, packet: Packet) -> tuple[bytes, Peer] | None:
        """The datagram as an original unicast or broadcast, and its sender (for a BBMD's
        Forwarded-NPDU, the original one); None for BVLL management, network-layer and
        routed messages, and what is not BACnet/IP."""
        data, src = packet.payload, packet.src
        where = f"packet {packet.number}"
        if len(data) < 4 or data[0] != 0x81:
            self._warnings.add("BACnet datagram that is not BACnet/IP", where)
            return None
        if data[1] == _BVLL_FORWARDED and len(data) >= 12:
            src = Peer(".".join(map(str, data[4:8])), int.from_bytes(data[8:10], "big"))
            data = b"\x81\x0b" + (len(data) - 6).to_bytes(2, "big") + data[10:]
        elif data[1] == _BVLL_DISTRIBUTE:
            data = b"\x81\x0b" + data[2:]
        problem = None
        control = data[5] if len(data) > 5 else 0  # the NPDU's (a short one: parse says)
        if data[1] not in _MESSAGES or control & 0x80:
            pass  # BVLL management (results, tables, registration), network-layer messages
        elif len(data) > frames.MAX_DATAGRAM:
            problem = "BACnet datagram over BACnet/IP's size"
        elif control & 0x28:
            problem = "BACnet routed message (not followed)"
        else:
            return data, src
        if problem:
            self._warnings.add(problem, where)
        return None

    def _learn(self, packet: Packet, device: Peer, identifier: Any) -> None:
        try:
            object_type, instance = str(identifier[0]), int(identifier[1])
        except (TypeError, IndexError, ValueError):
            return  # names no device
        if object_type != "device" or instance == frames.WILDCARD_INSTANCE:
            return
        if device not in self._instances and len(self._instances) >= MAX_DEVICES:
            self._warnings.add(
                "BACnet devices beyond the reader's bound", f"packet {packet.number}"
            )
            return
        self._instances[device] = instance

    def _request(self, packet: Packet, client: Peer, apdu: Any) -> list[Observation]:
        """A confirmed request from `client` to the device at the datagram's destination."""
        device = packet.dst
        service = type(apdu).__name__.removesuffix("Request")

        def request(obj: Object | None, write: bool) -> Request:
            table, start = obj if obj else ("", 0)
            return Request(
                protocol="bacnet",
                time=packet.time,
                client=client.host,
                server=device,
                unit=self.instance_of(device),
                table=table,
                start=start,
                count=1 if obj else 0,
                function=service,
                write=write,
            )

        if isinstance(apdu, ReadPropertyRequest | ReadPropertyMultipleRequest):
            wanted = _wanted(apdu)
            self._pending[client, device, apdu.apduInvokeID] = _Asked(service, wanted)
            if len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
                self._warnings.add("BACnet requests never answered", f"packet {packet.number}")
            return [request(o, False) for o, props in wanted.items() if _polls_value(o, props)]
        if isinstance(apdu, WritePropertyRequest):
            writes = [
                (_object(apdu.objectIdentifier), [(apdu.propertyIdentifier, apdu.propertyValue)])
            ]
        elif isinstance(apdu, WritePropertyMultipleRequest):
            writes = [
                (
                    _object(spec.objectIdentifier),
                    [(p.propertyIdentifier, p.value) for p in spec.listOfProperties or ()],
                )
                for spec in apdu.listOfWriteAccessSpecs or ()
            ]
        else:
            named = getattr(apdu, "objectIdentifier", None)
            obj = _object(named) if isinstance(named, ObjectIdentifier) else None
            return [] if service in READ_ONLY else [request(obj, True)]
        observations: list[Observation] = []
        for obj, properties in writes:
            observations.append(request(obj, True))
            for prop, value in properties:
                if str(prop) != PRESENT_VALUE:
                    continue
                written = self._value(packet, obj[0], PRESENT_VALUE, value, relinquish=True)
                if written is not None:
                    observations.append(self._values(packet, device, obj, written, written=True))
        return observations

    def _answered(
        self, packet: Packet, device: Peer, apdu: Any, asked: _Asked
    ) -> list[Observation]:
        """The present-values and descriptions in an ACK, of what was asked only."""
        if isinstance(apdu, ReadPropertyACK):
            results = [(apdu.objectIdentifier, [(apdu.propertyIdentifier, apdu.propertyValue)])]
        else:
            results = [
                (
                    result.objectIdentifier,
                    [
                        (element.propertyIdentifier, element.readResult.propertyValue)
                        for element in result.listOfResults or ()
                        if element.readResult.propertyValue is not None  # not an access error
                    ],
                )
                for result in apdu.listOfReadAccessResults or ()
            ]
        observations: list[Observation] = []
        for identifier, properties in results:
            obj = _object(identifier)
            if obj not in asked.wanted:
                continue  # not asked for: never data
            self._learn(packet, device, identifier)
            allowed = asked.wanted[obj]
            said: dict[str, str] = {}
            for prop_id, any_value in properties:
                prop = str(prop_id)
                if allowed is not None and prop not in allowed:
                    continue
                if prop == PRESENT_VALUE:
                    value = self._value(packet, obj[0], prop, any_value)
                    if value is not None:
                        observations.append(self._values(packet, device, obj, value))
                elif prop in _DESCRIBING and (text := _text(obj[0], prop, any_value)) is not None:
                    said[prop] = text
            if said:
                observations.append(
                    Description(
                        "bacnet", device, self.instance_of(device), obj[0], obj[1],
                        name=said.get("object-name"), units=said.get("units"),
                        description=said.get("description"),
                    )
                )  # fmt: skip
        return observations

    def _notified(self, packet: Packet, device: Peer, apdu: Any) -> list[Observation]:
        obj = _object(apdu.monitoredObjectIdentifier)
        observations: list[Observation] = []
        for prop in apdu.listOfValues or ():
            if str(prop.propertyIdentifier) == PRESENT_VALUE:
                value = self._value(packet, obj[0], PRESENT_VALUE, prop.value)
                if value is not None:
                    observations.append(self._values(packet, device, obj, value))
        return observations

    def _values(
        self, packet: Packet, device: Peer, obj: Object, value: Value, *, written: bool = False
    ) -> Values:
        unit = self.instance_of(device)
        return Values("bacnet", packet.time, device, unit, obj[0], obj[1], (value,), written)

    def _value(
        self, packet: Packet, object_type: str, prop: str, value: Any, *, relinquish: bool = False
    ) -> Any:
        """A property value as the connector would take it; None, warned, when it is not
        the property's standard type (a written Null relinquishes a priority: no value)."""
        try:
            raw = raw_of(object_type, prop, frames.value_of(object_type, prop, value))
        except FrameError as e:
            if relinquish and _is_null(value):
                return None
            self._warnings.add("BACnet value not decoded", f"packet {packet.number}: {e}")
            return None
        return None if isinstance(raw, tuple) else raw


def _object(identifier: Any) -> Object:
    return str(identifier[0]), int(identifier[1])


def _wanted(apdu: Any) -> Wanted:
    if isinstance(apdu, ReadPropertyRequest):
        prop = str(apdu.propertyIdentifier)
        return {
            _object(apdu.objectIdentifier): None if prop in _ANY_PROPERTY else frozenset({prop})
        }
    wanted: Wanted = {}
    for spec in apdu.listOfReadAccessSpecs or ():
        props = {str(ref.propertyIdentifier) for ref in spec.listOfPropertyReferences or ()}
        obj = _object(spec.objectIdentifier)
        known = wanted.get(obj, frozenset())
        everything = props & _ANY_PROPERTY or known is None
        wanted[obj] = None if everything else frozenset(props) | (known or frozenset())
    return wanted


def _polls_value(obj: Object, props: frozenset[str] | None) -> bool:
    """Whether a read asks for a point's value (a device object has none)."""
    return obj[0] != "device" and (props is None or PRESENT_VALUE in props)


def _text(object_type: str, prop: str, value: Any) -> str | None:
    """A name, description or units as text; units in the policy's spelling where known."""
    try:
        decoded = frames.value_of(object_type, prop, value)
    except FrameError:
        return None  # says nothing
    return our_unit(decoded.attr, str(decoded)) if prop == "units" else str(decoded)


def _is_null(value: Any) -> bool:
    try:
        value.cast_out(Null)
    except Exception:  # bacpypes3 says "not a Null" in assorted ways
        return False
    return True
