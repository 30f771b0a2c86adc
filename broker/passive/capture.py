"""Read a packet capture file (pcap or pcapng) into the TCP and UDP payloads it holds.

Streams the file record by record with scapy's raw readers (never `rdpcap`, which loads the
whole file), so memory stays flat with the file's size. Link, IP, TCP and UDP headers are
decoded with `struct`: scapy's dissection (`Ether(frame)`, then the TCP layer's fields and
payload) costs 150-200 µs a Modbus/TCP packet on a 2-core box against 3-4 µs here, 30 to 50
times more; with scapy's raw reader the whole read is about 8 µs a packet (~120,000
packets/s, ~11 MB/s of small Modbus frames).

Checksums are not checked: captures taken on the sending host carry the offloaded (wrong)
ones. Anything that is not TCP or UDP over IP is other traffic and skipped silently; a
header that is cut or malformed is one `Warnings.add` and the packet is skipped, never an
exception. Only a file that is not a capture at all raises `CaptureError`.

Reads a file; never opens a socket or sends a packet.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv6Address
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from scapy.error import Scapy_Exception
from scapy.utils import RawPcapNgReader

from broker.passive.observations import Peer, Warnings

PROGRESS_EVERY_S = 0.5
MAX_RECORD = 4 * 0xFFFF  # bytes: the most scapy reads of one record (libpcap's cap: 262,144)
# bytes: no pcapng block is longer (a packet and its options, a list of names or keys), so a
# longer length is garbage (Wireshark's own cap is near 128 MiB)
MAX_BLOCK = 16 * 1024 * 1024
MAX_IPV6_EXTENSIONS = 8  # more chained extension headers than any real stack sends

# Link-layer types (DLT / LINKTYPE numbers) this reader decodes.
_NULL, _LOOP = 0, 108  # BSD loopback: a 4-byte address family first
_RAW = (101, 12, 14, 228, 229)  # raw IP (228/229: IPv4/IPv6 only)
# (offset of the EtherType, offset of the payload or None: right after the type)
_ETHERTYPE_AT: dict[int, tuple[int, int | None]] = {
    1: (12, None),  # Ethernet
    113: (14, None),  # Linux cooked capture (SLL)
    276: (0, 20),  # Linux cooked capture v2 (SLL2)
}
_VLAN_TAGS = (0x8100, 0x88A8, 0x9100)  # 802.1Q, 802.1ad, old QinQ
_IPV4, _IPV6 = 0x0800, 0x86DD
_AF_INET, _AF_INET6 = 2, (10, 24, 28, 30)  # Linux, NetBSD/OpenBSD, FreeBSD, macOS
_TCP, _UDP = 6, 17
_IPV6_SKIPPABLE = (0, 43, 60)  # hop-by-hop, routing, destination options
_IPV6_FRAGMENT, _IPV6_AH = 44, 51

_ETHERTYPE = struct.Struct("!H")
_IPV4_HEADER = struct.Struct("!BBHHHBB2x4s4s")
_IPV6_HEADER = struct.Struct("!4xHBB16s16s")
_TCP_HEADER = struct.Struct("!HHIIBB")
_UDP_HEADER = struct.Struct("!HHH")


class CaptureError(ValueError):
    """The file is not a packet capture this reader understands (or cannot be read)."""


class Packet(NamedTuple):
    """One IP packet's transport payload (a NamedTuple: built for every packet, it costs a
    third of a frozen dataclass)."""

    number: int  # 1-based packet number in the file (for warnings: f"packet {n}")
    time: float  # capture timestamp, s since epoch
    transport: Literal["tcp", "udp"]
    src: Peer
    dst: Peer
    payload: bytes
    seq: int = 0  # TCP only
    flags: int = 0  # TCP only, as in the header: SYN 0x02, FIN 0x01, RST 0x04, ACK 0x10
    ack: int = 0  # TCP only: the acknowledgement number (meaningful with the ACK flag)


def packets(
    path: Path, warnings: Warnings, progress: Callable[[int], None] | None = None
) -> Iterator[Packet]:
    """The TCP and UDP payloads of the capture at `path`, in file order.

    `progress(bytes read so far)` is called at most every PROGRESS_EVERY_S seconds."""
    try:
        file = path.open("rb")
    except OSError as e:
        raise CaptureError(f"cannot read capture {path}: {e.strerror or e}") from e
    with file, _scapy_quiet():
        reader = _open(path, file)
        decoder = _Decoder(warnings)
        yield from _read(reader, file, decoder, warnings, progress)


def _open(path: Path, file: IO[bytes]) -> Any:
    """scapy's raw reader for the file (pcapng, else pcap; gzip-compressed too)."""
    try:
        return RawPcapNgReader(file)  # type: ignore[arg-type]  # its metaclass takes a file too
    except (Scapy_Exception, EOFError, OSError, struct.error) as e:
        raise CaptureError(
            f"{path} is not a packet capture (pcap or pcapng): {e}; "
            "take one with tcpdump -w or Wireshark"
        ) from e


