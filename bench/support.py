"""What the benchmarks share: the repository root, a free loopback port, the CLI, a device
in a child process of its own, Mosquitto, a process's RSS and CPU time, and the loop that
measures what a connector ingests."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import resource
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.plant.connectors.base import Connector, RawSample

REPO = Path(__file__).resolve().parent.parent
SPAWN = mp.get_context("spawn")  # a fresh interpreter: the device shares nothing with us


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str) -> None:
    """`dmzbroker ARGS…` from the repository root; raises if it fails."""
    subprocess.run(
        [sys.executable, "-m", "broker", *args], check=True, capture_output=True, cwd=REPO
    )


@contextmanager
def mosquitto(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Mosquitto on `config` (bench/footprint.py writes one) until the block ends."""
    process = subprocess.Popen(["mosquitto", "-c", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        yield process
    finally:
        process.terminate()
        process.wait(10)


def rss_bytes(pid: int | str = "self") -> int:
    """A process's resident set size now (Linux's /proc; the figure psutil's rss gives)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def rusage_cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU seconds of this process (or of its children waited for)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def device_process(what: str, serve: Callable[..., None], *args: Any) -> Iterator[None]:
    """`serve(*args, ready, stop)` in a spawned child (its own core), from when it sets
    `ready` until the block ends; then `stop` is set and the child joined (killed after 30 s).
    Shared values the child writes must come from `SPAWN`."""
    ready, stop = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=serve, args=(*args, ready, stop))
    child.start()
    try:
        if not ready.wait(300):
            raise SystemExit(f"{what} did not start within 300 s")
        yield
    finally:
        stop.set()
        child.join(30)
        if child.is_alive():
            child.kill()


Tally = Callable[[list[RawSample], Counter[str]], None]  # adds one emitted batch's counts


@dataclass(frozen=True)
class Window:
    """What a connector did over the measured window."""

    seconds: float
    counted: Counter[str]  # samples, by the names a `Tally` counted them under
    changed: dict[str, int]  # the increase of each connector counter measured
    cpu: float  # this process's CPU time over the window, as a share of one core
    errors: int  # the connector's session errors since it started

    def per_s(self, name: str) -> float:
        """A sample count's or a connector counter's increase per second."""
        return (self.changed[name] if name in self.changed else self.counted[name]) / self.seconds


async def measure_ingest(
    connector: Connector, tally: Tally, counters: Iterable[str], warmup_s: float, measure_s: float
) -> Window:
    """Run `connector` for `warmup_s`, then count for `measure_s`: what `tally` counts of
    the batches it emits, and the increase of its attributes named in `counters`. Counting
    is per batch, not per sample: it runs in the connector's process and would weigh on the
    figure."""
    counted: Counter[str] = Counter()

    async def emit(samples: list[RawSample]) -> None:
        tally(samples, counted)

    task = asyncio.create_task(connector.run(emit))
    try:
        await asyncio.sleep(warmup_s)
        names = list(counters)
        before, counted_before = {n: getattr(connector, n) for n in names}, counted.copy()
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.sleep(measure_s)
        elapsed = time.perf_counter() - started
        in_window = counted.copy()
        in_window.subtract(counted_before)
        return Window(
            seconds=elapsed,
            counted=in_window,
            changed={n: getattr(connector, n) - before[n] for n in names},
            cpu=(time.process_time() - cpu) / elapsed,
            errors=connector.errors,
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def serve_until_stopped(servers: list[Any], ready: Any, stop: Any) -> None:
    """Serve these pymodbus servers in a device child until the parent sets `stop`; `ready`
    once they listen."""
    tasks = [asyncio.create_task(server.serve_forever()) for server in servers]
    await asyncio.sleep(0.5)
    ready.set()
    await asyncio.to_thread(stop.wait)
    for server in servers:
        await server.shutdown()
    for task in tasks:
        task.cancel()


def samples_and_good(samples: list[RawSample], counts: Counter[str]) -> None:
    """A `Tally`: every sample counts under `samples`, a good one under `good` too."""
    counts["samples"] += len(samples)
    counts["good"] += sum(1 for sample in samples if sample.quality == "good")
