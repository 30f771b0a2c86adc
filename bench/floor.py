"""Benchmark: the floors, what CPython and the chosen libraries cost at issue 19's loads.

Some of issue 19's targets may lie below what the stack can reach at all. This bench
measures the libraries alone, each in its cheapest correct use and in a process of its own,
with none of the broker's data path in the figure:

1. Memory. The modules each of the three processes held as deployed: `python -I -m broker
   run` (the supervisor) and each half started on its own with the same config, through
   tests/test_footprint.py's runner (sys.modules when the process ends), on a throwaway
   appliance at the like-for-like load with the MQTT sink on, once records have reached MQTT
   and a /v1/stream consumer. They are then imported into a fresh `python -I` in groups
   (asyncio and ssl; the rest of the standard library; each library; the broker's own
   modules), RSS after each group, next to the RSS of the processes as they ran (`run`, 5 s
   after the first record reached MQTT).
2. CPU at the like-for-like load (1,000 int16 input registers polled every 100 ms, 10,000
   points/s), CPU time (user + system, getrusage) of the library's process over a window:
   pymodbus (a bare asyncio client, the scan's 8 requests of 125 registers sent together
   every 100 ms, against a pymodbus server in another process, whose CPU is not counted: it
   stands for a PLC); paho via aiomqtt 2.5's `client._client` as the MQTT sink uses it (the
   sink's messages of a scan, one per asset per batch with its payloads, published in one
   burst at QoS 1, retained, over mTLS to a local Mosquitto with set_tcp_nodelay, PUBACKs
   awaited); aiohttp serving /v1/stream's frames over mTLS to one consumer, a write per batch
   of 125; msgspec's JSON of one record (in this process, the best of three runs). Each as %
   of a core per 1,000 points/s, against the 0.44 % target and the broker's measured figure.
3. The same libraries at the 100,000-signal load (110,000 records/s with bench/pipeline.py's
   context): the pymodbus client at 800 requests/s of 125 registers; paho publishing 10,000
   messages/s of 11 records; aiohttp serving 110,000 records/s; the benches' SSE consumer
   (bench/pipeline.py's StreamConsumer: TLS, framing, a JSON decode of each record); msgspec
   encoding them. Cores needed = CPU per unit x the load's units/s (a library that could not
   reach the rate here is scaled from the CPU per unit it did).

Run from the repository root: `.venv/bin/python bench/floor.py` (--help). Prints tables; exits
0 whatever the figures, non-zero only on a crash. Every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import queue
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import msgspec
import psutil
from aiohttp import web
from footprint import MqttProbe, policy_document, processes, serve_device
from footprint import appliance as like_for_like_appliance
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from pipeline import Scanner, StreamConsumer, make_policy, timed_scans, warmed
from pymodbus.client import AsyncModbusTcpClient
from support import REPO, SPAWN, device_process, free_port

from broker.enterprise.store import sse_event
from broker.plant.pipeline import PlantPipeline
from broker.policy import parse as policy_parse
from broker.records import Record, to_json
from broker.trust import tls
from tests.test_footprint import LISTING_RUNNER

BROKER_CPU_PER_1000 = "3.65-4.28"  # % of a core, docs/performance.md (quiet machine, 2026-12-06)
TARGET_CPU_PER_1000 = 0.44
REGISTERS_PER_REQUEST = 125
SCALE_RECORDS_S = 110_000  # 100,000 signals and a derived one per asset of 10, each second
SCALE_REGISTERS_S = 100_000
SCALE_MESSAGES_S = 10_000  # one per asset (11 records) and second
SCALE_DEVICE_REGISTERS = 10_000  # polled 10 times a second: 800 requests/s of 125
CHILD_TIMEOUT_S = 120.0
STARTED_TIMEOUT_S = 90.0  # for records to reach MQTT after the broker starts (a loaded machine)
LIBRARIES = {  # top-level module -> the library it is counted with, in the order added
    "cryptography": "cryptography", "_cffi_backend": "cryptography", "_openssl": "cryptography",
    "structlog": "structlog", "msgspec": "msgspec", "yaml": "PyYAML", "_yaml": "PyYAML",
    "pymodbus": "pymodbus", "serial": "pymodbus",
    "aiohttp": "aiohttp", "multidict": "aiohttp", "yarl": "aiohttp", "frozenlist": "aiohttp",
    "aiosignal": "aiohttp", "propcache": "aiohttp", "aiohappyeyeballs": "aiohttp",
    "idna": "aiohttp", "attr": "aiohttp",
    "aiomqtt": "aiomqtt/paho", "paho": "aiomqtt/paho",
    "prometheus_client": "prometheus_client", "casbin": "casbin", "simpleeval": "casbin",
    "wcmatch": "casbin", "bracex": "casbin",
}  # fmt: skip
# Imports the groups of modules named in a file (a line: label TAB names), printing the RSS
# after each. It imports nothing before the bare figure (`__import__` is a builtin), and
# refuses what `python -m broker` refuses (broker/__main__.py: rich, an optional import of
# structlog). Last line: the top-level packages it holds that the process did not.
IMPORTER = """
import sys
def rss():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
print("bare python -I", rss(), "", sep="\\t")
sys.modules["rich"] = None
with open(sys.argv[1]) as lines:
    steps = [line.split("\\t") for line in lines.read().splitlines()]
