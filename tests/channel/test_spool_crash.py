"""`kill -9` of real broker processes: the spool stays consistent and reading resumes exactly.

The plant half is killed mid-writing several times; the enterprise half is killed after it
consumed the spool. Afterwards every record reads back, in order, with no duplicate, no gap
and nothing misparsed.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
import msgspec
import pytest

from broker.channel.spool import SpoolReceiver, frame, segment_numbers, segment_path
from broker.records import encode_frame_payload
from broker.sim.refrigeration import RefrigerationPlant
from tests.harness import Deployment, Pki, consumer_ssl, eventually, get_json

pytestmark = pytest.mark.timeout(120)


def spool_records(deployment: Deployment, state: str) -> SpoolReceiver:
    return SpoolReceiver(deployment.spool, deployment.directory / state)


def count_records(deployment: Deployment) -> int:
    receiver = spool_records(deployment, "count-state")
    total = 0
    for _ in range(10_000):  # bounded; each call returns at least one record until caught up
        batch = receiver.receive()
        if not batch:
            break
        total += len(batch)
    return total


def tear_last_segment(deployment: Deployment) -> int:
    """What a power loss does mid-write: half of the next frame reaches the disk."""
    newest = segment_path(deployment.spool, segment_numbers(deployment.spool)[-1])
    last = spool_records(deployment, "tear-state")
    records = [r for _ in range(10_000) if (batch := last.receive()) for r in batch]
    half_frame = frame(
        encode_frame_payload([msgspec.structs.replace(records[-1], seq=records[-1].seq + 1)])
    )
    torn = half_frame[: len(half_frame) // 2]
    with open(newest, "ab") as f:
        f.write(torn)
    return len(torn)


async def test_plant_killed_repeatedly_and_a_torn_write_leave_a_spool_that_reads_back_whole(
    deployment: Deployment, plant_sim: RefrigerationPlant, start_broker
) -> None:
    rng = random.Random(7)
    target = 0
    torn_bytes = 0
    for round_ in range(4):
        plant = start_broker("plant", deployment.config)
        target += 14 * 3  # three more scans of the 14 signals
        await eventually(lambda t=target: count_records(deployment) >= t, timeout=20)
        await asyncio.sleep(rng.uniform(0, 0.3))  # land the kill anywhere in a scan
        plant.kill9()
        if round_ == 1:
            torn_bytes = tear_last_segment(deployment)
    assert len(segment_numbers(deployment.spool)) >= 4  # one segment per start

    receiver = spool_records(deployment, "audit-state")
    seqs = []
    for _ in range(10_000):
        batch = receiver.receive()
        if not batch:
            break
        seqs.extend(r.seq for r in batch)
        assert all(r.signal.startswith("coldstore/") and r.policy_version == 1 for r in batch)
    assert seqs == list(range(1, len(seqs) + 1))  # in order, no duplicate, no gap
    assert receiver.torn_bytes == torn_bytes > 0  # the torn frame was skipped, not parsed
    assert receiver.bad_records == 0 and receiver.lost_records == 0


async def snapshot_seqs(deployment: Deployment, pki: Pki) -> list[int] | None:
    try:
        status, body = await get_json(deployment.base_url + "/v1/snapshot", consumer_ssl(pki))
    except aiohttp.ClientConnectionError:
        return None
    assert status == 200
    return sorted(r["seq"] for r in body["records"])


async def test_enterprise_killed_resumes_after_what_it_had_delivered(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, start_broker
) -> None:
    plant = start_broker("plant", deployment.config)
    await eventually(lambda: count_records(deployment) >= 14 * 3, timeout=20)
    assert plant.stop() == 0
    written = count_records(deployment)

    enterprise = start_broker("enterprise", deployment.config)

    async def delivered_everything() -> bool:
        seqs = await snapshot_seqs(deployment, pki)
        return bool(seqs) and seqs[-1] == written

    await eventually(delivered_everything, timeout=20)
    enterprise.kill9()

    # Nothing new in the spool: a restarted enterprise half must deliver nothing again.
    restarted = start_broker("enterprise", deployment.config)

    async def api_up() -> bool:
        return await snapshot_seqs(deployment, pki) is not None

    await eventually(api_up, timeout=20)
    await asyncio.sleep(0.5)  # a hundred reader polls
    assert await snapshot_seqs(deployment, pki) == []

    plant = start_broker("plant", deployment.config)

    async def new_records_arrived() -> bool:
        return bool(await snapshot_seqs(deployment, pki))

    await eventually(new_records_arrived, timeout=20)
    seqs = await snapshot_seqs(deployment, pki)
    assert seqs and min(seqs) > written
    assert plant.stop() == 0 and restarted.stop() == 0
