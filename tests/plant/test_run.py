"""The plant half's connectors: one device failing in a way nobody expected stays with it.

Two devices read from a real Modbus PLC (the demo simulator). One of them gets a fault
injected (a patched method raising, because no real part raises an arbitrary exception on
demand); the other keeps producing good values throughout, and the half keeps reading.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog

from broker import policy
from broker.channel.spool import SpoolSender
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.modbus import ModbusConnector
from broker.plant.maintenance import MaintenanceBook
from broker.plant.run import PlantHalf
from broker.policy import Policy
from broker.sim.refrigeration import RefrigerationPlant
from tests.harness import DEMO_POLICY, eventually

pytestmark = pytest.mark.timeout(60)

DEMO = policy.load(DEMO_POLICY)


class RegisterMapGlitch(Exception):
    """Not a DeviceError: nothing in the connector expects it."""


def two_devices(port: int) -> Policy:
    """The demo PLC read as two devices, `plc-a` and `plc-b`, each with its own signals."""
    plc = msgspec.structs.replace(DEMO.devices[0], port=port, poll_interval_s=0.1)
    read = [s for s in DEMO.signals if s.device == plc.name]
    signals = [
        msgspec.structs.replace(s, device=name, path=s.path.replace("coldstore", name))
        for name in ("plc-a", "plc-b")
        for s in read
    ]
    devices = [msgspec.structs.replace(plc, name=name) for name in ("plc-a", "plc-b")]
    return msgspec.structs.replace(DEMO, devices=devices, signals=signals)


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


async def test_an_unexpected_exception_in_one_connector_leaves_the_other_devices_reading(
    plant_sim: RefrigerationPlant,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    events: list[dict[str, Any]],
) -> None:
    faults = {"left": 2}
    scan = ModbusConnector._scan

    async def glitching(self: ModbusConnector, clients: Any) -> list[RawSample]:
        if self._device.name == "plc-a" and faults["left"]:
            faults["left"] -= 1
            raise RegisterMapGlitch("the PLC's register map changed under the library")
        return await scan(self, clients)

    monkeypatch.setattr(ModbusConnector, "_scan", glitching)
    sender = SpoolSender(tmp_path / "spool", segment_bytes=1 << 20, retention_bytes=1 << 24)
    half = PlantHalf(sender, DEMO, MaintenanceBook(None))
    latest: dict[str, RawSample] = {}
    seen: list[RawSample] = []

    async def drain() -> None:  # the spool writer's place: take each scan off the queue
        while True:
            batch = await half._queue.get()
            seen.extend(batch)
            latest.update((s.signal, s) for s in batch)

    def quality(device: str) -> set[str]:
        return {s.quality for path, s in latest.items() if path.startswith(device)}

    reading = asyncio.create_task(half._read(two_devices(plant_sim.address[1])))
    draining = asyncio.create_task(drain())
    try:
        await eventually(lambda: quality("plc-a") == {"bad"}, timeout=10)
        b_while_a_down = len([s for s in seen if s.signal.startswith("plc-b")])
        await eventually(lambda: quality("plc-a") == {"good"}, timeout=20)  # after 1 + 2 s
        b_during = [s for s in seen if s.signal.startswith("plc-b")]
        assert not reading.done()  # the half's connectors never stopped
    finally:
        reading.cancel()
        draining.cancel()
        await asyncio.gather(reading, draining, return_exceptions=True)
        sender.close()
    assert faults["left"] == 0
    assert len(b_during) > b_while_a_down  # plc-b kept scanning while plc-a was failing
    assert {s.quality for s in b_during} == {"good"}  # and never noticed
    failed = [e for e in events if e["event"] == "device_connector_failed"]
    assert [e["device"] for e in failed] == ["plc-a"]  # once for two failures
    assert "RegisterMapGlitch: the PLC's register map changed" in failed[0]["error"]
    recovered = [e["device"] for e in events if e["event"] == "device_connector_recovered"]
    assert recovered == ["plc-a"]
    assert half._devices["plc-a"].errors == 2 and half._devices["plc-b"].errors == 0
