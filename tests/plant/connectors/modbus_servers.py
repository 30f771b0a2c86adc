"""Servers for the Modbus connector tests, each started and stopped by the test that uses it,
and what the tests observe of a running connector.

`Gateway` is a real pymodbus server with several unit ids that records what it is asked and
can be made slow or made to refuse; `silent_server` accepts connections and never answers,
which no real server does on purpose.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from broker.plant.connectors.base import RawSample
from broker.plant.connectors.modbus import ModbusConnector
from broker.policy import ModbusDevice, Signal
from tests import harness
from tests.harness import free_port

REGISTERS = 300  # per table and unit id; input register i of unit u holds u * 1000 + i


def register_value(unit_id: int, address: int) -> int:
    return unit_id * 1000 + address


def values(unit_id: int) -> list[int]:
    return [register_value(unit_id, a) for a in range(REGISTERS)]


@dataclass(frozen=True)
class Request:
    at: float  # loop time of arrival
    unit_id: int
    function_code: int
    address: int
    count: int


@dataclass
class Gateway:
    """Unit ids behind one Modbus TCP address, as a serial gateway or a PLC rack presents them."""

    units: Sequence[int] = (1,)
    delay_s: float = 0.0  # how long each read takes
    refuse: dict[int, ExcCodes] = field(default_factory=dict)  # unit id → its answer to reads
    silent: set[int] = field(default_factory=set)  # units that do not answer until `wake()`
    port: int = field(default_factory=free_port)
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    _woken: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        devices = [
            SimDevice(
                id=unit,
                simdata=(
                    [SimData(0, count=REGISTERS, values=False, datatype=DataType.BITS)],
                    [SimData(0, count=REGISTERS, values=False, datatype=DataType.BITS)],
                    [SimData(0, values=values(unit), datatype=DataType.REGISTERS)],
                    [SimData(0, values=values(unit), datatype=DataType.REGISTERS)],
                ),
                action=functools.partial(self._serve, unit),
            )
            for unit in self.units
        ]
        self._server = ModbusTcpServer(
            devices,
            address=("127.0.0.1", self.port),
            trace_pdu=self._trace,
            trace_connect=self._connected,
        )

    def wake(self) -> None:
        """The silent units answer again."""
        self.silent.clear()
        self._woken.set()

    async def __aenter__(self) -> Gateway:
        await self._server.serve_forever(background=True)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._server.shutdown()  # type: ignore[no-untyped-call]

    async def _serve(self, unit: int, *_: Any) -> ExcCodes | None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if unit in self.silent:  # a dead slave: the answer comes (late) after `wake()`
                await self._woken.wait()
        finally:
            self.in_flight -= 1
        return self.refuse.get(unit)

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests.append(
                Request(
                    asyncio.get_running_loop().time(),
                    pdu.dev_id,
                    pdu.function_code,
                    getattr(pdu, "address", -1),
                    getattr(pdu, "count", 0),
                )
            )
        return pdu

    def _connected(self, connected: bool) -> None:
        self.connections += connected


@dataclass
class Silent:
    port: int
    accepted: list[float] = field(default_factory=list)  # loop time of each connection


@asynccontextmanager
async def silent_server() -> AsyncIterator[Silent]:
    """Accepts TCP connections, reads what is sent, never answers: a hung device."""
    silent = Silent(0)

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.accepted.append(asyncio.get_running_loop().time())
        try:
            while await reader.read(4096):  # until the client gives up and closes
                pass
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    silent.port = server.sockets[0].getsockname()[1]
    try:
        yield silent
    finally:
        server.close()
        await server.wait_closed()


def modbus_device(port: int, name: str = "plc", **budget: Any) -> ModbusDevice:
    fields = {"poll_interval_s": 0.05, "timeout_s": 0.5, **budget}
    return msgspec.convert(
        {"protocol": "modbus", "name": name, "host": "127.0.0.1", "port": port, **fields},
        ModbusDevice,
    )


def input_registers(
    addresses: Sequence[int], unit_id: int | None = None, device: str = "plc"
) -> list[Signal]:
    """One uint16 signal per address, named after its unit id and address."""
    unit = {} if unit_id is None else {"unit_id": unit_id}
    return [
        msgspec.convert(
            {
                "path": f"site/{device}/u{unit_id or 'default'}-ir{address}",
                "device": device,
                "source": {
                    "protocol": "modbus",
                    "table": "input_register",
                    "address": address,
                    "type": "uint16",
                    **unit,
                },
            },
            Signal,
        )
        for address in addresses
    ]


class Scans:
    """What a connector emitted, with the loop time of each batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, list[RawSample]]] = []

    async def emit(self, samples: list[RawSample]) -> None:
        self.batches.append((asyncio.get_running_loop().time(), samples))

    def good(self) -> list[float]:
        return [t for t, batch in self.batches if all(s.quality == "good" for s in batch)]

    def bad(self) -> list[float]:
        return [t for t, batch in self.batches if all(s.quality == "bad" for s in batch)]


def running(*pairs: tuple[ModbusConnector, Scans]) -> AbstractAsyncContextManager[None]:
    """Each connector in its own task, as the plant half runs them."""
    return harness.running(*(c.run(scans.emit) for c, scans in pairs))


@contextmanager
def events() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as logs:
        yield logs


def named(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == event]
