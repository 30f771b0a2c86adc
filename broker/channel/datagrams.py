"""The diode's datagram format (ADR 0019): encode on the OT host, decode on the IT host.

Sans-io: bytes in, bytes or typed values out; no socket, no clock. Every datagram stands
alone, so one lost datagram loses only what it carried:

    magic b"DD" | u8 version | u8 kind | u64 session | u64 seq | u32 CRC-32 | payload

The CRC-32 covers the 20 header bytes before it and the payload. `session` is random per
sender start; `seq` counts every datagram of a session from 1 (copies of one datagram share
it). Kinds and payloads:
- RECORDS, RESYNC: a MessagePack array of records (as a spool frame's payload), as many
  as fit; RESYNC records are latest values sent again, below the live seq.
- CHECKPOINT: one of the plant's audit checkpoint entries (its canonical JSON line).
- HEARTBEAT: u64 seq of the last record sent, u64 datagrams sent (copies included).
- FRAGMENT: u64 seq of the message's first fragment | u16 index | u16 count | u8 kind |
  a slice of one RECORDS, RESYNC or CHECKPOINT payload too large for a datagram.

`decode` never raises anything but DatagramError, whose `reason` is a short code: any
byte string is decoded or refused (tests/channel/test_datagrams.py). It checks integrity
against damage; a CRC is no proof of origin (ADR 0019: the receiver's port faces only the
diode).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from broker.records import Record, decode_frame_payload

MAGIC = b"DD"
VERSION = 1
RECORDS, FRAGMENT, CHECKPOINT, HEARTBEAT, RESYNC = 1, 2, 3, 4, 5
KIND_NAMES = {
    RECORDS: "records",
    FRAGMENT: "fragment",
    CHECKPOINT: "checkpoint",
    HEARTBEAT: "heartbeat",
    RESYNC: "resync",
}
HEADER = struct.Struct("<2sBBQQI")
_CRC_AT = HEADER.size - 4
_HEARTBEAT = struct.Struct("<QQ")
_FRAGMENT = struct.Struct("<QHHB")
_ARRAY16 = struct.Struct(">BH")  # MessagePack array 16: 0xdc, count
MAX_FRAGMENTS = 0xFFFF
MIN_DATAGRAM = 512  # bytes; DiodeConfig.datagram_bytes' floor
MAX_DATAGRAM = 65_507  # the largest UDP payload over IPv4
_U64 = (1 << 64) - 1

_encoder = msgspec.msgpack.Encoder()


class DatagramError(ValueError):
    """A datagram refused; `reason` is a low-cardinality code for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Heartbeat(NamedTuple):
    last_record_seq: int
    sent: int


class Fragment(NamedTuple):
    message: int  # seq of the message's first fragment
    part: int  # 0-based
    parts: int
    kind: int  # RECORDS, RESYNC or CHECKPOINT
    chunk: bytes


Body = list[Record] | bytes | Heartbeat | Fragment


class Datagram(NamedTuple):
    kind: int
    session: int
    seq: int
    body: Body  # records (RECORDS, RESYNC), the entry (CHECKPOINT), Heartbeat, Fragment


def encode(kind: int, session: int, seq: int, payload: bytes) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, kind, session, seq, 0)[:_CRC_AT]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def decode(data: bytes) -> Datagram:
    """One datagram, checked and parsed; raises DatagramError (only) on anything else."""
    if len(data) < HEADER.size:
        raise DatagramError("short", f"{len(data)} bytes, a header is {HEADER.size}")
    if len(data) > MAX_DATAGRAM:
        raise DatagramError("oversized", f"{len(data)} bytes")
    magic, version, kind, session, seq, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DatagramError("magic", repr(magic))
    if zlib.crc32(data[HEADER.size :], zlib.crc32(data[:_CRC_AT])) != crc:
        raise DatagramError("crc", "CRC-32 does not match")
    if version != VERSION:
        raise DatagramError("version", str(version))
    if seq == 0:
        raise DatagramError("seq", "0 (a session counts from 1)")
    return Datagram(kind, session, seq, decode_body(kind, data[HEADER.size :]))


