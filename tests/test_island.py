"""Island mode stops all data crossing within a second, survives a restart, and is logged."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.channel.spool import SpoolReceiver
from broker.sim.refrigeration import RefrigerationPlant
from tests.harness import BrokerProcess, Deployment, Owners, dmzbroker, eventually, sign_policy

pytestmark = pytest.mark.timeout(120)


class SpoolCount:
    """Counts records in the spool as a reader of our own (its own position)."""

    def __init__(self, deployment: Deployment) -> None:
        self._receiver = SpoolReceiver(deployment.spool, deployment.directory / "count-state")
        self.total = 0

    def __call__(self) -> int:
        for _ in range(10_000):
            batch = self._receiver.receive()
            if not batch:
                break
            self.total += len(batch)
        return self.total


async def quiet_for(count: SpoolCount, seconds: float) -> bool:
    before = count()
    await asyncio.sleep(seconds)
    return count() == before


def island(deployment: Deployment, state: str) -> str:
    return dmzbroker("island", state, "--config", str(deployment.config), "--reason", "test").stdout


async def test_island_mode_stops_crossing_within_a_second_and_survives_a_restart(
    deployment: Deployment, plant_sim: RefrigerationPlant, start_broker
) -> None:
    count = SpoolCount(deployment)
    plant: BrokerProcess = start_broker("plant", deployment.config)
    await eventually(lambda: count() > 14)

    assert "island mode on" in island(deployment, "on")
    switched = time.monotonic()
    await eventually(lambda: quiet_for(count, 0.6), timeout=5)
    assert time.monotonic() - switched < 1.0 + 0.6 + 0.2  # stopped within a second
    assert await quiet_for(count, 1.0)

    assert plant.stop() == 0
    restarted: BrokerProcess = start_broker("plant", deployment.config)
    await asyncio.sleep(1.5)  # several scans' worth
    assert await quiet_for(count, 0.5)

    assert "island mode off" in island(deployment, "off")
    before = count()
    await eventually(lambda: count() > before + 14)
    events = [json.loads(line)["event"] for line in restarted.events() if line.startswith("{")]
    assert "island_mode_off" in events
    assert restarted.stop() == 0


def test_island_on_twice_says_it_already_was(deployment: Deployment) -> None:
    island(deployment, "on")
    assert "already" in island(deployment, "on")
    assert "island mode off" in island(deployment, "off")


async def test_a_running_broker_stops_publishing_when_its_policy_expires(
    deployment: Deployment, plant_sim: RefrigerationPlant, owners: Owners, start_broker
) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=4)
    document = dict(deployment.document, expires=soon.isoformat())
    sign_policy(deployment.directory, document, [owners.ot_key, owners.it_key])
    count = SpoolCount(deployment)
    plant: BrokerProcess = start_broker("plant", deployment.config)
    await eventually(lambda: count() > 14)
    await asyncio.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.5)
    assert await quiet_for(count, 1.0)
    events = [json.loads(line)["event"] for line in plant.events() if line.startswith("{")]
    assert "policy_expiring" in events  # warned beforehand
    await eventually(lambda: '"policy_expired"' in "".join(plant.events()), timeout=5)
    assert plant.process.poll() is None  # still running, ready for a newer policy


def test_island_state_lives_in_the_plant_state_dir(deployment: Deployment) -> None:
    island(deployment, "on")
    assert (Path(deployment.directory) / "plant-state" / "island").exists()
    island(deployment, "off")
