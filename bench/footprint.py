"""Benchmark: footprint and latency at the like-for-like load of issue 19.

The load the ThingsBoard IoT Gateway was measured at: 1,000 int16 registers of one Modbus
device polled every 100 ms (10,000 points/s offered). The device is a pymodbus server in a
child process of its own; the broker runs as deployed, `python -m broker run` (a supervisor
and its two halves, each a process) on a throwaway appliance (broker.sim.appliance) with the
MQTT sink publishing to a real Mosquitto over mutual TLS. This process reads /v1/stream over
mutual TLS and subscribes to the sink's topics, and for each output notes every record's
latency: when its bytes arrive here - its source_time (the plant's read; one wall clock).

Printed per window: points/s delivered and latency p50/p99 per output (SSE, MQTT), RSS of
every process (the headline figure) and its PSS (shared pages split among the processes),
and the broker's CPU (supervisor and halves) per 1,000 points/s delivered, as a share of one
core. Targets (issue 19): MQTT p50 <= 15 ms; CPU <= 0.44 % per 1,000
points/s; all the broker's processes together <= 67 MB RSS. Run from the repository root:
`.venv/bin/python bench/footprint.py` (--help for the window and the load). Exits 0 whether
or not the targets are met; non-zero only on a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import paho.mqtt.client as paho
import psutil
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pipeline import StreamConsumer, percentile, wait_ready
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from support import REPO, device_process, free_port, serve_until_stopped

from broker.policy import parse as policy_parse
from broker.sim.appliance import DAYS, provision
from broker.trust import certs, tls

CONSUMER_URI = "spiffe://bench/consumer/probe"
TOPIC_PREFIX = "footprint"
MOSQUITTO = """listener {port} 127.0.0.1
cafile {pki}/ca.crt
certfile {pki}/mqtt-broker.crt
keyfile {pki}/mqtt-broker.key
require_certificate true
use_identity_as_username true
tls_version tlsv1.3
persistence false
user root
max_queued_messages 0
set_tcp_nodelay true
"""
TARGETS = {"mqtt_p50_ms": 15.0, "cpu_per_1000": 0.44, "rss_mb": 67.0}


def policy_document(
    port: int, registers: int, poll_s: float, requests_per_s: int = 200
) -> dict[str, Any]:
    """One Modbus device, `registers` int16 input registers, ten signals per asset."""
    return {
        "deployment_id": "footprint",
        "version": 1,
        "expires": datetime.now(UTC) + timedelta(days=1),
        "roles": [{"name": "probe", "signals": ["**"]}],
        "consumers": [{"identity": CONSUMER_URI, "roles": ["probe"]}],
        "devices": [
            {
                "name": "plc",
                "protocol": "modbus",
                "host": "127.0.0.1",
                "port": port,
                "unit_id": 1,
                "poll_interval_s": poll_s,
                # 8 requests a scan, 80/s: above the default 20 (spaced 1/requests_per_s apart)
                "max_requests_per_s": requests_per_s,
            }
        ],
        "signals": [
            {
                "path": f"bench/line/asset-{i // 10:04d}/reg_{i % 10}",
                "device": "plc",
                "source": {"table": "input_register", "address": i, "type": "int16"},
                "unit": "degC",
                "scale": 0.1,
            }
            for i in range(registers)
        ],
    }


def serve_device(port: int, registers: int, ready: Event, stop: Event) -> None:
    """A pymodbus server with `registers` input registers (in a spawned child)."""

    async def main() -> None:
        regs = [SimData(0, count=registers, values=215, datatype=DataType.REGISTERS)]
        bits = [SimData(0, count=1, values=False, datatype=DataType.BITS)]
        device = SimDevice(id=1, simdata=(bits, bits, regs, regs))
        server = ModbusTcpServer([device], address=("127.0.0.1", port))
        await serve_until_stopped([server], ready, stop)

    asyncio.run(main())


class _Event(msgspec.Struct):
    source_time: datetime


class MqttProbe:
    """Subscribes to the sink's topics (paho's own thread); notes (source time, latency)."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.events: list[tuple[float, float]] = []
        self._decode = msgspec.json.Decoder(list[_Event]).decode
        self._client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self._client.tls_set_context(context)
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *_: c.subscribe(f"{TOPIC_PREFIX}/#", qos=1)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _on_message(self, _client: Any, _data: Any, message: paho.MQTTMessage) -> None:
        received = time.time()
        for event in self._decode(message.payload):
            source = event.source_time.timestamp()
            self.events.append((source, received - source))

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@dataclass(frozen=True)
class Output:
    rate: float  # points/s whose source time is in the window
    p50_ms: float
    p99_ms: float


