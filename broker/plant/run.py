"""The plant half's process: connectors → pipeline → spool sender.

Opens no listening socket. The only thing it writes is the spool; the only peers it talks
to are the devices the policy names, with read-only services. A newer accepted policy
replaces the connectors and the pipeline without a restart; the island flag closes the
gate within a fraction of a second. Each checkpoint of the plant's audit log crosses the
spool too, so the enterprise half witnesses it (broker.audit.witness): with the next scan's
batch, or within WITNESS_WAIT_S when no scan comes. A checkpoint is made right after start
and right before the spool closes, so the entries of a run are witnessed up to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from broker import island
from broker.audit.entry import canonical
from broker.audit.log import AuditLog
from broker.audit.monitor import AuditMonitor
from broker.channel.spool import SpoolSender
from broker.config import BrokerConfig, OpcUaConfig
from broker.errors import ChannelError
from broker.health import ClockWatch, DiskWatch
from broker.metrics import PlantMetrics
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.registry import SupervisedDevice, supervised_devices
from broker.plant.maintenance import MaintenanceBook
from broker.plant.pipeline import PlantPipeline
from broker.policy import Policy
from broker.policy.activation import TrustedPolicy
from broker.policy.collection import settle, tune_garbage_collector
from broker.policy.watch import PolicyWatcher
from broker.records import Record

log = structlog.get_logger("plant")

# Samples waiting for the spool (2 s at 100,000 signals; ~25 MB): past this, connectors
# wait (backpressure). Counted in samples, not batches: a batch is a request's or a scan's.
QUEUE_SAMPLES = 200_000
WRITE_SAMPLES = 20_000  # samples made into records for one spool write (a few MB of records)
METRICS_EVERY_S = 2.0  # the metrics file is rewritten this often, or less often when
METRICS_SHARE = 0.05  # writing it would take more than this share of a core (at 100,000
# signals its per-signal series are 28 MB and 2 s of CPU: every 2 s it took a core)
WITNESS_WAIT_S = 0.5  # longest an audit checkpoint waits for the spool when no scan comes


class PlantHalf:
    def __init__(self, sender: SpoolSender, policy: Policy, maintenance: MaintenanceBook) -> None:
        self._sender = sender
        self._queue: asyncio.Queue[list[RawSample]] = asyncio.Queue()  # bounded by _put
        self._queued = 0  # samples in the queue
        self._room = asyncio.Event()  # set when the queue falls below QUEUE_SAMPLES
        self._maintenance = maintenance
        self.pipeline = PlantPipeline(policy, maintenance)
        self._policy = policy
        # One thread writes the spool, so shutting it down waits for a write in progress.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="spool-writer")
        # Audit checkpoints waiting to cross, appended by the audit log from any thread
        # (deque appends and pops are atomic: no lock the spool writer could wait on).
        self._checkpoints: deque[bytes] = deque()
        self._tasks: asyncio.TaskGroup | None = None
        self._connectors: asyncio.Task[None] | None = None
        self._switching = asyncio.Lock()  # a reload and an audit failure never interleave
        self._devices: dict[str, SupervisedDevice] = {}  # the running devices, for metrics
        self._opcua: OpcUaConfig | None = None  # run() sets it from the appliance config
        self.metrics = PlantMetrics(
            dropped=lambda: self.pipeline.gate.dropped,
            island=lambda: self.pipeline.gate.island,
            audit_failing=lambda: self.pipeline.gate.audit_failing,
            devices=lambda: dict(self._devices),
            written_seq=lambda: sender.next_seq - 1,
            signals=lambda: dict(self.pipeline.checks.stats),
        )

    async def run(self, config: BrokerConfig, trusted: TrustedPolicy, audit: AuditLog) -> None:
        watcher = PolicyWatcher(config.policy, config.trust_root, config.plant.state_dir, trusted)
        self._opcua = config.plant.opcua  # OPC UA connectors need its certificates and trust
        self.pipeline.gate.island = island.is_on(config.plant.state_dir)  # before any scan
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            tasks.create_task(self._write(), name="spool writer")
            tasks.create_task(self._watch_flags(config, audit), name="island and audit flags")
            tasks.create_task(self._write_metrics(config), name="metrics file")
            self._start_reading()
            async for accepted in watcher.updates():
                async with self._switching:
                    await self._stop_reading()
                    while not self._queue.empty():  # read under the old policy: never crosses
                        self._taken(len(self._queue.get_nowait()))
                    old_gate = self.pipeline.gate
                    self._policy = accepted.policy
                    self.pipeline = PlantPipeline(accepted.policy, self._maintenance)
                    self.pipeline.gate.island = old_gate.island
                    self.pipeline.gate.audit_failing = old_gate.audit_failing
                    if not old_gate.audit_failing:
                        self._start_reading()
                settle()  # the new policy out of the collector's view, the old one freed

    def _start_reading(self) -> None:
        assert self._tasks is not None
        self._connectors = self._tasks.create_task(self._read(self._policy), name="connectors")

    async def _stop_reading(self) -> None:
        """Cancel the connectors; each closes its device session on the way out."""
        if self._connectors is not None:
            self._connectors.cancel()
            await asyncio.gather(self._connectors, return_exceptions=True)
            self._connectors = None

    async def _read(self, policy: Policy) -> None:
        """Each device under its own supervisor, which also builds its connector: whatever
        one raises, or lacks in the appliance config, stays with that device."""
        self._devices = supervised_devices(policy, self._opcua)
        async with asyncio.TaskGroup() as tasks:
            for name, device in self._devices.items():
                tasks.create_task(device.run(self._put), name=f"connector {name}")

    async def _put(self, samples: list[RawSample]) -> None:
        """A connector's batch, queued for the spool; waits while QUEUE_SAMPLES wait."""
        while self._queued >= QUEUE_SAMPLES:
            self._room.clear()
            await self._room.wait()
        self._queued += len(samples)
        self._queue.put_nowait(samples)

    def _taken(self, samples: int) -> None:
        self._queued -= samples
        if self._queued < QUEUE_SAMPLES:
            self._room.set()

    def witness(self, entry: dict[str, Any]) -> None:
        """The audit log's `on_checkpoint` hook: queue the entry to cross with the next
        batch. Called under the audit log's lock, maybe from the spool writer's own thread
        (it logs too), so it only appends: it never waits for the spool."""
        self._checkpoints.append(canonical(entry))

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            scans = []
            if not self._checkpoints:
                with contextlib.suppress(TimeoutError):  # no scan: checkpoints still cross
                    async with asyncio.timeout(WITNESS_WAIT_S):
                        scans.append(await self._queue.get())
            # Group commit: what is waiting, one fsync; at most WRITE_SAMPLES a write, so a
            # spool that fell behind does not turn a whole queue into records at once.
            taken = sum(len(scan) for scan in scans)
            while taken < WRITE_SAMPLES and not self._queue.empty():
                scans.append(self._queue.get_nowait())
                taken += len(scans[-1])
            self._taken(taken)
            # One batch at a time through the pipeline, so each record carries its own scan's
            # asset state (a batch holds each modelled asset's signals whole: ADR 0032).
            records = [record for scan in scans for record in self.pipeline.process(scan)]
            checkpoints = self._take_checkpoints()
            if records or checkpoints:
                await loop.run_in_executor(self._writer, self._send, records, checkpoints)

    def _take_checkpoints(self) -> list[bytes]:
        taken: list[bytes] = []
        while self._checkpoints:
            taken.append(self._checkpoints.popleft())
        return taken

    def _send(self, records: list[Record], checkpoints: list[bytes]) -> None:
        self._sender.send(records, checkpoints)
        self.metrics.records_written.inc(len(records))

    def send_last_checkpoint(self, audit: AuditLog) -> None:
        """After the writer thread stopped: a checkpoint of everything so far, sent at once,
        so the enterprise half witnesses this run up to its end (only the closing entries
        written after the spool is closed wait for the next start's checkpoint). Not reason
        "stop": that is the writer's own last entry (AuditLog.close), and `audit verify` takes
        anything after a stop checkpoint as added."""
        audit.checkpoint("time")
        checkpoints = self._take_checkpoints()
        try:
            self._sender.send([], checkpoints)
        except ChannelError as e:
            log.error("spool_checkpoint_unsent", error=str(e), checkpoints=len(checkpoints))

    async def finish_sending(self) -> None:
        """Let the writer thread finish the batch it is writing, even when the task that
        waited for it was cancelled (its thread goes on): the spool must not close under a
        write."""
        await asyncio.to_thread(self._writer.shutdown)

    async def _watch_flags(self, config: BrokerConfig, audit: AuditLog) -> None:
        """The island flag, the audit log's health, the clock and the spool's disk."""
        monitor = AuditMonitor(audit, "nothing crosses until it can be written")
        clock = ClockWatch()
        spool_disk = DiskWatch(config.spool.dir, "spool")
        while True:
            clock.check()
            spool_disk.check()
            gate = self.pipeline.gate
            on = island.is_on(config.plant.state_dir)
            if on != gate.island:
                gate.island = on
                log.warning("island_mode_on" if on else "island_mode_off", noticed_by="plant")
            failing = monitor.check()
            if failing != gate.audit_failing:
                # Fail closed: nothing crosses, and the device sessions close cleanly (nothing
                # read may go unaudited); they reopen once the audit log can be written.
                async with self._switching:
                    self.pipeline.gate.audit_failing = failing
                    if failing:
                        await self._stop_reading()
                    else:
                        self._start_reading()
            await asyncio.sleep(island.CHECK_INTERVAL_S)

    async def _write_metrics(self, config: BrokerConfig) -> None:
        """The metrics file, in a task of its own: however long a write takes, the flags
        above are still checked every CHECK_INTERVAL_S."""
        while True:
            cost_s = await asyncio.to_thread(self._metrics_cost_s, config)
            await asyncio.sleep(max(METRICS_EVERY_S, cost_s / METRICS_SHARE))

    def _metrics_cost_s(self, config: BrokerConfig) -> float:
        """Write the metrics file; the CPU seconds the write took (its thread's own)."""
        started = time.thread_time()
        self.metrics.write(config.spool.dir)
        return time.thread_time() - started


async def run_plant(config: BrokerConfig, trusted: TrustedPolicy, audit: AuditLog) -> None:
    sender = SpoolSender(
        config.spool.dir,
        segment_bytes=config.spool.segment_mib * 1024 * 1024,
        retention_bytes=config.spool.retention_mib * 1024 * 1024,
    )
    policy = trusted.policy
    log.info(
        "plant_started",
        policy_version=policy.version,
        devices=len(policy.devices),
        signals=len(policy.signals),
        next_seq=sender.next_seq,
    )
    half = PlantHalf(sender, policy, MaintenanceBook(config.plant.maintenance))
    audit.on_checkpoint = half.witness
    tune_garbage_collector()
    settle()  # the policy, decoders, model and histories out of the collector's view
    try:
        # The start checkpoint was made before the spool opened: this one, covering it
        # and the start's entries (the accepted policy), is the first to cross.
        audit.checkpoint("start")
        await half.run(config, trusted, audit)
    finally:
        await half.finish_sending()
        await asyncio.to_thread(half.send_last_checkpoint, audit)
        audit.on_checkpoint = None  # the spool closes: the closing checkpoint cannot cross
        sender.close()
