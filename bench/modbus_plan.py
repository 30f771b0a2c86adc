"""Benchmark: Modbus transactions per scan, counted at a real pymodbus server, against the plan.

For each map (the demo policy; a generated map of 1,000 signals over several unit ids, with
gaps, overlaps, bits in registers, 64-bit values, strings and runs longer than one request),
it runs the real `ModbusConnector` against a pymodbus server on loopback for a number of
scans and counts the requests the server receives per scan. It prints that figure beside the
planner's count, an independent lower bound (each gap-free block of modelled addresses needs
at least ceil(length / limit) requests): when the plan equals it, the plan is a minimum.
Run: `.venv/bin/python bench/modbus_plan.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from collections import defaultdict
from collections.abc import Sequence

import msgspec
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from support import REPO, free_port

from broker import policy
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.modbus import ModbusConnector
from broker.plant.connectors.modbus_plan import READ_FUNCTIONS, modbus_source, plan_reads
from broker.policy import ModbusDevice, Signal

TABLES = list(READ_FUNCTIONS)  # coil, discrete_input, holding_register, input_register
REGISTER_TYPES = ["int16", "uint16", "int32", "float32", "float64", "uint64", "string", "bool"]


def generated_map(count: int, units: int, seed: int) -> list[Signal]:
    """A plant-like register map: runs of values with gaps, some overlaps and long runs."""
    rng = random.Random(seed)
    cursor: dict[tuple[int, str], int] = defaultdict(int)
    signals = []
    for n in range(count):
        unit = rng.randint(1, units)
        table = rng.choices(TABLES, weights=[1, 1, 4, 4])[0]
        source: dict[str, object] = {"table": table, "unit_id": unit}
        if table in ("coil", "discrete_input"):
            source["type"], width = "bool", 1
        else:
            kind = rng.choice(REGISTER_TYPES)
            source["type"] = kind
            width = {"int32": 2, "float32": 2, "float64": 4, "uint64": 4}.get(kind, 1)
            if kind == "string":
                width = source["length"] = rng.randint(4, 16)
            if kind == "bool":
                source["bit"] = rng.randint(0, 15)
        gap = rng.choice([0] * 80 + [1, 2, 5, 40])
        overlap = cursor[unit, table] > 0 and rng.random() < 0.05
        address = cursor[unit, table] - (1 if overlap else 0) + (0 if overlap else gap)
        source["address"] = address
        cursor[unit, table] = max(cursor[unit, table], address + width)
        signals.append(
            msgspec.convert(
                {
                    "path": f"site/area/unit{unit}/s{n}",
                    "device": "plc",
                    "source": {"protocol": "modbus", **source},
                },
                Signal,
            )
        )
    return signals


def lower_bound(signals: Sequence[Signal], default_unit: int) -> tuple[int, int]:
    """Gap-free blocks of modelled addresses, and the requests no plan can go below: per block,
    its length over the request limit."""
    modelled: dict[tuple[int, str], set[int]] = defaultdict(set)
    for signal in signals:
        source = modbus_source(signal)
        unit = source.unit_id if source.unit_id is not None else default_unit
        modelled[unit, source.table].update(range(source.address, source.address + source.width))
    blocks = bound = 0
    for (_, table), addresses in modelled.items():
        ordered = sorted(addresses)
        block = 1
        for previous, address in zip(ordered, [*ordered[1:], None], strict=True):
            if address == previous + 1:
                block += 1
            else:
                blocks += 1
                bound += math.ceil(block / READ_FUNCTIONS[table][2])
                block = 1
    return blocks, bound


class CountingServer:
    """A pymodbus server with every unit id and address the map names; counts requests."""

    def __init__(self, signals: Sequence[Signal], default_unit: int, port: int) -> None:
        size: dict[int, int] = defaultdict(lambda: 1)
        for signal in signals:
            source = modbus_source(signal)
            unit = source.unit_id if source.unit_id is not None else default_unit
            size[unit] = max(size[unit], source.address + source.width)
        devices = [
            SimDevice(
                id=unit,
                simdata=(
                    [SimData(0, count=end, values=False, datatype=DataType.BITS)],
                    [SimData(0, count=end, values=False, datatype=DataType.BITS)],
                    [SimData(0, count=end, values=0, datatype=DataType.REGISTERS)],
                    [SimData(0, count=end, values=0, datatype=DataType.REGISTERS)],
                ),
            )
            for unit, end in sorted(size.items())
        ]
        self.requests = 0
        self._server = ModbusTcpServer(devices, address=("127.0.0.1", port), trace_pdu=self._trace)

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        self.requests += not sending
        return pdu

    async def __aenter__(self) -> CountingServer:
        await self._server.serve_forever(background=True)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._server.shutdown()  # type: ignore[no-untyped-call]


async def measure(name: str, signals: list[Signal], unit_id: int, scans: int) -> None:
    port = free_port()
    # A server on loopback, not a PLC: the budget is raised to its maximum so that the scan
    # time measured is the connector's, not the default budget's pacing (20 requests/s).
    device = msgspec.convert(
        {"protocol": "modbus", "name": "plc", "host": "127.0.0.1", "port": port,
         "unit_id": unit_id, "poll_interval_s": 0.05, "timeout_s": 5.0,
         "max_requests_per_s": 10_000},
        ModbusDevice,
    )  # fmt: skip
    planned = len(plan_reads(signals, unit_id))
    per_scan: list[int] = []
    async with CountingServer(signals, unit_id, port) as server:
        seen = 0
        done = asyncio.Event()

        async def emit(samples: list[RawSample]) -> None:
            nonlocal seen
            if any(s.quality != "good" for s in samples):
                raise SystemExit(f"{name}: a scan was not all good")
            per_scan.append(server.requests - seen)
            seen = server.requests
            if len(per_scan) >= scans:
                done.set()

        connector = ModbusConnector(device, signals)
        started = time.perf_counter()
        task = asyncio.create_task(connector.run(emit))
        try:
            await asyncio.wait_for(done.wait(), timeout=120)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elapsed = time.perf_counter() - started
    units = len({modbus_source(s).unit_id or unit_id for s in signals})
    measured = sorted(set(per_scan))
    blocks, bound = lower_bound(signals, unit_id)
    print(
        f"| {name} | {len(signals):,} | {units} | {blocks} | {bound} "
        f"| {planned} | {', '.join(map(str, measured))} | {connector.last_scan_s * 1000:.1f} ms "
        f"| {len(per_scan)} in {elapsed:.1f} s |"
    )
    if measured != [planned]:
        raise SystemExit(f"{name}: the server saw {measured} requests per scan, planned {planned}")


async def run(args: argparse.Namespace) -> None:
    demo = policy.load(REPO / "policies" / "refrigeration.yaml")
    print(
        "| map | signals | unit ids | gap-free blocks | lower bound | planned "
        "| requests per scan at the server | last scan | scans |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    demo_device = demo.devices[0]
    assert isinstance(demo_device, ModbusDevice)
    demo_signals = [s for s in demo.signals if s.device == demo_device.name]
    await measure("demo policy", demo_signals, demo_device.unit_id, args.scans)
    generated = generated_map(args.signals, args.units, args.seed)
    await measure(f"generated (seed {args.seed})", generated, 1, args.scans)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signals", type=int, default=1000, help="in the generated map")
    parser.add_argument("--units", type=int, default=4, help="unit ids in the generated map")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--scans", type=int, default=20)
    asyncio.run(run(parser.parse_args()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
