"""List a DNP3 outstation's points for `dmzbroker discover dnp3`: one integrity poll, read only.

Run by the CLI, never by a running half. It opens one TCP connection, sends one READ of
class 0 (the integrity poll's static data), and prints a starter policy
(`discovery_starter`) an OT owner edits (paths, units, scale, what to share) before it is
co-signed: discovery never decides what crosses. The only other things it may send are
those the protocol requires of a master: an application CONFIRM when the outstation asks
for one (a response in several fragments sets CON on each but the last; a null unsolicited
response, which carries no event and enables nothing, but holds the outstation's answers
until it is confirmed) and the link layer's answers the codec owes (`Channel.replies`). It never writes (no WRITE of the restart
indication), never enables or disables unsolicited responses, and never confirms an
unsolicited response with objects (that would delete events another master may need).
The whole answer must come within `DEADLINE_TIMEOUTS` × --timeout, in fragments numbered
as a response to its READ is: a hostile endpoint cannot keep the command running.
Every encoder it uses is in `broker.plant.connectors.dnp3_objects`, which builds READ and
CONFIRM only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from dataclasses import dataclass

import msgspec

from broker.errors import ConfigError, DeviceError
from broker.plant.connectors.dnp3_frames import Channel, FrameError
from broker.plant.connectors.dnp3_link import NULL_RESPONSE
from broker.plant.connectors.dnp3_objects import (
    RESPONSE,
    Point,
    Response,
    class_header,
    confirm,
    indications,
    parse_response,
    quality_of,
    read_request,
)
from broker.plant.discovery_starter import EDIT, Listed, quiet_logs, starter_policy
from broker.policy import Dnp3Device
from broker.policy.schema import DNP3_VARIATIONS, Dnp3Source

DEFAULT_PORT = 20000
MAX_FRAGMENTS = 256  # of one answer: 512 KiB, some 50,000 points, beyond most class 0 answers
DEADLINE_TIMEOUTS = 10  # the whole answer within this many --timeout
GROUP_NAMES = {  # the static groups a policy can name (schema.DNP3_VARIATIONS), as path words
    1: "binary-input",
    3: "double-bit-input",
    10: "binary-output-status",
    20: "counter",
    21: "frozen-counter",
    30: "analog-input",
    40: "analog-output-status",
}


@dataclass(frozen=True)
class Poll:
    """What one integrity poll returned."""

    points: list[Point]  # the last report of each (group, index), in group and index order
    indications: list[str]  # the IIN bits of the last fragment
    skipped: list[str]  # what the codec could not decode


def discover_dnp3(args: argparse.Namespace) -> int:
    quiet_logs()
    device = _device(args)
    poll = asyncio.run(_integrity_poll(device, args.timeout))
    print(_starter_policy(device, poll), end="")
    return 0


def _device(args: argparse.Namespace) -> Dnp3Device:
    host, port = args.address
    fields = {
        "name": args.device_name,
        "host": host,
        "port": port or DEFAULT_PORT,
        "outstation_address": args.outstation,
        "master_address": args.master,
    }
    try:
        return msgspec.convert(fields, Dnp3Device)
    except msgspec.ValidationError as e:
        raise ConfigError(f"discover dnp3: {e}") from e


async def _integrity_poll(device: Dnp3Device, timeout_s: float) -> Poll:
    where = (
        f"{device.address} (outstation {device.outstation_address}, master {device.master_address})"
    )
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(device.host, device.port), timeout_s
        )
    except TimeoutError as e:
        raise DeviceError(
            f"{device.address}: no TCP connection within {timeout_s:g} s: check the host, the "
            "port and any firewall between"
        ) from e
    except socket.gaierror as e:  # its errno is a resolver code, not an OS one
        raise DeviceError(
            f"{device.address}: cannot resolve {device.host!r} ({e.strerror}): check the host name"
        ) from e
    except OSError as e:  # asyncio's message repeats the address: the errno's words only
        raise DeviceError(
            f"{device.address}: cannot connect ({os.strerror(e.errno) if e.errno else e}): "
            f"check that the outstation listens there (DNP3's usual port is {DEFAULT_PORT})"
        ) from e
    try:
        return await _poll(Channel(device.master_address, device.outstation_address),
                           reader, writer, where, timeout_s)  # fmt: skip
    except FrameError as e:
        raise DeviceError(
            f"{where}: the answer is not DNP3 this master accepts ({e}): check the port and "
            "--outstation/--master against the outstation's configuration"
        ) from e
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)


async def _poll(
    channel: Channel,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    where: str,
    timeout_s: float,
) -> Poll:
    """One READ of class 0; the solicited fragments of its answer until the final one."""
    writer.write(channel.request(read_request(0, [class_header(0)])))
    await writer.drain()
    found: dict[tuple[int, int], Point] = {}
    skipped: list[str] = []
    loop = asyncio.get_running_loop()
    overall = loop.time() + DEADLINE_TIMEOUTS * timeout_s
    for n in range(MAX_FRAGMENTS):
        deadline = min(loop.time() + timeout_s, overall)
        response = await _next_response(
            channel, reader, writer, where, deadline=deadline, timeout_s=timeout_s
        )
        if response.seq != n & 0x0F or response.first != (n == 0):
            raise DeviceError(
                f"{where}: fragment {n + 1} of the answer has sequence {response.seq} "
                f"({'first' if response.first else 'not first'}) where {n & 0x0F} "
                f"({'first' if n == 0 else 'not first'}) was due: not an answer to this READ"
            )
        for point in response.points:
            found[(point.group, point.index)] = point
        skipped += response.skipped
        if response.confirm:  # the outstation waits for it before its next fragment
            writer.write(channel.request(confirm(response.seq, unsolicited=False)))
            await writer.drain()
        if response.final:
            return Poll(
                sorted(found.values(), key=lambda p: (p.group, p.index)),
                indications(response.iin),
                skipped,
            )
    raise DeviceError(f"{where}: the answer went on past {MAX_FRAGMENTS} fragments; stopped")


async def _next_response(
    channel: Channel,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    where: str,
    *,
    deadline: float,
    timeout_s: float,
) -> Response:
    """The next solicited response; unsolicited ones are read and dropped, a null one
    confirmed. One deadline for the whole wait: a trickle of unsolicited responses cannot
    extend it."""
    loop = asyncio.get_running_loop()
    pending: list[bytes] = []
    while True:
        while pending:
            apdu = pending.pop(0)
            response = parse_response(apdu)
            if response.function == RESPONSE:
                return response
            if response.confirm and len(apdu) == NULL_RESPONSE:
                writer.write(channel.request(confirm(response.seq, unsolicited=True)))
                await writer.drain()
        try:
            chunk = await asyncio.wait_for(reader.read(4096), max(0.0, deadline - loop.time()))
        except TimeoutError as e:
            raise DeviceError(
                f"{where}: no answer to the integrity poll within {timeout_s:g} s "
                f"(the whole answer within {DEADLINE_TIMEOUTS * timeout_s:g} s): an "
                "outstation ignores frames for another link address, so check --outstation "
                "and --master against its configuration (or raise --timeout)"
            ) from e
        if not chunk:
            raise DeviceError(
                f"{where}: the outstation closed the connection without answering: check that "
                "it accepts this master (its allowed master addresses or IP addresses)"
            )
        pending = channel.receive(chunk)
        owed = channel.replies()  # link status or acknowledgement the link layer requires
        if owed:
            writer.write(owed)
            await writer.drain()


def _starter_policy(device: Dnp3Device, poll: Poll) -> str:
    """A policy `policy compile` accepts as printed; the owner edits it before signing."""
    listed = [p for p in poll.points if p.group in DNP3_VARIATIONS]
    if not listed:
        raise DeviceError(
            f"{device.address}: the integrity poll returned {len(poll.points)} points, none of "
            f"a group the broker reads ({', '.join(map(str, DNP3_VARIATIONS))}): check which "
            "points the outstation assigns to class 0"
            + (f" (IIN: {', '.join(poll.indications)})" if poll.indications else "")
        )
    header = [
        f"# Starter policy for DNP3 outstation {device.outstation_address} at {device.address}: "
        f"{len(poll.points)} points in its integrity poll (class 0)",
        *([f"# Indications (IIN) set: {', '.join(poll.indications)}"] if poll.indications else []),
        *[f"# Not decoded: {what}" for what in poll.skipped],
        *[
            f"# Not listed: g{p.group}v{p.variation} index {p.index} (the broker does not read "
            f"group {p.group})"
            for p in poll.points
            if p.group not in DNP3_VARIATIONS
        ],
        *EDIT,
        "# Each variation is the one the outstation sent; another (g30v5: float) may be asked.",
    ]
    fields = {"name": device.name, "protocol": "dnp3", "host": device.host, "port": device.port,
              "outstation_address": device.outstation_address,
              "master_address": device.master_address}  # fmt: skip
    return starter_policy(header, fields, [_listed(device, point) for point in listed])


def _listed(device: Dnp3Device, point: Point) -> Listed:
    source = _source(point)
    quality, reason = quality_of(point)
    flags = "no flags" if point.flags is None else f"flags 0x{point.flags:02x}"
    comment = (
        f"g{point.group}v{point.variation} index {point.index}: {point.value!r}, {flags} "
        f"({quality}{': ' + reason if reason else ''}), {source.type}"
    )
    return Listed(
        comment,
        {
            "path": f"{device.name}/{GROUP_NAMES[point.group]}-{point.index}",
            "device": device.name,
            "source": {"group": source.group, "variation": source.variation, "index": source.index},
            "unit": "",
            "description": f"g{point.group}v{point.variation} index {point.index}",
        },
    )


def _source(point: Point) -> Dnp3Source:
    """The point as a policy source, in the variation it came in when the schema has it."""
    variation = point.variation if point.variation in DNP3_VARIATIONS[point.group] else 0
    return Dnp3Source(group=point.group, index=point.index, variation=variation)
