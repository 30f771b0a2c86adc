"""Benchmark: the ThingsBoard IoT Gateway (PyPI `thingsboard-gateway` 3.8.5) on this machine.

The contrast of issue 19, run here instead of quoted: the real gateway, in a venv of its own
(`--install` makes it: never a dependency of this project), polls pymodbus devices with its
Modbus connector and publishes to a local Mosquitto as if it were ThingsBoard (the gateway
API's `v1/gateway/telemetry`, QoS 1, access-token login, anonymous on loopback). Its
connector config is the one its documentation shows: one `timeseries` entry per register,
which it reads with one request each, device by device, in order (`--layout ranges` gives it
address ranges of 125 registers instead, the most it can batch).

Every input register of the devices answers the device's clock when read (milliseconds mod
65,536, as `16uint`: a pymodbus action), so each value says when it was read; this process
subscribes to the telemetry and notes, per value, its latency (arrival here - the clock it
carries). Printed per window: points/s delivered (values that arrived in the window: a
gateway that falls behind still delivers, late), latency p50/p99, the gateway's RSS and its
CPU per 1,000 points/s as a share of one core (the figures bench/footprint.py prints for
dmzbroker). `--json` appends them to a file that bench/scale.py `--contrast` draws.

Everything runs in a temporary folder (the gateway's config, logs and working directory,
Mosquitto's config) and every process started here is stopped at the end. Run from the
repository root: `.venv/bin/python bench/tb_gateway.py --install` once, then
`.venv/bin/python bench/tb_gateway.py` (the like-for-like load: 1,000 registers every 100 ms)
or `--registers 10000 --poll-ms 1000` (a sweep point; at most --per-device registers a
device). Exits 0 whether or not the gateway keeps up; 1 if it cannot be run here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from pipeline import percentile
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from support import REPO, device_process, free_port, serve_until_stopped

TB_VERSION = "3.8.5"
TB_PACKAGES = [f"thingsboard-gateway=={TB_VERSION}", "pymodbus==3.9.2", "pyserial",
               "pyserial-asyncio"]  # fmt: skip  # the pymodbus its connector pins (else it pip-installs it)
VENV = REPO / "bench" / ".tb-venv"
CLOCK_WRAP_MS = 65_536  # a 16uint register holds the device clock mod this
MOSQUITTO = """listener {port} 127.0.0.1
allow_anonymous true
persistence false
set_tcp_nodelay true
max_queued_messages 0
"""
FIRST_S = 60.0  # the longest wait for the first telemetry before the windows start
RPC_REQUEST = "v1/devices/me/rpc/request/"
SESSION_LIMITS = {"maxPayloadSize": 65536, "maxInflightMessages": 100, "rateLimits": {},
                  "gatewayRateLimits": {}}  # fmt: skip
LOGGERS = ("service", "connector", "converter", "tb_connection", "storage", "database",
           "extension")  # fmt: skip


# --- the gateway's venv and config --------------------------------------------------------


def gateway_python(venv: Path, install: bool) -> Path:
    """The venv's interpreter with the gateway importable; made first if `install`."""
    python = venv / "bin" / "python"
    if install:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TB_PACKAGES], check=True)
    probe = [str(python), "-c", "import thingsboard_gateway.version as v; print(v.VERSION)"]
    if (
        not python.exists()
        or subprocess.run(probe, check=False, capture_output=True).returncode != 0
    ):
        raise SystemExit(f"no ThingsBoard gateway in {venv}: run this bench with --install once")
    return python


def devices(registers: int, per_device: int) -> list[tuple[str, int, int]]:
    """(name, port, registers) of each device: `registers` in all, at most `per_device` each."""
    counts = [min(per_device, registers - start) for start in range(0, registers, per_device)]
    return [(f"plc-{i}", free_port(), n) for i, n in enumerate(counts)]


