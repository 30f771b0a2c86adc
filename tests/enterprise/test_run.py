"""The enterprise half: its spool reader survives file-system errors (issue 12), its
/metrics shows what the audit throttle only counted, an output's failure to take a policy is
contained, and stopping never waits long on an output that hangs.

The file-system fault is real: this process's open-file limit is lowered for a moment, so
listing the spool, opening a segment and saving the read position fail with EMFILE, as they
did when idle connections filled the file table. The failing and hanging outputs are made
up: a bug is a fault no real output offers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import socket
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import msgspec
import pytest
import structlog
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import config as broker_config
from broker import policy
from broker.audit.log import AuditLog
from broker.channel.spool import SpoolSender
from broker.enterprise import run
from broker.enterprise.authz import Authorization
from broker.enterprise.output_failures import OutputFailures
from broker.enterprise.outputs import outputs_for
from broker.enterprise.run import _apply, _deliver, _SpoolReading
from broker.enterprise.store import Store
from broker.errors import ConfigError
from broker.metrics import EnterpriseMetrics
from broker.policy import Policy, trustroot
from broker.policy.activation import load_trusted
from broker.trust import tls
from tests.enterprise.served import ROOM, record
from tests.harness import (
    CONSUMER_URI,
    DEMO_POLICY,
    BrokerProcess,
    Deployment,
    Owners,
    Pki,
    demo_policy,
    eventually,
    free_port,
    sign_policy,
    write_config,
)

DENIED = 25  # denied requests of one identity in a minute: the first 10 audited in full


def lowest_free_fd() -> int:
    """The number the next open file would get: a soft limit of it makes that open fail
    (the limit bounds descriptor numbers, not how many are open)."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


def listening_on(config: Path, port: int) -> None:
    """Point the config's `enterprise.listen` at `port`."""
    document = yaml.safe_load(config.read_text())
    document["enterprise"]["listen"]["port"] = port
    config.write_text(yaml.safe_dump(document))


async def enterprise_listening(
    start_broker: Callable[..., BrokerProcess], config: Path
) -> tuple[BrokerProcess, int]:
    """`dmzbroker enterprise` once its API listens, and the port. free_port() releases the
    port it found, so another test (the other xdist worker) may bind it before the half
    does: on that error, and on no other, it starts again on another free port, 3 at most."""
    for tries in range(3, 0, -1):
        port = free_port()
        listening_on(config, port)
        half = start_broker("enterprise", config)

        def settled(half: BrokerProcess = half) -> bool:
            return half.process.poll() is not None or any(
                '"api_listening"' in line for line in half.events()
            )

        await eventually(settled, timeout=60, interval=0.2)
        if half.process.poll() is None:
            return half, port
        log = "\n".join(half.events())
        if tries == 1 or "Address already in use" not in log:
            raise AssertionError(f"the enterprise half did not start:\n{log}")
    raise AssertionError("unreachable")


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
            seen.extend(e.record.seq for e in batch)

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
            # A repeat of what was read before the failures would come before a record
            # written after them: one more, then everything seen so far is checked.
            sender.send([record(ROOM, 4.0, 301)])
            await eventually(lambda: seen[-1:] == [301], timeout=15)
        finally:
            for task in (delivering, collecting):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            reading.receiver.close()
            sender.close()
    assert seen == list(range(1, 302))
    assert reading.receiver.last_seq == 301
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
    _, deployment.api_port = await enterprise_listening(start_broker, deployment.config)
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


class Refusing:
    """An output whose `use_policy` has a bug."""

    name = "refusing"

    def use_policy(self, policy: Policy) -> None:
        raise KeyError("a signal it did not expect")


class Told:
    name = "told"

    def __init__(self) -> None:
        self.versions: list[int] = []

    def use_policy(self, policy: Policy) -> None:
        self.versions.append(policy.version)


