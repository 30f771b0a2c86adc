"""`discover pcap FILE`: draft a policy's devices and signals from a capture of the traffic a
plant already has (docs/discovery.md).

Reads the file and nothing else: it never opens a socket or sends a packet, so it can run
where active discovery is forbidden. Packets go by port to a protocol reader (TCP through
reassembly first); what was asked goes to the poll log, what was answered or written to the
inference; the draft and the summary come from those. A capture it cannot read is one line
and exit 2; what a readable capture holds that it cannot use is a warning, never a failure.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from broker import safe_files
from broker.errors import ConfigError, DmzBrokerError
from broker.passive import summary
from broker.passive.bacnet import BacnetReader
from broker.passive.capture import CaptureError, Packet, packets
from broker.passive.dnp3 import Dnp3Reader
from broker.passive.draft import draft
from broker.passive.infer import Guess, Inference
from broker.passive.modbus import ModbusReader
from broker.passive.observations import (
    UNKNOWN_UNIT,
    Observation,
    Peer,
    Protocol,
    Request,
    Warnings,
)
from broker.passive.polls import Polled, PollLog
from broker.passive.shown import Hosts, one_line
from broker.passive.streams import Chunk, Streams
from broker.plant.discovery_starter import quiet_logs
from broker.policy.fields import NAME, SPELLING
from broker.records import to_json

DEFAULT_PORTS: Mapping[Protocol, int] = {"modbus": 502, "dnp3": 20000, "bacnet": 47808}
PROTOCOL_NAMES: Mapping[Protocol, str] = {
    "modbus": "Modbus/TCP",
    "dnp3": "DNP3",
    "bacnet": "BACnet/IP",
}
PROGRESS_AFTER_S = 2.0  # a run shorter than this prints no progress
PROGRESS_LINE_EVERY_S = 10.0  # when stderr is not a terminal (a log): a line this often
DRAFT_MODE = 0o644  # a draft holds no secret; with --redact it is meant to be shared


def discover_pcap(args: argparse.Namespace) -> int:
    ports = _ports(args.port)
    if not NAME.fullmatch(args.site):
        raise ConfigError(f"--site {args.site!r}: must be one word of {SPELLING}")
    output: Path | None = args.output
    if output is not None and (output.exists() or output.is_symlink()) and not args.force:
        raise ConfigError(f"--output {output}: the file exists; --force replaces it")
    # with --redact the capture's name appears nowhere, errors included (plantA-10.20.0.0.pcap)
    label = "the capture (name redacted)" if args.redact else str(args.file)
    quiet_logs()
    warnings = Warnings()
    capture = _Capture(ports, warnings)
    progress = _Progress(args.file)
    try:
        for packet in packets(args.file, warnings, progress):
            progress.packets += 1
            capture.packet(packet)
    except CaptureError as e:
        raise ConfigError(str(e).replace(str(args.file), label)) from e
    except OSError as e:  # the file went away or failed while being read
        raise ConfigError(f"cannot read capture {label}: {e.strerror or e}") from e
    capture.flush()
    progress.done()

    hosts = Hosts(args.redact)
    guesses, polled = capture.resolved()
    drafted = draft(guesses, polled, site=args.site, hosts=hosts, include_constant=args.include_constant,
                    source="(redacted)" if args.redact else args.file.name)  # fmt: skip
    if drafted.text is not None and (output is not None or not args.json):
        _write(drafted.text, output)
    if args.json:
        document = summary.document(drafted, polled, warnings, hosts)
        sys.stdout.buffer.write(to_json(document) + b"\n")
    else:
        shown = sys.stdout if output is not None else sys.stderr
        shown.write(summary.table(drafted))
        sys.stderr.write(summary.warnings_text(warnings, hosts))
    sys.stdout.flush()
    if drafted.text is None:
        raise DmzBrokerError(
            f"{label}: nothing to draft: the capture shows no read the broker could repeat "
            f"(ports {_ports_text(ports)}; name others with --port PROTOCOL=PORT)"
            + "".join(
                f"; port {port} looks like {PROTOCOL_NAMES[p]}: add --port {p}={port}"
                for p, port in capture.suspects()
            )
        )
    return 0


def _ports(options: Iterable[str]) -> dict[Protocol, set[int]]:
    """The default ports and each --port PROTOCOL=PORT (e.g. modbus=5020): a port is one
    protocol's (a segment goes to the first protocol whose port it has)."""
    ports: dict[Protocol, set[int]] = {p: {port} for p, port in DEFAULT_PORTS.items()}
    for text in options:
        protocol, equals, port = text.partition("=")
        found = next((p for p in ports if p == protocol), None)
        if not equals or found is None or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"--port {text!r}: expected PROTOCOL=PORT, PROTOCOL one of "
                f"{', '.join(DEFAULT_PORTS)} and PORT 1-65535 (e.g. modbus=5020)"
            )
        other = next((p for p, taken in ports.items() if p != found and int(port) in taken), None)
        if other is not None:
            raise ConfigError(
                f"--port {text!r}: port {int(port)} is already {other}'s; a port can be one "
                "protocol's only"
            )
        ports[found].add(int(port))
    return ports