def summarize(events: list[tuple[float, float]], start: float, end: float) -> Output:
    latencies = sorted(1000 * lat for source, lat in list(events) if start <= source < end)
    if not latencies:
        raise RuntimeError("no record in the window reached this output")
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    return Output(len(latencies) / (end - start), p50, p99)


def appliance(workdir: Path, args: argparse.Namespace) -> tuple[Path, int, int, ssl.SSLContext]:
    """The appliance's config with its MQTT sink, Mosquitto's config; the API and MQTT
    ports, and the consumer's TLS context (it subscribes to Mosquitto with it too)."""
    api, mqtt, device = free_port(), free_port(), args.device_port
    rate = getattr(args, "requests_per_s", 200)  # latency_stages.py sets it
    document = policy_document(device, args.registers, args.poll_ms / 1000, rate)
    policy = policy_parse.from_payload(msgspec.json.encode(document), "footprint policy")
    made = provision(workdir, policy, port=api, consumer_uri=CONSUMER_URI)
    with_mqtt_sink(workdir, made.config, mqtt, "footprint-sink")
    context = tls.client_context(made.ca, made.client_cert, made.client_key)
    return made.config, api, mqtt, context


def with_mqtt_sink(workdir: Path, config_path: Path, port: int, client_id: str) -> None:
    """The provisioned appliance's MQTT sink, publishing over mTLS to a Mosquitto on `port`:
    its certificates, its `enterprise.mqtt` section and Mosquitto's config in `workdir`."""
    pki = workdir / "certs"
    certs.issue_server(
        pki, pki, name="mqtt-broker", dns=["localhost"], ips=["127.0.0.1"], days=DAYS
    )
    certs.issue_client(pki, pki, name="sink", uri="spiffe://bench/sink", days=DAYS)
    config = yaml.safe_load(config_path.read_text())
    config["enterprise"]["mqtt"] = {
        "host": "127.0.0.1", "port": port, "server_name": "localhost", "ca": "certs/ca.crt",
        "cert": "certs/sink.crt", "key": "certs/sink.key", "identity": CONSUMER_URI,
        "topic_prefix": TOPIC_PREFIX, "client_id": client_id,
    }  # fmt: skip
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    (workdir / "mosquitto.conf").write_text(MOSQUITTO.format(port=port, pki=pki))


def processes(root: psutil.Process) -> dict[str, psutil.Process]:
    """The supervisor and its halves, by role."""
    found = {"supervisor": root}
    for child in root.children(recursive=True):
        role = next((a for a in child.cmdline() if a in ("plant", "enterprise")), str(child.pid))
        found[role] = child
    return found


