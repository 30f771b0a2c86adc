"""The enterprise half's process: spool receiver → store → outputs (broker.enterprise.outputs:
the HTTPS API, and the sinks and servers the config names).

Its only input is the spool, opened read-only; its only outputs are the ones in the output
registry, each contained on its own (docs/specs/output.md), and its audit log, which keeps
the plant's audit checkpoints that crossed as witnesses. It holds no plant address and no
plant credential. A newer accepted policy takes effect without a restart: connected
consumers keep their streams, with their view widened or narrowed to what the new policy
grants, and every output is told. Stopping never waits on an output for long: its run and
its close() get `OUTPUT_STOP_S` in all, and one still going then is left behind (logged).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import structlog

from broker.audit.crossing import CROSSING_WRITER, witness_details
from broker.audit.export import SiemExporter
from broker.audit.log import AuditLog
from broker.audit.monitor import AuditMonitor
from broker.audit.witness import WITNESSED
from broker.channel.spool import SpoolReceiver
from broker.channel.spool_watch import SpoolWatch
from broker.config import BrokerConfig
from broker.enterprise.authz import Authorization
from broker.enterprise.episodes import Episode
from broker.enterprise.listener import ConnectionStats
from broker.enterprise.output_failures import OutputFailures
from broker.enterprise.outputs import Output, OutputContext, outputs_for, run_contained
from broker.enterprise.store import Store
from broker.errors import ChannelError
from broker.health import ClockWatch, days_left, warn_expiring_certificates
from broker.metrics import EnterpriseMetrics
from broker.policy import Policy
from broker.policy.activation import TrustedPolicy
from broker.policy.collection import settle, tune_garbage_collector
from broker.policy.watch import PolicyWatcher
from broker.records import Record
from broker.trust import tls

POLL_S = 0.005  # how often an idle reader looks for new frames where the spool is not watched
AUDIT_CHECK_S = 0.25  # how soon a failing audit log closes the API
TLS_CHECK_S = 1.0  # how often the TLS files are looked at; SIGHUP acts at once
SPOOL_RETRY_S = (0.05, 2.0)  # first and longest pause after a failed spool read
# Stopping the outputs: their runs get RUN_STOP_S to end once cancelled, then their close()
# what is left of OUTPUT_STOP_S, well within the supervisor's 10 s before it kills the half.
RUN_STOP_S = 1.5
OUTPUT_STOP_S = 4.0

log = structlog.get_logger("enterprise")


async def run_enterprise(config: BrokerConfig, trusted: TrustedPolicy, audit: AuditLog) -> None:
    tune_garbage_collector()
    ent = config.enterprise
    # The TLS context in force, fresh on each reload; the CRLs accepted are recorded in the
    # state dir, so an older one put back while the half was stopped is refused at start.
    reloader = tls.EndpointReloader(ent.tls, ent.state_dir)
    spool = _SpoolReading(config.spool.dir, ent.state_dir)
    store = Store(trusted.policy, ent.stream_queue, ent.max_streams)
    # What this half applied before a restart counts as applied: a stream resumed after it
    # replays from the spool up to here, then goes on live.
    store.last_seq = spool.receiver.last_seq
    authz = Authorization(trusted.policy, reloader.revoked)
    connections = ConnectionStats()
    metrics = EnterpriseMetrics(
        streams=lambda: len(store.subscriptions),
        audit_failing=lambda: audit.failing,
        read_seq=lambda: spool.receiver.last_seq,
        certificates=lambda: days_left(_certificates(config)),
        connections=lambda: connections,
        audit_suppressed=lambda: audit.suppressed,
    )
    context = OutputContext(config, authz, store, audit, metrics, reloader, connections)
    outputs = outputs_for(context)
    failures = {output.name: OutputFailures(output.name) for output in outputs}
    started: list[Output] = []
    runs: dict[asyncio.Task[NoReturn], Output] = {}
    try:
        for output in outputs:
            started.append(output)  # closed below even if its start fails halfway
            await output.start()
        warn_expiring_certificates(_certificates(config))
        watcher = PolicyWatcher(
            config.policy,
            config.trust_root,
            ent.state_dir,
            trusted,
            on_hangup=lambda: _reload_tls(reloader, authz, force=True),
        )
        # Outside the task group, which would wait for each to end however long it takes.
        runs = {_run(output): output for output in outputs}
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_deliver(spool, store, metrics), name="spool reader")
            tasks.create_task(_watch_audit(audit, store), name="audit health")
            tasks.create_task(_watch_tls(reloader, authz), name="tls material")
            if config.audit.siem is not None:
                exporter = _exporter(config, trusted.policy.deployment_id)
                tasks.create_task(exporter.run(), name="siem export")
            async for accepted in watcher.updates():
                _apply(accepted.policy, store, authz, outputs, failures)
                settle()  # the new policy out of the collector's view, the old one freed
    finally:
        store.close()
        await stop_outputs(runs, started, failures)
        spool.close()


def _run(output: Output) -> asyncio.Task[NoReturn]:
    return asyncio.create_task(run_contained(output), name=f"output {output.name}")


async def stop_outputs(
    runs: Mapping[asyncio.Task[NoReturn], Output],
    outputs: list[Output],
    failures: dict[str, OutputFailures],
) -> None:
    """End the outputs' runs, then close every output that was started (its start may have
    failed halfway), in at most OUTPUT_STOP_S whatever they do: a run or a close() still
    going at its deadline is cancelled (again) and left behind, logged as `output_failed`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OUTPUT_STOP_S
    for task in runs:
        task.cancel()
    await _wait_bounded(runs, RUN_STOP_S, "stop", failures)
    closing = {asyncio.create_task(output.close()): output for output in reversed(outputs)}
    await _wait_bounded(closing, deadline - loop.time(), "close", failures)


