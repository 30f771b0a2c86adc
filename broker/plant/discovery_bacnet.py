"""List a BACnet/IP device's objects for `dmzbroker discover bacnet`: Who-Is and reads only.

Run by the CLI, never by a running half. It sends a Who-Is (to the device, or to a broadcast
address), then ReadProperty and ReadPropertyMultiple requests to the device that answered:
its object-list, and each object's object-name, description, units and present-value. It
prints a starter policy an OT owner edits before it is co-signed: discovery never decides
what crosses. It never writes, never subscribes, never sends a device-management service,
and answers nothing it receives (it runs no bacpypes3 Application, which would serve a
device object of its own). Its packets are the connector's (`bacnet_frames`), plus a Who-Is
sent as a broadcast and a read of one entry of the object-list, which the connector does
not need.

Its work is bounded: at most `--max-objects` entries of the object-list are read (a device
that holds more is named as such), each request waits `--timeout` seconds at most, and a
datagram longer than BACnet/IP allows is dropped unread.

ADDRESS is a broadcast when it is the broadcast address of one of the host's own IPv4
interfaces (the Who-Is then goes to that subnet and every answer within `--timeout` is
collected); any other address is one device's. Two I-Ams for one device instance from two
addresses are an error naming both: a duplicated instance or a spoofer, never silently
the last one.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import psutil
import yaml
from bacpypes3.apdu import (
    AbortPDU,
    ErrorPDU,
    IAmRequest,
    ReadPropertyACK,
    ReadPropertyMultipleACK,
    ReadPropertyRequest,
    RejectPDU,
)
from bacpypes3.primitivedata import ObjectIdentifier, Unsigned

from broker import logs
from broker.errors import ConfigError, DeviceError
from broker.plant.connectors import bacnet_frames
from broker.plant.connectors.bacnet_frames import FrameError, parse, value_of
from broker.plant.connectors.bacnet_units import our_unit
from broker.policy import BacnetDevice
from broker.policy.schema import BACNET_OBJECT_TYPES

SERVICES_SENT = ("whoIs", "readProperty", "readPropertyMultiple")  # and nothing else
DEFAULT_PORT = 47808
OBJECTS_PER_REQUEST = 8  # of a ReadPropertyMultiple: its answer stays well under 480 bytes
PROPERTIES = ("object-name", "description", "units", "present-value")
MAX_I_AMS = 1000  # answers kept from one broadcast Who-Is
_ORIGINAL_BROADCAST = b"\x81\x0b"  # BVLL type and function of a broadcast (Annex J.2.10)


@dataclass(frozen=True)
class IAm:
    instance: int
    address: tuple[str, int]


@dataclass(frozen=True)
class Found:
    object_type: str
    instance: int
    values: dict[str, Any]  # property → value as decoded; a property the object lacks is absent


class _Datagrams(asyncio.DatagramProtocol):
    """Received datagrams in a queue; an ICMP refusal of a connected socket as an error."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]] | OSError] = asyncio.Queue(
            maxsize=MAX_I_AMS
        )

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > bacnet_frames.MAX_DATAGRAM:
            return  # not BACnet/IP: never decoded
        if not self.queue.full():  # a flood is dropped, not buffered
            self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and not self.queue.full():
            self.queue.put_nowait(exc)


def discover_bacnet(args: argparse.Namespace) -> int:
    logs.configure("console", "cli")
    logging.getLogger().setLevel(logging.ERROR)  # stdout is the YAML; errors are one line
    host, port = args.address
    port = port or DEFAULT_PORT
    if args.max_objects < 1 or args.timeout <= 0:
        raise ConfigError("discover bacnet: --max-objects and --timeout must be above 0")
    print(asyncio.run(_discover(host, port, args)), end="")
    return 0


