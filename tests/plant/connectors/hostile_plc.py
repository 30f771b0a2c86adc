"""A hostile Modbus/TCP "PLC" for the connector tests, on 127.0.0.1.

It parses each request with scapy (`ModbusADURequest`) and answers it the way its current
misbehaviour says, building the answer with scapy too: wrong transaction or protocol ids,
length fields that lie, truncated frames, byte counts that disagree with the request, other
function codes, unknown exception codes, frames for requests never sent, a slow drip, a flood
of garbage. `behaviour = "healthy"` answers correctly, so a test can switch mid-run and watch
the connector recover.

Every register a hostile answer carries holds `HOSTILE`; no healthy answer ever does, so a
test can prove that nothing from a wrong answer was taken as data. The server records each
request; leaving it fails if any request was not a read (function codes 1–4).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from scapy.contrib.modbus import (
    ModbusADURequest,
    ModbusADUResponse,
    ModbusPDU01ReadCoilsResponse,
    ModbusPDU02ReadDiscreteInputsResponse,
    ModbusPDU03ReadHoldingRegistersError,
    ModbusPDU03ReadHoldingRegistersResponse,
    ModbusPDU04ReadInputRegistersResponse,
    ModbusPDU06WriteSingleRegisterResponse,
    ModbusPDUUserDefinedFunctionCodeResponse,
)
from scapy.packet import Packet

HOSTILE = 0xDEAD  # in every register of a hostile answer, never in a healthy one
READS = frozenset({1, 2, 3, 4})
UNPROMPTED_TID = 1000  # added to a request's transaction id: an id the client has not used


def healthy_register(address: int) -> int:
    return 0x1000 + address


def healthy_bit(address: int) -> bool:
    return address % 3 == 0


@dataclass(frozen=True)
class Asked:
    """One request as scapy parsed it."""

    tid: int
    unit: int
    function: int
    address: int
    count: int


@dataclass(frozen=True)
class Reply:
    """What the PLC sends back: chunks written `gap_s` apart, then maybe it hangs up."""

    chunks: Sequence[bytes]
    gap_s: float = 0.0
    close: bool = False


def _pack_bits(bits: Sequence[bool]) -> list[int]:
    """Modbus bit order: the first bit is the least significant bit of the first byte."""
    return [
        sum(1 << i for i, bit in enumerate(bits[start : start + 8]) if bit)
        for start in range(0, len(bits), 8)
    ]


_REGISTER_RESPONSES = {
    3: ModbusPDU03ReadHoldingRegistersResponse,
    4: ModbusPDU04ReadInputRegistersResponse,
}
_BIT_RESPONSES = {1: ModbusPDU01ReadCoilsResponse, 2: ModbusPDU02ReadDiscreteInputsResponse}


def _pdu(
    asked: Asked, values: Sequence[int] | None = None, function: int | None = None, **fields: object
) -> Packet:
    """A read response to `asked`: its healthy values unless `values` (registers) are given."""
    function = asked.function if function is None else function
    if function in _BIT_RESPONSES:
        bits = [healthy_bit(asked.address + i) for i in range(asked.count)]
        if values is not None:
            bits = [True] * len(values)
        return _BIT_RESPONSES[function](coilStatus=_pack_bits(bits), **fields)
    if values is None:
        values = [healthy_register(asked.address + i) for i in range(asked.count)]
    return _REGISTER_RESPONSES[function](registerVal=list(values), **fields)


def _frame(asked: Asked, pdu: Packet | bytes, **mbap: object) -> bytes:
    header = {"transId": asked.tid, "unitId": asked.unit, **mbap}
    return bytes(ModbusADUResponse(**header) / pdu)


def _hostile(count: int) -> list[int]:
    return [HOSTILE] * count


def _exception(asked: Asked, code: int, function: int | None = None) -> bytes:
    function = asked.function if function is None else function
    return _frame(
        asked, ModbusPDU03ReadHoldingRegistersError(funcCode=function | 0x80, exceptCode=code)
    )


def _healthy(asked: Asked) -> Reply:
    return Reply([_frame(asked, _pdu(asked))])


def _garbage(asked: Asked) -> Reply:
    noise = random.Random(asked.tid)
    return Reply([noise.randbytes(1024) for _ in range(64)])


def _cut(frame: bytes) -> bytes:
    return frame[: len(frame) // 2]


# misbehaviour → how it answers a request
BEHAVIOURS: dict[str, Callable[[Asked], Reply]] = {
    "healthy": _healthy,
    "wrong_transaction_id": lambda a: Reply(
        [_frame(a, _pdu(a, _hostile(a.count)), transId=(a.tid + 1) % 0x10000 or 1)]
    ),
    "zero_transaction_id": lambda a: Reply([_frame(a, _pdu(a, _hostile(a.count)), transId=0)]),
    "wrong_protocol_id": lambda a: Reply([_frame(a, _pdu(a, _hostile(a.count)), protoId=1)]),
    "length_too_long": lambda a: Reply(
        [_frame(a, _pdu(a, _hostile(a.count)), len=3 + 2 * a.count + 10)]
    ),
    "length_too_short": lambda a: Reply(
        [_frame(a, _pdu(a, _hostile(a.count)), len=3 + 2 * a.count - 2)]
    ),
    "truncated_then_close": lambda a: Reply(
        [_cut(_frame(a, _pdu(a, _hostile(a.count))))], close=True
    ),
    "truncated_then_silence": lambda a: Reply([_cut(_frame(a, _pdu(a, _hostile(a.count))))]),
    "more_items": lambda a: Reply([_frame(a, _pdu(a, _hostile(a.count + 8)))]),
    "fewer_items": lambda a: Reply([_frame(a, _pdu(a, _hostile(max(1, a.count - 8))))]),
    "odd_byte_count": lambda a: Reply(
        [_frame(a, _pdu(a, _hostile(a.count), byteCount=2 * a.count + 1) / b"\xde")]
    ),
    "byte_count_beyond_frame": lambda a: Reply(
        [_frame(a, _pdu(a, _hostile(a.count), byteCount=2 * a.count + 4))]
    ),
    "other_function_code": lambda a: Reply(
        [_frame(a, _pdu(a, _hostile(a.count), function=4 if a.function == 3 else 3))]
    ),
    "unknown_function_code": lambda a: Reply(
        [_frame(a, ModbusPDUUserDefinedFunctionCodeResponse(funcCode=0x41, mb_payload=b"\xde\xad"))]
    ),
    "write_function_code": lambda a: Reply(
        [
            _frame(
                a,
                ModbusPDU06WriteSingleRegisterResponse(
                    registerAddr=a.address, registerValue=HOSTILE
                ),
            )
        ]
    ),
    "exception_code_0x0c": lambda a: Reply([_exception(a, 0x0C)]),
    "exception_code_0x7f": lambda a: Reply([_exception(a, 0x7F)]),
    "exception_for_other_function": lambda a: Reply([_exception(a, 0x02, function=a.function + 1)]),
    "exception_without_code": lambda a: Reply([_frame(a, bytes([a.function | 0x80]))]),
    "other_unit_id": lambda a: Reply(
        [_frame(a, _pdu(a, _hostile(a.count)), unitId=(a.unit + 1) % 256)]
    ),
    "unprompted_around": lambda a: Reply(
        [
            _frame(a, _pdu(a, _hostile(a.count)), transId=a.tid + UNPROMPTED_TID),
            _frame(a, _pdu(a)),
            _frame(a, _pdu(a, _hostile(a.count)), transId=a.tid + 2 * UNPROMPTED_TID),
        ]
    ),
    "unprompted_zero_tid_first": lambda a: Reply(
        [_frame(a, _pdu(a, _hostile(a.count)), transId=0), _frame(a, _pdu(a))]
    ),
    "slow_drip": lambda a: Reply(
        [bytes([b]) for b in _frame(a, _pdu(a, _hostile(a.count)))], gap_s=0.3
    ),
    "garbage_flood": _garbage,
    # a connection's first request (pymodbus numbers each client's from 1) answered well, the
    # rest with transaction id 0: a device that passes one scan per connection, then fails
    "healthy_once_per_connection": lambda a: (
        _healthy(a) if a.tid == 1 else Reply([_frame(a, _pdu(a, _hostile(a.count)), transId=0)])
    ),
}


@dataclass
class HostilePLC:
    """An asyncio TCP server on a free port of 127.0.0.1, misbehaving as `behaviour` says."""

    behaviour: str = "healthy"
    hostile_units: frozenset[int] | None = None  # the unit ids that misbehave; None: all
    requests: list[Asked] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    served: list[str] = field(default_factory=list)  # the behaviour each request met
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _closing: bool = False

    def answered(self, behaviour: str) -> int:
        """How many requests met `behaviour`."""
        return self.served.count(behaviour)

    async def __aenter__(self) -> HostilePLC:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        self._closing = True
        for writer in self._writers:
            writer.transport.abort()
        if self._handlers:  # each ends at its next read, write or pause
            await asyncio.wait(self._handlers, timeout=5)
        await self._server.wait_closed()
        writes = sorted({r.function for r in self.requests} - READS)
        assert not writes, f"the connector sent function codes {writes}, which are not reads"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            for _ in range(100_000):  # bounded: a test ends long before
                asked = await self._next_request(reader)
                self.requests.append(asked)
                hostile = self.hostile_units is None or asked.unit in self.hostile_units
                behaviour = self.behaviour if hostile else "healthy"
                self.served.append(behaviour)
                reply = BEHAVIOURS[behaviour](asked)
                for i, chunk in enumerate(reply.chunks):
                    if i and reply.gap_s:
                        await asyncio.sleep(reply.gap_s)  # the device's pace, not a test's wait
                    if self._closing:
                        return
                    writer.write(chunk)
                    await writer.drain()
                if reply.close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up, as it should after a wrong answer
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()

    @staticmethod
    async def _next_request(reader: asyncio.StreamReader) -> Asked:
        header = await reader.readexactly(6)  # transaction id, protocol id, length
        length = int.from_bytes(header[4:6], "big")
        assert 2 <= length <= 254, f"a request with an MBAP length of {length}"
        adu = ModbusADURequest(header + await reader.readexactly(length))
        pdu = adu.payload
        return Asked(
            adu.transId,
            adu.unitId,
            pdu.funcCode,
            getattr(pdu, "startAddr", -1),
            getattr(pdu, "quantity", 0),
        )
