"""A simulated BACnet/IP device (bacpypes3) that counts every service request it receives.

For the tests, the demo's room controller, `discover bacnet` and the bench: a device object
and the analog, binary and multi-state objects it is given, each with present-value,
status-flags, reliability, out-of-service, object-name, description and (analog) units,
served on one UDP port. Every request is counted by service name (`readProperty`,
`writeProperty`, `whoIs`, …) as it arrives, before bacpypes3 decides to answer or refuse
it, so a test can assert that a client sent no write and no device-management service.
Datagrams that are not a request (answers, malformed packets) are counted under
`"not-a-request"`. BVLL messages other than the two that carry an NPDU (Write-BDT,
Register-Foreign-Device, …) are counted as `"bvll:write-bdt"` and the like, and
network-layer messages as `"network:initialize-routing-table"` and the like, as they reach
the socket: a test that asserts the counts names every message a client sent.

Like a real device (and unlike bacpypes3's own server), it answers a ReadProperty of the
wildcard device instance 4194303 as itself, and aborts with segmentation-not-supported an
answer longer than its `max_apdu` (it never segments).

It is a test and demo device: it must never be imported by the broker's halves (the import
contracts forbid it), and it is not hardened against hostile clients.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bacpypes3.apdu import (
    AbortPDU,
    ComplexAckPDU,
    ConfirmedServiceChoice,
    UnconfirmedServiceChoice,
)
from bacpypes3.app import Application
from bacpypes3.local.analog import AnalogInputObject, AnalogOutputObject, AnalogValueObject
from bacpypes3.local.binary import BinaryInputObject, BinaryOutputObject, BinaryValueObject
from bacpypes3.local.device import DeviceObject
from bacpypes3.local.multistate import (
    MultiStateInputObject,
    MultiStateOutputObject,
    MultiStateValueObject,
)
from bacpypes3.local.networkport import NetworkPortObject
from bacpypes3.primitivedata import ObjectIdentifier


@dataclass(frozen=True)
class SimObject:
    object_type: str  # as in BacnetSource: "analog-input", "binary-input", ...
    instance: int
    name: str
    value: float | bool | int
    units: str | None = None  # bacpypes3 EngineeringUnits name, e.g. "degreesCelsius"
    description: str = ""


class _Overridable:
    """bacpypes3 derives status-flags from event state, reliability and out-of-service, and
    always reports `overridden` clear: this lets a test set it."""

    _overridden = False

    @property
    def statusFlags(self) -> Any:
        flags = super().statusFlags  # type: ignore[misc]
        if self._overridden:
            flags[2] = 1
        return flags

    @statusFlags.setter
    def statusFlags(self, value: Any) -> None:  # derived, as in bacpypes3
        pass


def _kind(base: type) -> type:
    return type(f"Sim{base.__name__}", (_Overridable, base), {})


_CLASSES: dict[str, type] = {
    "analog-input": _kind(AnalogInputObject),
    "analog-output": _kind(AnalogOutputObject),
    "analog-value": _kind(AnalogValueObject),
    "binary-input": _kind(BinaryInputObject),
    "binary-output": _kind(BinaryOutputObject),
    "binary-value": _kind(BinaryValueObject),
    "multi-state-input": _kind(MultiStateInputObject),
    "multi-state-output": _kind(MultiStateOutputObject),
    "multi-state-value": _kind(MultiStateValueObject),
}
_CONFIRMED: dict[int, str] = ConfirmedServiceChoice._attr_map  # number → "readProperty", …
_UNCONFIRMED: dict[int, str] = UnconfirmedServiceChoice._attr_map
_WILDCARD = ObjectIdentifier(("device", 4194303))
# Annex J.2: the BVLL functions; 0x0a and 0x0b carry an NPDU to the application
_BVLL = {
    0x00: "result", 0x01: "write-bdt", 0x02: "read-bdt", 0x03: "read-bdt-ack",
    0x04: "forwarded-npdu", 0x05: "register-foreign-device", 0x06: "read-fdt",
    0x07: "read-fdt-ack", 0x08: "delete-fdt-entry", 0x09: "distribute-broadcast-to-network",
    0x0C: "secure-bvll",
}  # fmt: skip
# clause 6.2.4: network-layer message types
_NETWORK = {
    0x00: "who-is-router-to-network", 0x01: "i-am-router-to-network",
    0x02: "i-could-be-router-to-network", 0x03: "reject-message-to-network",
    0x04: "router-busy-to-network", 0x05: "router-available-to-network",
    0x06: "initialize-routing-table", 0x07: "initialize-routing-table-ack",
    0x08: "establish-connection-to-network", 0x09: "disconnect-connection-to-network",
    0x12: "what-is-network-number", 0x13: "network-number-is",
}  # fmt: skip


def link_message(data: bytes) -> str | None:
    """A BVLL or network-layer message's name (`"bvll:write-bdt"`,
    `"network:initialize-routing-table"`); None for a datagram that carries an APDU (or that
    is not BACnet/IP: the application layer counts it)."""
    if len(data) < 4 or data[0] != 0x81:
        return None
    if data[1] not in (0x0A, 0x0B):
        return "bvll:" + _BVLL.get(data[1], f"0x{data[1]:02x}")
    npdu = data[4:]
    if len(npdu) < 2 or not npdu[1] & 0x80:
        return None
    at = 2
    if npdu[1] & 0x20:  # DNET, DLEN, DADR
        at += 3 + (npdu[at + 2] if len(npdu) > at + 2 else 0)
    if npdu[1] & 0x08:  # SNET, SLEN, SADR
        at += 3 + (npdu[at + 2] if len(npdu) > at + 2 else 0)
    if npdu[1] & 0x20:
        at += 1  # hop count
    kind = npdu[at] if len(npdu) > at else None
    return "network:" + (_NETWORK.get(kind, f"0x{kind:02x}") if kind is not None else "cut")


def service_name(data: bytes) -> str:
    """The service of a request APDU from its first octets (clause 20.1), as the BACnet
    enumerations name it; `"not-a-request"` for anything else."""
    if not data:
        return "not-a-request"
    kind = data[0] >> 4
    if kind == 0:  # confirmed: type/flags, max segs/apdu, invoke id, [seq, window,] service
        at = 5 if data[0] & 0x08 else 3
        if len(data) > at:
            return _CONFIRMED.get(data[at], f"confirmed-{data[at]}")
    elif kind == 1 and len(data) > 1:
        return _UNCONFIRMED.get(data[1], f"unconfirmed-{data[1]}")
    return "not-a-request"


def _value(object_type: str, value: float | bool | int) -> Any:
    if object_type.startswith("binary"):
        return "active" if value else "inactive"
    if object_type.startswith("multi-state"):
        return int(value)
    return float(value)


class SimulatedBacnetDevice:
    """One BACnet/IP device on (host, port); `start` serves it, `stop` closes its socket."""

    def __init__(
        self,
        host: str,
        port: int,
        device_instance: int,
        objects: Sequence[SimObject],
        name: str = "simulated-device",
        *,
        max_apdu: int = 1476,
        prefix: int = 32,
        abort_over: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.device_instance = device_instance
        self.name = name
        self.requests: collections.Counter[str] = collections.Counter()
        self._max_apdu = max_apdu
        # answers longer than this are aborted; a device that claims more than it can send
        # (some gateways) has it below max_apdu
        self._abort_over = max_apdu if abort_over is None else abort_over
        self._prefix = prefix  # of its network: below 32, it also hears that subnet's broadcasts
        self._specs = list(objects)
        self._objects: dict[tuple[str, int], Any] = {}
        self._app: Application | None = None

    async def start(self) -> None:
        """Serve the device; its objects keep the values and status set so far."""
        if self._app is not None:
            return
        # bacpypes3 retries a port in use for ever, in a task: say so now instead
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((self.host, self.port))
        device = DeviceObject(
            objectIdentifier=("device", self.device_instance),
            objectName=self.name,
            vendorIdentifier=999,
            vendorName="dmzbroker simulator",
            modelName="simulated BACnet device",
            maxApduLengthAccepted=self._max_apdu,
            segmentationSupported="noSegmentation",
        )
        port = NetworkPortObject(
            f"{self.host}/{self._prefix}:{self.port}",
            objectIdentifier=("network-port", 1),
            objectName="NetworkPort-1",
        )
        if not self._objects:
            for spec in self._specs:
                self._objects[(spec.object_type, spec.instance)] = self._build(spec)
        app = Application.from_object_list([device, port, *self._objects.values()])
        asap = app.asap
        counted = asap.confirmation

        async def confirmation(pdu: Any) -> None:
            self.requests[service_name(bytes(pdu.pduData))] += 1  # before any dispatch
            await counted(pdu)

        asap.confirmation = confirmation
        read_property = app.do_ReadPropertyRequest
        me = ObjectIdentifier(("device", self.device_instance))

        async def do_read_property(apdu: Any) -> None:
            if apdu.objectIdentifier == _WILDCARD:  # "whoever receives this" (clause 15.5.2)
                apdu.objectIdentifier = me
            await read_property(apdu)

        app.do_ReadPropertyRequest = do_read_property
        respond = app.response

        async def response(apdu: Any) -> None:
            if (
                isinstance(apdu, ComplexAckPDU)
                and 3 + len(apdu.encode().pduData) > self._abort_over
            ):
                abort = AbortPDU(
                    srv=True, invoke_id=apdu.apduInvokeID, reason="segmentationNotSupported"
                )
                abort.pduSource, abort.pduDestination = apdu.pduSource, apdu.pduDestination
                apdu = abort
            await respond(apdu)

        app.response = response
        self._app = app
        try:
            await self._bound()
        except BaseException:
            await self.stop()
            raise

    async def _bound(self) -> None:
        """Wait (bounded) until the UDP endpoint is open: bacpypes3 opens it in a task."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while loop.time() < deadline:
            if self._transport() is not None:
                return
            await asyncio.sleep(0.01)
        raise OSError(f"simulated BACnet device: {self.host}:{self.port} did not open")

    def _transport(self) -> Any:
        app = self._app
        for layer in app.link_layers.values() if app is not None else ():
            transport = getattr(getattr(layer, "server", None), "local_transport", None)
            if transport is not None:
                self._count_link_messages(layer.server)
                return transport
        return None

    def _count_link_messages(self, server: Any) -> None:
        """Count BVLL and network-layer messages where datagrams arrive (bacpypes3 handles
        them below the application, where `requests` counts)."""
        if getattr(server, "_counted", False):
            return
        arrived = server.confirmation

        async def confirmation(pdu: Any) -> None:
            message = link_message(bytes(pdu.pduData))
            if message is not None:
                self.requests[message] += 1
            await arrived(pdu)

        server.confirmation = confirmation
        server._counted = True

    async def stop(self) -> None:
        """Close the device's socket; nothing answers on the port until `start` again."""
        app, self._app = self._app, None
        if app is not None:
            app.close()
            await asyncio.sleep(0)  # let the endpoint's close run

    def subscriptions(self) -> list[tuple[str, int, str]]:
        """The live COV subscriptions: (subscriber address, process id, object)."""
        app = self._app
        detections = getattr(app, "_cov_detections", {}) if app is not None else {}
        return [
            (str(c.client_addr), int(c.proc_id), str(getattr(c.obj_ref, "objectIdentifier", "?")))
            for d in detections.values()
            for c in d.cov_subscriptions
        ]

    @staticmethod
    def _build(spec: SimObject) -> Any:
        try:
            kind = _CLASSES[spec.object_type]
        except KeyError:
            raise ValueError(
                f"simulated BACnet device: object type {spec.object_type!r} is not one of "
                f"{', '.join(_CLASSES)}"
            ) from None
        properties: dict[str, Any] = {
            "objectIdentifier": ObjectIdentifier((spec.object_type, spec.instance)),
            "objectName": spec.name,
            "description": spec.description,
            "presentValue": _value(spec.object_type, spec.value),
            "outOfService": False,
            "reliability": "noFaultDetected",
            "eventState": "normal",
        }
        if spec.object_type.startswith("analog"):
            properties["units"] = spec.units or "noUnits"
            properties["covIncrement"] = 0.0
        if spec.object_type.startswith("multi-state"):
            properties["numberOfStates"] = max(int(spec.value), 4)
        if spec.object_type.endswith("-output"):
            properties["relinquishDefault"] = _value(spec.object_type, spec.value)
        return kind(**properties)

    def _object(self, object_type: str, instance: int) -> Any:
        try:
            return self._objects[(object_type, instance)]
        except KeyError:
            raise KeyError(f"no {object_type} {instance} in the simulated device") from None

    def set(self, object_type: str, instance: int, value: float | bool | int) -> None:
        """Change an object's present-value (a COV subscriber is notified by bacpypes3)."""
        self._object(object_type, instance).presentValue = _value(object_type, value)

    def set_status(
        self,
        object_type: str,
        instance: int,
        *,
        fault: bool = False,
        out_of_service: bool = False,
        overridden: bool = False,
        reliability: str | None = None,
    ) -> None:
        """Set what status-flags and reliability report. `fault` without a reliability
        reports `unreliableOther`; a reliability is a bacpypes3 Reliability name
        (`openLoop`, `overRange`, …)."""
        obj = self._object(object_type, instance)
        obj.outOfService = out_of_service
        obj._overridden = overridden
        obj.reliability = reliability or ("unreliableOther" if fault else "noFaultDetected")
