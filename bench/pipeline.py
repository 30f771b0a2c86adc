"""Benchmark of the broker's data path: throughput without a network, latency over mutual TLS.

1. Throughput. A synthetic policy (by default 1,000 signals on 4 devices, a mix of bool,
   int16 and float32, 10 per asset, each asset with a semantic model: a state rule, ambient,
   load windows, a baseline, two rules, a derived signal) and batches of one scan of every
   signal a second, made before the clock starts. Every pipeline is first warmed with a
   day of history (untimed), so load windows span all their buckets and every numeric
   record carries its trend, as in a broker that has run for a while:
   - plant: every batch through PlantPipeline.process (gate, decode, quality checks,
     context) into SpoolSender.send (one write and one fsync per batch); also the same
     signals without any model, to show what the context costs;
   - enterprise: then every record through SpoolReceiver.receive, Store.apply and
     SpoolReceiver.commit, as broker.enterprise.run delivers them;
   - end to end: the two one after the other (the figure held against the target);
   - concurrent: a writer process and a reader process on one spool at the same time.
   Target: >= 50,000 points/s, held against "plant" with a semantic model (issue 7: context
   must keep the pipeline at that rate with 1,000 assets) and against "end to end" with
   --no-model (issue 2).

2. Latency. `python -m broker enterprise` runs as its own process, on a throwaway PKI made
   with `python -m broker certs` and the same synthetic policy written as YAML. This process
   makes samples at a fixed rate (by default 10,000 points/s in scans every 10 ms), stamped
   with the time they are made, sends them through the pipeline into the spool (the fsync in
   a worker thread, as broker.plant.run does), and reads /v1/stream over mutual TLS in the
   same event loop. Latency = the time an event's bytes arrive at the consumer - its
   source_time (both processes read the same wall clock).
   Target: p99 <= 50 ms, with no event missing.

3. Memory (`--memory`, instead of 1 and 2). This process's RSS after the policy of
   `--signals` is parsed, after the plant pipeline is built, and after it is warmed with a
   day of history as in 1 (the steady state of a half that has run for a day); with
   `--trace-memory` also the memory tracemalloc traces to each module during build and
   warm-up (slower, and the RSS then includes the tracer's own).

Run from the repository root: `make bench`, or `.venv/bin/python bench/pipeline.py --help`.
The spool is fsynced, so the temporary directory (--tmpdir) should be on a real disk.
Exits 0 whether or not the targets are met (PASS/FAIL is printed); non-zero only on a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import math
import multiprocessing
import os
import shutil
import ssl
import struct
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from support import free_port, rss_bytes

from broker import logs
from broker.channel.spool import SpoolReceiver, SpoolSender
from broker.enterprise.run import POLL_S
from broker.enterprise.store import Store
from broker.plant.connectors.base import RawSample
from broker.plant.decode import RawValue
from broker.plant.pipeline import PlantPipeline
from broker.policy import Policy
from broker.policy import parse as policy_parse
from broker.policy.collection import tune_garbage_collector
from broker.policy.schema import REGISTER_WIDTH
from broker.sim.appliance import provision
from broker.trust import tls

THROUGHPUT_TARGET = 50_000  # points/s: plant with context (issue 7), end to end without (2)
P99_TARGET_MS = 50.0

SEGMENT_BYTES = 16 * 1024 * 1024  # broker.config's defaults
RETENTION_BYTES = 1024 * 1024 * 1024
STREAM_QUEUE = 10_000

SIGNALS_PER_ASSET = 10  # the first one is the asset's state signal
KINDS = ("int16", "float32", "bool")
TABLE = {"int16": "input_register", "float32": "holding_register", "bool": "coil"}
UNITS: dict[str, dict[str, Any]] = {
    "int16": {"unit": "degC", "scale": 0.1},
    "float32": {"unit": "kW"},
    "bool": {},
}
RAW: dict[str, RawValue] = {
    "int16": (215,),
    "float32": struct.unpack(">2H", struct.pack(">f", 21.5)),
    "bool": True,
}

SCAN_INTERVAL = timedelta(seconds=1)  # between the source times of the timed scans
CONSUMER_URI = "spiffe://bench/consumer/probe"
READY_TIMEOUT_S = 30.0  # for a child process to come up
STALL_TIMEOUT_S = 30.0  # for the spool reader to see a new record
DRAIN_TIMEOUT_S = 5.0  # for the last records to reach the consumer
STOP_TIMEOUT_S = 10.0  # SIGTERM, then SIGKILL


# --- the synthetic plant -------------------------------------------------------------------


def asset_model(path: str) -> dict[str, Any]:
    """What the context evaluates for each asset: a state rule, ambient, load windows, a
    baseline of one measure, two rules (with the sample values and a warmed history, one is
    true: every record carries its alert)."""
    return {
        "path": path,
        "type": "pump",
        "states": [{"state": "running", "when": "running"}],
        "ambient": {"temperature": f"{path}/int16_3"},
        "load": {"signal": f"{path}/float32_4", "windows": ["15m", "24h"]},
        "baselines": [
            {
                "measure": "int16_6",
                "ambient": "temperature",
                "ambient_points": [0, 40],
                "load_points": [10, 30],
                "expected": [[18, 20], [22, 26]],
                "worse": "higher",
                "states": ["running"],
            }
        ],
        "rules": [
            {
                "name": "hot",
                "when": "state == 'running' and label('int16_6') != 'expected'",
                "alert": "hotter than expected",
                "action": "check the cooling",
                "outcome": "asset_life",
            },
            {
                "name": "heavy",
                "when": "load_mean('15m') > 20 and trend('float32_4') >= 0",
                "alert": "heavy load",
                "action": "check the load",
                "outcome": "energy",
            },
        ],
    }


def synthetic_policy(signals: int, devices: int, model: bool = True) -> dict[str, Any]:
    """A policy document: `signals` signals spread over `devices` devices, 10 per asset;
    with `model`, each asset has the context of `asset_model` and a derived signal."""
    next_address: Counter[tuple[str, str]] = Counter()
    signal_docs: list[dict[str, Any]] = []
    asset_docs: list[dict[str, Any]] = []
    for i in range(signals):
        device = f"plc-{i * devices // signals}"
        asset, k = divmod(i, SIGNALS_PER_ASSET)
        asset_path = f"bench/line/asset-{asset:04d}"
        kind = "bool" if k == 0 else KINDS[k % len(KINDS)]
        path = f"{asset_path}/running" if k == 0 else f"{asset_path}/{kind}_{k}"
        table = TABLE[kind]
        address = next_address[device, table]
        next_address[device, table] += REGISTER_WIDTH.get(kind, 1)
        source = {"table": table, "address": address, "type": kind}
        valid = {"range": {"min": -50, "max": 150}} if kind == "int16" else {}
        signal_docs.append(
            {"path": path, "device": device, "source": source, **UNITS[kind], **valid}
        )
        if model and k == SIGNALS_PER_ASSET - 1:
            asset_docs.append(asset_model(asset_path))
            signal_docs.append(
                {"path": f"{asset_path}/ratio", "source": {"expression": "float32_4 / int16_3"}}
            )
    return {
        "deployment_id": "bench",
        "version": 1,
        "expires": datetime.now(UTC) + timedelta(days=1),
        "roles": [{"name": "probe", "signals": ["**"]}],
        "consumers": [{"identity": CONSUMER_URI, "roles": ["probe"]}],
        "devices": [
            {"name": f"plc-{d}", "protocol": "modbus", "host": "127.0.0.1"} for d in range(devices)
        ],
        "assets": asset_docs,
        "signals": signal_docs,
    }


def make_policy(signals: int, devices: int, model: bool = True) -> Policy:
    document = synthetic_policy(signals, devices, model)
    return policy_parse.from_payload(msgspec.json.encode(document), "synthetic policy")


class Scanner:
    """Stands in for the connectors: samples of every signal in turn, stamped when made (or
    at the time given)."""

    def __init__(self, policy: Policy) -> None:
        self._points = [(s.path, RAW[s.source.type]) for s in policy.signals if s.device]
        self._next = 0

    def scan(self, size: int, at: datetime | None = None) -> list[RawSample]:
        now = at or datetime.now(UTC)
        samples = []
        for _ in range(size):
            path, raw = self._points[self._next]
            samples.append(RawSample(path, raw, now, "good"))
            self._next = (self._next + 1) % len(self._points)
        return samples


def full_scans(policy: Policy, times: Iterable[datetime]) -> Iterator[list[RawSample]]:
    """A scan of every signal read from devices at each of `times`."""
    scanner = Scanner(policy)
    read = sum(1 for s in policy.signals if s.device)
    return (scanner.scan(read, at) for at in times)


def timed_scans(policy: Policy, count: int) -> list[list[RawSample]]:
    """The scans timed, one every SCAN_INTERVAL, ending now."""
    start = datetime.now(UTC) - count * SCAN_INTERVAL
    return list(full_scans(policy, (start + i * SCAN_INTERVAL for i in range(count))))


# --- throughput ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    points: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.points / self.seconds


def warmed(policy: Policy, batches: Sequence[list[RawSample]]) -> PlantPipeline:
    """A pipeline with every history filled (see `warm`) before the first of `batches`."""
    pipeline = PlantPipeline(policy)
    warm(pipeline, policy, batches[0][0].source_time)
    return pipeline


def warm(pipeline: PlantPipeline, policy: Policy, before: datetime) -> None:
    """Fills every history of `pipeline` as a broker that has run for a day would have them
    before `before`: scans over the 25 h before it, every 45 min (each bucket of the 24 h load
    windows) then every 2 min for the last hour (each bucket of the 1 h trend lines), so
    trends are computed and carried, and window maxima span all their buckets."""
    day = [before - timedelta(hours=25) + i * timedelta(minutes=45) for i in range(32)]
    hour = [before - timedelta(hours=1) + i * timedelta(minutes=2) for i in range(30)]
    for scan in full_scans(policy, day + hour):
        pipeline.process(scan)


@dataclass(frozen=True)
class PlantTimes:
    seconds: float  # wall clock, process and send
    process_cpu: float  # this thread's CPU seconds in PlantPipeline.process
    send_cpu: float  # and in SpoolSender.send (its fsync waits are not CPU)


def write_all(
    pipeline: PlantPipeline, batches: Sequence[list[RawSample]], spool: Path
) -> PlantTimes:
    """The plant side: every batch through the pipeline into the spool. The CPU times are
    the figures to compare on a loaded machine: other processes stretch the wall clock."""
    sender = SpoolSender(spool, SEGMENT_BYTES, RETENTION_BYTES)
    process_cpu = send_cpu = 0.0
    try:
        start = time.perf_counter()
        for batch in batches:
            before = time.thread_time()
            records = pipeline.process(batch)
            made = time.thread_time()
            sender.send(records)
            process_cpu += made - before
            send_cpu += time.thread_time() - made
        return PlantTimes(time.perf_counter() - start, process_cpu, send_cpu)
    finally:
        sender.close()


def read_all(policy: Policy, spool: Path, state_dir: Path, total: int) -> float:
    """The enterprise side, until record `total` is applied, with the enterprise process's
    garbage-collector setting; returns seconds."""
    threshold = gc.get_threshold()
    tune_garbage_collector()
    try:
        return _read_all(policy, spool, state_dir, total)
    finally:
        gc.set_threshold(*threshold)


def _read_all(policy: Policy, spool: Path, state_dir: Path, total: int) -> float:
    receiver = SpoolReceiver(spool, state_dir)
    store = Store(policy, STREAM_QUEUE)
    try:
        start = progress = time.perf_counter()
        while receiver.last_seq < total:
            records = receiver.receive()
            now = time.perf_counter()
            if records:
                store.apply(records)
                receiver.commit()
                progress = now
            elif now - progress < STALL_TIMEOUT_S:
                time.sleep(POLL_S)  # caught up with the writer
            else:
                raise RuntimeError(f"read stalled at seq {receiver.last_seq} of {total}")
        return time.perf_counter() - start
    finally:
        receiver.close()


def _writer_process(
    signals: int, devices: int, model: bool, batch_count: int, spool: Path, start: Barrier
) -> None:
    """The writer of the concurrent run; `start` is a barrier shared with the reader."""
    policy = make_policy(signals, devices, model)
    batches = timed_scans(policy, batch_count)
    pipeline = warmed(policy, batches)
    start.wait()
    write_all(pipeline, batches, spool)


def run_concurrently(args: argparse.Namespace, policy: Policy, workdir: Path) -> Rate:
    """Writer and reader in two OS processes; timed until the reader has applied everything."""
    points = args.batches * args.signals
    spool = workdir / "spool"
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2, timeout=READY_TIMEOUT_S)
    writer = context.Process(
        target=_writer_process,
        args=(args.signals, args.devices, args.model, args.batches, spool, start),
        daemon=True,
    )
    writer.start()
    try:
        start.wait()
        seconds = read_all(policy, spool, workdir / "state", args.batches * len(policy.signals))
    finally:
        writer.join(READY_TIMEOUT_S)
        if writer.is_alive():
            writer.terminate()
            writer.join()
    if writer.exitcode != 0:
        raise RuntimeError(f"writer process exited with {writer.exitcode}")
    return Rate(points, seconds)


def measure_throughput(
    args: argparse.Namespace, workdir: Path
) -> tuple[dict[str, Rate], PlantTimes]:
    """Points are the samples read from devices; with the model, each scan also makes one
    derived record per asset, which the enterprise side reads as well."""
    policy = make_policy(args.signals, args.devices, args.model)
    points = args.batches * args.signals
    batches = timed_scans(policy, args.batches)
    plant = write_all(warmed(policy, batches), batches, workdir / "spool")
    records = args.batches * len(policy.signals)
    enterprise = read_all(policy, workdir / "spool", workdir / "state", records)
    bare = make_policy(args.signals, args.devices, model=False)
    bare_batches = timed_scans(bare, args.batches)
    no_context = write_all(warmed(bare, bare_batches), bare_batches, workdir / "spool-no-context")
    rates = {
        "plant": Rate(points, plant.seconds),
        "plant_no_context": Rate(points, no_context.seconds),
        "enterprise": Rate(points, enterprise),
        "end_to_end": Rate(points, plant.seconds + enterprise),
        "concurrent": run_concurrently(args, policy, workdir / "concurrent"),
    }
    return rates, plant


# --- latency: the enterprise process and its PKI -------------------------------------------


@contextlib.asynccontextmanager
async def enterprise_process(config: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m broker enterprise` with its output in `log`; stopped on exit."""
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker", "enterprise", "--config", str(config),
            "--reset-state", stdout=out, stderr=out,
        )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()


