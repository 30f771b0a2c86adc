"""Benchmark: one appliance at 1,000, 10,000 and 100,000 signals (issue 19), and the sweep.

For each signal count N: the synthetic plant of bench/pipeline.py (10 signals an asset, each
asset with its semantic model and a derived signal; at 100,000 signals 10,000 assets) spread
over Modbus devices of at most SIGNALS_PER_DEVICE signals each (requests of at most 125
registers), every one polled each second. The devices are pymodbus servers in one child
process of their own. The broker runs as deployed, `python -m broker run` (a supervisor and
its two halves) on a throwaway appliance (broker.sim.appliance) with the MQTT sink on a real
Mosquitto; this process reads /v1/stream over mutual TLS and subscribes to the sink's
topics, as bench/footprint.py does.

Printed per N: `policy compile` of the policy as written (JSON) and `policy verify` of the
co-signed envelope, each a `python -m broker` process timed from outside; the time from
`broker run` to the first record read (its source_time) and to its arrival over SSE; then
over a window: scans done and scan slots skipped (from the two writes of the plant's paced
metrics file around the window), points/s delivered per output (SSE, MQTT; derived signals
counted too), added latency p50/p99 per output (arrival here - source_time), RSS of every
process and the broker's CPU. With several counts (`--signals 1000 10000 100000`) a table
follows, and `--png` draws the sweep;
`--contrast` adds the ThingsBoard IoT Gateway's figures at the same counts (bench/tb_gateway.py
--json), `--save` keeps the figures and `--replot` draws them again without a run.
Targets at 100,000 signals (issue 19): no skipped scans, >= 100,000 points/s to each output,
p99 <= 50 ms, all processes <= 500 MB RSS, first record <= 10 s, compile + verify <= 5 s.

Run from the repository root: `.venv/bin/python bench/scale.py --signals 1000 10000 100000
--png docs/img/scale-sweep.png`. Exits 0 whether or not the targets are met.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pipeline
import psutil
from footprint import CONSUMER_URI, MqttProbe, cpu_s, processes, with_mqtt_sink
from matplotlib.figure import Figure
from pipeline import StreamConsumer, percentile, synthetic_policy, wait_ready
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from support import REPO, device_process, free_port, mosquitto, rss_bytes, serve_until_stopped

from broker.policy import parse as policy_parse
from broker.policy.schema import REGISTER_WIDTH
from broker.sim.appliance import provision
from broker.trust import tls

SIGNALS_PER_DEVICE = 5_000  # 1,500 float32 = 3,000 holding registers: 24 requests a scan
POLL_S = 1.0
MAX_REQUESTS_PER_S = 200  # ~38 requests a scan; the default budget (20/s) would skip scans
MAX_CONNECTIONS = 2
RAW = {"input_register": 215, "holding_register": 0x41AC, "coil": True}  # 21.5 as float32 BE
METRICS_WAIT_S = 90.0  # for the plant's next metrics write after the window
TARGETS = {"p99_ms": 50.0, "rss_mb": 500.0, "first_s": 10.0, "policy_s": 5.0}
pipeline.READY_TIMEOUT_S = 600.0  # wait_ready's bound: a large policy takes long to start


# --- the plant: policy and devices ---------------------------------------------------------


def plant_policy(signals: int) -> dict[str, Any]:
    """bench/pipeline.py's synthetic plant, each device on a free loopback port, polled
    every POLL_S with a budget its scans fit in."""
    devices = max(1, -(-signals // SIGNALS_PER_DEVICE))
    document = synthetic_policy(signals, devices)
    for device in document["devices"]:
        device.update(
            port=free_port(),
            poll_interval_s=POLL_S,
            max_requests_per_s=MAX_REQUESTS_PER_S,
            max_connections=MAX_CONNECTIONS,
        )
    return document


def register_map(document: dict[str, Any]) -> dict[int, dict[str, int]]:
    """Per device port, how many addresses of each table its signals reach."""
    ports = {d["name"]: d["port"] for d in document["devices"]}
    sizes: dict[int, Counter[str]] = {port: Counter() for port in ports.values()}
    for signal in document["signals"]:
        if "device" in signal:
            source = signal["source"]
            end = source["address"] + REGISTER_WIDTH.get(source["type"], 1)
            port = ports[signal["device"]]
            sizes[port][source["table"]] = max(sizes[port][source["table"]], end)
    return {port: dict(tables) for port, tables in sizes.items()}


def serve_devices(tables: dict[int, dict[str, int]], ready: Event, stop: Event) -> None:
    """A pymodbus server per device, all in this (spawned) child's one event loop. Every
    float32 register pair reads 21.5 (0x41AC, 0x0000): even addresses hold the high word."""

    def registers(count: int, value: int, pairs: bool) -> list[SimData]:
        if not pairs:
            return [SimData(0, count=max(count, 1), values=value, datatype=DataType.REGISTERS)]
        words = [value if i % 2 == 0 else 0 for i in range(max(count, 2))]
        return [SimData(0, values=words, datatype=DataType.REGISTERS)]

    async def main() -> None:
        servers = []
        for port, size in tables.items():
            bits = [SimData(0, count=max(size.get("coil", 0), 1), values=True,
                            datatype=DataType.BITS)]  # fmt: skip
            holding = registers(size.get("holding_register", 0), RAW["holding_register"], True)
            inputs = registers(size.get("input_register", 0), RAW["input_register"], False)
            device = SimDevice(id=1, simdata=(bits, bits, holding, inputs))
            servers.append(ModbusTcpServer([device], address=("127.0.0.1", port)))
        await serve_until_stopped(servers, ready, stop)

    asyncio.run(main())


# --- the appliance -------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    config: Path
    api: int
    mqtt: int
    context: Any  # the consumer's ssl.SSLContext (Mosquitto takes it too)
    policy_yaml: Path
    envelope: Path
    trust_root: Path


def appliance(workdir: Path, document: dict[str, Any]) -> Setup:
    """The co-signed policy, broker.yaml with the MQTT sink, Mosquitto's config; and the
    policy as written, for `policy compile`: JSON, which is read in C (YAML at 100,000
    signals is 23 MB, over the 4 MiB a YAML document may have)."""
    api, mqtt = free_port(), free_port()
    policy = policy_parse.from_payload(msgspec.json.encode(document), "scale policy")
    made = provision(workdir, policy, port=api, consumer_uri=CONSUMER_URI)
    with_mqtt_sink(workdir, made.config, mqtt, "scale-sink")
    written = workdir / "policy.json"  # as a site's tooling would write it (docs/policy.md)
    written.write_bytes(msgspec.json.format(msgspec.json.encode(document)))
    context = tls.client_context(made.ca, made.client_cert, made.client_key)
    return Setup(made.config, api, mqtt, context, written, workdir / "policy.dsse.json",
                 workdir / "trust-root.yaml")  # fmt: skip


def timed_cli(*args: str) -> float:
    """Seconds a `python -m broker ARGS` process takes, as an owner would run it."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "broker", *args], capture_output=True,
                          cwd=REPO, check=False)  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"dmzbroker {' '.join(args)}: {done.stdout[-500:]!r}{done.stderr[-500:]!r}"
        )
    return seconds