async def _discover(host: str, port: int, args: argparse.Namespace) -> str:
    found = await _who_is(host, port, args.device_instance, args.timeout, args.port_local)
    device = _chosen(f"{host}:{port}", found, args.device_instance, args.device_name)
    session = await _Session.open(device, args.timeout)
    try:
        identifier = ObjectIdentifier(("device", device.device_instance))
        name = await session.read(identifier, "object-name")
        objects, total = await _object_list(session, identifier, args.max_objects)
        listed = [o for o in objects if str(o[0]) in BACNET_OBJECT_TYPES]
        described = await _describe(session, listed)
    except _Refused as e:
        raise DeviceError(
            f"{device.address}: device {device.device_instance} refused to list its objects ({e})"
        ) from e
    finally:
        session.close()
    return _starter_policy(device, str(name), described, len(objects), total)


def is_broadcast(host: str) -> bool:
    """Whether `host` is the broadcast address of one of this host's IPv4 interfaces (its
    subnet's directed broadcast). 255.255.255.255 is refused: it leaves by the default
    route's interface, which need not be the OT one."""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        return False
    if address == ipaddress.IPv4Address("255.255.255.255"):
        raise ConfigError(
            "discover bacnet: 255.255.255.255 leaves by the default route, which may not be "
            f"the OT network: name the OT subnet's broadcast address ({_broadcasts()})"
        )
    return host in _interface_broadcasts()


def _interface_broadcasts() -> set[str]:
    """Each IPv4 interface address's subnet broadcast (from its netmask: `ip address add`
    without `brd +` leaves the broadcast attribute unset, though the kernel routes it)."""
    found: set[str] = set()
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family != socket.AF_INET or not a.netmask:
                continue
            network = ipaddress.IPv4Network(f"{a.address}/{a.netmask}", strict=False)
            if network.prefixlen < 31 and not network.is_loopback:
                found.add(str(network.broadcast_address))
            if a.broadcast:
                found.add(a.broadcast)
    return found


def _broadcasts() -> str:
    found = sorted(_interface_broadcasts())
    return "this host's: " + ", ".join(found) if found else "this host has none"


async def _who_is(
    host: str, port: int, instance: int | None, timeout_s: float, port_local: int
) -> list[IAm]:
    """The devices that answer a Who-Is: the first answer when directed, every answer within
    `timeout_s` when broadcast."""
    loop = asyncio.get_running_loop()
    broadcast = is_broadcast(host)
    if broadcast:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # every interface: the I-Ams of a broadcast come back from any device, to any address
        sock.bind(("0.0.0.0", port_local))  # noqa: S104
        transport, link = await loop.create_datagram_endpoint(_Datagrams, sock=sock)
    else:
        try:
            transport, link = await loop.create_datagram_endpoint(
                _Datagrams,
                remote_addr=(host, port),
                local_addr=("0.0.0.0", port_local),  # noqa: S104 - connected to the device below
            )
        except OSError as e:
            raise DeviceError(
                f"{host}:{port}: cannot send to it ({e.strerror or e}); a broadcast must be "
                f"the broadcast address of one of this host's interfaces ({_broadcasts()})"
            ) from e
    try:
        who_is = bacnet_frames.who_is()  # an Original-Unicast-NPDU
        if broadcast:
            transport.sendto(_ORIGINAL_BROADCAST + who_is[2:], (host, port))
        else:
            transport.sendto(who_is)
        found = await _i_ams(link, f"{host}:{port}", broadcast, timeout_s)
    finally:
        transport.close()
    if instance is not None and found and not any(i.instance == instance for i in found):
        answered = ", ".join(str(i.instance) for i in found[:20])
        raise DeviceError(
            f"{host}:{port}: no device {instance} answered the Who-Is (device {answered} did): "
            "check --device-instance"
        )
    return [i for i in found if instance is None or i.instance == instance]