async def _wait_bounded(
    tasks: Mapping[asyncio.Task[Any], Output],
    wait_s: float,
    stage: str,
    failures: dict[str, OutputFailures],
) -> None:
    """Wait up to `wait_s` for each output's task; one still going is cancelled and logged,
    never waited for. What one raised is logged too: the others end all the same."""
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, wait_s))
    for task in pending:
        task.cancel()  # psycopg, for one, gives up its own cancel-and-wait at a second one
        why = f"did not end within {wait_s:.1f} s of the stop: left behind"
        failures[tasks[task].name].failed(stage, why)
    for task in done:
        if not task.cancelled() and (error := task.exception()) is not None:
            failures[tasks[task].name].failed(stage, error)


def _apply(
    policy: Policy,
    store: Store,
    authz: Authorization,
    outputs: list[Output],
    failures: dict[str, OutputFailures],
) -> None:
    """Switch to a newer policy: the store, the authorization, then every output (the API's
    open streams get the new view). An output that fails to take it is logged; the others
    are told all the same."""
    store.use_policy(policy)
    authz.use_policy(policy)
    for output in outputs:
        try:
            output.use_policy(policy)
        except Exception as e:  # the output's bug: the half and the other outputs go on
            failures[output.name].failed("use_policy", e)


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
        authz.use_revoked(revoked)  # open streams of a revoked serial end at once


async def _watch_tls(reloader: tls.EndpointReloader, authz: Authorization) -> None:
    """New certificate, key, client CA or CRL files take effect for new connections; a new
    CRL's revocations for open ones too."""
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


class _SpoolReading:
    """The spool receiver, reopened from its saved position after a failed read: a read
    that fails midway may have moved past records it never returned; and the watch that
    wakes it when the spool grows."""

    def __init__(self, directory: Path, state_dir: Path) -> None:
        self._directory = directory
        self._state_dir = state_dir
        self.receiver = SpoolReceiver(directory, state_dir)
        self.watch = SpoolWatch(directory, POLL_S)

    def close(self) -> None:
        self.receiver.close()
        self.watch.close()

    def reopen(self) -> None:
        self.receiver.close()
        self.receiver = SpoolReceiver(self._directory, self._state_dir)


async def _deliver(spool: _SpoolReading, store: Store, metrics: EnterpriseMetrics) -> None:
    """Spool → store, for as long as the half runs. A failed read or position save (out of
    descriptors, an I/O error) is retried with backoff and logged once per episode; it never
    ends the half, and no record is delivered twice or skipped."""
    failing = Episode(log, "spool_read_failed", "spool_read_recovered")
    pause = SPOOL_RETRY_S[0]
    reopen = False
    committed = True  # the saved position is where the store has got to
    while True:
        try:
            if reopen:
                spool.reopen()
                reopen = False
            if not committed:
                await _commit(spool.receiver)
                committed = True
            checkpoints: list[bytes] = []
            resync: list[Record] = []  # only behind a diode (ADR 0019)
            records = spool.receiver.receive(checkpoints=checkpoints, resync=resync)
            if records:
                store.apply(records)
                metrics.records_received.inc(len(records))
            if resync:
                store.apply_resync(resync)
            if checkpoints:
                _witness(checkpoints)
            if records or checkpoints or resync:
                committed = False
                await _commit(spool.receiver)
                committed = True
        except (ChannelError, OSError) as e:
            cause = e.__cause__ if isinstance(e.__cause__, OSError) else e
            error = errno.errorcode.get(getattr(cause, "errno", None) or 0, type(cause).__name__)
            metrics.spool_read_errors.labels(error).inc()
            failing.hit(error, error=str(e), retry_in_s=pause)
            reopen = committed  # what was read but not delivered is read again
            await asyncio.sleep(pause)
            pause = min(SPOOL_RETRY_S[1], pause * 2)
            continue
        if failing.active:
            failing.end(resume_after_seq=spool.receiver.last_seq)
            pause = SPOOL_RETRY_S[0]
        # An idle reader waits for the spool to grow; while catching up, consumers drain
        # between batches.
        if records:
            await asyncio.sleep(0)
        else:
            await spool.watch.wait()


async def _commit(receiver: SpoolReceiver) -> None:
    """Save the reader's position with its fsync in a worker thread: the fsync takes
    milliseconds, and on the loop it held every output's work behind it (docs/performance.md,
    "The enterprise half at 100,000 points/s"). The reader waits for it, and nothing else
    touches the receiver meanwhile."""
    await asyncio.to_thread(receiver.commit)


def _witness(checkpoints: list[bytes]) -> None:
    """The plant's audit checkpoints that crossed, each kept as an `audit_checkpoint_witnessed`
    entry of this half's audit log (written by the audit forwarder, like every catalogue
    event), before the spool position moves past them: a crash in between witnesses one
    again after the restart, an identical entry `audit verify` counts as the same witness.
    What is not a well-formed plant checkpoint is refused, logged and skipped."""
    for unverified in checkpoints:
        try:
            details = witness_details(unverified)
        except ValueError as e:
            log.error("spool_checkpoint_refused", reason=str(e), bytes=len(unverified))
            continue
        log.info(WITNESSED, actor=CROSSING_WRITER, **details)
