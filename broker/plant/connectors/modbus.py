"""Modbus TCP connector: coils, discrete inputs, holding and input registers, read-only.

Read-only by construction: the only Modbus functions this code base names are in
`READ_FUNCTIONS` (codes 1–4); it never sends a write function code. It never reads an
address that no signal names: a request covers only modelled addresses that touch or
overlap, so gaps are never bridged, even when bridging would save a request.

Scans of one device run one after another, never overlapping: a scan that overruns the
poll interval makes the connector skip the missed slots (counted) instead of queueing them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.pdu import ModbusPDU

from broker.errors import DeviceError
from broker.plant.connectors.base import Backoff, Emit, RawSample, raise_if_cancelled
from broker.policy import ModbusDevice, ModbusSource, Signal
from broker.policy.schema import BIT_TABLES, ModbusTable

# table → (function code, client method, most items one request may ask for)
READ_FUNCTIONS: dict[ModbusTable, tuple[int, str, int]] = {
    "coil": (1, "read_coils", 2000),
    "discrete_input": (2, "read_discrete_inputs", 2000),
    "holding_register": (3, "read_holding_registers", 125),
    "input_register": (4, "read_input_registers", 125),
}


@dataclass(frozen=True)
class Slot:
    signal: str
    offset: int  # position of the signal's first item in the response
    width: int


@dataclass(frozen=True)
class ReadRequest:
    table: ModbusTable
    address: int
    count: int
    slots: tuple[Slot, ...]

    @property
    def function_code(self) -> int:
        return READ_FUNCTIONS[self.table][0]


def _modbus(signal: Signal) -> ModbusSource:
    assert isinstance(signal.source, ModbusSource)  # parse checked it against the device
    return signal.source


def plan_reads(signals: Sequence[Signal]) -> list[ReadRequest]:
    """The fewest requests that read every modelled address and no other one."""
    by_table: dict[ModbusTable, list[Signal]] = defaultdict(list)
    for signal in signals:
        by_table[_modbus(signal).table].append(signal)
    requests: list[ReadRequest] = []
    for table, group in sorted(by_table.items()):
        limit = READ_FUNCTIONS[table][2]
        group.sort(key=lambda s: _modbus(s).address)
        start = end = -1
        members: list[Signal] = []
        for signal in group:
            s_start = _modbus(signal).address
            s_end = s_start + _modbus(signal).width
            if members and s_start <= end and max(end, s_end) - start <= limit:
                end = max(end, s_end)
            else:
                if members:
                    requests.append(_request(table, start, end, members))
                start, end, members = s_start, s_end, []
            members.append(signal)
        requests.append(_request(table, start, end, members))
    return requests


def _request(table: ModbusTable, start: int, end: int, members: list[Signal]) -> ReadRequest:
    slots = tuple(Slot(s.path, _modbus(s).address - start, _modbus(s).width) for s in members)
    return ReadRequest(table, start, end - start, slots)


def _items(response: ModbusPDU, request: ReadRequest) -> Sequence[int] | None:
    """The bits or registers of a response, None if it holds fewer than were asked for."""
    items = response.bits if request.table in BIT_TABLES else response.registers
    return items if len(items) >= request.count else None


class ModbusConnector:
    def __init__(self, device: ModbusDevice, signals: Sequence[Signal]) -> None:
        self._device = device
        self._signals = [s.path for s in signals]
        self.plan = plan_reads(signals)
        self.scans = 0
        self.overruns = 0  # scan slots skipped because the previous scan ran late
        self.errors = 0  # failed connections and reads
        self.last_scan_s = 0.0  # how long the last whole scan took
        self._refused: set[ReadRequest] = set()  # requests the device currently refuses
        self._log = structlog.get_logger("modbus").bind(device=device.name)

    async def run(self, emit: Emit) -> None:
        device = self._device
        backoff = Backoff(initial_s=min(1.0, device.poll_interval_s))
        loop = asyncio.get_running_loop()
        while True:
            client = AsyncModbusTcpClient(
                device.host,
                port=device.port,
                timeout=device.timeout_s,
                retries=0,
                reconnect_delay=0,  # reconnects are ours, with backoff and a log line
            )
            try:
                await self._connect(client)
                next_scan = loop.time()
                while True:
                    await emit(await self._scan(client))
                    backoff.reset()  # only a whole scan proves the device is back
                    next_scan = self._schedule(next_scan, loop.time())
                    await asyncio.sleep(next_scan - loop.time())
            except DeviceError as e:
                self.errors += 1
                self._log.warning("device_session_down", error=str(e))
                await emit(self._all_bad())
            finally:
                client.close()
            await asyncio.sleep(backoff.delay())

    async def _connect(self, client: AsyncModbusTcpClient) -> None:
        device = self._device
        connected = await client.connect()
        raise_if_cancelled()
        if not connected:
            raise DeviceError(f"cannot connect to {device.host}:{device.port}")
        self._log.info("device_session_up", host=device.host, port=device.port)

    async def _scan(self, client: AsyncModbusTcpClient) -> list[RawSample]:
        started = time.monotonic()
        samples: list[RawSample] = []
        for request in self.plan:
            samples.extend(await self._read(client, request))
        self.scans += 1
        self.last_scan_s = time.monotonic() - started
        return samples

    async def _read(self, client: AsyncModbusTcpClient, request: ReadRequest) -> list[RawSample]:
        raise_if_cancelled()
        method = getattr(client, READ_FUNCTIONS[request.table][1])
        try:
            response = await method(
                request.address, count=request.count, device_id=self._device.unit_id
            )
        except Exception as e:
            raise DeviceError(
                f"read of {request.table} {request.address}+{request.count}: {e!r}"
            ) from e
        now = datetime.now(UTC)
        items = None if response.isError() else _items(response, request)
        if items is None:
            self.errors += 1
            if request not in self._refused:  # logged (and audited) once per state change
                self._refused.add(request)
                self._log.warning(
                    "device_read_refused",
                    table=request.table,
                    address=request.address,
                    count=request.count,
                    reason="exception_response" if response.isError() else "short_response",
                    exception_code=getattr(response, "exception_code", None),
                )
            return [RawSample(slot.signal, None, now, "bad") for slot in request.slots]
        if request in self._refused:
            self._refused.discard(request)
            self._log.info("device_read_recovered", table=request.table, address=request.address)
        if request.table in BIT_TABLES:
            return [RawSample(s.signal, bool(items[s.offset]), now, "good") for s in request.slots]
        return [
            RawSample(s.signal, tuple(items[s.offset : s.offset + s.width]), now, "good")
            for s in request.slots
        ]

    def _schedule(self, planned: float, now: float) -> float:
        """The next scan time on the fixed grid; slots already missed are skipped and counted."""
        interval = self._device.poll_interval_s
        following = planned + interval
        if now > following:
            missed = math.ceil((now - following) / interval)
            self.overruns += missed
            self._log.warning("scan_overrun", skipped_scans=missed, total_skipped=self.overruns)
            following += missed * interval
        return following

    def _all_bad(self) -> list[RawSample]:
        now = datetime.now(UTC)
        return [RawSample(path, None, now, "bad") for path in self._signals]
