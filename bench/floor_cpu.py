"""The floor bench's CPU part: each library alone, in a process of its own, over a window.

CPU time (user + system, getrusage) of the library's process over a window after a warm-up,
with none of the broker's data path in it: pymodbus (a bare asyncio client, a scan's
requests of 125 registers sent together each poll, against a pymodbus server in another
process, whose CPU is not counted: it stands for a PLC); paho via aiomqtt 2.5's
`client._client` as the MQTT sink uses it (a burst of messages at QoS 1, retained, over mTLS
to a local Mosquitto, Nagle off, PUBACKs awaited; Mosquitto's CPU watched too); aiohttp
serving SSE frames over mTLS to one consumer, and that consumer (bench/pipeline.py's
StreamConsumer: TLS, framing, a JSON decode of each record); msgspec's JSON of a record (in
this process, the best of three runs). bench/floor.py chooses the loads and prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import psutil
from aiohttp import web
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from pipeline import StreamConsumer
from pymodbus.client import AsyncModbusTcpClient
from support import SPAWN, rusage_cpu_s

from broker.records import Record, to_json
from broker.trust import tls

REGISTERS_PER_REQUEST = 125
CHILD_TIMEOUT_S = 120.0


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
            window = now, rusage_cpu_s(), peer_cpu(), done.copy()
        if window is not None and now - window[0] >= seconds:
            in_window = done.copy()
            in_window.subtract(window[3])
            return Figure(now - window[0], rusage_cpu_s() - window[1], dict(in_window),
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
        started, cpu = time.monotonic(), rusage_cpu_s()
        await asyncio.sleep(seconds)
        elapsed, used = time.monotonic() - started, rusage_cpu_s() - cpu
        records = len(consumer.events)
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