for label, names in steps:
    failed = []
    for name in names.split():
        try:
            __import__(name)
        except Exception:
            failed.append(name)
    print(label, rss(), " ".join(failed), sep="\\t")
held = {name.partition(".")[0] for _, names in steps for name in names.split()}
extra = {name.partition(".")[0] for name, module in sys.modules.items() if module} - held
print("extra", 0, " ".join(sorted(extra)), sep="\\t")
"""


# --- memory -----------------------------------------------------------------------------------


def imported(listing: Path) -> list[str]:
    """The modules in a process's sys.modules when it ended (tests/test_footprint.py's
    runner writes them), less the entry points."""
    return [n for n in listing.read_text().split() if not n.endswith(("__main__", "__mp_main__"))]


def import_steps(modules: list[str]) -> list[tuple[str, list[str]]]:
    """The modules in the groups they are imported and measured by."""
    stdlib, own, other = [], [], []
    libraries: defaultdict[str, list[str]] = defaultdict(list)
    for name in modules:
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in sys.builtin_module_names:
            stdlib.append(name)
        elif top == "broker":
            own.append(name)
        elif top in LIBRARIES:
            libraries[LIBRARIES[top]].append(name)
        else:
            other.append(name)
    ordered = sorted(libraries, key=list(LIBRARIES.values()).index)
    others = sorted({n.partition(".")[0] for n in other})
    return [
        ("+ asyncio, ssl", ["asyncio", "ssl"]),
        ("+ rest of the stdlib it imports", stdlib),
        *((f"+ {library}", libraries[library]) for library in ordered),
        *([(f"+ other libraries ({', '.join(others)})", other)] if other else []),
        ("+ the broker's own modules", own),
    ]


def rss_after_imports(modules: list[str], workdir: Path, name: str) -> list[tuple[str, float, str]]:
    steps = workdir / f"{name}.steps"
    steps.write_text("".join(f"{label}\t{' '.join(n)}\n" for label, n in import_steps(modules)))
    out = subprocess.run([sys.executable, "-I", "-c", IMPORTER, str(steps)], check=True,
                         capture_output=True, text=True, cwd=REPO).stdout  # fmt: skip
    rows = [line.split("\t") for line in out.splitlines()]
    return [(label, float(mb), failed) for label, mb, failed in rows]


@contextlib.contextmanager
def listed(workdir: Path, name: str, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`python -I -m broker ARGS` through tests/test_footprint.py's runner, which writes its
    sys.modules to `workdir/NAME.modules` when it ends (its children start as they would);
    stderr in `workdir/NAME.stderr`; SIGTERM at the end (SIGKILL after 30 s)."""
    with (workdir / f"{name}.stderr").open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", LISTING_RUNNER, str(workdir / f"{name}.modules"),
             *args, "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
        )  # fmt: skip
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def until_flowing(
    api: int, context: Any, probe: MqttProbe, running: list[subprocess.Popen[bytes]]
) -> None:
    """Until records reached MQTT and one /v1/stream read gave bytes (so every module the
    data path imports late is in); raises if a process ended or STARTED_TIMEOUT_S passed."""
    deadline = time.monotonic() + STARTED_TIMEOUT_S
    streamed = False
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        while not (streamed and probe.events):
            if time.monotonic() > deadline or any(p.poll() is not None for p in running):
                raise RuntimeError("the broker did not deliver records: see the .stderr files")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                url = f"https://127.0.0.1:{api}/v1/stream"
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    streamed = r.status == 200 and bool(await r.content.readany())
            await asyncio.sleep(0.2)


