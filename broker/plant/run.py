"""The plant half's process: connectors → pipeline → spool sender.

Opens no listening socket. The only thing it writes is the spool; the only peers it talks
to are the devices the policy names, with read-only services.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import structlog

from broker.channel.spool import SpoolSender
from broker.config import BrokerConfig
from broker.plant.connectors import CONNECTORS, RawSample
from broker.plant.pipeline import PlantPipeline
from broker.policy import Policy, Signal

log = structlog.get_logger("plant")

QUEUE_BATCHES = 256  # scans waiting for the spool; past this, connectors wait (backpressure)


async def run_plant(config: BrokerConfig, policy: Policy) -> None:
    sender = SpoolSender(
        config.spool.dir,
        segment_bytes=config.spool.segment_mib * 1024 * 1024,
        retention_bytes=config.spool.retention_mib * 1024 * 1024,
    )
    pipeline = PlantPipeline(policy)
    queue: asyncio.Queue[list[RawSample]] = asyncio.Queue(QUEUE_BATCHES)
    signals_of: dict[str, list[Signal]] = defaultdict(list)
    for signal in policy.signals:
        signals_of[signal.device].append(signal)
    log.info(
        "plant_started",
        policy_version=policy.version,
        devices=len(policy.devices),
        signals=len(policy.signals),
        next_seq=sender.next_seq,
    )
    try:
        async with asyncio.TaskGroup() as tasks:
            for device in policy.devices:
                connector = CONNECTORS[device.protocol](device, signals_of[device.name])
                tasks.create_task(connector.run(queue.put), name=f"connector {device.name}")
            tasks.create_task(_write(queue, pipeline, sender), name="spool writer")
    finally:
        sender.close()


async def _write(
    queue: asyncio.Queue[list[RawSample]], pipeline: PlantPipeline, sender: SpoolSender
) -> None:
    while True:
        batch = await queue.get()
        while not queue.empty():  # group commit: everything that is waiting, one fsync
            batch.extend(queue.get_nowait())
        records = pipeline.process(batch)
        await asyncio.to_thread(sender.send, records)
