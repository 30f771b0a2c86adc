"""The enterprise half: its spool reader survives file-system errors (issue 12), and its
/metrics shows what the audit throttle only counted.

The fault is real: this process's open-file limit is lowered for a moment, so listing the
spool, opening a segment and saving the read position fail with EMFILE, as they did when
idle connections filled the file table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from broker import policy
from broker.channel.spool import SpoolSender
from broker.enterprise.run import _deliver, _SpoolReading
from broker.enterprise.store import Store
from broker.metrics import EnterpriseMetrics
from broker.trust import tls
from tests.enterprise.served import ROOM, record
from tests.harness import CONSUMER_URI, DEMO_POLICY, Deployment, Pki, eventually

DENIED = 25  # denied requests of one identity in a minute: the first 10 audited in full


def lowest_free_fd() -> int:
    """The number the next open file would get: a soft limit of it makes that open fail
    (the limit bounds descriptor numbers, not how many are open)."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


def exhaust(held: list[int]) -> None:
    """Take every descriptor number still free under the limit. An object of an earlier test
    that the garbage collector closes meanwhile frees a number below the limit, and the
    spool reader's next open would then succeed (seen once in a full run)."""
    with contextlib.suppress(OSError):
        while len(held) < 10_000:
            held.append(os.open(os.devnull, os.O_RDONLY))


async def test_spool_reads_failing_with_emfile_are_retried_without_a_gap_or_a_repeat(
    tmp_path: Path,
) -> None:
    spool_dir, state_dir = tmp_path / "spool", tmp_path / "state"
    sender = SpoolSender(spool_dir, 1024 * 1024, 4 * 1024 * 1024)
    store = Store(policy.load(DEMO_POLICY), queue_limit=10_000)
    seen: list[int] = []
    subscription = store.subscribe(CONSUMER_URI, frozenset({ROOM}))
    metrics = EnterpriseMetrics(lambda: 0, lambda: False)
    reading = _SpoolReading(spool_dir, state_dir)

    async def collect() -> None:
        while (batch := await subscription.next_batch()) is not None:
            seen.extend(r.seq for r, _ in batch)

    def failures() -> float:
        return metrics.spool_read_errors.labels("EMFILE")._value.get()

    sender.send([record(ROOM, 1.0, seq) for seq in range(1, 101)])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with structlog.testing.capture_logs() as logs:
        delivering = asyncio.create_task(_deliver(reading, store, metrics))
        collecting = asyncio.create_task(collect())
        try:
            await eventually(lambda: len(seen) == 100, timeout=10)
            held: list[int] = []
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd(), hard))
                sender.send([record(ROOM, 2.0, seq) for seq in range(101, 201)])  # open fd
                await eventually(lambda: exhaust(held) or failures() >= 3, timeout=10)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                for fd in held:
                    os.close(fd)
            sender.send([record(ROOM, 3.0, seq) for seq in range(201, 301)])
            await eventually(lambda: len(seen) >= 300, timeout=15)
            await asyncio.sleep(0.2)  # time for a repeat to show, if there were one
        finally:
            for task in (delivering, collecting):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            reading.receiver.close()
            sender.close()
    assert seen == list(range(1, 301))
    assert reading.receiver.last_seq == 300
    assert [e["event"] for e in logs if e["event"].startswith("spool_read")] == [
        "spool_read_failed",
        "spool_read_recovered",
    ]
    recovered = next(e for e in logs if e["event"] == "spool_read_recovered")
    assert recovered["counts"]["EMFILE"] == failures()


async def test_audit_events_only_counted_by_the_throttle_show_in_the_halfs_metrics(
    deployment: Deployment, pki: Pki, start_broker: Any
) -> None:
    """The real `dmzbroker enterprise`: past the audit's per-source budget (10 a minute),
    a consumer's denied requests are only counted, and /metrics says how many."""
    start_broker("enterprise", deployment.config)
    monitoring = tls.client_context(pki.ca, pki.monitoring_cert, pki.monitoring_key)
    energy = tls.client_context(pki.ca, pki.energy_cert, pki.energy_key)  # not ROOM's

    async def metrics() -> str | None:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(deployment.base_url + "/metrics", ssl=monitoring) as response,
            ):
                return await response.text() if response.status == 200 else None
        except (aiohttp.ClientConnectionError, ssl.SSLError):
            return None  # not listening yet

    await eventually(metrics, timeout=60, interval=0.2)
    async with aiohttp.ClientSession() as session:
        for _ in range(DENIED):
            url = f"{deployment.base_url}/v1/signals/{ROOM}"
            async with session.get(url, ssl=energy) as r:
                assert r.status == 403
    counted = f'dmzbroker_audit_events_suppressed_total{{event="consumer_denied"}} {DENIED - 10}.0'

    async def shown() -> bool:
        return counted in (await metrics() or "")

    await eventually(shown, timeout=10)