def measure_memory(rig: Rig) -> None:
    workdir, api, context = rig.workdir, rig.api, rig.consumer
    common = ("--config", str(rig.config), "--reset-state")
    probe = MqttProbe(rig.mqtt, context)
    try:
        with listed(workdir, "supervisor", "run", *common, "--same-user") as run:
            asyncio.run(until_flowing(api, context, probe, [run]))
            time.sleep(5)
            running = {role: p.memory_info().rss / 1e6
                       for role, p in processes(psutil.Process(run.pid)).items()}  # fmt: skip
        probe.events.clear()
        with (
            listed(workdir, "plant", "plant", *common) as plant,
            listed(workdir, "enterprise", "enterprise", *common) as enterprise,
        ):
            asyncio.run(until_flowing(api, context, probe, [plant, enterprise]))
    finally:
        probe.close()
    modules = {role: imported(workdir / f"{role}.modules") for role in running}
    modules["one process, all three's"] = list(
        dict.fromkeys(name for names in modules.values() for name in names)
    )
    print("\nRSS (MB) of a fresh `python -I` after importing, group by group, the modules each "
          "process held as deployed")  # fmt: skip
    for role, names in modules.items():
        print(f"\n{role}: {len(names)} modules")
        for label, mb, failed in rss_after_imports(names, workdir, role.split()[0]):
            if label == "extra":
                extra = [
                    n
                    for n in failed.split()
                    if n not in (*sys.stdlib_module_names, "__main__", "__mp_main__")
                ]
                if extra:
                    print(f"  held here, not by the process: {', '.join(extra)}")
                continue
            note = f"  (not importable by name: {failed})" if failed else ""
            print(f"  {mb:6.1f}  {label}{note}")
        if role in running:
            print(f"  {running[role]:6.1f}  the process as it ran (`run`, like-for-like load)")
    print(
        f"\n  {sum(running.values()):6.1f}  the three processes as they ran, together "
        "(target <= 67)"
    )


# --- CPU: each library in a process of its own ------------------------------------------------


@dataclass(frozen=True)
class Figure:
    seconds: float  # wall clock of the window
    cpu_s: float  # the process's user + system CPU over it
    done: dict[str, int]  # what it did in the window (points, requests, messages, records)
    peer_cpu_s: float = 0.0  # the CPU of the process it talks to (Mosquitto), if watched

    def per_s(self, unit: str) -> float:
        return self.done[unit] / self.seconds

    def cores_at(self, unit: str, per_s: float) -> float:
        """Cores needed for `per_s` of `unit`, from the CPU each one took here."""
        return self.cpu_s / self.done[unit] * per_s


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def paced(
    interval: float,
    warmup: float,
    seconds: float,
    step: Callable[[Counter[str]], Awaitable[None]],
    peer: int | None = None,
) -> Figure:
    """`step` every `interval` (at once again if it fell behind), counted over `seconds`
    after `warmup`; with `peer`, that process's CPU over the same window too."""
    loop = asyncio.get_running_loop()
    watched = psutil.Process(peer) if peer is not None else None

    def peer_cpu() -> float:
        return 0.0 if watched is None else sum(watched.cpu_times()[:2])

    done: Counter[str] = Counter()
    started = next_at = loop.time()
    window: tuple[float, float, float, Counter[str]] | None = None
    while True:
        now = loop.time()
        if window is None and now - started >= warmup:
            window = now, cpu_now(), peer_cpu(), done.copy()
        if window is not None and now - window[0] >= seconds:
            in_window = done.copy()
            in_window.subtract(window[3])
            return Figure(now - window[0], cpu_now() - window[1], dict(in_window),
                          peer_cpu() - window[2])  # fmt: skip
        await step(done)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - loop.time()))


def _child(
    work: Callable[..., Coroutine[Any, Any, Figure]], args: tuple[Any, ...], out: Any
) -> None:
    try:
        out.put(("ok", asyncio.run(work(*args))))
    except BaseException:
        out.put(("error", traceback.format_exc()))