def _ports_text(ports: Mapping[Protocol, set[int]]) -> str:
    return "; ".join(f"{p} {', '.join(map(str, sorted(n)))}" for p, n in ports.items())


class _Capture:
    """What reading the capture gathers: requests in the poll log, values in the inference."""

    def __init__(self, ports: Mapping[Protocol, set[int]], warnings: Warnings) -> None:
        self._modbus, self._dnp3 = ports["modbus"], ports["dnp3"]
        self._bacnet = ports["bacnet"]
        self._streams = Streams(warnings)
        self._readers: dict[str, ModbusReader | Dnp3Reader] = {
            "modbus": ModbusReader(warnings),
            "dnp3": Dnp3Reader(warnings),
        }
        self._bacnet_reader = BacnetReader(warnings)
        self.polls = PollLog(warnings)
        self.inference = Inference(warnings)
        self._other = _OtherPorts()

    def packet(self, packet: Packet) -> None:
        if packet.transport == "udp":
            if packet.dst.port in self._bacnet or packet.src.port in self._bacnet:
                to_server = packet.dst.port in self._bacnet
                self._observe(self._bacnet_reader.feed(packet, to_server))
        elif self._tcp(packet.src.port, packet.dst.port) is not None:
            self._chunks(self._streams.add(packet))
        elif packet.payload:  # other TCP: not kept, but it may be a PLC on another port
            self._other.look(packet)

    def flush(self) -> None:
        self._chunks(self._streams.flush())

    def suspects(self) -> list[tuple[Protocol, int]]:
        return self._other.suspects()

    def resolved(self) -> tuple[list[Guess], list[Polled]]:
        """The guesses and polled ranges, each BACnet device's under the instance the capture
        named, even for what was seen before its I-Am (else the draft would hold it twice):
        one mapping, applied once. Capture text (names, units) is cleaned here too."""
        instance = self._bacnet_reader.instance_of

        def unit(protocol: str, server: Peer, unit: int) -> int:
            return instance(server) if protocol == "bacnet" and unit == UNKNOWN_UNIT else unit

        found: dict[tuple[str, Peer, int, str, int], Guess] = {}
        for seen in self.inference.guesses():
            guess = replace(seen, unit=unit(seen.protocol, seen.server, seen.unit),
                            name=_clean(seen.name), units=_clean(seen.units),
                            description=_clean(seen.description))  # fmt: skip
            key = (guess.protocol, guess.server, guess.unit, guess.table, guess.address)
            other = found.get(key)
            if other is not None:  # the same point before and after its instance was known
                best = guess if guess.samples >= other.samples else other
                guess = replace(best, written=guess.written or other.written)
            found[key] = guess
        polled = [replace(p, unit=unit(p.protocol, p.server, p.unit)) for p in self.polls.polled()]
        return list(found.values()), polled

    def _tcp(self, src: int, dst: int) -> tuple[str, bool] | None:
        """The protocol of a TCP segment, and whether it goes to the server (the port's end)."""
        for protocol, ports in (("modbus", self._modbus), ("dnp3", self._dnp3)):
            if dst in ports or src in ports:
                return protocol, dst in ports
        return None

    def _chunks(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            found = self._tcp(chunk.src.port, chunk.dst.port)
            if found is not None:
                protocol, from_client = found
                self._observe(self._readers[protocol].feed(chunk, from_client))

    def _observe(self, observations: list[Observation]) -> None:
        for observation in observations:
            if isinstance(observation, Request):
                self.polls.add(observation)
            else:
                self.inference.add(observation)


def _clean(text: str | None) -> str | None:
    return None if text is None else one_line(text)


class _OtherPorts:
    """TCP connections on ports no protocol was given: the first payload of each, looked at
    for a Modbus/TCP (MBAP) or DNP3 header, so that "nothing to draft" can name the port.
    Bounded: the first MAX_LOOKED connections only."""

    MAX_LOOKED = 10_000

    def __init__(self) -> None:
        self._looked: set[tuple[str, int, str, int]] = set()
        self._found: Counter[tuple[Protocol, int]] = Counter()

    def look(self, packet: Packet) -> None:
        a, b = (packet.src.host, packet.src.port), (packet.dst.host, packet.dst.port)
        key = (*min(a, b), *max(a, b))
        if key in self._looked or len(self._looked) >= self.MAX_LOOKED:
            return
        self._looked.add(key)
        protocol = _looks_like(packet.payload)
        if protocol is not None:  # a PLC's port is the well-known, lower one of the two
            self._found[protocol, min(packet.src.port, packet.dst.port)] += 1

    def suspects(self) -> list[tuple[Protocol, int]]:
        return [found for found, _ in self._found.most_common(3)]


def _looks_like(payload: bytes) -> Protocol | None:
    """The protocol whose header a connection's first payload starts with, if any."""
    if payload[:2] == b"\x05\x64" and len(payload) >= 10:  # a DNP3 link header
        return "dnp3"
    if len(payload) >= 8:  # MBAP: transaction, protocol 0, length 2..254, unit; a function
        _, protocol, length = struct.unpack_from(">HHH", payload)
        if (
            protocol == 0
            and 2 <= length <= 254
            and 6 + length <= len(payload)
            and 0 < payload[7] & 0x7F <= 43
        ):
            return "modbus"
    return None


class _Progress:
    """`progress(bytes read)` for `packets`: nothing for a run under PROGRESS_AFTER_S; then a
    line rewritten in place on a terminal, or a line every PROGRESS_LINE_EVERY_S in a log."""

    def __init__(self, path: Path) -> None:
        try:
            self._size = path.stat().st_size
        except OSError:
            self._size = 0  # `packets` names the problem
        self._started = self._last = time.monotonic()
        self._terminal = sys.stderr.isatty()
        self._shown = False
        self.packets = 0

    def __call__(self, read: int) -> None:
        now = time.monotonic()
        if now - self._started < PROGRESS_AFTER_S:
            return
        if not self._terminal and self._shown and now - self._last < PROGRESS_LINE_EVERY_S:
            return
        self._last, self._shown = now, True
        mb, size = read / 1e6, max(self._size, read) / 1e6
        share = 100 * read / max(self._size, read, 1)
        line = (
            f"discover pcap: {mb:,.0f} of {size:,.0f} MB ({share:.0f} %), {self.packets:,} packets"
        )
        sys.stderr.write(f"\r{line}" if self._terminal else f"{line}\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self._shown and self._terminal:
            sys.stderr.write("\n")


def _write(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    try:  # written whole or not at all; a symlink at the path is replaced, never followed
        safe_files.replace_durably(output, text.encode(), mode=DRAFT_MODE)
    except OSError as e:  # name what failed when it is not the draft (or its .tmp): a folder
        failed = (
            f" ({e.filename})" if e.filename and Path(e.filename).parent != output.parent else ""
        )
        raise ConfigError(f"--output {output}: cannot write: {e.strerror or e}{failed}") from e
