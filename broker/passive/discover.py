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
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from broker import safe_files
from broker.errors import ConfigError, DmzBrokerError
from broker.passive import summary
from broker.passive.bacnet import BacnetReader
from broker.passive.capture import CaptureError, Packet, packets
from broker.passive.dnp3 import Dnp3Reader
from broker.passive.draft import Hosts, draft
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
from broker.passive.streams import Chunk, Streams
from broker.plant.discovery_starter import quiet_logs
from broker.policy.fields import NAME, SPELLING
from broker.records import to_json

DEFAULT_PORTS: Mapping[Protocol, int] = {"modbus": 502, "dnp3": 20000, "bacnet": 47808}
PROGRESS_AFTER_S = 2.0  # a run shorter than this prints no progress
PROGRESS_LINE_EVERY_S = 10.0  # when stderr is not a terminal (a log): a line this often
DRAFT_MODE = 0o644  # a draft holds no secret; with --redact it is meant to be shared


def discover_pcap(args: argparse.Namespace) -> int:
    ports = _ports(args.port)
    if not NAME.fullmatch(args.site):
        raise ConfigError(f"--site {args.site!r}: must be one word of {SPELLING}")
    quiet_logs()
    warnings = Warnings()
    capture = _Capture(ports, warnings)
    progress = _Progress(args.file)
    try:
        for packet in packets(args.file, warnings, progress):
            progress.packets += 1
            capture.packet(packet)
    except CaptureError as e:
        raise ConfigError(str(e)) from e
    except OSError as e:  # the file went away or failed while being read
        raise ConfigError(f"cannot read capture {args.file}: {e.strerror or e}") from e
    capture.flush()
    progress.done()

    hosts = Hosts(args.redact)
    guesses, polled = capture.guesses(), capture.polled()
    drafted = draft(guesses, polled, capture.interval_s, site=args.site, hosts=hosts,
                    source="(redacted)" if args.redact else args.file.name)  # fmt: skip
    if args.json:
        document = summary.document(drafted, polled, warnings, hosts)
        sys.stdout.buffer.write(to_json(document) + b"\n")
    else:
        if drafted.text is not None:
            _write(drafted.text, args.output)
        shown = sys.stdout if args.output is not None else sys.stderr
        shown.write(summary.table(drafted))
        sys.stderr.write(summary.warnings_text(warnings, hosts))
    sys.stdout.flush()
    if drafted.text is None:
        raise DmzBrokerError(
            f"{args.file}: nothing to draft: the capture shows no read the broker could repeat "
            f"(ports {_ports_text(ports)}; name others with --port PROTOCOL=PORT)"
        )
    return 0


def _ports(options: Iterable[str]) -> dict[Protocol, set[int]]:
    """The default ports and each --port PROTOCOL=PORT (e.g. modbus=5020)."""
    ports: dict[Protocol, set[int]] = {p: {port} for p, port in DEFAULT_PORTS.items()}
    for text in options:
        protocol, equals, port = text.partition("=")
        found = next((p for p in ports if p == protocol), None)
        if not equals or found is None or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"--port {text!r}: expected PROTOCOL=PORT, PROTOCOL one of "
                f"{', '.join(DEFAULT_PORTS)} and PORT 1-65535 (e.g. modbus=5020)"
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

    def packet(self, packet: Packet) -> None:
        if packet.transport == "udp":
            if packet.dst.port in self._bacnet or packet.src.port in self._bacnet:
                to_server = packet.dst.port in self._bacnet
                self._observe(self._bacnet_reader.feed(packet, to_server))
        elif self._tcp(packet.src.port, packet.dst.port) is not None:  # other TCP: not kept
            self._chunks(self._streams.add(packet))

    def flush(self) -> None:
        self._chunks(self._streams.flush())

    # A BACnet device's points seen before the capture named its instance carry UNKNOWN_UNIT:
    # once it is known they are that device's (else the draft would hold it twice).
    def _unit(self, protocol: str, server: Peer, unit: int) -> int:
        if protocol == "bacnet" and unit == UNKNOWN_UNIT:
            return self._bacnet_reader.instance_of(server)
        return unit

    def guesses(self) -> list[Guess]:
        found: dict[tuple[str, Peer, int, str, int], Guess] = {}
        for seen in self.inference.guesses():
            guess = replace(seen, unit=self._unit(seen.protocol, seen.server, seen.unit))
            key = (guess.protocol, guess.server, guess.unit, guess.table, guess.address)
            other = found.get(key)
            if other is not None:  # the same point before and after its instance was known
                best = guess if guess.samples >= other.samples else other
                guess = replace(best, written=guess.written or other.written)
            found[key] = guess
        return list(found.values())

    def polled(self) -> list[Polled]:
        return [
            replace(p, unit=self._unit(p.protocol, p.server, p.unit)) for p in self.polls.polled()
        ]

    def interval_s(self, server: Peer, unit: int) -> float | None:
        """`PollLog.interval_s`, over what was asked of the device before its instance was known too."""
        units = {unit}
        if unit != UNKNOWN_UNIT and self._bacnet_reader.instance_of(server) == unit:
            units.add(UNKNOWN_UNIT)
        found = [self.polls.interval_s(server, u) for u in units]
        return max((i for i in found if i is not None), default=None)

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
    try:
        safe_files.replace_durably(output, text.encode(), mode=DRAFT_MODE)
    except OSError as e:
        raise ConfigError(f"--output {output}: cannot write: {e.strerror or e}") from e