@contextlib.contextmanager
def in_child(
    work: Callable[..., Coroutine[Any, Any, Figure]], *args: Any
) -> Iterator[Callable[[], Figure]]:
    """`work(*args)` in a spawned child; yields a function that waits for its Figure."""
    out = SPAWN.Queue()
    child = SPAWN.Process(target=_child, args=(work, args, out))
    child.start()

    def result() -> Figure:
        try:
            status, value = out.get(timeout=CHILD_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError(
                f"{work.__name__} gave no figure in {CHILD_TIMEOUT_S:.0f} s"
            ) from None
        if status != "ok":
            raise RuntimeError(f"{work.__name__} failed:\n{value}")
        return value  # type: ignore[no-any-return]

    try:
        yield result
    finally:
        child.join(15)
        if child.is_alive():
            child.kill()
            child.join()


async def modbus_client(port: int, registers: int, poll_s: float, warmup: float, seconds: float
                        ) -> Figure:  # fmt: skip
    """A bare pymodbus client: every register in requests of 125, sent together, each poll."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=10)
    if not await client.connect():
        raise RuntimeError(f"no Modbus server on port {port}")
    starts = range(0, registers, REGISTERS_PER_REQUEST)

    async def scan(done: Counter[str]) -> None:
        answers = await asyncio.gather(*(
            client.read_input_registers(a, count=min(REGISTERS_PER_REQUEST, registers - a),
                                        device_id=1) for a in starts
        ))  # fmt: skip
        for answer in answers:
            if answer.isError():
                raise RuntimeError(f"Modbus answered {answer}")
            done["points"] += len(answer.registers)
        done["requests"] += len(answers)

    try:
        return await paced(poll_s, warmup, seconds, scan)
    finally:
        client.close()


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    def client(self) -> Any:
        return tls.client_context(self.ca, self.cert, self.key)


async def mqtt_publisher(port: int, peer: int, files: TlsFiles,
                         messages: list[tuple[str, bytes, int]], interval: float, warmup: float,
                         seconds: float) -> Figure:  # fmt: skip
    """`messages` (topic, payload, records) every `interval` at QoS 1, retained, on aiomqtt's
    paho client as the sink publishes, Nagle off; each burst's PUBACKs awaited. `peer`:
    Mosquitto's pid, whose CPU is measured too."""
    loop = asyncio.get_running_loop()
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier="floor-publisher",
        protocol=aiomqtt.ProtocolVersion(MQTTProtocolVersion.MQTTv5), tls_context=files.client(),
        timeout=10, keepalive=10, max_inflight_messages=len(messages),
    ) as client:  # fmt: skip
        paho = client._client
        connection = paho.socket()
        if isinstance(connection, socket.socket):  # an ssl.SSLSocket on TLS
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        waiting: set[int] = set()
        all_acked: list[asyncio.Future[None]] = []

        def acked(_c: object, _u: object, mid: int, _r: object, _p: object) -> None:
            waiting.discard(mid)
            if not waiting and all_acked and not all_acked[0].done():
                all_acked[0].set_result(None)

        paho.on_publish = acked

        async def burst(done: Counter[str]) -> None:
            for topic, payload, records in messages:
                info = paho.publish(topic, payload, qos=1, retain=True)
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise RuntimeError(f"publish: {info.rc}")
                waiting.add(info.mid)
                done["records"] += records
            done["messages"] += len(messages)
            all_acked[:] = [loop.create_future()]  # PUBACKs are read on this loop: after it
            await asyncio.wait_for(all_acked[0], 10)

        return await paced(interval, warmup, seconds, burst, peer)


async def sse_server(port: int, files: TlsFiles, chunks: list[tuple[bytes, int]],
                     interval: float, warmup: float, seconds: float) -> Figure:  # fmt: skip
    """aiohttp serving one /stream consumer over mTLS: `chunks` (bytes, records) written one
    write each, every `interval`; the stream ends 1 s after the window, so the consumer's
    window (as long, begun as late) ends within it."""
    figure: asyncio.Future[Figure] = asyncio.get_running_loop().create_future()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def write(done: Counter[str]) -> None:
            for chunk, records in chunks:
                await response.write(chunk)
                done["records"] += records

        try:
            measured = await paced(interval, warmup, seconds, write)
            await paced(interval, 0.0, 1.0, write)
            figure.set_result(measured)
        except Exception as e:
            figure.set_exception(e)
        return response

    app = web.Application()
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = tls.server_context(files.cert, files.key, files.ca)
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    try:
        return await asyncio.wait_for(figure, CHILD_TIMEOUT_S)
    finally:
        await runner.cleanup()