async def _i_ams(link: _Datagrams, where: str, broadcast: bool, timeout_s: float) -> list[IAm]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    found: dict[int, IAm] = {}
    twice: dict[int, set[tuple[str, int]]] = {}  # instance → every address that claimed it
    while len(found) < MAX_I_AMS and (left := deadline - loop.time()) > 0:
        try:
            item = await asyncio.wait_for(link.queue.get(), left)
        except TimeoutError:
            break
        if isinstance(item, OSError):
            raise _refused(where, item)
        data, source = item
        try:
            apdu = parse(data)
        except FrameError as e:
            if broadcast:  # other traffic on a shared port is not ours to judge
                continue
            raise DeviceError(f"{where}: {e}: is this the device's BACnet/IP port?") from e
        if isinstance(apdu, IAmRequest):
            try:
                instance = int(apdu.iAmDeviceIdentifier[1])
            except (TypeError, IndexError, ValueError):
                continue  # an I-Am without a device identifier names nothing
            if instance in found and found[instance].address != source:
                twice.setdefault(instance, {found[instance].address}).add(source)
                continue
            found[instance] = IAm(instance, source)
            if not broadcast:
                break
    for instance, addresses in sorted(twice.items()):
        listed = " and ".join(f"{a[0]}:{a[1]}" for a in sorted(addresses))
        raise DeviceError(
            f"{where}: device {instance} answered from {listed}: two devices share the "
            "instance, or a host spoofs it; fix that before writing a policy"
        )
    return sorted(found.values(), key=lambda i: i.instance)


def _refused(where: str, e: OSError) -> DeviceError:
    return DeviceError(
        f"{where}: nothing listens there ({e.strerror or e}): check the address and the "
        f"port (BACnet/IP's usual port is {DEFAULT_PORT})"
    )


def _chosen(where: str, found: list[IAm], instance: int | None, name: str) -> BacnetDevice:
    if not found:
        which = "device" if instance is None else f"device {instance}"
        raise DeviceError(
            f"{where}: no {which} answered the Who-Is: check the address, the port, "
            "--device-instance and any firewall between (or raise --timeout)"
        )
    if len(found) > 1:
        listed = ", ".join(f"{i.instance} at {i.address[0]}:{i.address[1]}" for i in found[:20])
        raise DeviceError(
            f"{where}: {len(found)} devices answered ({listed}"
            f"{', …' if len(found) > 20 else ''}): name one with --device-instance"
        )
    (only,) = found
    fields = {"name": name, "host": only.address[0], "port": only.address[1],
              "device_instance": only.instance}  # fmt: skip
    try:
        return msgspec.convert(fields, BacnetDevice)
    except msgspec.ValidationError as e:
        raise ConfigError(f"discover bacnet: {e}") from e


async def _object_list(
    session: _Session, device: ObjectIdentifier, max_objects: int
) -> tuple[list[ObjectIdentifier], int]:
    """The first `max_objects` entries of the device's object-list, and how many it holds.
    A list too long for one answer (the device aborts: we take no segments) is read one
    entry at a time."""
    try:
        whole = await session.read(device, "object-list")
    except _Refused:
        count = int(await session.read(device, "object-list", index=0))
        return [await session.read(device, "object-list", index=i)
                for i in range(1, min(count, max_objects) + 1)], count  # fmt: skip
    return list(whole)[:max_objects], len(whole)


async def _describe(session: _Session, objects: list[ObjectIdentifier]) -> list[Found]:
    """The PROPERTIES of each object, several objects per ReadPropertyMultiple; one
    ReadProperty at a time for a device that refuses ReadPropertyMultiple."""
    found: list[Found] = []
    for start in range(0, len(objects), OBJECTS_PER_REQUEST):
        batch = objects[start : start + OBJECTS_PER_REQUEST]
        try:
            found += await session.read_multiple(batch, PROPERTIES)
            continue
        except _Refused:
            pass
        for identifier in batch:
            values = {}
            for prop in PROPERTIES:
                try:
                    values[prop] = await session.read(identifier, prop)
                except _Refused:  # the object has no such property
                    continue
            found.append(Found(str(identifier[0]), int(identifier[1]), values))
    return found


