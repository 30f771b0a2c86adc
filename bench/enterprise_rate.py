"""Benchmark: points/s the enterprise half alone delivers to an SSE consumer and the MQTT sink.

bench/pipeline.py's synthetic plant (by default 10,000 signals, each asset with its semantic
model) is run through the real plant pipeline into a scratch spool before anything is timed,
so every record carries the context a deployed plant half gives it. Then
`python -m broker enterprise` runs as its own process on a throwaway appliance with the MQTT
sink publishing (QoS 1, mTLS) to a local Mosquitto, one consumer reads /v1/stream over mTLS,
and the scratch spool's bytes are appended to the half's spool at once (a fast writer: the
plant half's cost is not in the figure). Timed from that write until the consumer has the
last record and until the sink's saved position (moved after PUBACKs) reaches it. Target
(issue 19): >= 100,000 points/s to each, both outputs running together.
Run: `.venv/bin/python bench/enterprise_rate.py --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec
import pipeline
import psutil
import yaml
from footprint import CONSUMER_URI, with_mqtt_sink
from pipeline import synthetic_policy, timed_scans, wait_ready, warmed, write_all
from support import free_port

from broker.channel.spool import SpoolReceiver
from broker.policy import parse as policy_parse
from broker.sim.appliance import provision
from broker.trust import tls

TARGET = 100_000
DONE_TIMEOUT_S = float(os.environ.get("RATE_TIMEOUT_S", "300"))


def fill_scratch(workdir: Path, document: dict[str, object], scans: int) -> tuple[Path, int]:
    """`scans` scans of every signal through the plant pipeline into a scratch spool;
    returns its folder and the number of records (derived ones too)."""
    policy = policy_parse.from_payload(msgspec.json.encode(document), "bench policy")
    batches = timed_scans(policy, scans)
    plant = warmed(policy, batches)
    scratch = workdir / "scratch-spool"
    pipeline.SEGMENT_BYTES = 1 << 30  # one segment: appended as one file
    write_all(plant, batches, scratch)
    receiver = SpoolReceiver(scratch, workdir / "scratch-state")
    total = 0
    while records := receiver.receive():
        total = records[-1].seq
    receiver.close()
    return scratch, total


async def consume(response: aiohttp.ClientResponse, last: int, done: asyncio.Event) -> None:
    """Until the event whose id is `last` has arrived (ids are seqs, in order)."""
    marker = b"id: %d\n" % last
    tail = b""
    async for chunk in response.content.iter_any():
        if marker in tail + chunk[: len(marker)] or marker in chunk:
            done.set()
            return
        tail = chunk[-len(marker) :]


def sink_position(state: Path) -> int:
    try:
        return int(json.loads((state / "spool-position-mqtt.json").read_text())["seq"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


async def measure(workdir: Path, args: argparse.Namespace) -> tuple[float, float | None]:
    document = synthetic_policy(args.signals, max(1, args.signals // 5000))
    scratch, total = fill_scratch(workdir, document, args.scans)
    api, mqtt = free_port(), free_port()
    policy = policy_parse.from_payload(msgspec.json.encode(document), "bench policy")
    made = provision(workdir, policy, port=api, consumer_uri=CONSUMER_URI)
    if args.mqtt:
        with_mqtt_sink(workdir, made.config, mqtt, "rate-sink")
    context = tls.client_context(made.ca, made.client_cert, made.client_key)
    config = made.config.read_text()
    spool = workdir / "spool"
    assert "spool" in config
    mosquitto = subprocess.Popen(["mosquitto", "-c", str(workdir / "mosquitto.conf")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if args.mqtt else None  # fmt: skip
    log = workdir / "enterprise.log"
    spool.mkdir()  # as the plant half would have made it
    try:
        async with pipeline.enterprise_process(made.config, log) as process:
            print(f"enterprise half pid {process.pid}", flush=True)
            async with aiohttp.ClientSession(
                f"https://127.0.0.1:{api}", connector=aiohttp.TCPConnector(ssl=context)
            ) as session:
                await wait_ready(session, "/v1/snapshot", process, log)
                done = asyncio.Event()
                timeout = aiohttp.ClientTimeout(total=DONE_TIMEOUT_S)
                async with session.get("/v1/stream", timeout=timeout) as response:
                    reader = asyncio.create_task(consume(response, total, done))
                    if not args.sse:
                        done.set()
                    await asyncio.sleep(0.5)  # the subscription is registered
                    if args.pause:
                        await asyncio.to_thread(input, "profile now; Enter to start ")
                    state = _state_dir(made.config)
                    started = time.perf_counter()
                    cpu = _cpu(process.pid, mosquitto)
                    _append(scratch, spool)
                    sse_s = mqtt_s = None
                    while time.perf_counter() - started < DONE_TIMEOUT_S:
                        now = time.perf_counter() - started
                        if sse_s is None and done.is_set():
                            sse_s = now
                        if mqtt_s is None and (not args.mqtt or sink_position(state) >= total):
                            mqtt_s = now
                        if sse_s is not None and mqtt_s is not None:
                            break
                        await asyncio.sleep(0.01)
                    reader.cancel()
                    used = [b - a for a, b in zip(cpu, _cpu(process.pid, mosquitto), strict=True)]
                    print(f"CPU s: enterprise half {used[0]:.2f} ({used[0] / total * 1e6:.1f} µs "
                          f"a record), Mosquitto {used[1]:.2f}; the half's peak RSS "
                          f"{_peak_rss_mb(process.pid):.0f} MB", flush=True)  # fmt: skip
        if sse_s is None or mqtt_s is None:
            print(log.read_text()[-3000:], file=sys.stderr)
            raise RuntimeError(
                f"not done in {DONE_TIMEOUT_S:.0f} s (SSE {sse_s}, MQTT {mqtt_s}, position {sink_position(state)} of {total}): see {log}"
            )
        return total / sse_s, (total / mqtt_s if args.mqtt else None)
    finally:
        if mosquitto is not None:
            mosquitto.terminate()
            mosquitto.wait(10)


def _cpu(pid: int, mosquitto: subprocess.Popen[bytes] | None) -> list[float]:
    procs = [psutil.Process(pid)] + ([psutil.Process(mosquitto.pid)] if mosquitto else [])
    return [sum(p.cpu_times()[:2]) for p in procs] + [0.0] * (2 - len(procs))


def _peak_rss_mb(pid: int) -> float:
    """The process's resident set at its highest so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def _state_dir(config: Path) -> Path:
    loaded = yaml.safe_load(config.read_text())
    return (config.parent / loaded["enterprise"]["state_dir"]).resolve()