async def wait_ready(
    session: aiohttp.ClientSession,
    url: str,
    process: asyncio.subprocess.Process,
    log: Path,
) -> None:
    """Until the API answers `url` over mutual TLS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    problem = "no answer"
    while loop.time() < deadline:
        if process.returncode is not None:
            output = await asyncio.to_thread(log.read_text)
            raise RuntimeError(f"enterprise process exited:\n{output[-2000:]}")
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except aiohttp.ClientConnectionError as e:
            problem = str(e)
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url}: {problem} after {READY_TIMEOUT_S:.0f} s")


# --- latency: the paced plant half and the consumer ----------------------------------------


async def write_spool(
    queue: asyncio.Queue[list[RawSample]], pipeline: PlantPipeline, sender: SpoolSender
) -> None:
    """Group commit as broker.plant.run does: every scan that is waiting, one fsync."""
    while True:
        samples = await queue.get()
        taken = 1
        while not queue.empty():
            samples.extend(queue.get_nowait())
            taken += 1
        records = pipeline.process(samples)
        await asyncio.to_thread(sender.send, records)
        for _ in range(taken):
            queue.task_done()


async def feed_plant(
    policy: Policy, sender: SpoolSender, per_scan: int, interval: float, seconds: float
) -> list[tuple[float, int]]:
    """A scan of `per_scan` samples every `interval` s for `seconds`, into the spool.

    Returns the source time and size of every scan, once all of them are in the spool.
    """
    pipeline = PlantPipeline(policy)
    scanner = Scanner(policy)
    queue: asyncio.Queue[list[RawSample]] = asyncio.Queue()
    scans: list[tuple[float, int]] = []
    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as tasks:
        writer = tasks.create_task(write_spool(queue, pipeline, sender))
        start = loop.time()
        for tick in range(round(seconds / interval)):
            await asyncio.sleep(start + tick * interval - loop.time())
            samples = scanner.scan(per_scan)
            scans.append((samples[0].source_time.timestamp(), per_scan))
            queue.put_nowait(samples)
        await queue.join()
        writer.cancel()
    return scans


class _Event(msgspec.Struct):
    seq: int
    signal: str
    source_time: datetime


class StreamConsumer:
    """Reads /v1/stream; notes each event's source time and latency when its bytes arrive.

    Derived signals' records (made in the plant half, not sent by the scanner) are not
    counted: `sent` counts the scanner's points."""

    def __init__(self, derived: frozenset[str]) -> None:
        self._derived = derived
        self.events: list[tuple[float, float]] = []  # (source time, latency), seconds
        self.last_seq = 0
        self._awaited_seq = math.inf
        self._done = asyncio.Event()  # the awaited seq arrived, or the stream ended

    async def run(self, response: aiohttp.ClientResponse) -> None:
        decode = msgspec.json.Decoder(_Event).decode
        pending = b""
        try:
            async for chunk in response.content.iter_any():
                received = time.time()
                complete, _, pending = (pending + chunk).rpartition(b"\n\n")
                for line in complete.split(b"\n"):
                    if line.startswith(b"data: "):
                        event = decode(line[6:])
                        self.last_seq = event.seq
                        if event.signal not in self._derived:
                            source = event.source_time.timestamp()
                            self.events.append((source, received - source))
                if self.last_seq >= self._awaited_seq:
                    self._done.set()
        finally:
            self._done.set()

    async def drain(self, seq: int) -> None:
        """Until event `seq` has arrived, the stream has ended, or DRAIN_TIMEOUT_S passed."""
        self._awaited_seq = seq
        if self.last_seq < seq:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), DRAIN_TIMEOUT_S)


