"""The enterprise half's process: spool receiver → store → HTTPS API.

Its only input is the spool, opened read-only; its only outputs are the consumer-facing
listeners. It holds no plant address and no plant credential. A newer accepted policy takes
effect without a restart: connected consumers keep their streams, with their view widened
or narrowed to what the new policy grants.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import structlog
from aiohttp import web

from broker.audit.export import SiemExporter
from broker.audit.log import AuditLog, AuditMonitor
from broker.channel.spool import SpoolReceiver
from broker.config import BrokerConfig
from broker.enterprise.api import create_app
from broker.enterprise.authz import Authorization
from broker.enterprise.listener import listen
from broker.enterprise.mqtt import MqttSink
from broker.enterprise.store import Store
from broker.errors import ConfigError
from broker.health import ClockWatch, days_left, warn_expiring_certificates
from broker.metrics import EnterpriseMetrics
from broker.policy import Policy
from broker.policy.activation import TrustedPolicy
from broker.policy.watch import PolicyWatcher
from broker.trust import tls

POLL_S = 0.005  # how often an idle reader looks for new frames; bounds added latency
AUDIT_CHECK_S = 0.25  # how soon a failing audit log closes the API
TLS_CHECK_S = 1.0  # how often the TLS files are looked at; SIGHUP acts at once
GC_YOUNG_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)

log = structlog.get_logger("enterprise")


def tune_garbage_collector() -> None:
    """Fewer young collections. Records decoded from the spool carry lists and dicts that
    the cyclic collector tracks though they never form cycles; at CPython's default it took
    45 % of this half's time (docs/performance.md). Reference counting still frees each
    record as soon as it is delivered; only cyclic garbage waits longer."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def run_enterprise(config: BrokerConfig, trusted: TrustedPolicy, audit: AuditLog) -> None:
    tune_garbage_collector()
    ent = config.enterprise
    ssl_context, revoked = tls.endpoint_context(ent.tls)
    reloader = tls.EndpointReloader(ent.tls, ssl_context)
    receiver = SpoolReceiver(config.spool.dir, ent.state_dir)
    store = Store(trusted.policy, ent.stream_queue, ent.max_streams)
    authz = Authorization(trusted.policy, revoked)
    metrics = EnterpriseMetrics(
        streams=lambda: len(store.subscriptions),
        audit_failing=lambda: audit.failing,
        read_seq=lambda: receiver.last_seq,
        certificates=lambda: days_left(_certificates(config)),
    )
    app = create_app(store, authz, audit, metrics, config.spool.dir)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    listening: asyncio.Server | None = None
    try:
        try:
            listening = await listen(runner, ent.listen.host, ent.listen.port, ssl_context)
        except OSError as e:
            raise ConfigError(
                f"enterprise.listen: cannot listen on {ent.listen.host}:{ent.listen.port}: "
                f"{e.strerror}"
            ) from e
        log.info(
            "api_listening",
            address=f"https://{ent.listen.host}:{ent.listen.port}",
            policy_version=trusted.policy.version,
            resume_after_seq=receiver.last_seq,
        )
        warn_expiring_certificates(_certificates(config))
        watcher = PolicyWatcher(
            config.policy,
            config.trust_root,
            ent.state_dir,
            trusted,
            on_hangup=lambda: _reload_tls(reloader, authz, force=True),
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_deliver(receiver, store, metrics), name="spool reader")
            tasks.create_task(_watch_audit(audit, store), name="audit health")
            tasks.create_task(_watch_tls(reloader, authz), name="tls material")
            if ent.mqtt is not None:
                sink = MqttSink(ent.mqtt, config.spool.dir, ent.state_dir, authz)
                tasks.create_task(sink.run(), name="mqtt sink")
            if config.audit.siem is not None:
                exporter = _exporter(config, trusted.policy.deployment_id)
                tasks.create_task(exporter.run(), name="siem export")
            async for accepted in watcher.updates():
                _apply(accepted.policy, store, authz)
    finally:
        store.close()
        if listening is not None:
            listening.close()
        await runner.cleanup()
        receiver.close()


def _apply(policy: Policy, store: Store, authz: Authorization) -> None:
    """Switch to a newer policy: the store, the API's authorization, every open stream."""
    store.use_policy(policy)
    authz.use_policy(policy)
    for subscription in store.subscriptions:
        subscription.view = authz.view(subscription.identity)


def _certificates(config: BrokerConfig) -> dict[str, Path]:
    tls_config, siem = config.enterprise.tls, config.audit.siem
    found = {"server certificate": tls_config.cert, "client CA": tls_config.client_ca}
    if siem is not None:
        found |= {"SIEM client certificate": siem.cert, "SIEM CA": siem.ca}
    return found


def _exporter(config: BrokerConfig, appliance: str) -> SiemExporter:
    siem = config.audit.siem
    assert siem is not None
    return SiemExporter(
        config.audit.dir,
        config.enterprise.state_dir,
        (siem.host, siem.port),
        tls.client_context(siem.ca, siem.cert, siem.key),
        server_name=siem.server_name or siem.host,
        hostname=appliance,
    )


def _reload_tls(reloader: tls.EndpointReloader, authz: Authorization, *, force: bool) -> None:
    revoked = reloader.check(force=force)
    if revoked is not None:
        authz.revoked = revoked


async def _watch_tls(reloader: tls.EndpointReloader, authz: Authorization) -> None:
    """New certificate, key, client CA or CRL files take effect for new connections."""
    while True:
        await asyncio.sleep(TLS_CHECK_S)
        _reload_tls(reloader, authz, force=False)


async def _watch_audit(audit: AuditLog, store: Store) -> None:
    """Fail closed while the audit log cannot be written: the API refuses, streams end.
    Also notes wall-clock steps."""
    monitor = AuditMonitor(audit, "consumers are refused until it can be written")
    clock = ClockWatch()
    while True:
        clock.check()
        was_failing = monitor.failing
        if monitor.check() and not was_failing:
            store.close()
        await asyncio.sleep(AUDIT_CHECK_S)


async def _deliver(receiver: SpoolReceiver, store: Store, metrics: EnterpriseMetrics) -> None:
    while True:
        records = receiver.receive()
        if not records:
            await asyncio.sleep(POLL_S)
            continue
        store.apply(records)
        receiver.commit()
        metrics.records_received.inc(len(records))
        await asyncio.sleep(0)  # let consumers drain between batches while catching up
