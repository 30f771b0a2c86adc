"""The plant half's connectors: one device failing in a way nobody expected stays with it.

Two devices read from a real Modbus PLC (the demo simulator). One of them gets a fault
injected (a patched method raising, because no real part raises an arbitrary exception on
demand); the other keeps producing good values throughout, and the half keeps reading.
A real `dmzbroker plant` takes a policy reload adding an OPC UA device (a real asyncua
server) that its appliance config cannot serve: that device alone is bad until fixed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
import yaml
from prometheus_client.parser import text_string_to_metric_families

from broker import policy
from broker.audit.catalogue import EVENTS
from broker.channel.spool import SpoolSender
from broker.metrics import PLANT_FILE
from broker.plant import run
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.modbus import ModbusConnector
from broker.plant.maintenance import MaintenanceBook
from broker.plant.run import PlantHalf
from broker.policy import Policy
from broker.sim.refrigeration import RefrigerationPlant
from tests.harness import DEMO_POLICY, BrokerProcess, Deployment, Owners, eventually, sign_policy
from tests.plant.connectors.opcua_server import OpcUaPki, OpcUaTestServer, make_pki

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

    async def glitching(self: ModbusConnector, clients: Any, emit: Any) -> None:
        if self._device.name == "plc-a" and faults["left"]:
            faults["left"] -= 1
            raise RegisterMapGlitch("the PLC's register map changed under the library")
        await scan(self, clients, emit)

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


@pytest.fixture(scope="module")
def opcua_pki(tmp_path_factory: pytest.TempPathFactory) -> OpcUaPki:
    return make_pki(tmp_path_factory.mktemp("opcua-pki"))


def device_metric(spool: Path, name: str, device: str) -> float:
    """A device's counter in the metrics file the plant half writes every 2 s (0 before)."""
    try:
        text = (spool / PLANT_FILE).read_text()
    except FileNotFoundError:
        return 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"dmzbroker_device_{name}_total" and sample.labels == {
                "device": device
            }:
                return sample.value
    return 0.0


def events_of(process: BrokerProcess, event: str, **fields: object) -> list[dict[str, Any]]:
    entries = (json.loads(line) for line in process.events() if line.startswith("{"))
    return [
        e
        for e in entries
        if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
    ]


@pytest.mark.timeout(120)
async def test_a_reload_adding_a_device_the_config_cannot_serve_leaves_the_rest_reading(
    deployment: Deployment,
    owners: Owners,
    opcua_pki: OpcUaPki,
    start_broker: Callable[[str, Path], BrokerProcess],
) -> None:
    """A new policy names an OPC UA device whose trust list file is not a certificate: that
    device is bad (logged and audited once), the Modbus device keeps reading, the half keeps
    running; once the file is fixed the device comes up without a restart."""
    trust_file = deployment.directory / "opcua-trust.pem"
    trust_file.write_text("not a certificate\n")
    config = yaml.safe_load(deployment.config.read_text())
    config["plant"]["opcua"] = {
        "certificate": str(opcua_pki.client_cert),
        "private_key": str(opcua_pki.client_key),
        "trust_list": [str(trust_file)],
    }
    deployment.config.write_text(yaml.safe_dump(config))
    modbus = deployment.document["devices"][0]["name"]
    plant = start_broker("plant", deployment.config)
    spool = deployment.directory / "spool"
    await eventually(lambda: device_metric(spool, "scans", modbus) > 0, timeout=30)
    server = OpcUaTestServer(opcua_pki, {"Power": 2.5})
    await server.start()
    try:
        document = dict(deployment.document, version=2)
        document["devices"] = [
            *document["devices"],
            {"name": "ua-plc", "protocol": "opcua", "endpoint": server.endpoint,
             "poll_interval_s": 0.2, "timeout_s": 2.0},
        ]  # fmt: skip
        document["signals"] = [
            *document["signals"],
            {"path": "coldstore/ua/plc/power", "device": "ua-plc",
             "source": {"protocol": "opcua", "node": server.node("Power")}},
        ]  # fmt: skip
        signed = sign_policy(deployment.directory, document, [owners.ot_key, owners.it_key], "v2")
        os.replace(signed, deployment.policy)
        await eventually(lambda: events_of(plant, "policy_accepted", version=2), timeout=30)
        await eventually(lambda: device_metric(spool, "errors", "ua-plc") >= 2, timeout=30)
        scans = device_metric(spool, "scans", modbus)
        await eventually(lambda: device_metric(spool, "scans", modbus) > scans + 5, timeout=30)
        assert plant.process.poll() is None  # the half kept running
        assert device_metric(spool, "scans", "ua-plc") == 0  # never read: never built

        shutil.copy(opcua_pki.ca, trust_file)  # the operator fixes the file: no restart
        await eventually(lambda: events_of(plant, "device_session_up", device="ua-plc"), 30)
        await eventually(lambda: device_metric(spool, "scans", "ua-plc") > 0, timeout=30)
        assert plant.process.poll() is None
    finally:
        await server.stop()
    (failed,) = events_of(plant, "device_connector_failed", device="ua-plc")  # once
    assert failed["stage"] == "build" and str(trust_file) in failed["error"], failed
    assert "not a readable certificate" in failed["error"]
    assert {"device_connector_failed", "device_connector_recovered"} <= set(EVENTS)  # audited
    assert events_of(plant, "device_connector_recovered", device="ua-plc")
    assert not events_of(plant, "device_connector_failed", device=modbus)


async def test_connectors_wait_while_the_queue_holds_its_samples_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run, "QUEUE_SAMPLES", 3)
    sender = SpoolSender(tmp_path / "spool", segment_bytes=1 << 20, retention_bytes=1 << 24)
    try:
        half = PlantHalf(sender, DEMO, MaintenanceBook(None))
        batch = [RawSample("a/b/c", None, datetime.now(UTC), "bad")] * 2
        await half._put(batch)
        await half._put(batch)  # 2 < 3 queued: goes in, however large the batch
        blocked = asyncio.create_task(half._put(batch))
        await asyncio.sleep(0)
        assert not blocked.done() and half._queue.qsize() == 2  # 4 >= 3: waits
        half._taken(len(half._queue.get_nowait()))
        await asyncio.wait_for(blocked, 10)
        assert half._queue.qsize() == 2
    finally:
        sender.close()