@dataclass(frozen=True)
class Latency:
    rate: float  # points/s in the measured window
    per_scan: int
    sent: int  # points whose source time is in the measured window
    received: int  # of those, delivered to the consumer
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def passed(self) -> bool:
        return self.received == self.sent > 0 and self.p99_ms <= P99_TARGET_MS


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(
    scans: list[tuple[float, int]], events: list[tuple[float, float]], args: argparse.Namespace
) -> Latency:
    window_start = scans[0][0] + args.warmup
    sent = sum(n for t, n in scans if t >= window_start)
    latencies = sorted(1000 * latency for t, latency in events if t >= window_start)
    if not latencies:
        raise RuntimeError(f"the consumer received none of the {sent} points measured")
    return Latency(
        rate=sent / args.duration,
        per_scan=scans[0][1],
        sent=sent,
        received=len(latencies),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        max_ms=latencies[-1],
    )


@dataclass(frozen=True)
class LatencySetup:
    policy: Policy  # the one the enterprise process loads, co-signed
    config: Path
    port: int
    ssl: ssl.SSLContext  # the consumer's
    log: Path  # the enterprise process's output


def prepare_latency(args: argparse.Namespace, workdir: Path) -> LatencySetup:
    """A throwaway appliance (PKI, owner keys, co-signed policy, broker.yaml) for the process."""
    workdir.mkdir()
    policy = make_policy(args.signals, args.devices, args.model)
    port = free_port()
    appliance = provision(workdir, policy, port=port, consumer_uri=CONSUMER_URI)
    return LatencySetup(
        policy=policy,
        config=appliance.config,
        port=port,
        ssl=tls.client_context(appliance.ca, appliance.client_cert, appliance.client_key),
        log=workdir / "enterprise.log",
    )