def _append(scratch: Path, spool: Path) -> None:
    """The scratch spool's segments written into the half's spool, in 4 MiB writes."""
    spool.mkdir(exist_ok=True)
    for segment in sorted(scratch.glob("*.seg")):
        data = segment.read_bytes()
        fd = os.open(spool / segment.name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for start in range(0, len(data), 4 << 20):
                os.write(fd, data[start : start + (4 << 20)])
        finally:
            os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signals", type=int, default=10_000)
    parser.add_argument("--scans", type=int, default=30, help="scans of every signal written")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-mqtt", dest="mqtt", action="store_false")
    parser.add_argument(
        "--no-sse",
        dest="sse",
        action="store_false",
        help="the consumer connects but its count is not awaited",
    )
    parser.add_argument("--pause", action="store_true", help="wait for Enter before the write")
    parser.add_argument("--tmpdir", type=Path, default=None)
    args = parser.parse_args()
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="dmzbroker-ent-rate-", dir=args.tmpdir) as tmp:
            sse, mqtt = asyncio.run(measure(Path(tmp), args))
        load = os.getloadavg()[0]
        shown = "off" if mqtt is None else f"{mqtt:,.0f}"
        print(f"enterprise half, {args.signals:,} signals x {args.scans} scans: SSE {sse:,.0f} "
              f"records/s, MQTT {shown} records/s (target >= {TARGET:,}); load {load:.2f}",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