class _Refused(Exception):
    """The device answered a request with an error, a reject or an abort."""


class _Session:
    """Confirmed requests to one device over a connected socket, one at a time."""

    def __init__(self, where: str, transport: asyncio.DatagramTransport, link: _Datagrams,
                 timeout_s: float) -> None:  # fmt: skip
        self._where = where
        self._transport = transport
        self._link = link
        self._timeout_s = timeout_s
        self._invoke_id = 255

    @classmethod
    async def open(cls, device: BacnetDevice, timeout_s: float) -> _Session:
        loop = asyncio.get_running_loop()
        transport, link = await loop.create_datagram_endpoint(
            _Datagrams, remote_addr=(device.host, device.port)
        )  # connected: the kernel drops datagrams from anyone but the device
        return cls(device.address, transport, link, timeout_s)

    def close(self) -> None:
        self._transport.close()

    async def read(self, identifier: ObjectIdentifier, prop: str, index: int | None = None) -> Any:
        """One property; of an array (the object-list), one entry (`index` 0: the length)."""
        what = f"{prop} of {identifier}"
        if index is None:
            answer = await self._ask(
                lambda i: bacnet_frames.read_property(i, identifier, prop), what
            )
        else:
            answer = await self._ask(lambda i: _read_entry(i, identifier, prop, index), what)
        if not isinstance(answer, ReadPropertyACK) or str(answer.propertyIdentifier) != prop:
            raise self._unexpected(answer)
        if answer.objectIdentifier != identifier:
            raise self._unexpected(answer)
        try:
            if index is None:
                return value_of(str(identifier[0]), prop, answer.propertyValue)
            return answer.propertyValue.cast_out(Unsigned if index == 0 else ObjectIdentifier)
        except (FrameError, ValueError, TypeError) as e:  # bacpypes3's words for a bad value
            raise _Refused(f"{what}: {e}") from e

    async def read_multiple(
        self, identifiers: list[ObjectIdentifier], properties: tuple[str, ...]
    ) -> list[Found]:
        wanted = [(identifier, prop) for identifier in identifiers for prop in properties]
        answer = await self._ask(
            lambda i: bacnet_frames.read_property_multiple(i, wanted), f"{len(identifiers)} objects"
        )
        if not isinstance(answer, ReadPropertyMultipleACK):
            raise self._unexpected(answer)
        found = []
        for result in answer.listOfReadAccessResults:
            identifier, values = result.objectIdentifier, {}
            for element in result.listOfResults:
                value = element.readResult.propertyValue
                if value is None:  # an error in the list: the object lacks that property
                    continue
                prop = str(element.propertyIdentifier)
                try:
                    values[prop] = value_of(str(identifier[0]), prop, value)
                except FrameError:
                    continue  # not the standard datatype: left out, as if absent
            found.append(Found(str(identifier[0]), int(identifier[1]), values))
        return found

    async def _ask(self, request: Callable[[int], bytes], what: str) -> Any:
        invoke_id = secrets.randbelow(255)  # never the previous one: a late answer is not ours
        self._invoke_id = invoke_id + (invoke_id >= self._invoke_id)
        self._transport.sendto(request(self._invoke_id))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        while (left := deadline - loop.time()) > 0:
            try:
                item = await asyncio.wait_for(self._link.queue.get(), left)
            except TimeoutError:
                break
            if isinstance(item, OSError):
                raise _refused(self._where, item)
            try:
                answer = parse(item[0])
            except FrameError as e:
                raise DeviceError(f"{self._where}: {e} in the answer to a read of {what}") from e
            if getattr(answer, "apduInvokeID", None) != self._invoke_id:
                continue  # a late answer to an earlier request, or an unconfirmed request
            if isinstance(answer, ErrorPDU | RejectPDU | AbortPDU):
                raise _Refused(_words(answer))
            return answer
        raise DeviceError(
            f"{self._where}: no answer to a read of {what} within {self._timeout_s:g} s "
            "(raise --timeout for a slow device or a busy network)"
        )

    def _unexpected(self, answer: Any) -> DeviceError:
        return DeviceError(f"{self._where}: answered a read with {type(answer).__name__}")