async def measure_latency(args: argparse.Namespace, setup: LatencySetup) -> Latency:
    interval = args.interval_ms / 1000
    per_scan = max(1, round(args.rate * interval))
    consumer = StreamConsumer(frozenset(s.path for s in setup.policy.signals if not s.device))
    async with (
        enterprise_process(setup.config, setup.log) as process,
        aiohttp.ClientSession(
            f"https://127.0.0.1:{setup.port}", connector=aiohttp.TCPConnector(ssl=setup.ssl)
        ) as session,
    ):
        await wait_ready(session, "/v1/snapshot", process, setup.log)
        async with session.get("/v1/stream") as response:
            response.raise_for_status()
            reading = asyncio.create_task(consumer.run(response))
            sender = SpoolSender(setup.config.parent / "spool", SEGMENT_BYTES, RETENTION_BYTES)
            try:
                seconds = args.warmup + args.duration
                scans = await feed_plant(setup.policy, sender, per_scan, interval, seconds)
                await consumer.drain(sender.next_seq - 1)
            finally:
                sender.close()
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
    return summarize(scans, consumer.events, args)


# --- memory --------------------------------------------------------------------------------


def rss_mb() -> float:
    """This process's resident set size now, MB of 2**20 bytes."""
    return rss_bytes() / 2**20


