"""A running broker takes a newer signed policy without a restart, and refuses a bad one.

Real `dmzbroker run` processes, a real simulator, consumers over real mutual TLS.
"""

from __future__ import annotations

import json
import os
import signal
import time

import aiohttp
import pytest

from broker import policy
from broker.policy.access import Access
from broker.sim.refrigeration import RefrigerationPlant
from broker.trust import tls
from tests.harness import (
    CONSUMER_URI,
    ENERGY_URI,
    BrokerProcess,
    Deployment,
    Owners,
    Pki,
    eventually,
    get_json,
    sign_policy,
)

pytestmark = pytest.mark.timeout(120)
ROOM = "coldstore/storage/cold-room-1/temperature"
POWER = "coldstore/machine-room/compressor-1/motor_power"


def energy_ssl(pki: Pki):
    return tls.client_context(pki.ca, pki.energy_cert, pki.energy_key)


def historian_ssl(pki: Pki):
    return tls.client_context(pki.ca, pki.client_cert, pki.client_key)


async def snapshot(deployment: Deployment, context) -> dict[str, dict]:
    try:
        status, body = await get_json(deployment.base_url + "/v1/snapshot", context)
    except aiohttp.ClientConnectionError:
        return {}
    assert status == 200
    return {r["signal"]: r for r in body["records"]}


@pytest.fixture
async def broker(deployment: Deployment, pki: Pki, start_broker) -> BrokerProcess:
    process: BrokerProcess = start_broker("run", deployment.config)
    await eventually(lambda: snapshot(deployment, historian_ssl(pki)), timeout=20)
    return process


def publish(
    deployment: Deployment, owners: Owners, version: int, roles: list[dict] | None = None, keys=None
) -> None:
    """Sign a new version and put it in place the way an operator would (atomic rename)."""
    document = dict(deployment.document, version=version)
    if roles is not None:
        document["roles"] = roles
    signers = [owners.ot_key, owners.it_key] if keys is None else keys
    staged = sign_policy(deployment.directory, document, signers, name=f"policy-v{version}")
    os.replace(staged, deployment.policy)


def logged(broker: BrokerProcess, event: str, **fields: object) -> bool:
    for line in broker.events():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items()):
                return True
    return False


def energy_roles(*patterns: str) -> list[dict]:
    return [
        {"name": "historian", "signals": ["coldstore/**"]},
        {"name": "energy", "signals": list(patterns)},
        {"name": "monitoring", "metrics": True},
    ]


async def test_two_consumers_with_different_roles_each_see_exactly_their_set(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, broker: BrokerProcess
) -> None:
    access = Access(policy.load(deployment.directory / "policy.yaml"))
    await eventually(lambda: _has_all(deployment, pki, access), timeout=20)
    assert set(await snapshot(deployment, historian_ssl(pki))) == access.visible_to(CONSUMER_URI)
    assert set(await snapshot(deployment, energy_ssl(pki))) == access.visible_to(ENERGY_URI)
    assert access.visible_to(ENERGY_URI) < access.visible_to(CONSUMER_URI)


async def _has_all(deployment: Deployment, pki: Pki, access: Access) -> bool:
    return set(await snapshot(deployment, historian_ssl(pki))) == access.visible_to(CONSUMER_URI)


async def test_a_reload_widens_then_narrows_a_connected_stream(
    deployment: Deployment,
    plant_sim: RefrigerationPlant,
    pki: Pki,
    owners: Owners,
    broker: BrokerProcess,
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(deployment.base_url + "/v1/stream", ssl=energy_ssl(pki)) as stream,
    ):
        seen = await read_signals(stream, count=8)
        assert ROOM not in seen and POWER in seen

        publish(deployment, owners, 2, energy_roles("coldstore/machine-room/*/motor_power", ROOM))
        await eventually(
            lambda: logged(broker, "policy_accepted", process="enterprise", version=2), timeout=20
        )
        after = await records_after_switch(deployment, pki)
        seen = await read_signals(stream, count=12, after_seq=after)
        assert seen == {ROOM, POWER}  # widened: the room temperature now reaches this stream

        publish(deployment, owners, 3, energy_roles(ROOM))
        await eventually(
            lambda: logged(broker, "policy_accepted", process="enterprise", version=3), timeout=20
        )
        after = await records_after_switch(deployment, pki)
        seen = await read_signals(stream, count=6, after_seq=after)
        assert seen == {ROOM}  # narrowed: the motor power no longer does
    assert broker.process.poll() is None


async def records_after_switch(deployment: Deployment, pki: Pki) -> int:
    """The highest seq served now: anything later was filtered by the new view."""
    records = await snapshot(deployment, historian_ssl(pki))
    return max(r["seq"] for r in records.values())


async def read_signals(stream: aiohttp.ClientResponse, count: int, after_seq: int = 0) -> set[str]:
    """The signals of the next `count` events with a seq above `after_seq` (10 s at most)."""
    signals: set[str] = set()
    taken = 0
    deadline = time.monotonic() + 10
    async for line in stream.content:
        assert time.monotonic() < deadline, "the stream went quiet"
        if line.startswith(b"data: "):
            event = json.loads(line[6:])
            if event["seq"] > after_seq:
                signals.add(event["signal"])
                taken += 1
                if taken == count:
                    break
    return signals


async def test_an_invalid_new_policy_is_refused_and_the_running_one_stays(
    deployment: Deployment,
    plant_sim: RefrigerationPlant,
    pki: Pki,
    owners: Owners,
    broker: BrokerProcess,
) -> None:
    publish(deployment, owners, 2, keys=[owners.ot_key])  # IT did not sign
    await eventually(
        lambda: logged(broker, "policy_refused", process="plant", reason="threshold_not_met"),
        timeout=20,
    )
    await eventually(
        lambda: logged(broker, "policy_refused", process="enterprise", reason="threshold_not_met"),
        timeout=20,
    )
    before = await records_after_switch(deployment, pki)
    await eventually(lambda: _newer_than(deployment, pki, before), timeout=10)  # data still flows
    records = await snapshot(deployment, energy_ssl(pki))
    assert {r["policy_version"] for r in records.values()} == {1}
    assert broker.process.poll() is None


async def _newer_than(deployment: Deployment, pki: Pki, seq: int) -> bool:
    return await records_after_switch(deployment, pki) > seq


async def test_sighup_to_run_is_passed_to_both_halves_and_stops_nothing(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, broker: BrokerProcess
) -> None:
    broker.process.send_signal(signal.SIGHUP)
    await eventually(lambda: logged(broker, "policy_reload_requested"), timeout=10)
    before = await records_after_switch(deployment, pki)
    await eventually(lambda: _newer_than(deployment, pki, before), timeout=10)
    assert broker.process.poll() is None
