"""List a BACnet/IP device's objects for `dmzbroker discover bacnet`: Who-Is and reads only.

Run by the CLI, never by a running half. It finds the device with a Who-Is (to the device,
or to a broadcast address: `discovery_bacnet_who_is`), then sends ReadProperty and
ReadPropertyMultiple requests to the device that answered: its object-list, and each
object's object-name, description, units and present-value. It prints a starter policy
(`discovery_starter`) an OT owner edits before it is co-signed: discovery never decides
what crosses. It never writes, never subscribes, never sends a device-management service,
and answers nothing it receives (it runs no bacpypes3 Application, which would serve a
device object of its own). Its packets are the connector's (`bacnet_frames`), plus a Who-Is
sent as a broadcast and a read of one entry of the object-list, which the connector does
not need.

Its work is bounded: at most `--max-objects` entries of the object-list are read (a device
that holds more is named as such), each request waits `--timeout` seconds at most, and a
datagram longer than BACnet/IP allows is dropped unread.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from bacpypes3.apdu import (
    AbortPDU,
    ErrorPDU,
    ReadPropertyACK,
    ReadPropertyMultipleACK,
    ReadPropertyRequest,
    RejectPDU,
)
from bacpypes3.primitivedata import ObjectIdentifier, Unsigned

from broker.errors import ConfigError, DeviceError
from broker.plant.connectors import bacnet_frames
from broker.plant.connectors.bacnet_frames import FrameError, parse, value_of
from broker.plant.connectors.bacnet_units import our_unit
from broker.plant.discovery_bacnet_who_is import DEFAULT_PORT, Datagrams, IAm, refused, who_is
from broker.plant.discovery_starter import EDIT, Listed, quiet_logs, starter_policy
from broker.policy import BacnetDevice
from broker.policy.schema import BACNET_OBJECT_TYPES

OBJECTS_PER_REQUEST = 8  # of a ReadPropertyMultiple: its answer stays well under 480 bytes
PROPERTIES = ("object-name", "description", "units", "present-value")


@dataclass(frozen=True)
class Found:
    object_type: str
    instance: int
    values: dict[str, Any]  # property → value as decoded; a property the object lacks is absent


def discover_bacnet(args: argparse.Namespace) -> int:
    quiet_logs()
    host, port = args.address
    port = port or DEFAULT_PORT
    if args.max_objects < 1 or args.timeout <= 0:
        raise ConfigError("discover bacnet: --max-objects and --timeout must be above 0")
    print(asyncio.run(_discover(host, port, args)), end="")
    return 0


async def _discover(host: str, port: int, args: argparse.Namespace) -> str:
    found = await who_is(host, port, args.device_instance, args.timeout, args.port_local)
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

    def __init__(self, where: str, transport: asyncio.DatagramTransport, link: Datagrams,
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
            Datagrams, remote_addr=(device.host, device.port)
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
                raise refused(self._where, item)
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
        *EDIT,
    ]
    fields = {"name": device.name, "protocol": "bacnet", "host": device.host,
              "port": device.port, "device_instance": device.device_instance}  # fmt: skip
    return starter_policy(header, fields, [_listed(device, f) for f in found])


def _listed(device: BacnetDevice, f: Found) -> Listed:
    object_name = str(f.values.get("object-name", ""))
    units = f.values.get("units")
    comment = (
        f"{f.object_type} {f.instance} {object_name!r}: {f.values.get('present-value')!s}"
        + (f" {units}" if units is not None else "")
        + f", {BACNET_OBJECT_TYPES[f.object_type]}"
    )
    return Listed(
        comment,
        {
            "path": f"{device.name}/{f.object_type}-{f.instance}",
            "device": device.name,
            "source": {"object_type": f.object_type, "instance": f.instance},
            "unit": our_unit(units.attr, str(units)) if units is not None else "",
            "description": " — ".join(
                str(part) for part in (object_name, f.values.get("description")) if part
            ),
        },
    )