def _read_entry(invoke_id: int, identifier: ObjectIdentifier, prop: str, index: int) -> bytes:
    """A ReadProperty of one entry of an array property: `bacnet_frames.read_property` with
    a property array index (the connector reads no array, so its module has no such read)."""
    whole = bacnet_frames.read_property(invoke_id, identifier, prop)
    request = ReadPropertyRequest(objectIdentifier=identifier, propertyIdentifier=prop,
                                  propertyArrayIndex=index)  # fmt: skip
    entry = request.encode().pduData  # the service's parameters: appended after the header
    tail = bytes(ReadPropertyRequest(objectIdentifier=identifier,
                                     propertyIdentifier=prop).encode().pduData)  # fmt: skip
    body = whole[: len(whole) - len(tail)] + bytes(entry)
    return body[:2] + len(body).to_bytes(2, "big") + body[4:]


def _words(answer: Any) -> str:
    """What an error, reject or abort says, in BACnet's words."""
    if isinstance(answer, ErrorPDU):
        return f"error {answer.errorClass}: {answer.errorCode}"
    return f"{type(answer).__name__.removesuffix('PDU').lower()} {answer.apduAbortRejectReason}"


def _starter_policy(
    device: BacnetDevice, name: str, found: list[Found], read: int, total: int
) -> str:
    """A policy `policy compile` accepts as printed; the owner edits it before signing."""
    if not found:
        raise DeviceError(
            f"{device.address}: device {device.device_instance} ({name}) has no object of the "
            f"types the broker reads ({', '.join(BACNET_OBJECT_TYPES)}) among its first {read}"
        )
    header = [
        f"# Starter policy for BACnet device {device.device_instance} ({name}) at "
        f"{device.address}: {len(found)} objects listed of {total} in its object-list"
        + (f" (stopped at --max-objects {read}; raise it to see the rest)" if read < total else ""),
        "# Set deployment_id, version and expires; edit each path (site/area/asset/measure),",
        "# unit and scale, delete what must not cross; then compile and co-sign it.",
    ]
    document = {
        "deployment_id": "change-me",
        "version": 1,
        "expires": (datetime.now(UTC) + timedelta(days=90)).strftime("%Y-%m-%dT00:00:00Z"),
        "devices": [
            {
                "name": device.name,
                "protocol": "bacnet",
                "host": device.host,
                "port": device.port,
                "device_instance": device.device_instance,
            }
        ],
    }
    signals = ["signals:"]
    for f in found:
        object_name = str(f.values.get("object-name", ""))
        units = f.values.get("units")
        signals.append(
            f"  # {f.object_type} {f.instance} {object_name!r}: {f.values.get('present-value')!s}"
            + (f" {units}" if units is not None else "")
            + f", {BACNET_OBJECT_TYPES[f.object_type]}"
        )
        signal = {
            "path": f"{device.name}/{f.object_type}-{f.instance}",
            "device": device.name,
            "source": {"protocol": "bacnet", "object_type": f.object_type, "instance": f.instance},
            "unit": our_unit(units.attr, str(units)) if units is not None else "",
            "description": " — ".join(
                str(part) for part in (object_name, f.values.get("description")) if part
            ),
        }
        dumped = yaml.safe_dump([signal], sort_keys=False, allow_unicode=True)
        signals.append("\n".join("  " + line for line in dumped.splitlines()))
    body = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    return "\n".join(header) + "\n" + body + "\n".join(signals) + "\n"