def pss_mb(process: psutil.Process) -> float:
    """Proportional set size (/proc/PID/smaps_rollup): each shared page split among the
    processes that map it, so the halves' PSS add up where their RSS counts shared pages twice."""
    for line in Path(f"/proc/{process.pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1e3
    raise RuntimeError(f"no Pss in /proc/{process.pid}/smaps_rollup")


def cpu_s(procs: dict[str, psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs.values())


@contextlib.asynccontextmanager
async def deployed(
    workdir: Path, config: Path, api: int, context: ssl.SSLContext
) -> AsyncIterator[
    tuple[asyncio.subprocess.Process, subprocess.Popen[bytes], aiohttp.ClientSession]
]:
    """Mosquitto and `python -m broker run` on `config`, until the API answers; yields the
    broker, Mosquitto and a session on the API. Both processes are stopped at the end."""
    mosquitto = subprocess.Popen(["mosquitto", "-c", str(workdir / "mosquitto.conf")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    log = workdir / "broker.log"
    with log.open("wb") as out:
        broker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker", "run", "--config", str(config), "--same-user",
            "--reset-state", "--log-format", "json", stdout=out, stderr=out, cwd=REPO,
        )  # fmt: skip
    try:
        async with aiohttp.ClientSession(
            f"https://127.0.0.1:{api}", connector=aiohttp.TCPConnector(ssl=context)
        ) as session:
            await wait_ready(session, "/v1/snapshot", broker, log)  # type: ignore[arg-type]
            yield broker, mosquitto, session
    finally:
        if broker.returncode is None:
            broker.terminate()
            try:
                await asyncio.wait_for(broker.wait(), 15)
            except TimeoutError:
                broker.kill()
                await broker.wait()
        mosquitto.terminate()
        mosquitto.wait(10)


async def measure(workdir: Path, args: argparse.Namespace) -> None:
    config, api, mqtt, context = appliance(workdir, args)
    async with deployed(workdir, config, api, context) as (broker, mosquitto, session):
        probe = MqttProbe(mqtt, context)
        try:
            sse = StreamConsumer(frozenset())
            async with session.get("/v1/stream") as response:
                response.raise_for_status()
                reading = asyncio.create_task(sse.run(response))
                await asyncio.sleep(args.warmup)
                for window in range(1, args.windows + 1):
                    await report(window, args, sse, probe, psutil.Process(broker.pid), mosquitto)
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
        finally:
            probe.close()


async def report(
    window: int,
    args: argparse.Namespace,
    sse: StreamConsumer,
    probe: MqttProbe,
    root: psutil.Process,
    mosquitto: subprocess.Popen[bytes],
) -> None:
    procs = processes(root)
    start, cpu = time.time(), cpu_s(procs)
    await asyncio.sleep(args.seconds)
    end, used = time.time(), cpu_s(procs) - cpu
    await asyncio.sleep(1.0)  # the window's last records arrive
    outputs = {
        "SSE": summarize(sse.events, start, end),
        "MQTT": summarize(probe.events, start, end),
    }
    del sse.events[:], probe.events[:]  # bounded: only the next window is kept
    rss = {role: p.memory_info().rss / 1e6 for role, p in procs.items()}
    pss = {role: pss_mb(p) for role, p in procs.items()}
    delivered = outputs["SSE"].rate
    cpu_share = 100 * used / (end - start) / (delivered / 1000)
    load = " ".join(f"{x:.2f}" for x in psutil.getloadavg())
    print(f"window {window}: {end - start:.0f} s, load average {load}")
    for name, o in outputs.items():
        print(f"  {name:4} {o.rate:9,.0f} points/s  latency p50 {o.p50_ms:6.1f} ms  "
              f"p99 {o.p99_ms:6.1f} ms")  # fmt: skip
    print("  RSS " + ", ".join(f"{role} {mb:.0f} MB" for role, mb in rss.items())
          + f"; together {sum(rss.values()):.0f} MB (target <= {TARGETS['rss_mb']:.0f}); "
          f"mosquitto {psutil.Process(mosquitto.pid).memory_info().rss / 1e6:.0f} MB")  # fmt: skip
    print("  PSS " + ", ".join(f"{role} {mb:.0f} MB" for role, mb in pss.items())
          + f"; together {sum(pss.values()):.0f} MB (pages shared by the three counted once)")  # fmt: skip
    print(f"  CPU  {cpu_share:.2f} % of a core per 1,000 points/s (target <= "
          f"{TARGETS['cpu_per_1000']}); MQTT p50 target <= {TARGETS['mqtt_p50_ms']:.0f} ms")  # fmt: skip
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registers", type=int, default=1000)
    parser.add_argument("--poll-ms", type=float, default=100.0)
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="seconds before the first window"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="length of a window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--tmpdir", type=Path, default=None)
    args = parser.parse_args()
    args.device_port = free_port()
    print(f"{args.registers:,} int16 registers polled every {args.poll_ms:g} ms "
          f"({args.registers * 1000 / args.poll_ms:,.0f} points/s offered)")  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="dmzbroker-footprint-", dir=args.tmpdir) as tmp,
        device_process("modbus device", serve_device, args.device_port, args.registers),
    ):
        asyncio.run(measure(Path(tmp), args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