def timeseries(count: int, layout: str) -> list[dict[str, Any]]:
    """The connector's reads: one tag per register (`per-tag`, one request each), or tags of
    up to 125 registers read as an address range (`ranges`)."""
    if layout == "per-tag":
        return [{"tag": f"reg_{a}", "type": "16uint", "functionCode": 4, "objectsCount": 1,
                 "address": a} for a in range(count)]  # fmt: skip
    return [{"tag": f"range_{a}_${{address}}",  # a tag per range: the connector keys reads by tag
             "type": "16uint", "functionCode": 4, "objectsCount": 1,
             "address": f"{a}-{min(a + 125, count) - 1}", "maxRegistersPerRequest": 125}
            for a in range(0, count, 125)]  # fmt: skip


def write_config(workdir: Path, mqtt: int, plcs: list[tuple[str, int, int]], args: Any) -> None:
    """tb_gateway.json (ThingsBoard = the local Mosquitto, no remote configuration, no rate
    limits), modbus.json and logs.json (its loggers at INFO, its default, to one file)."""
    main = json.loads((args.gateway_config_dir / "tb_gateway.json").read_text())
    tb = main["thingsboard"]
    tb.update(host="127.0.0.1", port=mqtt, remoteConfiguration=False, remoteShell=False)
    tb["security"] = {"type": "accessToken", "accessToken": "bench"}
    tb["statistics"]["enable"] = False
    for key in ("rateLimits", "dpRateLimits", "messagesRateLimits", "deviceMessagesRateLimits",
                "deviceRateLimits", "deviceDpRateLimits"):  # fmt: skip
        tb[key] = "0:0,"  # ThingsBoard's own limits are not this bench's subject
    main["storage"] = {"type": "memory", "read_records_count": 100, "max_records_count": 1_000_000}
    main["connectors"] = [{"type": "modbus", "name": "Modbus", "configuration": "modbus.json"}]
    slaves = [
        {"host": "127.0.0.1", "port": port, "type": "tcp", "method": "socket", "unitId": 1,
         "deviceName": name, "deviceType": "default", "timeout": 35, "byteOrder": "BIG",
         "wordOrder": "BIG", "retries": 3, "pollPeriod": args.poll_ms,
         "attributes": [], "timeseries": timeseries(count, args.layout),
         "attributeUpdates": [], "rpc": []}
        for name, port, count in plcs
    ]  # fmt: skip
    handler = {"class": "logging.FileHandler", "filename": str(workdir / "gateway.log"),
               "formatter": "plain"}  # fmt: skip
    logs = {"version": 1, "disable_existing_loggers": False,
            "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
            "handlers": {"file": handler},
            "loggers": {name: {"handlers": ["file"], "level": "INFO", "propagate": False}
                        for name in LOGGERS}}  # fmt: skip
    files = {
        "tb_gateway.json": main,
        "modbus.json": {"master": {"slaves": slaves}},
        "logs.json": logs,
    }
    for name, document in files.items():
        (workdir / name).write_text(json.dumps(document, indent=1))
    (workdir / "mosquitto.conf").write_text(MOSQUITTO.format(port=mqtt))


# --- the devices: input registers that tell the time --------------------------------------


def serve_clock_devices(plcs: list[tuple[str, int, int]], ready: Event, stop: Event) -> None:
    """A pymodbus server per device (in a spawned child) whose input registers, when read,
    answer the clock (ms mod CLOCK_WRAP_MS): each value says when it was read."""

    async def clock(_fc: int, start: int, address: int, count: int, registers: list[int],
                    _values: Any) -> None:  # fmt: skip
        offset = address - start
        registers[offset : offset + count] = [int(time.time() * 1000) % CLOCK_WRAP_MS] * count

    async def main() -> None:
        servers = []
        for _name, port, count in plcs:
            regs = [SimData(0, count=count, values=0, datatype=DataType.REGISTERS)]
            bits = [SimData(0, count=1, values=False, datatype=DataType.BITS)]
            device = SimDevice(id=1, simdata=(bits, bits, regs, regs), action=clock)
            servers.append(ModbusTcpServer([device], address=("127.0.0.1", port)))
        await serve_until_stopped(servers, ready, stop)

    asyncio.run(main())