def policy_seconds(setup: Setup, workdir: Path) -> tuple[float, float]:
    compiled = workdir / "compiled.dsse.json"
    compile_s = timed_cli("policy", "compile", str(setup.policy_yaml), "--out", str(compiled))
    verify_s = timed_cli("policy", "verify", str(setup.envelope), "--trust", str(setup.trust_root))
    return compile_s, verify_s


# --- one run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    signals: int
    records: int  # made a scan: one per signal, derived ones too
    compile_s: float
    verify_s: float
    first_read_s: float  # broker run -> source_time of the first record delivered
    first_seen_s: float  # broker run -> its arrival over SSE
    scans: int
    skipped: int
    rates: dict[str, float]  # points/s by output
    p50_ms: dict[str, float]
    p99_ms: dict[str, float]
    rss_mb: dict[str, float]  # by process
    cpu_pct: float  # the broker's processes, % of one core


_COUNTER = re.compile(rb"^dmzbroker_device_(scans|skipped_scans)_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def scan_counts(spool: Path) -> tuple[float, Counter[str]]:
    """When the plant last wrote its metrics file, and its whole scans and skipped slots,
    summed over devices."""
    counts: Counter[str] = Counter()
    path = spool / "metrics-plant.prom"
    try:
        written, text = path.stat().st_mtime, path.read_bytes()
    except FileNotFoundError:
        return 0.0, counts
    for name, value in _COUNTER.findall(text):
        counts[name.decode()] += int(float(value))
    return written, counts


async def counts_written_after(spool: Path, moment: float) -> Counter[str]:
    """The counts of the plant's first metrics write after `moment`. The plant paces the file
    to <= 5 % of a core (every ~40 s at 100,000 signals), so the scans of a window are read
    from the two writes around it; bounded, the latest write if none comes."""
    deadline = time.monotonic() + METRICS_WAIT_S
    written, counts = scan_counts(spool)
    while written <= moment and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        written, counts = scan_counts(spool)
    return counts


async def run_once(signals: int, workdir: Path, args: argparse.Namespace) -> Result:
    document = plant_policy(signals)
    setup = appliance(workdir, document)
    compile_s, verify_s = policy_seconds(setup, workdir)
    log = workdir / "broker.log"
    with (
        mosquitto(workdir / "mosquitto.conf") as mqtt_broker,
        device_process("modbus devices", serve_devices, register_map(document)),
    ):
        started = time.time()
        with log.open("wb") as out:
            broker = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "broker", "run", "--config", str(setup.config),
                "--same-user", "--reset-state", "--log-format", "json",
                stdout=out, stderr=out, cwd=REPO,
            )  # fmt: skip
        try:
            return await measure(signals, document, setup, broker, log, started,
                                 mqtt_broker.pid, (compile_s, verify_s), args)  # fmt: skip
        finally:
            if broker.returncode is None:
                broker.terminate()
                try:
                    await asyncio.wait_for(broker.wait(), 30)
                except TimeoutError:
                    broker.kill()
                    await broker.wait()