def test_an_output_that_fails_to_take_a_policy_is_logged_once_and_the_others_are_told() -> None:
    demo = policy.load(DEMO_POLICY)
    store, authz = Store(demo, queue_limit=16), Authorization(demo)
    refusing, told = Refusing(), Told()
    outputs: Any = [refusing, told]  # only what _apply calls of them
    failures = {o.name: OutputFailures(o.name) for o in (refusing, told)}
    with structlog.testing.capture_logs() as logs:
        for version in (demo.version + 1, demo.version + 2):
            _apply(msgspec.structs.replace(demo, version=version), store, authz, outputs, failures)
    assert told.versions == [demo.version + 1, demo.version + 2]
    assert authz.policy.version == demo.version + 2
    failed = [(e["output"], e["stage"], e["error"]) for e in logs if e["event"] == "output_failed"]
    assert failed == [("refusing", "use_policy", "KeyError: 'a signal it did not expect'")]


class Stuck:
    """An output that will not stop: its run takes no cancellation and its close() never
    returns (worse than psycopg, whose cancel-and-wait of a query to a stopped server held
    the half 13 s), until the test releases it."""

    name = "stuck"

    def __init__(self) -> None:
        self.running = asyncio.Event()
        self.released = asyncio.Event()
        self.cancels = 0
        self.closed = False

    async def start(self) -> None:
        pass

    async def run(self) -> NoReturn:
        self.running.set()
        await self._hold()
        raise asyncio.CancelledError  # released: it ends as cancelled

    def use_policy(self, policy: Policy) -> None:
        pass

    async def close(self) -> None:
        await self._hold()
        self.closed = True

    async def _hold(self) -> None:
        while not self.released.is_set():
            try:
                await self.released.wait()
            except asyncio.CancelledError:
                self.cancels += 1


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def test_stopping_the_half_does_not_wait_on_an_output_that_never_stops(
    tmp_path: Path, pki: Pki, owners: Owners, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The half's own run_enterprise, in this process, with its real outputs (the HTTPS API)
    and one that hangs: cancelled as a stop signal does, it returns while that output's run
    and close() are still going, each logged once, and the API's port is closed."""
    envelope = sign_policy(tmp_path, demo_policy(free_port()), [owners.ot_key, owners.it_key])
    config_path = write_config(tmp_path, envelope, pki, free_port(), owners)
    config = broker_config.load(config_path)
    trusted = load_trusted(
        envelope, trustroot.load(owners.trust_root), config.enterprise.state_dir,
        datetime.now(UTC), floor=None,
    )  # fmt: skip
    audit = AuditLog(tmp_path / "audit-log", "enterprise", trusted.policy.deployment_id,
                     Ed25519PrivateKey.generate())  # fmt: skip
    stuck = Stuck()
    monkeypatch.setattr(run, "outputs_for", lambda context: [*outputs_for(context), stuck])
    thresholds = gc.get_threshold()  # run_enterprise tunes them for its process
    try:
        with structlog.testing.capture_logs() as logs:
            for tries in range(3, 0, -1):  # another test may take the free port first
                port = free_port()
                listening_on(config_path, port)
                config = broker_config.load(config_path)
                half = asyncio.create_task(run.run_enterprise(config, trusted, audit))
                await eventually(lambda h=half: stuck.running.is_set() or h.done(), timeout=60)
                if not half.done() or tries == 1:
                    break
                with pytest.raises(ConfigError, match="Address already in use"):
                    half.result()
            assert not refused(port)  # the API listens
            half.cancel()  # as the half's stop signal does
            done, _ = await asyncio.wait({half}, timeout=30)
            assert half in done  # it returned, with the stuck output still going
        assert half.cancelled() and not stuck.closed and stuck.cancels >= 2
        assert refused(port)  # the API was closed all the same
        failed = [(e["output"], e["stage"]) for e in logs if e["event"] == "output_failed"]
        assert failed == [("stuck", "stop"), ("stuck", "close")]
    finally:
        stuck.released.set()
        await eventually(lambda: stuck.closed)
        gc.set_threshold(*thresholds)
        audit.close()
