"""Modbus/TCP in a capture: turns the in-order bytes of each direction of a connection into
the `Request`s a poller sent and the `Values` the answers (and the poller's writes) carried.

It reads bytes someone else captured; it never sends, and it never answers anything. Bad input
(a header that is not MBAP, a frame whose length does not fit its function, an answer that
does not fit its question, bytes lost in the capture) is one `Warnings.add` and the reader goes
on with the next frame it can trust. What it holds is bounded: per direction, less than one
frame (260 bytes); per connection, `max_pending` unanswered requests, and `max_pending_total`
in all (about 240 bytes each); `max_connections` connections. The least recently seen goes
first, with a warning.

Framing: an MBAP header (transaction id, protocol id 0, length 2..254, unit id) and the PDU.
At a direction's first bytes (the capture may start mid-frame), after a gap in the capture and
after a header that is not MBAP, a frame start is trusted only when its function code is a
public one and the whole frame has the length its function gives (`_asked`, `_fits`): this is
what finds the frame boundary in a stream of unknown bytes. So a direction whose every frame
uses a private function code is never read (they are not reads or writes discovery can use).

Matching: an answer is matched to the pending request of its connection with its transaction
id, unit id and function code. Lost bytes (a chunk with `gap`) end what can be matched: a gap
in the requests drops the pending requests, and a gap in the answers drops them too unless
the requests had a gap since the last answers came (so both directions of a new connection on
the same ports, each starting with a gap, keep the requests it sent). So an old connection's
request is never answered by a new one's answer; what it costs is the answers, due when
bytes were lost, to requests a poller had in flight.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import NamedTuple

from broker.passive.observations import Observation, Peer, Request, Value, Values, Warnings
from broker.passive.streams import Chunk
from broker.plant.connectors.modbus_plan import READ_FUNCTIONS

_HEADER = struct.Struct(">HHHB")  # transaction id, protocol id, length, unit id
_TWO_WORDS = struct.Struct(">HH")  # address and quantity, or address and value
_MANY = struct.Struct(">HHB")  # address, quantity, byte count of the values that follow
_MAX_FRAME = 260  # MBAP header (7) + the longest PDU (253)
_EXCEPTION = 0x80
# Read function code → (table, most items one request may ask for), from the planner's table.
_READS = {fc: (table, limit) for table, (fc, _method, limit) in READ_FUNCTIONS.items()}
_BIT_READS = frozenset(
    fc for fc, (table, _) in _READS.items() if table in ("coil", "discrete_input")
)
# Every public function code (Modbus Application Protocol 1.1b3, section 6): after lost bytes,
# only a frame with one of these is trusted as a frame start.
_PUBLIC = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 15, 16, 17, 20, 21, 22, 23, 24, 43})
# The public functions besides 1-4 and 23 that only read (exception status, event counter and
# log, server id, file record, FIFO queue, device identification). Any other function may
# change the device (diagnostics restart, file writes, mask write, a private code): write=True.
_ONLY_READ = frozenset({7, 11, 12, 17, 20, 24, 43})
# Quantity limits of the functions that set values (section 6.11, 6.12, 6.17).
_MAX_COILS_SET = 1968
_MAX_REGISTERS_SET = 123
_MAX_REGISTERS_SET_IN_23 = 121
_COIL_ON, _COIL_OFF = 0xFF00, 0x0000
# bits of one data byte, least significant first, as Modbus packs them
_BITS_OF = [tuple(bool(byte >> i & 1) for i in range(8)) for byte in range(256)]


class _Asked(NamedTuple):
    """What one request asked for: the range its answer carries, the values it sets."""

    function: int
    read: tuple[str, int, int] | None  # table, start, count
    written: tuple[str, int, tuple[Value, ...]] | None  # table, start, values


class _Frame(NamedTuple):
    at: int  # offset of its first byte in its direction, for warnings
    tid: int  # transaction id
    unit: int
    pdu: bytes


@dataclass(slots=True)
class _Direction:
    buffer: bytes = b""  # the first bytes of a frame not yet complete (< _MAX_FRAME)
    offset: int = 0  # bytes of this direction seen so far, for `where` in warnings
    # Whether the buffer starts where a frame starts. Not at first: a capture may begin
    # mid-connection, mid-frame. Until then a frame start must look like one.
    synced: bool = False
    told: bool = False  # bytes skipped since synced was lost were warned about


@dataclass(slots=True)
class _Connection:
    requests: _Direction = field(default_factory=_Direction)
    answers: _Direction = field(default_factory=_Direction)
    # (transaction id, unit id, function code) → (when, what was asked), oldest first
    pending: OrderedDict[tuple[int, int, int], tuple[float, _Asked]] = field(
        default_factory=OrderedDict
    )
    asked_since: float = -math.inf  # time of the requests' last gap: later ones are whole
    answered_at: float = -math.inf  # time of the last answers


class ModbusReader:
    """Modbus/TCP frames of every connection fed to it, in capture order per direction."""

    def __init__(
        self,
        warnings: Warnings,
        *,
        max_connections: int = 10_000,
        max_pending: int = 256,
        max_pending_total: int = 65_536,
    ) -> None:
        self._warnings = warnings
        self._max_connections = max_connections
        self._max_pending = max_pending
        self._max_pending_total = max_pending_total
        self._pending_total = 0
        # (client host, port, server host, port): hashing plain tuples is cheaper than Peers
        self._connections: OrderedDict[tuple[str, int, str, int], _Connection] = OrderedDict()

    def feed(self, chunk: Chunk, from_client: bool) -> list[Observation]:
        client, server = (chunk.src, chunk.dst) if from_client else (chunk.dst, chunk.src)
        connection = self._connection(client, server)
        side = connection.requests if from_client else connection.answers
        if chunk.gap:
            if side.buffer:
                self._warn("Modbus frame cut by a gap in the capture", chunk, side.offset)
            side.buffer, side.synced, side.told = b"", False, False
            self._unmatchable(connection, chunk.time, from_client)
        found: list[Observation] = []
        for frame in self._frames(side, chunk, from_client):
            if from_client:
                found += self._request(connection, chunk, frame)
            else:
                found += self._answer(connection, chunk, frame)
        if not from_client:
            connection.answered_at = chunk.time
        return found

    def _unmatchable(self, connection: _Connection, time: float, from_client: bool) -> None:
        """Drop the pending requests bytes lost at `time` leave unmatchable (see the module
        docstring): what was asked before a gap in the requests, and before a gap in the
        answers unless the requests had one since the answers last came."""
        pending = connection.pending
        if from_client:
            connection.asked_since = time
        if not pending:
            return
        if from_client:
            kept = {}
        elif connection.asked_since > connection.answered_at:
            kept = {k: v for k, v in pending.items() if v[0] >= connection.asked_since}
        else:
            kept = {}
        self._pending_total -= len(pending) - len(kept)
        connection.pending = OrderedDict(kept)

    def _connection(self, client: Peer, server: Peer) -> _Connection:
        key = (client.host, client.port, server.host, server.port)
        connection = self._connections.get(key)
        if connection is None:
            connection = self._connections[key] = _Connection()
            if len(self._connections) > self._max_connections:
                _, forgotten = self._connections.popitem(last=False)
                self._pending_total -= len(forgotten.pending)
                self._warnings.add(
                    f"Modbus connections beyond {self._max_connections}: least recently seen "
                    "forgotten",
                    f"{client} → {server}",
                )
        else:
            self._connections.move_to_end(key)
        return connection

    def _frames(self, side: _Direction, chunk: Chunk, from_client: bool) -> list[_Frame]:
        """The complete frames the buffer and the chunk hold; what is left of an incomplete
        frame stays in the buffer."""
        data = side.buffer + chunk.data
        base = side.offset - len(side.buffer)  # offset of data[0] in this direction
        side.offset += len(chunk.data)
        frames = []
        pos, end = 0, len(data)
        while end - pos > _HEADER.size:  # a header and a function code
            tid, protocol, length, unit = _HEADER.unpack_from(data, pos)
            function = data[pos + _HEADER.size]
            mbap = protocol == 0 and 2 <= length <= _MAX_FRAME - 6
            if side.synced and not mbap:
                self._warn("Modbus header invalid (protocol id or length)", chunk, base + pos)
                side.synced, side.told = False, True
            if not side.synced and (not mbap or (function & ~_EXCEPTION) not in _PUBLIC):
                self._skip(side, chunk, base + pos)
                pos += 1
                continue
            if pos + 6 + length > end:
                break
            pdu = data[pos + _HEADER.size : pos + 6 + length]
            if not side.synced and not _fits(pdu, from_client):
                self._skip(side, chunk, base + pos)
                pos += 1
                continue
            side.synced, side.told = True, False
            frames.append(_Frame(base + pos, tid, unit, pdu))
            pos += 6 + length
        side.buffer = data[pos:]
        return frames

    def _skip(self, side: _Direction, chunk: Chunk, at: int) -> None:
        if not side.told:  # once until a frame is found: the gap or the bad header is the news
            self._warn("Modbus bytes skipped to find where a frame starts", chunk, at)
            side.told = True

    def _request(self, connection: _Connection, chunk: Chunk, frame: _Frame) -> list[Observation]:
        function, unit, server = frame.pdu[0], frame.unit, chunk.dst
        asked = _asked(frame.pdu)
        if asked is None:
            self._warn(f"Modbus FC{function} request malformed", chunk, frame.at)
            return []
        self._expect(connection, (frame.tid, unit, function), asked, chunk, frame.at)

        def request(table: str, start: int, count: int, write: bool) -> Request:
            return Request(
                "modbus", chunk.time, chunk.src.host, server, unit, table, start, count,
                f"FC{function}", write,
            )  # fmt: skip

        found: list[Observation] = []
        if asked.read is not None:
            found.append(request(*asked.read, write=False))
        if asked.written is not None:
            table, start, values = asked.written
            found.append(request(table, start, len(values), write=True))
            found.append(
                Values("modbus", chunk.time, server, unit, table, start, values, written=True)
            )
        if not found:
            self._warn(f"Modbus function {function} seen (not a read or write)", chunk, frame.at)
            found.append(request("", 0, 0, write=function not in _ONLY_READ))
        return found

    def _expect(
        self,
        connection: _Connection,
        key: tuple[int, int, int],
        asked: _Asked,
        chunk: Chunk,
        at: int,
    ) -> None:
        pending = connection.pending
        if pending.pop(key, None) is not None:
            self._warn("Modbus request not answered (its transaction id was used again)", chunk, at)
            self._pending_total -= 1
        pending[key] = (chunk.time, asked)
        self._pending_total += 1
        if len(pending) > self._max_pending:
            pending.popitem(last=False)
            self._pending_total -= 1
            self._warn(
                f"Modbus requests unanswered beyond {self._max_pending} on one connection: "
                "oldest forgotten",
                chunk,
                at,
            )
        if self._pending_total > self._max_pending_total:
            self._forget_pending(chunk, at)

    def _forget_pending(self, chunk: Chunk, at: int) -> None:
        """Forget the unanswered requests of the least recently seen connections, down to
        three quarters of the bound, so that the walk over connections is rare."""
        self._warn(
            f"Modbus requests unanswered beyond {self._max_pending_total} in all: those of the "
            "least recently seen connections forgotten",
            chunk,
            at,
        )
        for connection in self._connections.values():
            if self._pending_total <= self._max_pending_total * 3 // 4:
                break
            self._pending_total -= len(connection.pending)
            connection.pending.clear()

    def _answered(self, connection: _Connection, key: tuple[int, int, int]) -> _Asked | None:
        entry = connection.pending.pop(key, None)
        if entry is None:
            return None
        self._pending_total -= 1
        return entry[1]

    def _answer(self, connection: _Connection, chunk: Chunk, frame: _Frame) -> list[Observation]:
        pdu, unit = frame.pdu, frame.unit
        function = pdu[0] & ~_EXCEPTION
        asked = self._answered(connection, (frame.tid, unit, function))
        if pdu[0] & _EXCEPTION:
            code = pdu[1] if len(pdu) > 1 else 0
            self._warn(f"Modbus exception {code} to FC{function} at unit {unit}", chunk, frame.at)
            return []
        if asked is None:
            self._warn("Modbus answer to no request seen", chunk, frame.at)
            return []
        if asked.read is None:  # the echo of a write, or another function's answer
            return []
        table, start, count = asked.read
        values = _read_values(pdu, asked.function, count)
        if values is None:
            self._warn(f"Modbus FC{function} answer does not fit its request", chunk, frame.at)
            return []
        return [Values("modbus", chunk.time, chunk.src, unit, table, start, values)]

    def _warn(self, kind: str, chunk: Chunk, at: int) -> None:
        self._warnings.add(kind, f"{chunk.src} → {chunk.dst} at byte {at}")


def _asked(pdu: bytes) -> _Asked | None:
    """What a request PDU asks for; None when it is malformed (its length or a quantity is
    not what its function allows). A function besides reads and writes: neither range."""
    parse = _REQUESTS.get(pdu[0])
    if parse is None:
        return _Asked(pdu[0], None, None)
    try:
        return parse(pdu)
    except struct.error:  # shorter than its function's fields
        return None


def _read(pdu: bytes) -> _Asked | None:
    start, count = _TWO_WORDS.unpack_from(pdu, 1)
    table, limit = _READS[pdu[0]]
    if len(pdu) != 5 or not _in_range(start, count, limit):
        return None
    return _Asked(pdu[0], (table, start, count), None)


def _set_one(pdu: bytes) -> _Asked | None:
    at, value = _TWO_WORDS.unpack(pdu[1:])
    if pdu[0] == 6:
        return _Asked(6, None, ("holding_register", at, (value,)))
    if value not in (_COIL_ON, _COIL_OFF):
        return None
    return _Asked(5, None, ("coil", at, (value == _COIL_ON,)))


def _set_many(pdu: bytes) -> _Asked | None:
    written = _written(pdu, 1)
    return None if written is None else _Asked(pdu[0], None, written)


def _read_and_set(pdu: bytes) -> _Asked | None:
    start, count = _TWO_WORDS.unpack_from(pdu, 1)
    written = _written(pdu, 5)
    if written is None or not _in_range(start, count, _READS[3][1]):
        return None
    return _Asked(23, ("holding_register", start, count), written)


def _written(pdu: bytes, offset: int) -> tuple[str, int, tuple[Value, ...]] | None:
    """The coils (FC 15) or registers (FC 16, 23) a request sets from `offset` on: address,
    quantity, byte count, values."""
    at, quantity, byte_count = _MANY.unpack_from(pdu, offset)
    first = offset + _MANY.size
    if len(pdu) != first + byte_count:
        return None
    if pdu[0] == 15:
        if byte_count != (quantity + 7) // 8 or not _in_range(at, quantity, _MAX_COILS_SET):
            return None
        return ("coil", at, _bits(pdu[first:], quantity))
    limit = _MAX_REGISTERS_SET if pdu[0] == 16 else _MAX_REGISTERS_SET_IN_23
    if byte_count != 2 * quantity or not _in_range(at, quantity, limit):
        return None
    return ("holding_register", at, struct.unpack_from(f">{quantity}H", pdu, first))


_REQUESTS: dict[int, Callable[[bytes], _Asked | None]] = {
    **dict.fromkeys(_READS, _read),
    5: _set_one,
    6: _set_one,
    15: _set_many,
    16: _set_many,
    23: _read_and_set,
}


def _fits(pdu: bytes, from_client: bool) -> bool:
    """Whether a frame has the length its function gives it: what a frame start found after
    lost bytes must show before it is trusted."""
    if from_client:
        return _asked(pdu) is not None
    function, size = pdu[0], len(pdu)
    if function & _EXCEPTION:
        return size == 2
    if function in _READS or function == 23:
        return size >= 2 and size == 2 + pdu[1]
    if function in (5, 6, 15, 16):
        return size == 5
    return True


def _read_values(pdu: bytes, function: int, count: int) -> tuple[Value, ...] | None:
    """The bits or words a read's answer carries; None when they do not fit the request."""
    if len(pdu) < 2 or len(pdu) != 2 + pdu[1]:
        return None
    if function in _BIT_READS:
        return _bits(pdu[2:], count) if pdu[1] == (count + 7) // 8 else None
    return struct.unpack_from(f">{count}H", pdu, 2) if pdu[1] == 2 * count else None


def _bits(data: bytes, count: int) -> tuple[bool, ...]:
    return tuple(chain.from_iterable(_BITS_OF[byte] for byte in data))[:count]


def _in_range(start: int, count: int, limit: int) -> bool:
    return 1 <= count <= limit and start + count <= 0x10000
