"""A spool that is behind never pauses a Modbus scan between its requests (ADR 0032): the
scan's reads go back to back, its groups wait for room after the last one, and
`last_scan_s` is the device's time, not the spool's."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from broker.plant.connectors.base import RawSample
from broker.plant.connectors.modbus import ModbusConnector
from tests.harness import eventually
from tests.plant.connectors.modbus_servers import Gateway, input_registers, modbus_device

pytestmark = pytest.mark.timeout(60)


class HeldSpool:
    """An `emit` that waits until released, as `PlantHalf._put` does while the spool is
    behind; it records each batch when it is handed on and when it is taken."""

    def __init__(self) -> None:
        self.handed: list[list[RawSample]] = []
        self.taken: list[list[RawSample]] = []
        self.room = asyncio.Event()

    async def emit(self, samples: list[RawSample]) -> None:
        self.handed.append(samples)
        await self.room.wait()
        self.taken.append(samples)


async def test_a_held_spool_leaves_the_scans_reads_back_to_back_and_out_of_its_time() -> None:
    # Three requests (gaps between the addresses); the asset of 0 and 4 needs both in one
    # batch, so the plan's groups interleave: {0, 4} and {2}, and {2} is complete first.
    signals = input_registers([0, 2, 4])
    asset = frozenset({signals[0].path, signals[2].path})
    spool = HeldSpool()
    async with Gateway() as gateway:
        # One connection, one scan in the test's time: the next slot is 60 s away.
        device = modbus_device(gateway.port, poll_interval_s=60, max_connections=1)
        connector = ModbusConnector(device, signals, [asset])
        assert len(connector.plan) == 3
        task = asyncio.create_task(connector.run(spool.emit))
        try:
            # Request 2's group waits for the spool, and request 4 is read all the same.
            await eventually(lambda: len(gateway.requests) == 3 and connector.last_scan_s > 0)
            assert [r.address for r in gateway.requests] == [0, 2, 4]
            assert [[s.signal for s in batch] for batch in spool.handed] == [[signals[1].path]]
            assert spool.taken == [] and connector.scans == 0  # the scan waits for room now
            scan_s = connector.last_scan_s  # timed before the spool's wait ended
            released = datetime.now(UTC)
            spool.room.set()
            await eventually(lambda: connector.scans == 1)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    # Both groups went on in the order they were completed, the asset's whole and read
    # before the spool had room again; the wait did not count as the device's time.
    assert [{s.signal for s in batch} for batch in spool.taken] == [{signals[1].path}, asset]
    assert all(s.quality == "good" and s.source_time < released for s in spool.taken[1])
    assert connector.last_scan_s == scan_s
    assert len(gateway.requests) == 3  # no scan began while the spool was behind