async def measure(
    signals: int,
    document: dict[str, Any],
    setup: Setup,
    broker: asyncio.subprocess.Process,
    log: Path,
    started: float,
    mosquitto_pid: int,
    policy_s: tuple[float, float],
    args: argparse.Namespace,
) -> Result:
    probe: MqttProbe | None = None
    async with aiohttp.ClientSession(
        f"https://127.0.0.1:{setup.api}", connector=aiohttp.TCPConnector(ssl=setup.context)
    ) as session:
        await wait_ready(session, "/v1/snapshot", broker, log)
        sse = StreamConsumer(frozenset())
        try:
            probe = MqttProbe(setup.mqtt, setup.context)
            async with session.get("/v1/stream", timeout=aiohttp.ClientTimeout()) as response:
                response.raise_for_status()
                reading = asyncio.create_task(sse.run(response))
                first_read, first_seen = await first_record(sse, started)
                await asyncio.sleep(args.warmup)
                procs = processes(psutil.Process(broker.pid))
                spool = setup.config.parent / "spool"
                before, cpu = scan_counts(spool)[1], cpu_s(procs)
                start = time.time()
                await asyncio.sleep(args.seconds)
                end, used = time.time(), cpu_s(procs) - cpu
                await asyncio.sleep(3.0)  # the window's last records arrive
                after = await counts_written_after(spool, end)
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
        finally:
            if probe is not None:
                probe.close()
    rss = {role: rss_bytes(p.pid) / 1e6 for role, p in procs.items()}
    rss["mosquitto"] = rss_bytes(mosquitto_pid) / 1e6
    outputs = {"SSE": sse.events, "MQTT": probe.events}
    windows = {name: window(events, start, end) for name, events in outputs.items()}
    return Result(
        signals=signals,
        records=len(document["signals"]),
        compile_s=policy_s[0],
        verify_s=policy_s[1],
        first_read_s=first_read,
        first_seen_s=first_seen,
        scans=after["scans"] - before["scans"],
        skipped=after["skipped_scans"] - before["skipped_scans"],
        rates={name: w[0] for name, w in windows.items()},
        p50_ms={name: w[1] for name, w in windows.items()},
        p99_ms={name: w[2] for name, w in windows.items()},
        rss_mb=rss,
        cpu_pct=100 * used / (end - start),
    )


async def first_record(sse: StreamConsumer, started: float) -> tuple[float, float]:
    """Seconds from `broker run` to the first record's source_time and to its arrival."""
    deadline = time.monotonic() + 300
    while not sse.events:
        if time.monotonic() > deadline:
            raise RuntimeError("no record reached the SSE consumer within 300 s")
        await asyncio.sleep(0.01)
    source, latency = sse.events[0]
    return source - started, source + latency - started