async def sse_consumer(port: int, files: TlsFiles, warmup: float, seconds: float) -> Figure:
    """The benches' consumer (bench/pipeline.py's StreamConsumer: aiohttp, TLS, framing, a
    JSON decode of each record) on the stream `sse_server` serves."""
    consumer = StreamConsumer(frozenset())
    connector = aiohttp.TCPConnector(ssl=files.client())
    async with aiohttp.ClientSession(f"https://127.0.0.1:{port}", connector=connector) as session:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = await session.get("/stream")
                break
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        reading = asyncio.create_task(consumer.run(response))
        await asyncio.sleep(warmup)
        del consumer.events[:]
        started, cpu = time.monotonic(), cpu_now()
        await asyncio.sleep(seconds)
        elapsed, used, records = time.monotonic() - started, cpu_now() - cpu, len(consumer.events)
        await asyncio.wait_for(reading, 30)  # until the server ends the stream
        response.close()
    return Figure(elapsed, used, {"records": records})


def encode_floor(records: list[Record]) -> float:
    """µs of CPU msgspec takes for one record's JSON, the best of three runs."""
    best = float("inf")
    repeat = max(1, 20_000 // len(records))
    for _ in range(3):
        started = time.thread_time()
        for _ in range(repeat):
            for record in records:
                to_json(record)
        best = min(best, (time.thread_time() - started) / (repeat * len(records)))
    return best * 1e6


# --- the records and messages of each load ----------------------------------------------------


def like_for_like_records(document: dict[str, Any]) -> list[Record]:
    """One scan of the like-for-like policy through the real plant pipeline, seqs stamped."""
    policy = policy_parse.from_payload(msgspec.json.encode(document), "floor policy")
    records = PlantPipeline(policy).process(Scanner(policy).scan(len(policy.signals)))
    return stamped(records)


def scale_records() -> list[Record]:
    """A scan of 1,000 of bench/pipeline.py's signals with their context (100 assets,
    1,100 records, a warmed day of history): what each second of the 100,000 load carries."""
    policy = make_policy(1000, 1)
    batches = timed_scans(policy, 1)
    return stamped(warmed(policy, batches).process(batches[0]))


def stamped(records: list[Record]) -> list[Record]:
    for seq, record in enumerate(records, 1):
        record.seq = seq
    return records


def sink_messages(batches: list[list[Record]], prefix: str) -> list[tuple[str, bytes, int]]:
    """The sink's messages for these batches: one per asset per batch, its records' JSON."""
    messages = []
    for batch in batches:
        by_asset: defaultdict[str, list[Record]] = defaultdict(list)
        for record in batch:
            by_asset[record.signal.rpartition("/")[0]].append(record)
        messages += [(f"{prefix}/{a}", to_json(group), len(group)) for a, group in by_asset.items()]
    return messages


def sse_chunks(records: list[Record], per_write: int) -> list[tuple[bytes, int]]:
    """The API's writes: the SSE frames of a batch joined."""
    return [(b"".join(sse_event(r) for r in records[i : i + per_write]),
             len(records[i : i + per_write])) for i in range(0, len(records), per_write)]  # fmt: skip


# --- the runs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    what: str
    reached: str  # the rate it ran at
    figure: float  # % of a core per 1,000 points/s, or cores
    broker: bool = True  # the broker's own work; else another process on the same cores


def print_rows(title: str, unit: str, rows: list[Row]) -> None:
    print(f"\n{title}\n  {'library, alone in its process':64} {'ran at':>16} {unit:>8}")
    for row in (r for r in rows if r.broker):
        print(f"  {row.what:64} {row.reached:>16} {row.figure:8.3f}")
    total = sum(r.figure for r in rows if r.broker)
    print(f"  {'sum of the broker-side libraries':64} {'':16} {total:8.3f}")
    for row in (r for r in rows if not r.broker):
        print(f"  {'not the broker: ' + row.what:64} {row.reached:>16} {row.figure:8.3f}")


def per_1000(figure: Figure, unit: str, cpu_s: float | None = None) -> float:
    """% of a core per 1,000 `unit`/s (of this figure's process, or of `cpu_s`)."""
    used = figure.cpu_s if cpu_s is None else cpu_s
    return 100 * used / figure.done[unit] * 1000


@contextlib.contextmanager
def mosquitto(workdir: Path) -> Iterator[int]:
    """Mosquitto on the config bench/footprint.py wrote (mTLS, set_tcp_nodelay)."""
    process = subprocess.Popen(["mosquitto", "-c", str(workdir / "mosquitto.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        yield process.pid
    finally:
        process.terminate()
        process.wait(10)


@dataclass(frozen=True)
class Rig:
    """The like-for-like appliance (bench/footprint.py's) and what the floors borrow from it."""

    workdir: Path
    config: Path
    api: int
    mqtt: int  # Mosquitto's port
    consumer: Any  # the consumer's ssl.SSLContext
    client: TlsFiles  # the sink's certificate: any client of the floors
    server: TlsFiles  # the API's

    @classmethod
    def made(cls, workdir: Path, args: argparse.Namespace) -> Rig:
        config, api, mqtt, consumer = like_for_like_appliance(workdir, args)
        pki = workdir / "certs"
        client = TlsFiles(pki / "ca.crt", pki / "sink.crt", pki / "sink.key")
        server = TlsFiles(pki / "ca.crt", pki / "server.crt", pki / "server.key")
        return cls(workdir, config, api, mqtt, consumer, client, server)


def run(args: argparse.Namespace, workdir: Path) -> None:
    rig = Rig.made(workdir, args)
    with mosquitto(workdir) as mqtt_pid:
        if "memory" in args.parts or "like" in args.parts:
            with device_process("modbus device", serve_device, args.device_port, args.registers):
                if "memory" in args.parts:
                    measure_memory(rig)
                if "like" in args.parts:
                    run_like_for_like(args, rig, mqtt_pid)
        if "scale" in args.parts:
            run_scale(args, rig, mqtt_pid)


def run_like_for_like(args: argparse.Namespace, rig: Rig, mqtt_pid: int) -> None:
    poll_s = args.poll_ms / 1000
    window = (args.warmup, args.seconds)
    records = like_for_like_records(policy_document(args.device_port, args.registers, poll_s))
    batches = [records[i : i + REGISTERS_PER_REQUEST]
               for i in range(0, len(records), REGISTERS_PER_REQUEST)]  # fmt: skip
    messages = sink_messages(batches, "floor")
    rows = []
    with in_child(modbus_client, args.device_port, args.registers, poll_s, *window) as got:
        modbus = got()
    rows.append(Row(f"pymodbus client, {len(batches)} requests of 125 a scan",
                    f"{modbus.per_s('points'):,.0f} points/s", per_1000(modbus, "points")))  # fmt: skip
    with in_child(mqtt_publisher, rig.mqtt, mqtt_pid, rig.client, messages, poll_s, *window) as got:
        mqtt = got()
    reached = f"{mqtt.per_s('records'):,.0f} records/s"
    rows.append(Row(f"paho QoS 1 mTLS, {len(messages)} messages a scan (~{len(messages[0][1]):,} B)",
                    reached, per_1000(mqtt, "records")))  # fmt: skip
    sse_port = free_port()
    chunks = sse_chunks(records, REGISTERS_PER_REQUEST)
    with (
        in_child(sse_server, sse_port, rig.server, chunks, poll_s, *window) as served,
        in_child(sse_consumer, sse_port, rig.client, *window) as consumed,
    ):
        server, consumer = served(), consumed()
    rows.append(Row(f"aiohttp SSE over mTLS, a write of {len(chunks[0][0]):,} B a batch",
                    f"{server.per_s('records'):,.0f} records/s", per_1000(server, "records")))  # fmt: skip
    encode_us = encode_floor(records)
    rows.append(Row(f"msgspec: JSON of one record ({len(to_json(records[0]))} B), "
                    f"{encode_us:.2f} µs", "", encode_us / 10))  # fmt: skip
    rows.append(Row("Mosquitto, receiving paho's messages", reached,
                    per_1000(mqtt, "records", mqtt.peer_cpu_s), broker=False))  # fmt: skip
    rows.append(Row("the SSE consumer (bench/pipeline.py's)",
                    f"{consumer.per_s('records'):,.0f} records/s", per_1000(consumer, "records"),
                    broker=False))  # fmt: skip
    print_rows(f"CPU at the like-for-like load ({args.registers:,} int16 registers every "
               f"{args.poll_ms:g} ms), % of a core per 1,000 points/s; target <= "
               f"{TARGET_CPU_PER_1000}, the broker as deployed {BROKER_CPU_PER_1000} "
               "(docs/performance.md)", "%/1,000", rows)  # fmt: skip


def run_scale(args: argparse.Namespace, rig: Rig, mqtt_pid: int) -> None:
    window = (args.warmup, args.seconds)
    records = scale_records()
    rows: list[Row] = []
    port = free_port()
    with (
        device_process("modbus device", serve_device, port, SCALE_DEVICE_REGISTERS),
        in_child(modbus_client, port, SCALE_DEVICE_REGISTERS, 0.1, *window) as got,
    ):
        modbus = got()
    rows.append(Row(f"pymodbus client, {SCALE_REGISTERS_S // REGISTERS_PER_REQUEST} requests/s "
                    "of 125", f"{modbus.per_s('points'):,.0f} points/s",
                    modbus.cores_at("points", SCALE_REGISTERS_S)))  # fmt: skip
    assets = sink_messages([records], "floor")
    messages = [(f"{topic}/{i}", payload, n) for i in range(SCALE_MESSAGES_S // 10 // len(assets))
                for topic, payload, n in assets]  # fmt: skip
    with in_child(mqtt_publisher, rig.mqtt, mqtt_pid, rig.client, messages, 0.1, *window) as got:
        mqtt = got()
    reached = f"{mqtt.per_s('messages'):,.0f} msg/s"
    rows.append(Row(f"paho QoS 1 mTLS, {SCALE_MESSAGES_S:,} messages/s of 11 "
                    f"(~{len(assets[0][1]):,} B)", reached,
                    mqtt.cores_at("messages", SCALE_MESSAGES_S)))  # fmt: skip
    sse_port = free_port()
    chunks = sse_chunks(records, len(records)) * (SCALE_RECORDS_S // 10 // len(records))
    with (
        in_child(sse_server, sse_port, rig.server, chunks, 0.1, *window) as served,
        in_child(sse_consumer, sse_port, rig.client, *window) as consumed,
    ):
        server, consumer = served(), consumed()
    rows.append(Row(f"aiohttp SSE over mTLS, frames of ~{len(sse_event(records[1]))} B, "
                    f"writes of {len(records):,}", f"{server.per_s('records'):,.0f} rec/s",
                    server.cores_at("records", SCALE_RECORDS_S)))  # fmt: skip
    encode_us = encode_floor(records)
    rows.append(Row(f"msgspec: JSON of a record with context, {encode_us:.2f} µs", "",
                    encode_us * SCALE_RECORDS_S / 1e6))  # fmt: skip
    rows.append(Row("Mosquitto, receiving paho's messages", reached,
                    mqtt.peer_cpu_s / mqtt.done["messages"] * SCALE_MESSAGES_S, broker=False))  # fmt: skip
    rows.append(Row("SSE consumer (bench/pipeline.py's): TLS, JSON decode",
                    f"{consumer.per_s('records'):,.0f} rec/s",
                    consumer.cores_at("records", SCALE_RECORDS_S), broker=False))  # fmt: skip
    print_rows(f"Cores at the 100,000-signal load ({SCALE_RECORDS_S:,} records/s; cores = CPU "
               "per unit here x the load's rate)", "cores", rows)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("memory", "like", "scale"),
                        default=["memory", "like", "scale"], help="what to measure")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each window")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each window")
    parser.add_argument("--tmpdir", type=Path, default=None)
    args = parser.parse_args()
    args.registers, args.poll_ms, args.device_port = 1000, 100.0, free_port()  # the load
    load = " ".join(f"{x:.2f}" for x in psutil.getloadavg())
    print(
        f"floors of CPython {sys.version.split()[0]} and the chosen libraries; load average {load}"
    )
    with tempfile.TemporaryDirectory(prefix="dmzbroker-floor-", dir=args.tmpdir) as tmp:
        run(args, Path(tmp))
    load = " ".join(f"{x:.2f}" for x in psutil.getloadavg())
    print(f"\nload average at the end {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