def decode_body(kind: int, payload: bytes) -> Body:
    """The body of one datagram, or of a message reassembled from fragments."""
    if kind in (RECORDS, RESYNC):
        try:
            records = decode_frame_payload(payload)
        except msgspec.DecodeError as e:
            raise DatagramError("payload", f"records: {e}") from e
        if not records:
            raise DatagramError("payload", "no records")
        return records
    if kind == CHECKPOINT:
        if not payload:
            raise DatagramError("payload", "empty checkpoint")
        return payload
    if kind == HEARTBEAT:
        if len(payload) != _HEARTBEAT.size:
            raise DatagramError("payload", f"heartbeat of {len(payload)} bytes")
        return Heartbeat(*_HEARTBEAT.unpack(payload))
    if kind == FRAGMENT:
        if len(payload) <= _FRAGMENT.size:
            raise DatagramError("payload", "fragment without data")
        message, part, parts, inner = _FRAGMENT.unpack_from(payload)
        if inner not in (RECORDS, RESYNC, CHECKPOINT) or not part < parts or parts < 2:
            raise DatagramError("payload", f"fragment {part}/{parts} of kind {inner}")
        return Fragment(message, part, parts, inner, payload[_FRAGMENT.size :])
    raise DatagramError("kind", str(kind))


@dataclass
class Framer:
    """Turns what the sender read into datagrams of at most `datagram_bytes`, numbering
    them; one per session (a sender start)."""

    session: int
    datagram_bytes: int
    seq: int = 0  # of the last datagram made
    _room: int = field(init=False)

    def __post_init__(self) -> None:
        if not MIN_DATAGRAM <= self.datagram_bytes <= MAX_DATAGRAM:
            raise ValueError(f"datagram_bytes {self.datagram_bytes} out of range")
        self._room = self.datagram_bytes - HEADER.size

    def records(self, records: Iterable[Record], kind: int = RECORDS) -> list[bytes]:
        """As few datagrams as the records fit in, in order; a record too large for one
        datagram alone is fragmented."""
        out: list[bytes] = []
        batch: list[bytes] = []
        size = _ARRAY16.size
        for record in records:
            encoded = _encoder.encode(record)
            if batch and size + len(encoded) > self._room:
                out.append(self._make(kind, _array(batch)))
                batch, size = [], _ARRAY16.size
            if _ARRAY16.size + len(encoded) > self._room:
                out += self._fragments(kind, _array([encoded]))
                continue
            batch.append(encoded)
            size += len(encoded)
        if batch:
            out.append(self._make(kind, _array(batch)))
        return out

    def checkpoint(self, entry: bytes) -> list[bytes]:
        if len(entry) <= self._room:
            return [self._make(CHECKPOINT, entry)]
        return self._fragments(CHECKPOINT, entry)

    def heartbeat(self, last_record_seq: int, sent: int) -> bytes:
        return self._make(HEARTBEAT, _HEARTBEAT.pack(last_record_seq & _U64, sent & _U64))

    def _make(self, kind: int, payload: bytes) -> bytes:
        self.seq += 1
        return encode(kind, self.session, self.seq, payload)

    def _fragments(self, kind: int, payload: bytes) -> list[bytes]:
        step = self._room - _FRAGMENT.size
        count = -(-len(payload) // step)
        if count > MAX_FRAGMENTS:
            raise ValueError(f"a message of {len(payload)} bytes needs {count} fragments")
        message = self.seq + 1
        return [
            self._make(
                FRAGMENT,
                _FRAGMENT.pack(message, i, count, kind) + payload[i * step : (i + 1) * step],
            )
            for i in range(count)
        ]


def _array(encoded: Sequence[bytes]) -> bytes:
    return _ARRAY16.pack(0xDC, len(encoded)) + b"".join(encoded)