def _read(
    reader: Any,
    file: IO[bytes],
    decoder: _Decoder,
    warnings: Warnings,
    progress: Callable[[int], None] | None,
) -> Iterator[Packet]:
    number = 0
    last_progress = time.monotonic()
    stream = reader.f  # the decompressed stream for a gzip file, else `file`
    while True:
        before = stream.tell()
        try:
            data, meta = reader._read_packet(MAX_RECORD)  # what scapy's __next__ calls
        except EOFError:  # the end, or a record that does not fit in what is left
            ended = stream.tell()
            break
        except (Scapy_Exception, struct.error, ValueError) as e:
            # scapy raises these on a corrupt block; what came before is kept
            warnings.add("capture file corrupt", f"after packet {number}: {e}")
            return
        number += 1
        linktype, stamp, caplen = _metadata(reader, meta)
        if caplen is not None and caplen > MAX_RECORD:
            # a length no capture tool writes: the file's framing is lost from here
            warnings.add("capture file corrupt", f"packet {number}: record of {caplen} bytes")
            return
        if caplen is not None and len(data) < caplen:
            # a pcap record's data is shorter than its header says: the file ends here
            warnings.add("capture file cut short", f"packet {number}")
            return
        packet = decoder.decode(linktype, data, number, stamp)
        if packet is not None:
            yield packet
        if progress is not None and number % 256 == 0:
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY_S:
                last_progress = now
                progress(file.tell())
    if ended > before:
        # bytes after the last whole record: the capture was cut mid-record, or a pcapng
        # block's length is garbage (scapy says "too short" for both)
        warnings.add(_ending(reader, stream, before, ended), f"after packet {number}")
    if progress is not None:
        progress(file.tell())


def _ending(reader: Any, stream: IO[bytes], at: int, ended: int) -> str:
    """The warning kind for the bytes from `at` (after the last whole record) to `ended` (where
    scapy gave up): "corrupt" when a pcapng block there claims a length no block has."""
    if not isinstance(reader, RawPcapNgReader):
        return "capture file cut short"
    stream.seek(at)
    while at < ended:  # the blocks scapy read whole (non-packet ones), then the one it did not
        head = stream.read(8)
        if len(head) < 8:
            break
        (length,) = struct.unpack(reader.endian + "I", head[4:])
        if not 12 <= length <= MAX_BLOCK:
            return "capture file corrupt"
        at += length
        stream.seek(at)
    return "capture file cut short"


def _metadata(reader: Any, meta: Any) -> tuple[int, float, int | None]:
    """(link type, capture time, record's stated length or None) for either reader."""
    if hasattr(meta, "tsresol"):  # pcapng; a simple packet block has no timestamp
        ticks = ((meta.tshigh or 0) << 32) | (meta.tslow or 0)
        return int(meta.linktype), ticks / meta.tsresol, None
    fraction = 1e-9 if reader.nano else 1e-6
    return int(reader.linktype), meta.sec + meta.usec * fraction, int(meta.caplen)


@contextlib.contextmanager
def _scapy_quiet() -> Iterator[None]:
    """scapy logs what it tolerates in a file to stderr; we report it as Warnings."""
    logger = logging.getLogger("scapy.runtime")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Bad(Exception):
    """A header cut short or malformed: the packet is skipped with this warning kind."""


class _Span(NamedTuple):
    """Where a transport header starts and its IP packet ends, and the IP addresses."""

    protocol: int
    at: int
    end: int
    src: bytes
    dst: bytes