# --- the probe: ThingsBoard's side of the telemetry ---------------------------------------


class TelemetryProbe:
    """ThingsBoard's side of the gateway's MQTT session (paho's own thread): answers its
    session-limits request as a ThingsBoard without rate limits would (the gateway sends
    nothing until it has them), and notes (read time, latency) of every telemetry value,
    the read time from the clock the value carries."""

    def __init__(self, port: int) -> None:
        self.events: list[tuple[float, float]] = []
        self._client = paho.Client(CallbackAPIVersion.VERSION2)
        self._client.on_message = self._on_message
        self.ready = threading.Event()
        self._client.on_connect = lambda c, *_: c.subscribe(
            [("v1/gateway/telemetry", 1), (f"{RPC_REQUEST}+", 1)]
        )
        self._client.on_subscribe = lambda *_: self.ready.set()
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _on_message(self, client: Any, _data: Any, message: paho.MQTTMessage) -> None:
        arrived_ms = time.time() * 1000
        if message.topic.startswith(RPC_REQUEST):
            answer = SESSION_LIMITS if b"getSessionLimits" in message.payload else {}
            reply = message.topic.replace("request", "response")
            client.publish(reply, json.dumps(answer), qos=1)
            return
        for entries in json.loads(message.payload).values():
            for entry in entries:
                for value in entry["values"].values():
                    latency_ms = (arrived_ms - value) % CLOCK_WRAP_MS
                    self.events.append(((arrived_ms - latency_ms) / 1000, latency_ms))

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@contextmanager
def started(command: list[str], workdir: Path, log: str, **env: str) -> Iterator[psutil.Process]:
    """`command` in `workdir` until the block ends; then it and its children are stopped."""
    with (workdir / log).open("wb") as out:
        # the gateway prints pymodbus 3.9's deprecation notice at every decode: not kept
        sink = subprocess.DEVNULL if log == "gateway.out" else out
        child = subprocess.Popen(command, cwd=workdir, stdout=sink, stderr=sink,
                                 env=os.environ | env)  # fmt: skip
    process = psutil.Process(child.pid)
    try:
        yield process
    finally:
        family = [process, *process.children(recursive=True)]
        for p in family:
            p.terminate()
        _gone, alive = psutil.wait_procs(family, timeout=15)
        for p in alive:
            p.kill()
        child.wait(5)


def gateway_cpu_s(gateway: psutil.Process) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in [gateway, *gateway.children(recursive=True)])