def window(
    events: list[tuple[float, float]], start: float, end: float
) -> tuple[float, float, float]:
    """Points/s whose source time is in the window, and their latency p50 and p99 (ms)."""
    latencies = sorted(1000 * lat for source, lat in list(events) if start <= source < end)
    if not latencies:
        return 0.0, float("nan"), float("nan")
    return (len(latencies) / (end - start), percentile(latencies, 0.5),
            percentile(latencies, 0.99))  # fmt: skip


# --- report --------------------------------------------------------------------------------


def print_result(r: Result) -> None:
    load = " ".join(f"{x:.2f}" for x in psutil.getloadavg())
    print(f"{r.signals:,} signals (load average {load})")
    print(f"  policy compile {r.compile_s:.1f} s + verify {r.verify_s:.1f} s = "
          f"{r.compile_s + r.verify_s:.1f} s (target <= {TARGETS['policy_s']:g} at 100,000)")  # fmt: skip
    print(f"  first record read {r.first_read_s:.1f} s after `broker run`, delivered over SSE "
          f"at {r.first_seen_s:.1f} s (target <= {TARGETS['first_s']:g})")  # fmt: skip
    print(f"  scans {r.scans:,} done, {r.skipped:,} slots skipped; "
          f"{r.records / POLL_S:,.0f} records/s offered (a scan's records: the read signals', the derived ones')")  # fmt: skip
    for name in r.rates:
        print(f"  {name:4} {r.rates[name]:9,.0f} points/s  latency p50 {r.p50_ms[name]:6.1f} ms"
              f"  p99 {r.p99_ms[name]:6.1f} ms")  # fmt: skip
    print("  RSS " + ", ".join(f"{role} {mb:.0f} MB" for role, mb in r.rss_mb.items())
          + f"; the broker {broker_mb(r):.0f} MB (target <= {TARGETS['rss_mb']:.0f} all together)")  # fmt: skip
    print(f"  CPU  the broker {r.cpu_pct:.0f} % of one core")
    sys.stdout.flush()


def broker_mb(r: Result) -> float:
    return sum(mb for role, mb in r.rss_mb.items() if role != "mosquitto")


def print_table(results: list[Result]) -> None:
    print()
    print(f"{'signals':>8} {'compile+verify':>14} {'first rec':>9} {'skipped':>7} "
          f"{'SSE pts/s':>10} {'MQTT pts/s':>10} {'SSE p99':>8} {'MQTT p99':>8} {'RSS MB':>7}")  # fmt: skip
    for r in results:
        print(f"{r.signals:>8,} {r.compile_s + r.verify_s:>12.1f} s {r.first_read_s:>7.1f} s "
              f"{r.skipped:>7,} {r.rates['SSE']:>10,.0f} {r.rates['MQTT']:>10,.0f} "
              f"{r.p99_ms['SSE']:>6.0f} ms {r.p99_ms['MQTT']:>6.0f} ms "
              f"{broker_mb(r):>7.0f}")  # fmt: skip


@dataclass(frozen=True)
class Contrast:
    """The ThingsBoard IoT Gateway at one signal count (bench/tb_gateway.py --json, polled
    every POLL_S), its windows averaged."""

    layout: str  # per-tag: one request a register; ranges: 125 registers a request
    signals: int
    points_per_s: float
    p99_ms: float
    rss_mb: float
    first_s: float | None


def read_contrast(path: Path) -> list[Contrast]:
    """bench/tb_gateway.py's windows at this sweep's poll interval, by layout and count."""
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["poll_ms"] == POLL_S * 1000:
            runs.setdefault((row["layout"], row["signals"]), []).append(row)
    return [
        Contrast(layout, signals,
                 sum(w["points_per_s"] for w in rows) / len(rows),
                 max(w["p99_ms"] for w in rows), max(w["rss_mb"] for w in rows),
                 rows[0].get("first_s"))
        for (layout, signals), rows in sorted(runs.items())
    ]  # fmt: skip


