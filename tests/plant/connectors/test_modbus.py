"""The Modbus connector against real pymodbus servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from broker import policy
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.modbus import ModbusConnector, emit_groups
from broker.plant.connectors.modbus_plan import plan_reads
from broker.plant.connectors.registry import shared_state
from broker.plant.decode import decoder_for
from broker.policy import Device, Signal
from broker.sim.refrigeration import RefrigerationPlant
from tests.harness import DEMO_POLICY, eventually, free_port

pytestmark = pytest.mark.timeout(60)

DEMO = policy.load(DEMO_POLICY)
SIGNALS = [s for s in DEMO.signals if s.device == DEMO.devices[0].name]  # not derived ones
ROOM = "coldstore/storage/cold-room-1/temperature"


def device(port: int, poll_interval_s: float = 0.05, timeout_s: float = 0.5) -> Device:
    return msgspec.structs.replace(
        DEMO.devices[0], port=port, poll_interval_s=poll_interval_s, timeout_s=timeout_s
    )


class Collector:
    def __init__(self) -> None:
        self.batches: list[list[RawSample]] = []

    async def emit(self, samples: list[RawSample]) -> None:
        self.batches.append(samples)

    def last(self) -> dict[str, RawSample]:
        return {s.signal: s for s in self.batches[-1]} if self.batches else {}


@asynccontextmanager
async def running(connector: ModbusConnector, collector: Collector) -> AsyncIterator[None]:
    task = asyncio.create_task(connector.run(collector.emit))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_scan_reads_every_signal_with_the_values_the_plc_holds(
    plant_sim: RefrigerationPlant,
) -> None:
    await plant_sim.freeze()
    plant_sim.state.room_c = -20.4
    await plant_sim.publish()
    collector = Collector()
    async with running(ModbusConnector(device(plant_sim.address[1]), SIGNALS), collector):
        await eventually(lambda: collector.batches)
    samples = collector.last()
    assert set(samples) == {s.path for s in SIGNALS}
    assert all(s.quality == "good" for s in samples.values())
    room = next(s for s in SIGNALS if s.path == ROOM)
    assert decoder_for(room)(samples[ROOM].raw) == pytest.approx(-20.4)


async def test_an_unreachable_device_gives_bad_quality_then_recovers_when_it_appears() -> None:
    port = free_port()
    collector = Collector()
    async with running(ModbusConnector(device(port), SIGNALS), collector):
        await eventually(lambda: collector.batches)
        assert all(s.quality == "bad" and s.raw is None for s in collector.last().values())
        sim = RefrigerationPlant("127.0.0.1", port)
        await sim.start()
        try:
            await eventually(
                lambda: (
                    collector.last().get(ROOM, None) and collector.last()[ROOM].quality == "good"
                )
            )
        finally:
            await sim.stop()


async def test_a_server_restart_mid_run_marks_values_bad_then_values_resume() -> None:
    port = free_port()
    collector = Collector()
    sim = RefrigerationPlant("127.0.0.1", port)
    await sim.start()
    async with running(ModbusConnector(device(port), SIGNALS), collector):
        await eventually(
            lambda: collector.last().get(ROOM) and collector.last()[ROOM].quality == "good"
        )
        await sim.stop()
        await eventually(lambda: collector.last()[ROOM].quality == "bad")
        sim = RefrigerationPlant("127.0.0.1", port)
        await sim.start()
        try:
            await eventually(lambda: collector.last()[ROOM].quality == "good")
        finally:
            await sim.stop()


async def test_an_exception_response_marks_only_that_requests_signals_bad(
    plant_sim: RefrigerationPlant,
) -> None:
    missing = msgspec.convert(
        {"path": "coldstore/machine-room/compressor-1/oil_level", "device": "plc-machine-room",
         "source": {"protocol": "modbus", "table": "input_register", "address": 200,
                    "type": "uint16"}},
        Signal,
    )  # fmt: skip
    collector = Collector()
    async with running(
        ModbusConnector(device(plant_sim.address[1]), [*SIGNALS, missing]), collector
    ):
        await eventually(lambda: len(collector.batches) >= 3)
    samples = collector.last()
    assert samples[missing.path].quality == "bad"
    assert all(s.quality == "good" for p, s in samples.items() if p != missing.path)


async def test_a_slow_device_never_sees_overlapping_scans_and_missed_scans_are_counted() -> None:
    in_flight = 0
    most_in_flight = 0

    async def slow(
        fc: int, start: int, address: int, count: int, registers: list[int], values: object
    ) -> None:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        await asyncio.sleep(0.08)
        in_flight -= 1

    port = free_port()
    server = ModbusTcpServer(
        SimDevice(
            id=1, simdata=[SimData(0, count=40, values=0, datatype=DataType.REGISTERS)], action=slow
        ),
        address=("127.0.0.1", port),
    )
    await server.serve_forever(background=True)
    signals = [s for s in SIGNALS if s.source.table == "input_register"]  # 4 requests a scan
    connector = ModbusConnector(device(port, poll_interval_s=0.1), signals)
    collector = Collector()
    try:
        async with running(connector, collector):
            await eventually(lambda: connector.scans >= 3, timeout=20)
    finally:
        await server.shutdown()
    assert most_in_flight == 1
    assert connector.overruns >= 2 * connector.scans  # each ~0.32 s scan skips 2-3 slots of 0.1 s
    assert all(s.quality == "good" for s in collector.last().values())


async def test_a_response_with_fewer_items_than_asked_marks_bad_and_never_crashes() -> None:
    """A faulty PLC answers a 10-coil read with one byte (8 coils); pymodbus passes it on."""

    async def short_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(1000):  # bounded: the test ends long before
                header = await reader.readexactly(7)  # MBAP: tid, protocol, length, unit
                pdu = await reader.readexactly(int.from_bytes(header[4:6], "big") - 1)
                answer = bytes([pdu[0], 1, 0b1]) if pdu[0] == 1 else bytes([pdu[0] | 0x80, 1])
                writer.write(
                    header[:4] + len(answer + b"u").to_bytes(2, "big") + header[6:7] + answer
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(short_answers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    coils = [
        msgspec.convert(
            {
                "path": f"site/asset/coil{a}",
                "device": "plc-machine-room",
                "source": {"protocol": "modbus", "table": "coil", "address": a, "type": "bool"},
            },
            Signal,
        )
        for a in range(10)
    ]
    connector = ModbusConnector(device(port), coils)
    collector = Collector()
    try:
        async with running(connector, collector):
            await eventually(lambda: len(collector.batches) >= 3)
    finally:
        server.close()
        await server.wait_closed()
    assert all(s.quality == "bad" for s in collector.last().values())
    assert connector.scans >= 3  # the session stayed up: one bad answer is not a dead device


def _input_register(path: str, address: int) -> Signal:
    source = {"protocol": "modbus", "table": "input_register", "address": address, "type": "uint16"}
    return msgspec.convert({"path": path, "device": "plc", "source": source}, Signal)


def test_requests_linked_by_shared_state_fall_in_one_group_transitively() -> None:
    places = [("a", 0), ("a", 200), ("b", 400), ("c", 600)]
    signals = [_input_register(f"site/{asset}/r{address}", address) for asset, address in places]
    plan = plan_reads(signals, 1)
    assert len(plan) == 4  # gaps: a request each
    a0, a200, b400 = (s.path for s in signals[:3])
    groups = emit_groups(plan, [frozenset({a0, a200}), frozenset({a200, b400}), frozenset({"x"})])
    assert groups[0] == groups[1] == groups[2] != groups[3]
    assert len(set(emit_groups(plan, []))) == 4


async def test_each_request_is_handed_on_when_answered_unless_an_asset_spans_requests(
    plant_sim: RefrigerationPlant,
) -> None:
    apart = ModbusConnector(device(plant_sim.address[1]), SIGNALS, [])
    collector = Collector()
    async with running(apart, collector):
        await eventually(lambda: len(collector.batches) >= 2 * len(apart.plan))
    requests = [{slot.signal for slot in request.slots} for request in apart.plan]
    assert all({s.signal for s in batch} in requests for batch in collector.batches)
    # The demo's modelled assets read from every request: its scans stay one batch each, so
    # every record of a scan carries that scan's asset state.
    shared = shared_state(DEMO)
    together = ModbusConnector(device(plant_sim.address[1]), SIGNALS, shared)
    collector = Collector()
    async with running(together, collector):
        await eventually(lambda: len(collector.batches) >= 2)
    assert all(
        {s.signal for s in batch} == {s.path for s in SIGNALS} for batch in collector.batches
    )
