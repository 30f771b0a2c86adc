"""Benchmark: where a record's latency goes at the like-for-like load of issue 19, by stage.

The load and the deployment are bench/footprint.py's (1,000 int16 registers of a pymodbus
device polled every 100 ms; `python -m broker run` with the MQTT sink on a real Mosquitto).
Nothing in the broker is instrumented: each record's stages come from timestamps it already
carries and from three observers in this process, all on one wall clock:

- read: source_time, when the Modbus connector got the answer to the record's request;
- record made: broker_time, when the plant half's pipeline turned the sample into a record;
- in the spool: when a second, read-only reader of the spool (a `SpoolReceiver` with a
  position of its own, woken by a `SpoolWatch` like the enterprise half's readers, in a
  thread of its own) finds the record's frame - the plant's queue to its writer thread,
  encode, write() and this reader's wake-up (fsync does not hold a reader back);
- SSE / MQTT: when the record's bytes arrive here over /v1/stream, or from Mosquitto.

Printed per window: p50/p99 of each stage (read -> made, made -> spool, spool -> SSE, spool
-> MQTT, and end to end), matched by seq, with the load average. The observers cost this
process CPU that the broker then shares the cores with. Run from the repository root:
`.venv/bin/python bench/latency_stages.py` (--help for the window and the load).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import paho.mqtt.client as paho
import psutil
from footprint import MqttProbe, appliance, deployed, serve_device
from pipeline import percentile
from support import device_process, free_port

from broker.channel.spool import SpoolReceiver
from broker.channel.spool_watch import SpoolWatch

WATCH_POLL_S = 0.001  # the observer's fallback if it cannot watch (it says so)


class _Seen(msgspec.Struct):
    seq: int


class SpoolObserver:
    """A read-only reader of the spool in a thread of its own: seq -> (source time, broker
    time, when this reader found it), all as wall-clock seconds."""

    def __init__(self, spool: Path, state: Path) -> None:
        self.seen: dict[int, tuple[float, float, float]] = {}
        self._receiver = SpoolReceiver(spool, state, reader="bench")
        self._spool = spool
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        watch = SpoolWatch(self._spool, WATCH_POLL_S)
        if not watch.watching:
            print("  (the observer cannot watch the spool: polling every 1 ms)")
        try:
            while not self._stop.is_set():
                records = self._receiver.receive()
                now = time.time()
                for r in records:
                    self.seen[r.seq] = (r.source_time.timestamp(), r.broker_time.timestamp(), now)
                if not records:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(watch.wait(), 0.5)
        finally:
            watch.close()
            self._receiver.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


class SeqProbe(MqttProbe):
    """The MQTT probe, noting seq -> arrival instead of (source time, latency)."""

    def __init__(self, port: int, context: Any) -> None:
        self.arrived: dict[int, float] = {}
        super().__init__(port, context)
        self._decode = msgspec.json.Decoder(list[_Seen]).decode  # type: ignore[assignment]

    def _on_message(self, _client: Any, _data: Any, message: paho.MQTTMessage) -> None:
        received = time.time()
        for event in self._decode(message.payload):
            self.arrived[event.seq] = received  # type: ignore[attr-defined]


async def read_sse(response: aiohttp.ClientResponse, arrived: dict[int, float]) -> None:
    """seq -> when its bytes arrived, for every event of /v1/stream."""
    decode = msgspec.json.Decoder(_Seen).decode
    pending = b""
    async for chunk in response.content.iter_any():
        received = time.time()
        complete, _, pending = (pending + chunk).rpartition(b"\n\n")
        for line in complete.split(b"\n"):
            if line.startswith(b"data: "):
                arrived[decode(line[6:]).seq] = received


def stages(
    seen: dict[int, tuple[float, float, float]],
    sse: dict[int, float],
    mqtt: dict[int, float],
    start: float,
    end: float,
) -> dict[str, list[float]]:
    """Each stage's durations (ms) for the records read in [start, end) seen everywhere."""
    out: dict[str, list[float]] = {
        k: [] for k in ("read -> made", "  read -> scan's last", "  scan's last -> made",
                        "made -> spool", "spool -> SSE", "spool -> MQTT",
                        "read -> SSE", "read -> MQTT")
    }  # fmt: skip
    last_read: dict[float, float] = {}  # a scan's records share a broker time
    for source, made, _ in list(seen.values()):
        last_read[made] = max(source, last_read.get(made, source))
    for seq, (source, made, spooled) in list(seen.items()):
        if not start <= source < end or seq not in sse or seq not in mqtt:
            continue
        for name, a, b in (
            ("read -> made", source, made), ("  read -> scan's last", source, last_read[made]),
            ("  scan's last -> made", last_read[made], made), ("made -> spool", made, spooled),
            ("spool -> SSE", spooled, sse[seq]), ("spool -> MQTT", spooled, mqtt[seq]),
            ("read -> SSE", source, sse[seq]), ("read -> MQTT", source, mqtt[seq]),
        ):  # fmt: skip
            out[name].append(1000 * (b - a))
    return out


async def measure(workdir: Path, args: argparse.Namespace) -> None:
    config, api, mqtt, context = appliance(workdir, args)
    async with deployed(workdir, config, api, context) as (_broker, _mosquitto, session):
        probe = SeqProbe(mqtt, context)
        observer = SpoolObserver(workdir / "spool", workdir / "bench-state")
        sse: dict[int, float] = {}
        try:
            async with session.get("/v1/stream") as response:
                response.raise_for_status()
                reading = asyncio.create_task(read_sse(response, sse))
                await asyncio.sleep(args.warmup)
                for window in range(1, args.windows + 1):
                    start = time.time()
                    await asyncio.sleep(args.seconds)
                    end = time.time()
                    await asyncio.sleep(1.0)  # the window's last records arrive
                    report(window, stages(observer.seen, sse, probe.arrived, start, end))
                    # bounded: forget what is already reported
                    for table in (observer.seen, sse, probe.arrived):
                        table.clear()
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
        finally:
            observer.close()
            probe.close()


def report(window: int, found: dict[str, list[float]]) -> None:
    load = " ".join(f"{x:.2f}" for x in psutil.getloadavg())
    print(f"window {window}: {len(found['read -> SSE']):,} records matched, load average {load}")
    for name, values in found.items():
        if values:
            values.sort()
            print(f"  {name:22} p50 {percentile(values, 0.5):6.1f} ms  "
                  f"p99 {percentile(values, 0.99):6.1f} ms")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registers", type=int, default=1000)
    parser.add_argument("--poll-ms", type=float, default=100.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of a window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--requests-per-s", type=int, default=200,
                        help="the device's max_requests_per_s (footprint.py's 200)")  # fmt: skip
    parser.add_argument("--tmpdir", type=Path, default=None)
    args = parser.parse_args()
    args.device_port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix="dmzbroker-stages-", dir=args.tmpdir) as tmp,
        device_process("modbus device", serve_device, args.device_port, args.registers),
    ):
        asyncio.run(measure(Path(tmp), args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