@dataclass(frozen=True)
class Memory:
    rss_mb: dict[str, float]  # stage → RSS after it
    warm_cpu_s: float  # the warm-up's CPU seconds
    traced_mb: dict[str, float]  # module → MB traced to it (with --trace-memory)


def measure_memory(args: argparse.Namespace) -> Memory:
    """RSS after each stage of bringing up the plant pipeline, garbage collected first."""
    rss = {"interpreter and imports": rss_mb()}
    policy = make_policy(args.signals, args.devices, args.model)
    gc.collect()
    rss["policy parsed"] = rss_mb()
    if args.trace_memory:
        tracemalloc.start()
    before = datetime.now(UTC)
    pipeline = PlantPipeline(policy)
    gc.collect()
    rss["pipeline built"] = rss_mb()
    start = time.process_time()
    warm(pipeline, policy, before)
    warm_cpu_s = time.process_time() - start
    gc.collect()
    rss["warmed with a day of history"] = rss_mb()
    traced: dict[str, float] = {}
    if args.trace_memory:
        snapshot = tracemalloc.take_snapshot()
        tracemalloc.stop()
        root = str(Path(__file__).resolve().parents[1]) + os.sep
        for stat in snapshot.statistics("filename")[:12]:
            name = stat.traceback[0].filename.removeprefix(root)
            traced[name] = stat.size / 1e6
    return Memory(rss, warm_cpu_s, traced)