class _Decoder:
    """Link, IP and transport headers → Packet, or None (skipped, with a warning if bad)."""

    MAX_PEERS = 65_536  # endpoints cached (a Peer is made once); cleared when full

    def __init__(self, warnings: Warnings) -> None:
        self._warnings = warnings
        self._peers: dict[tuple[bytes, int], Peer] = {}

    def decode(self, linktype: int, frame: bytes, number: int, stamp: float) -> Packet | None:
        try:
            network = _network(linktype, frame)
            if network is None:
                return None
            version, at = network
            span = _ipv4(frame, at) if version == 4 else _ipv6(frame, at)
            return None if span is None else self._transport(frame, span, number, stamp)
        except _Bad as e:
            self._warnings.add(str(e), f"packet {number}")
            return None

    def _transport(self, frame: bytes, span: _Span, number: int, stamp: float) -> Packet:
        at, end = span.at, span.end
        if span.protocol == _TCP:
            _need(end, at + 20)
            sport, dport, seq, ack, offset, flags = _TCP_HEADER.unpack_from(frame, at)
            header = (offset >> 4) * 4
            if header < 20 or at + header > end:
                raise _Bad("malformed TCP header")
            src, dst = self._peer(span.src, sport), self._peer(span.dst, dport)
            payload = frame[at + header : end]
            return Packet(number, stamp, "tcp", src, dst, payload, seq, flags, ack)
        _need(end, at + 8)
        sport, dport, length = _UDP_HEADER.unpack_from(frame, at)
        if length < 8 or at + length > end:
            raise _Bad("malformed UDP header")
        src, dst = self._peer(span.src, sport), self._peer(span.dst, dport)
        return Packet(number, stamp, "udp", src, dst, frame[at + 8 : at + length])

    def _peer(self, address: bytes, port: int) -> Peer:
        peer = self._peers.get((address, port))
        if peer is None:
            if len(self._peers) >= self.MAX_PEERS:
                self._peers.clear()
            host = ".".join(map(str, address)) if len(address) == 4 else str(IPv6Address(address))
            peer = self._peers[address, port] = Peer(host, port)
        return peer


def _need(available: int, needed: int) -> None:
    if available < needed:
        raise _Bad("truncated packet")


def _network(linktype: int, frame: bytes) -> tuple[int, int] | None:
    """(IP version, offset of the IP header), or None for other traffic."""
    if linktype in _ETHERTYPE_AT:
        return _ethernet(frame, *_ETHERTYPE_AT[linktype])
    if linktype in _RAW:
        version = frame[0] >> 4 if frame else 0
        return (version, 0) if version in (4, 6) else None
    if linktype in (_NULL, _LOOP):
        _need(len(frame), 4)
        family = int.from_bytes(frame[:4], "little")
        if family > 0xFFFF:  # in the capturing host's byte order: this one was big-endian
            family = int.from_bytes(frame[:4], "big")
        version = 4 if family == _AF_INET else 6 if family in _AF_INET6 else 0
        return (version, 4) if version else None
    raise _Bad(f"link type {linktype} not supported")


def _ethernet(frame: bytes, type_at: int, header: int | None) -> tuple[int, int] | None:
    """Follow the EtherType at `type_at` through VLAN tags; the payload starts at `header`
    (None: right after the type)."""
    _need(len(frame), max(type_at + 2, header or 0))
    ethertype = _ETHERTYPE.unpack_from(frame, type_at)[0]
    offset = type_at + 2 if header is None else header
    for _ in range(4):  # tags stacked deeper than QinQ-in-QinQ are not a real network
        if ethertype not in _VLAN_TAGS:
            break
        _need(len(frame), offset + 4)
        ethertype = _ETHERTYPE.unpack_from(frame, offset + 2)[0]
        offset += 4
    version = 4 if ethertype == _IPV4 else 6 if ethertype == _IPV6 else 0
    return (version, offset) if version else None


def _ipv4(frame: bytes, at: int) -> _Span | None:
    _need(len(frame), at + 20)
    first, _, total, _, fragment, _, protocol, src, dst = _IPV4_HEADER.unpack_from(frame, at)
    header = (first & 0x0F) * 4
    if first >> 4 != 4 or header < 20 or (total and total < header):
        raise _Bad("malformed IPv4 header")
    if protocol not in (_TCP, _UDP):
        return None
    if fragment & 0x3FFF:  # more fragments, or not the first: the payload is not whole
        raise _Bad("IP fragment")
    # total 0: a segmentation-offloaded packet captured on its sender (length unknown)
    end = at + total if total else len(frame)
    _need(len(frame), end)
    return _Span(protocol, at + header, end, src, dst)


def _ipv6(frame: bytes, at: int) -> _Span | None:
    _need(len(frame), at + 40)
    length, header, _, src, dst = _IPV6_HEADER.unpack_from(frame, at)
    if frame[at] >> 4 != 6:
        raise _Bad("malformed IPv6 header")
    end = at + 40 + length if length else len(frame)  # 0: a jumbogram
    _need(len(frame), end)
    offset = at + 40
    for _ in range(MAX_IPV6_EXTENSIONS):
        if header in (_TCP, _UDP):
            return _Span(header, offset, end, src, dst)
        if header not in (*_IPV6_SKIPPABLE, _IPV6_FRAGMENT, _IPV6_AH):
            return None  # ICMPv6, ESP (encrypted), no next header, ...
        if end < offset + 8:
            raise _Bad("malformed IPv6 header")
        if header == _IPV6_FRAGMENT:
            raise _Bad("IP fragment")
        units = (frame[offset + 1] + 2) * 4 if header == _IPV6_AH else (frame[offset + 1] + 1) * 8
        header = frame[offset]
        offset += units
    raise _Bad("malformed IPv6 header")