def print_contrast(contrast: list[Contrast]) -> None:
    print(f"\nThingsBoard IoT Gateway 3.8.5 (bench/tb_gateway.py), polled every {POLL_S:g} s:")
    print(
        f"{'layout':>8} {'signals':>8} {'first tel.':>10} {'points/s':>10} {'p99':>9} {'RSS MB':>7}"
    )
    for c in contrast:
        first = "none" if c.first_s is None else f"{c.first_s:.1f} s"
        print(f"{c.layout:>8} {c.signals:>8,} {first:>10} {c.points_per_s:>10,.0f} "
              f"{c.p99_ms:>6.0f} ms {c.rss_mb:>7.0f}")  # fmt: skip


def draw(results: list[Result], png: Path, contrast: list[Contrast]) -> None:
    """Four panels against the signal count, log-scaled: points/s, latency, RSS, start-up;
    the ThingsBoard gateway's figures dashed (its first telemetry on the start-up panel).
    Nothing delivered is no point: a log scale has no zero."""
    n = [r.signals for r in results]
    fig = Figure(figsize=(10, 7), layout="constrained")  # no pyplot: no display, no state
    axes = fig.subplots(2, 2)
    panels: list[tuple[Any, str, dict[str, list[float]], float | None]] = [
        (axes[0][0], "records/s delivered",
         {o: [r.rates[o] for r in results] for o in ("SSE", "MQTT")}
         | {"offered": [r.records / POLL_S for r in results]}, None),
        (axes[0][1], "added latency p99 (ms)",
         {o: [r.p99_ms[o] for r in results] for o in ("SSE", "MQTT")}, TARGETS["p99_ms"]),
        (axes[1][0], "RSS of the broker's processes (MB)",
         {"all": [broker_mb(r) for r in results]}, TARGETS["rss_mb"]),
        (axes[1][1], "seconds",
         {"compile + verify": [r.compile_s + r.verify_s for r in results],
          "first record": [r.first_read_s for r in results]}, TARGETS["first_s"]),
    ]  # fmt: skip
    tb = {"per-tag": "black", "ranges": "grey"}  # ThingsBoard's layouts, apart from ours
    for (ax, *_), figure in zip(panels, ("points_per_s", "p99_ms", "rss_mb", "first_s"),
                                strict=True):  # fmt: skip
        for layout, color in tb.items():
            runs = [c for c in contrast if c.layout == layout]
            values = [getattr(c, figure) or math.nan for c in runs]  # 0 or None: not drawn
            if runs:
                ax.plot([c.signals for c in runs], values, marker="x", linestyle="--",
                        color=color, label=f"TB gateway {layout}")  # fmt: skip
    for ax, title, series, target in panels:
        for label, values in series.items():
            ax.plot(n, [v or math.nan for v in values], marker="o", label=label)  # 0: not drawn
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("signals")
        ax.set_title(title)
        ax.legend(fontsize="small")
    fig.suptitle("dmzbroker on one 2-core appliance: scale sweep (bench/scale.py)"
                 + (", ThingsBoard IoT Gateway 3.8.5 dashed" if contrast else ""))  # fmt: skip
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    print(f"plot written to {png}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signals", type=int, nargs="+", default=[100_000])
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the window")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the window")
    parser.add_argument("--png", type=Path, help="draw the sweep here (several --signals)")
    parser.add_argument("--save", type=Path, help="write each count's figures here (JSON lines)")
    parser.add_argument("--replot", type=Path, help="draw and tabulate a --save file; run nothing")
    parser.add_argument("--contrast", type=Path,
                        help="bench/tb_gateway.py --json figures to draw and tabulate alongside")  # fmt: skip
    parser.add_argument("--tmpdir", type=Path, default=None)
    args = parser.parse_args()
    results = []
    if args.replot is not None:
        results = [Result(**json.loads(line)) for line in args.replot.read_text().splitlines()]
    for signals in [] if args.replot else args.signals:
        with tempfile.TemporaryDirectory(prefix="dmzbroker-scale-", dir=args.tmpdir) as tmp:
            results.append(asyncio.run(run_once(signals, Path(tmp), args)))
        print_result(results[-1])
        if args.save is not None:
            with args.save.open("a") as out:
                out.write(json.dumps(asdict(results[-1])) + "\n")
    contrast = read_contrast(args.contrast) if args.contrast else []
    if len(results) > 1:
        print_table(results)
    if contrast:
        print_contrast(contrast)
    if args.png is not None:
        draw(results, args.png, contrast)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
