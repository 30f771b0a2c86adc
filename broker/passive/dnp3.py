"""DNP3 in a capture: what a master asked an outstation and what the outstation answered,
read from the in-order bytes of each direction of a TCP connection (streams.Chunk).

Link frames are checked as the standard says (header and block CRCs, dnp3_frames.crc16),
transport segments reassembled per direction and link-address pair (dnp3_frames.Reassembler),
responses decoded by dnp3_objects.parse_response, requests by dnp3_requests. A master's
READ gives one Request per range of points it names, or one for its class poll; a control or
any other function that changes an outstation (WRITE, SELECT, OPERATE, FREEZE, restarts,
unsolicited on/off, ...) gives Request(write=True), and an OPERATE or DIRECT_OPERATE of a
binary or analog output the Values it wrote. Who is the outstation comes from the frames (a request goes to it, a
response comes from it), not from the TCP ports: an outstation may be the one that dialled.

Nothing here sends or answers a frame (it only reads a file's bytes). Bad input is never an
exception: it is one warning, and the reader resyncs on the next frame start (05 64).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Final

from broker.passive.dnp3_requests import (
    CONTROL_OBJECTS,
    CONTROLS,
    FUNCTIONS,
    OPERATES,
    READ_ONLY,
    Header,
    commanded,
    object_headers,
    reads,
)
from broker.passive.observations import Observation, Request, Values, Warnings
from broker.passive.streams import Chunk
from broker.plant.connectors.dnp3_frames import (
    MAX_FRAGMENT,
    PRI_CONFIRMED_USER_DATA,
    PRI_UNCONFIRMED_USER_DATA,
    PRM,
    START,
    FrameError,
    Reassembler,
    crc16,
)
from broker.plant.connectors.dnp3_objects import (
    RESPONSE,
    UNSOLICITED_RESPONSE,
    Point,
    parse_response,
)

MAX_DIRECTIONS: Final = 20_000  # directions of connections followed; least recently used go
MAX_FRAGMENTS: Final = 4_096  # fragments in progress in all (each at most MAX_FRAGMENT bytes)

_HEADER = 10  # start, length, control, destination, source, CRC
_BLOCK = 16
_USER_DATA = (PRI_CONFIRMED_USER_DATA, PRI_UNCONFIRMED_USER_DATA)
_Key = tuple[str, int, str, int]  # a direction's src host, port, dst host, port (cheap to hash)


class _Direction:
    """What one direction of one connection still owes a frame: bytes of a frame cut short."""

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.buffer = b""
        self.offset = 0  # bytes of the direction before the buffer: where a warning is
        # after a gap or a bad header, bytes before the next frame start are expected
        self.resyncing = False
        # transport reassembly per (source, destination) link address, least recently used
        # first: kept with its direction, so a gap drops them without a look at the others
        self.fragments: OrderedDict[tuple[int, int], Reassembler] = OrderedDict()


class Dnp3Reader:
    """Requests and Values from the DNP3 chunks of a capture's TCP connections."""

    def __init__(self, warnings: Warnings) -> None:
        self._warnings = warnings
        self._directions: OrderedDict[_Key, _Direction] = OrderedDict()
        # the directions with fragments in progress, the one least recently added to first
        self._holding: OrderedDict[_Key, _Direction] = OrderedDict()
        self._fragment_count = 0  # their fragments in all

    def feed(self, chunk: Chunk, from_client: bool) -> list[Observation]:
        """What `chunk` completes. `from_client` is not needed: the frames say who sent them."""
        key = (chunk.src.host, chunk.src.port, chunk.dst.host, chunk.dst.port)
        state = self._directions.pop(key, None) or _Direction(key)
        self._directions[key] = state
        if len(self._directions) > MAX_DIRECTIONS:
            self._drop_fragments(self._directions.popitem(last=False)[0])
            self._warnings.add("DNP3 connections beyond the reader's bound", _where(chunk, 0))
        if chunk.gap:
            self._resync(chunk, state)
        observations: list[Observation] = []
        for source, destination, tpdu, at in self._frames(chunk, state):
            apdu = self._reassemble(chunk, state, (source, destination), tpdu, at)
            if apdu is not None:
                observations += self._apdu(chunk, source, destination, apdu, at)
        return observations

    def _resync(self, chunk: Chunk, state: _Direction) -> None:
        """Bytes are missing before this chunk: a frame or fragment in progress is lost."""
        if state.buffer:
            self._warnings.add(
                "DNP3 frame cut by a gap in the capture", _where(chunk, state.offset)
            )
            state.offset += len(state.buffer)
            state.buffer = b""
        state.resyncing = True
        self._drop_fragments(state.key)

    def _drop_fragments(self, key: _Key) -> None:
        """Forget the fragments in progress of one direction."""
        state = self._holding.pop(key, None)
        if state is not None:
            self._fragment_count -= len(state.fragments)
            state.fragments.clear()

    def _frames(self, chunk: Chunk, state: _Direction) -> Iterator[tuple[int, int, bytes, int]]:
        """(source, destination, user data, byte offset) of each good frame carrying data."""
        buffer = state.buffer + chunk.data
        pos = 0
        while True:
            start = buffer.find(START, pos)
            if start < 0:  # a last 05 may begin the next frame's start
                start = len(buffer) - 1 if buffer.endswith(START[:1]) else len(buffer)
            if start > pos:
                if not state.resyncing:
                    where = _where(chunk, state.offset + pos)
                    self._warnings.add("DNP3 bytes that are no frame", where)
                pos = start
            if len(buffer) - pos < _HEADER:
                break
            header = buffer[pos : pos + _HEADER]
            if header[2] < 5 or int.from_bytes(header[8:10], "little") != crc16(header[:8]):
                where = _where(chunk, state.offset + pos)
                self._warnings.add("DNP3 frame header CRC or length wrong", where)
                state.resyncing = True  # what follows is that frame's data: no more warnings
                pos += len(START)
                continue
            user = header[2] - 5
            size = _HEADER + user + 2 * -(-user // _BLOCK)
            if len(buffer) - pos < size:
                break
            data = _user_data(buffer[pos + _HEADER : pos + size])
            at = state.offset + pos
            pos += size
            state.resyncing = False
            if data is None:
                self._warnings.add("DNP3 frame data CRC wrong", _where(chunk, at))
                continue
            control = header[3]
            # secondary frames (ACK, link status) and link services carry no application data
            if control & PRM and control & 0x0F in _USER_DATA and data:
                yield (
                    int.from_bytes(header[6:8], "little"),
                    int.from_bytes(header[4:6], "little"),
                    data,
                    at,
                )
        state.buffer = buffer[pos:]  # less than one frame (at most 292 bytes)
        state.offset += pos

    def _reassemble(
        self, chunk: Chunk, state: _Direction, pair: tuple[int, int], tpdu: bytes, at: int
    ) -> bytes | None:
        reassembler = state.fragments.pop(pair, None)
        if reassembler is None:
            reassembler = Reassembler()
            self._fragment_count += 1
        state.fragments[pair] = reassembler
        self._holding[state.key] = state
        self._holding.move_to_end(state.key)
        if self._fragment_count > MAX_FRAGMENTS:
            # the least recently used pair of the direction least recently added to
            oldest_key, oldest = next(iter(self._holding.items()))
            oldest.fragments.popitem(last=False)
            self._fragment_count -= 1
            if not oldest.fragments:
                del self._holding[oldest_key]
        try:
            return reassembler.add(tpdu)
        except FrameError:
            self._warnings.add(f"DNP3 fragment over {MAX_FRAGMENT} bytes", _where(chunk, at))
            return None

    def _apdu(
        self, chunk: Chunk, source: int, destination: int, apdu: bytes, at: int
    ) -> list[Observation]:
        if len(apdu) < 2:
            self._warnings.add("DNP3 fragment without a function code", _where(chunk, at))
            return []
        function = apdu[1]
        if function < len(FUNCTIONS):
            return self._request(chunk, source, destination, apdu, at) if function else []
        if function in (RESPONSE, UNSOLICITED_RESPONSE):
            return self._response(chunk, source, apdu, at)
        if function != RESPONSE + 2:  # 131 answers an authentication: no data
            self._warnings.add(f"DNP3 function {function} unknown", _where(chunk, at))
        return []

    def _response(self, chunk: Chunk, outstation: int, apdu: bytes, at: int) -> list[Observation]:
        try:
            response = parse_response(apdu)
        except FrameError as e:
            self._warnings.add("DNP3 response malformed", f"{_where(chunk, at)}: {e}")
            return []
        for skipped in response.skipped:
            self._warnings.add(
                "DNP3 response objects not decoded", f"{_where(chunk, at)}: {skipped}"
            )
        return list(_values(response.points, chunk, outstation))

    def _request(
        self, chunk: Chunk, master: int, outstation: int, apdu: bytes, at: int
    ) -> list[Observation]:
        name = FUNCTIONS[apdu[1]]
        headers: list[Header] = []
        if name == "READ" or name in CONTROLS:
            try:  # the headers before a bad one are kept
                headers.extend(object_headers(apdu, controls=name in CONTROLS))
            except FrameError as e:
                self._warnings.add(f"DNP3 {name} request not read", f"{_where(chunk, at)}: {e}")
        said = f"(master {master})"

        def request(table: str, start: int, count: int, function: str) -> Request:
            return Request(
                protocol="dnp3",
                time=chunk.time,
                client=chunk.src.host,
                server=chunk.dst,
                unit=outstation,
                table=table,
                start=start,
                count=count,
                function=f"{function} {said}",
                write=name not in READ_ONLY,
            )

        if name == "READ":
            return reads(headers, request)
        if name in READ_ONLY:
            return []  # asks for no point and changes nothing
        observations: list[Observation] = []
        for header in headers if name in CONTROLS else []:
            _, table = CONTROL_OBJECTS[header.group, header.variation]
            for index, body in zip(header.indexes or (), header.objects, strict=True):
                observations.append(request(str(table), index, 1, name))
                value = commanded(header, body) if name in OPERATES else None
                if value is not None:
                    written = Values(
                        "dnp3", chunk.time, chunk.dst, outstation, str(table), index, (value,),
                        written=True,
                    )  # fmt: skip
                    observations.append(written)
        return observations or [request("", 0, 0, name)]


def _where(chunk: Chunk, at: int) -> str:
    return f"{chunk.src} → {chunk.dst} at byte {at}"


def _user_data(blocks: bytes) -> bytes | None:
    """A frame's user data from its CRC'd 16-byte blocks; None when a CRC is wrong."""
    data = bytearray()
    for start in range(0, len(blocks), _BLOCK + 2):
        block = blocks[start : start + _BLOCK + 2]
        if int.from_bytes(block[-2:], "little") != crc16(block[:-2]):
            return None
        data += block[:-2]
    return bytes(data)


def _values(points: list[Point], chunk: Chunk, outstation: int) -> Iterator[Values]:
    """One Values per run of consecutive indexes of one static group, in order."""
    run: list[Point] = []
    for point in [*points, None]:
        if point is not None and run:
            last = run[-1]
            if point.group == last.group and point.index == last.index + 1:
                run.append(point)
                continue
        if run:
            first = run[0]
            yield Values(
                "dnp3", chunk.time, chunk.src, outstation, str(first.group), first.index,
                tuple(p.value for p in run),
            )  # fmt: skip
        run = [point] if point is not None else []
