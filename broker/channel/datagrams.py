"""The diode's datagram format (ADR 0019): encode on the OT host, decode on the IT host.

Sans-io: bytes in, bytes or typed values out; no socket, no clock. Every datagram stands
alone, so one lost datagram loses only what it carried:

    magic b"DD" | u8 version | u8 kind | u64 session | u64 seq | u32 CRC-32 | payload

The CRC-32 covers the 20 header bytes before it and the payload. `session` is random per
sender start; `seq` counts every datagram of a session from 1 (copies of one datagram share
it). Kinds and payloads:
- RECORDS, RESYNC: a MessagePack array of records (a spool frame's payload before ADR 0030;
  the shared-context map is refused here), as many as fit; RESYNC records are latest values
  sent again, below the live seq.
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

from broker.records import Record, decode_record_array

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


class Header(NamedTuple):
    kind: int
    session: int
    seq: int


def check(data: bytes) -> Header:
    """One datagram's header, checked with its CRC, the payload not parsed (the receiver
    holds the bytes and parses them when it releases them); raises DatagramError only."""
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
    if kind not in KIND_NAMES:
        raise DatagramError("kind", str(kind))
    return Header(kind, session, seq)


def decode(data: bytes) -> Datagram:
    """One datagram, checked and parsed; raises DatagramError (only) on anything else."""
    kind, session, seq = check(data)
    return Datagram(kind, session, seq, decode_body(kind, data[HEADER.size :]))


def decode_body(kind: int, payload: bytes) -> Body:
    """The body of one datagram, or of a message reassembled from fragments."""
    if kind in (RECORDS, RESYNC):
        try:
            records = decode_record_array(payload)
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


class Piece(NamedTuple):
    """A datagram's content before it is numbered: the sender queues these and numbers
    each one as it goes on the wire, so the wire order is the seq order (ADR 0019)."""

    kind: int  # RECORDS, RESYNC, CHECKPOINT, or FRAGMENT (then `inner` is the message's kind)
    payload: bytes  # a fragment's: its slice of the message
    last_record_seq: int = 0  # the highest record seq it completes, 0 if none
    part: int = 0  # FRAGMENT only: 0-based index, count, the message's kind
    parts: int = 0
    inner: int = 0


@dataclass
class Framer:
    """Turns what the sender read into datagrams of at most `datagram_bytes`; one per
    session (a sender start). `pieces`/`checkpoint_pieces` cut, `number` numbers: a
    sender queues pieces and numbers each one when it sends it."""

    session: int
    datagram_bytes: int
    seq: int = 0  # of the last datagram numbered
    _room: int = field(init=False)
    _message: int = field(init=False, default=0)  # seq of the current message's part 0

    def __post_init__(self) -> None:
        if not MIN_DATAGRAM <= self.datagram_bytes <= MAX_DATAGRAM:
            raise ValueError(f"datagram_bytes {self.datagram_bytes} out of range")
        self._room = self.datagram_bytes - HEADER.size

    def pieces(self, records: Iterable[Record], kind: int = RECORDS) -> list[Piece]:
        """As few pieces as the records fit in, in order; a record too large for one
        datagram alone is fragmented."""
        out: list[Piece] = []
        batch: list[bytes] = []
        size = _ARRAY16.size
        last = 0
        for record in records:
            encoded = _encoder.encode(record)
            if batch and size + len(encoded) > self._room:
                out.append(Piece(kind, _array(batch), last))
                batch, size = [], _ARRAY16.size
            last = record.seq
            if _ARRAY16.size + len(encoded) > self._room:
                out += self._fragments(kind, _array([encoded]), last)
                continue
            batch.append(encoded)
            size += len(encoded)
        if batch:
            out.append(Piece(kind, _array(batch), last))
        return out

    def checkpoint_pieces(self, entry: bytes) -> list[Piece]:
        if len(entry) <= self._room:
            return [Piece(CHECKPOINT, entry)]
        return self._fragments(CHECKPOINT, entry, 0)

    def number(self, piece: Piece) -> bytes:
        """The datagram of one piece, with the session's next seq. A message's fragments
        must be numbered in order; others may come between them (a heartbeat)."""
        self.seq += 1
        if piece.kind != FRAGMENT:
            return encode(piece.kind, self.session, self.seq, piece.payload)
        if piece.part == 0:
            self._message = self.seq
        head = _FRAGMENT.pack(self._message, piece.part, piece.parts, piece.inner)
        return encode(FRAGMENT, self.session, self.seq, head + piece.payload)

    def records(self, records: Iterable[Record], kind: int = RECORDS) -> list[bytes]:
        """`pieces`, numbered at once."""
        return [self.number(p) for p in self.pieces(records, kind)]

    def checkpoint(self, entry: bytes) -> list[bytes]:
        """`checkpoint_pieces`, numbered at once."""
        return [self.number(p) for p in self.checkpoint_pieces(entry)]

    def heartbeat(self, last_record_seq: int, sent: int) -> bytes:
        payload = _HEARTBEAT.pack(last_record_seq & _U64, sent & _U64)
        return self.number(Piece(HEARTBEAT, payload))

    def _fragments(self, kind: int, payload: bytes, last: int) -> list[Piece]:
        step = self._room - _FRAGMENT.size
        count = -(-len(payload) // step)
        if count > MAX_FRAGMENTS:
            raise ValueError(f"a message of {len(payload)} bytes needs {count} fragments")
        return [
            Piece(FRAGMENT, payload[i * step : (i + 1) * step], last, i, count, kind)
            for i in range(count)
        ]


def _array(encoded: Sequence[bytes]) -> bytes:
    return _ARRAY16.pack(0xDC, len(encoded)) + b"".join(encoded)