def print_memory(args: argparse.Namespace, memory: Memory) -> None:
    model = "with" if args.model else "without"
    print(
        f"Plant half's memory: {args.signals:,} signals on {args.devices} devices, {model} "
        f"a semantic model (warm-up: {memory.warm_cpu_s:.1f} CPU s)"
    )
    for stage, mb in memory.rss_mb.items():
        print(f"  RSS {stage:<32}{mb:>8,.0f} MB")
    if memory.traced_mb:
        print("  traced during build and warm-up, by module (the RSS above includes the tracer)")
        for name, mb in memory.traced_mb.items():
            print(f"    {name:<54}{mb:>8,.1f} MB")


# --- report --------------------------------------------------------------------------------


def print_report(
    args: argparse.Namespace, throughput: dict[str, Rate], cpu: PlantTimes, latency: Latency
) -> None:
    kinds = Counter(
        s.source.type for s in make_policy(args.signals, args.devices, args.model).signals
    )
    mix = ", ".join(f"{n:,} {kind}" for kind, n in sorted(kinds.items()))
    print(
        f"dmzbroker pipeline benchmark: {args.signals:,} signals on {args.devices} devices ({mix})"
    )
    print()
    print(
        f"Throughput, no network: {args.batches} batches of {args.signals:,} samples "
        "(one scan of every signal), one fsync per batch"
    )
    labels = {
        "plant": "plant        process -> send",
        "plant_no_context": "  the same without a semantic model (no context)",
        "enterprise": "enterprise   receive -> apply -> commit",
        "end_to_end": "end to end   write all, then read all",
        "concurrent": "concurrent   writer and reader, 2 processes",
    }
    for key, label in labels.items():
        rate = throughput[key]
        print(
            f"  {label:<46}{rate.points:>9,} points {rate.seconds:>7.2f} s"
            f" {rate.per_s:>10,.0f} points/s"
        )
    points = throughput["plant"].points
    print(
        f"  plant CPU per point: process {cpu.process_cpu / points * 1e6:.2f} µs, send "
        f"{cpu.send_cpu / points * 1e6:.2f} µs ({points / (cpu.process_cpu + cpu.send_cpu):,.0f}"
        " points per CPU-second)"
    )
    held = target_figure(args)
    verdict = "PASS" if throughput[held].per_s >= THROUGHPUT_TARGET else "FAIL"
    what = {"plant": "through the plant half, with context", "end_to_end": "end to end"}[held]
    print(f"  target >= {THROUGHPUT_TARGET:,} points/s {what}: {verdict}")
    print()
    print(
        f"Latency, {args.rate:,.0f} points/s in scans of {latency.per_scan:,} every "
        f"{args.interval_ms:g} ms, source_time -> SSE event over mutual TLS"
    )
    print(
        f"  {args.duration:g} s measured after {args.warmup:g} s warm-up: "
        f"{latency.sent:,} points sent ({latency.rate:,.0f}/s), {latency.received:,} received"
    )
    print(
        f"  p50 {latency.p50_ms:.1f} ms   p99 {latency.p99_ms:.1f} ms   max {latency.max_ms:.1f} ms"
    )
    verdict = "PASS" if latency.passed else "FAIL"
    print(f"  target p99 <= {P99_TARGET_MS:g} ms, none missing: {verdict}")


