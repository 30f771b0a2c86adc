"""`dmzbroker validate` on DNP3 and BACnet devices: a DNP3 outstation read by events and a
BACnet device read by COV emit every signal at every poll (docs/specs/component.md), so they
are judged by their poll interval like any polled device (docs/model.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from broker.config import PlantConfig
from broker.plant import validate
from broker.policy import BacnetDevice, Dnp3Device, parse
from broker.sim.bacnet_device import SimObject, SimulatedBacnetDevice
from tests.harness import free_udp_port
from tests.plant.connectors.dnp3_outstation import CountingProxy, Dnp3Outstation

pytestmark = pytest.mark.timeout(60)

POLL_S = 0.2
READ_S = 3.0  # 15 polls


@pytest.mark.parametrize(
    "device",
    [
        Dnp3Device(name="rtu", host="h", outstation_address=10, read="events"),
        Dnp3Device(name="rtu", host="h", outstation_address=10),
        BacnetDevice(name="ahu", host="h", device_instance=1, read="cov", poll_interval_s=5),
        BacnetDevice(name="ahu", host="h", device_instance=1),
    ],
)
def test_dnp3_and_bacnet_devices_are_judged_by_their_poll_interval(device: Any) -> None:
    assert validate.cadence_s(device) == device.poll_interval_s


def policy_document(dnp3_port: int, bacnet_port: int) -> dict[str, Any]:
    return {
        "deployment_id": "validate",
        "version": 3,
        "expires": (datetime.now(UTC) + timedelta(days=30)).isoformat(),
        "devices": [
            {"name": "rtu", "protocol": "dnp3", "host": "127.0.0.1", "port": dnp3_port,
             "outstation_address": 1024, "read": "events", "poll_interval_s": POLL_S},
            {"name": "ahu", "protocol": "bacnet", "host": "127.0.0.1", "port": bacnet_port,
             "device_instance": 1001, "read": "cov", "poll_interval_s": POLL_S},
        ],
        "signals": [
            {"path": "site/well/pump/flow", "device": "rtu", "lifecycle": "proposed",
             "source": {"group": 30, "index": 0}},
            {"path": "site/well/pump/running", "device": "rtu",
             "source": {"group": 1, "index": 1}},
            {"path": "site/room/ahu/supply", "device": "ahu", "unit": "°C",
             "lifecycle": "proposed", "source": {"object_type": "analog-input", "instance": 1}},
            {"path": "site/room/ahu/door", "device": "ahu",
             "source": {"object_type": "binary-input", "instance": 2}},
        ],
    }  # fmt: skip


async def test_validate_reads_a_dnp3_outstation_and_a_bacnet_device_and_writes_to_neither(
    tmp_path: Path,
) -> None:
    room = SimulatedBacnetDevice(
        "127.0.0.1",
        free_udp_port(),
        1001,
        [
            SimObject("analog-input", 1, "supply", 21.5, units="degreesCelsius"),
            SimObject("binary-input", 2, "door", False),
        ],
    )
    with Dnp3Outstation() as station:
        station.set("analog", 0, 12.5)  # ONLINE: the outstation starts with RESTART set
        station.set("binary", 1, True)
        async with CountingProxy(station.port) as proxy:
            await room.start()
            try:
                document = policy_document(proxy.port, room.port)
                policy = parse.from_payload(msgspec.json.encode(document), "policy")
                validation = validate.Validation(policy, PlantConfig(state_dir=tmp_path))
                await validation.observe(READ_S)
            finally:
                await room.stop()
        proxy.assert_read_only()

    report = validation.report(READ_S)
    assert report.complete
    verdicts = {s.signal: s for s in report.signals}
    for verdict in verdicts.values():
        # every value read is good; completeness counts the session's start (the BACnet
        # identity check and subscription), so over a few seconds on a busy machine it is
        # only asserted to be judged against the poll interval, not to reach 95 %
        assert verdict.samples > 0 and verdict.good == verdict.samples, verdict
        assert verdict.expected_samples == int(report.observed_s // POLL_S)
        assert verdict.completeness_pct is not None and verdict.completeness_pct >= 50
    assert {"readProperty", "readPropertyMultiple", "subscribeCOV"} & set(room.requests)
    assert set(room.requests) <= {"whoIs", "readProperty", "readPropertyMultiple", "subscribeCOV"}