def measure(workdir: Path, python: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    mqtt = free_port()
    plcs = devices(args.registers, args.per_device)
    write_config(workdir, mqtt, plcs, args)
    command = [str(python), "-c", "from thingsboard_gateway.tb_gateway import main; main()"]
    with (
        started(["mosquitto", "-c", str(workdir / "mosquitto.conf")], workdir, "mosquitto.log"),
        subscribed(mqtt) as probe,  # before the gateway: it asks for its limits once only
        device_process("modbus devices", serve_clock_devices, plcs),
        started(command, workdir, "gateway.out", TB_GW_CONFIG_DIR=f"{workdir}/") as gateway,
    ):
        first = first_telemetry(probe, gateway, workdir)
        print(f"first telemetry {first:.1f} s after the gateway started" if first is not None
              else f"no telemetry in the first {FIRST_S:.0f} s")  # fmt: skip
        time.sleep(args.warmup)
        rows = [report(window, args, probe, gateway) for window in range(1, args.windows + 1)]
    for row in rows:
        row["first_s"] = first
    return rows


@contextmanager
def subscribed(port: int) -> Iterator[TelemetryProbe]:
    """A TelemetryProbe once Mosquitto has acknowledged its subscriptions."""
    deadline = time.monotonic() + 30
    while True:
        try:
            probe = TelemetryProbe(port)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise SystemExit(f"Mosquitto did not listen on port {port} within 30 s") from None
            time.sleep(0.1)
    try:
        if not probe.ready.wait(30):
            raise SystemExit("Mosquitto did not acknowledge the probe's subscriptions within 30 s")
        yield probe
    finally:
        probe.close()


def first_telemetry(probe: TelemetryProbe, gateway: psutil.Process, workdir: Path) -> float | None:
    """Seconds from the gateway's start to its first telemetry; None after FIRST_S."""
    started_at = gateway.create_time()
    while not probe.events:
        if not gateway.is_running() or gateway.status() == psutil.STATUS_ZOMBIE:
            kept = shutil.copytree(workdir, tempfile.mkdtemp(prefix="dmzbroker-tb-failed-"),
                                   dirs_exist_ok=True)  # fmt: skip
            raise SystemExit(f"the ThingsBoard gateway stopped; its logs are in {kept}")
        if time.time() - started_at > FIRST_S:
            return None
        time.sleep(0.05)
    return probe.events[0][0] + probe.events[0][1] / 1000 - started_at


def report(window: int, args: argparse.Namespace, probe: TelemetryProbe,
           gateway: psutil.Process) -> dict[str, Any]:  # fmt: skip
    start, cpu = time.time(), gateway_cpu_s(gateway)
    time.sleep(args.seconds)
    end, used = time.time(), gateway_cpu_s(gateway) - cpu
    events, probe.events = probe.events, []  # bounded: only the next window is kept
    # delivered = arrived in the window (a gateway falling behind still delivers, late)
    latencies = sorted(lat for read, lat in events if start <= read + lat / 1000 < end)
    rate = len(latencies) / (end - start)
    p50, p99 = (percentile(latencies, q) for q in (0.5, 0.99)) if latencies else (0.0, 0.0)
    rss = sum(p.memory_info().rss for p in [gateway, *gateway.children(recursive=True)]) / 1e6
    cpu_share = 100 * used / (end - start)
    per_1000 = cpu_share / (rate / 1000) if rate else float("inf")
    load = " ".join(f"{x:.2f}" for x in psutil.getloadavg())
    print(f"window {window}: {end - start:.0f} s, load average {load}")
    print(f"  TB   {rate:9,.0f} points/s of {args.registers * 1000 / args.poll_ms:,.0f} offered  "
          f"latency p50 {p50:6.1f} ms  p99 {p99:6.1f} ms")  # fmt: skip
    print(f"  RSS  gateway {rss:.0f} MB;  CPU {cpu_share:.0f} % of a core, "
          f"{per_1000:.2f} % per 1,000 points/s")  # fmt: skip
    sys.stdout.flush()
    return {"signals": args.registers, "poll_ms": args.poll_ms, "layout": args.layout,
            "points_per_s": rate, "p50_ms": p50, "p99_ms": p99, "rss_mb": rss,
            "cpu_pct": cpu_share, "cpu_per_1000": per_1000}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registers", type=int, default=1000)
    parser.add_argument("--poll-ms", type=int, default=100)
    parser.add_argument("--per-device", type=int, default=5000, help="registers a device")
    parser.add_argument("--layout", choices=("per-tag", "ranges"), default="per-tag")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before a window")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of a window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--venv", type=Path, default=VENV, help="the gateway's own venv")
    parser.add_argument("--install", action="store_true", help="make --venv first")
    parser.add_argument("--json", type=Path, help="append each window's figures here")
    parser.add_argument("--tmpdir", type=Path, default=None)
    args = parser.parse_args()
    # a stop from outside unwinds the with-blocks, which stop Mosquitto, devices and gateway
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    python = gateway_python(args.venv, args.install)
    args.gateway_config_dir = next(
        args.venv.glob("lib/python3*/site-packages/thingsboard_gateway/config")
    )
    print(f"ThingsBoard IoT Gateway {TB_VERSION} ({args.layout}): {args.registers:,} registers "
          f"polled every {args.poll_ms} ms ({args.registers * 1000 / args.poll_ms:,.0f} points/s offered)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dmzbroker-tb-", dir=args.tmpdir) as tmp:
        rows = measure(Path(tmp), python, args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