def target_figure(args: argparse.Namespace) -> str:
    """The figure the target is held against: with context the plant pipeline's (issue 7),
    without it the whole path's (issue 2)."""
    return "plant" if args.model else "end_to_end"


def report_json(
    args: argparse.Namespace, throughput: dict[str, Rate], cpu: PlantTimes, latency: Latency
) -> str:
    return json.dumps(
        {
            "signals": args.signals,
            "devices": args.devices,
            "throughput": {
                "batch_size": args.signals,
                "batches": args.batches,
                "target_points_per_s": THROUGHPUT_TARGET,
                "target_figure": target_figure(args),
                "pass": throughput[target_figure(args)].per_s >= THROUGHPUT_TARGET,
                **{
                    key: {"points": r.points, "seconds": r.seconds, "points_per_s": r.per_s}
                    for key, r in throughput.items()
                },
                "plant_cpu_s": {"process": cpu.process_cpu, "send": cpu.send_cpu},
            },
            "latency": {
                "rate_points_per_s": latency.rate,
                "scan_size": latency.per_scan,
                "interval_ms": args.interval_ms,
                "warmup_s": args.warmup,
                "duration_s": args.duration,
                "sent": latency.sent,
                "received": latency.received,
                "p50_ms": latency.p50_ms,
                "p99_ms": latency.p99_ms,
                "max_ms": latency.max_ms,
                "target_p99_ms": P99_TARGET_MS,
                "pass": latency.passed,
            },
        },
        indent=2,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--signals", type=int, default=1000, help="signals in the policy")
    parser.add_argument("--devices", type=int, default=4, help="devices they are spread over")
    parser.add_argument(
        "--no-model",
        dest="model",
        action="store_false",
        help="no semantic model: records carry only their asset's path (issue 2's setup)",
    )
    parser.add_argument("--batches", type=int, default=200, help="throughput: full scans")
    parser.add_argument("--rate", type=float, default=10_000, help="latency: points/s")
    parser.add_argument("--interval-ms", type=float, default=10, help="latency: ms between scans")
    parser.add_argument("--duration", type=float, default=10, help="latency: seconds measured")
    parser.add_argument("--warmup", type=float, default=2, help="latency: seconds not measured")
    parser.add_argument("--tmpdir", type=Path, help="where the temporary files go")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="measure the plant pipeline's memory (RSS) instead of throughput and latency",
    )
    parser.add_argument(
        "--trace-memory",
        action="store_true",
        help="with --memory: also the memory traced to each module (slower)",
    )
    args = parser.parse_args()
    if min(args.signals, args.devices, args.batches) < 1:
        parser.error("--signals, --devices and --batches must be at least 1")
    if min(args.rate, args.interval_ms, args.duration) <= 0 or args.warmup < 0:
        parser.error("--rate, --interval-ms and --duration must be positive")
    if args.trace_memory and not args.memory:
        parser.error("--trace-memory goes with --memory")
    return args


def main() -> int:
    args = parse_args()
    logs.configure("auto", "bench")  # any log line of the broker goes to stderr
    if args.memory:
        memory = measure_memory(args)
        if args.json:
            print(json.dumps(dataclasses.asdict(memory), indent=2))
        else:
            print_memory(args, memory)
        return 0
    with tempfile.TemporaryDirectory(prefix="dmzbroker-bench-", dir=args.tmpdir) as tmp:
        workdir = Path(tmp)
        throughput, cpu = measure_throughput(args, workdir / "throughput")
        shutil.rmtree(workdir / "throughput")
        os.sync()  # else the write-back of its spools slows the latency run's fsyncs
        setup = prepare_latency(args, workdir / "latency")
        latency = asyncio.run(measure_latency(args, setup))
    if args.json:
        print(report_json(args, throughput, cpu, latency))
    else:
        print_report(args, throughput, cpu, latency)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything started has been stopped and removed by then
        sys.exit(130)
