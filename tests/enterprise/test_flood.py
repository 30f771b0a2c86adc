"""Issue 12: an IT-side flood under `ulimit -n 256` ends no half and locks no consumer out.

Real traffic against the real `dmzbroker run` (both halves, the demo plant simulator), its
open-file limit set to 256 (soft and hard, so it cannot raise it): at the same time 1,000
idle TCP connections (reopened whenever the broker closes them), 300 TLS connections with a
valid certificate that send one header byte every 2 s, and 4 clients hammering a request
that is denied (a valid certificate the policy does not know). Meanwhile the historian
(127.0.0.1, its own certificate) must get its data within a bounded time, every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from broker.trust import tls
from tests.harness import (
    REPO,
    Deployment,
    Pki,
    consumer_ssl,
    eventually,
    get_json,
    stop_process,
)

pytestmark = pytest.mark.timeout(120)

FILE_LIMIT = 256
IDLE = 1000
SLOW = 300
DENIED_CLIENTS = 4
FLOOD_S = 15.0
SERVED_WITHIN_S = 15.0  # the historian's deadline for one snapshot, flood or not
ROOM = "coldstore/storage/cold-room-1/temperature"


def _children(pid: int) -> dict[str, int]:
    """The halves under `run`: half name → pid."""
    found = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            for half in ("plant", "enterprise"):
                if half.encode() in argv:
                    found[half] = int(child)
    return found


def _peak_memory_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _open_files(pid: int) -> int:
    try:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return 0


async def _until(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True once the flood is to stop."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


async def _keep_idle(port: int, source: str, stop: asyncio.Event) -> None:
    """One idle connection, reopened whenever the broker closes it."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
        except OSError:
            if await _until(stop, 0.2):
                return
            continue
        try:
            read = asyncio.ensure_future(reader.read(1))
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait([read, stopped], return_when=asyncio.FIRST_COMPLETED)
            for task in (read, stopped):
                task.cancel()
        finally:
            writer.close()
        if await _until(stop, 0.5):
            return


async def _keep_slow(port: int, source: str, context: ssl.SSLContext, stop: asyncio.Event) -> None:
    """A consumer-looking TLS connection that sends one header byte every 2 s."""
    while not stop.is_set():
        try:
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname="localhost",
                    local_addr=(source, 0),
                )  # fmt: skip
        except (OSError, ssl.SSLError, TimeoutError):
            if await _until(stop, 0.2):
                return
            continue
        try:
            for byte in b"GET /v1/snapshot HTTP/1.1\r\nHost: localhost\r\n":
                writer.write(bytes([byte]))
                await writer.drain()
                if reader.at_eof() or await _until(stop, 2.0):
                    break
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()
        if await _until(stop, 0.1):
            return


async def _hammer_denied(url: str, context: ssl.SSLContext, stop: asyncio.Event) -> int:
    denied = 0
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.40", 0), limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        while not stop.is_set():
            try:
                async with session.get(url, ssl=context) as response:
                    await response.read()
                    denied += response.status == 403
            except (aiohttp.ClientError, OSError, ssl.SSLError):
                if await _until(stop, 0.1):
                    break
    return denied


async def _served(deployment: Deployment, pki: Pki) -> float:
    """Seconds until the historian gets a snapshot with data; fails past the deadline."""
    started = time.monotonic()
    deadline = started + SERVED_WITHIN_S
    while time.monotonic() < deadline:
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                status, body = await get_json(
                    deployment.base_url + "/v1/snapshot", consumer_ssl(pki)
                )
            if status == 200 and body["records"]:
                return time.monotonic() - started
        except (aiohttp.ClientError, OSError, ssl.SSLError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"the historian was not served within {SERVED_WITHIN_S} s")


async def _has_data(deployment: Deployment, pki: Pki) -> bool:
    try:
        status, body = await get_json(deployment.base_url + "/v1/snapshot", consumer_ssl(pki))
    except aiohttp.ClientConnectionError:
        return False  # not listening yet
    return status == 200 and bool(body["records"])


async def _metrics(deployment: Deployment, pki: Pki) -> str:
    """`/metrics`, retried like any client whose connection was reset, within the deadline."""
    context = tls.client_context(pki.ca, pki.monitoring_cert, pki.monitoring_key)
    deadline = time.monotonic() + SERVED_WITHIN_S
    while True:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(deployment.base_url + "/metrics", ssl=context) as response,
            ):
                assert response.status == 200
                return await response.text()
        except (aiohttp.ClientError, OSError, ssl.SSLError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _metric(text: str, name: str, **labels: str) -> float:
    """The sample's value; without labels, the sum over all of the metric's samples."""
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.split(" ")[0] == wanted
        or (not labels and line.startswith((name + " ", name + "{")))
    )


@pytest.fixture
def flood_config(deployment: Deployment) -> Path:
    """The deployment with a short header deadline, so it acts within the flood."""
    document = yaml.safe_load(deployment.config.read_text())
    document["enterprise"]["listen"]["header_timeout_s"] = 3.0
    deployment.config.write_text(yaml.safe_dump(document))
    return deployment.config


@pytest.fixture
def run_limited(flood_config: Path, tmp_path: Path) -> Any:
    """`dmzbroker run` with 256 open files at most; stopped at the end."""
    log = tmp_path / "run.log"
    with open(log, "ab") as stderr:
        process = subprocess.Popen(
            ["prlimit", f"--nofile={FILE_LIMIT}:{FILE_LIMIT}",  # then execs: the same pid
             sys.executable, "-m", "broker", "run", "--config", str(flood_config),
             "--reset-state", "--same-user"],
            stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO, start_new_session=True,
        )  # fmt: skip
    try:
        yield process, log
    finally:
        stop_process(process, timeout=20)


async def _gathered(tasks: list[Awaitable[Any]]) -> list[Any]:
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_flood_under_256_open_files_ends_no_half_and_the_historian_is_served(
    deployment: Deployment, pki: Pki, run_limited: Any
) -> None:
    process, log = run_limited
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE + SLOW + 500
    if soft < wanted:  # this process's own client sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, wanted), hard))
    try:
        await eventually(lambda: _has_data(deployment, pki), timeout=30)
        halves = _children(process.pid)
        assert set(halves) == {"plant", "enterprise"}

        stop = asyncio.Event()
        port = deployment.api_port
        slow_context = tls.client_context(pki.ca, pki.energy_cert, pki.energy_key)
        stranger = tls.client_context(pki.ca, pki.stranger_cert, pki.stranger_key)
        denied_url = f"{deployment.base_url}/v1/signals/{ROOM}"
        tasks = [
            *(asyncio.ensure_future(_keep_idle(port, f"127.0.0.{10 + i % 10}", stop))
              for i in range(IDLE)),
            *(asyncio.ensure_future(_keep_slow(port, f"127.0.0.{30 + i % 2}", slow_context, stop))
              for i in range(SLOW)),
        ]  # fmt: skip
        hammers = [
            asyncio.ensure_future(_hammer_denied(denied_url, stranger, stop))
            for _ in range(DENIED_CLIENTS)
        ]
        waits: list[float] = []
        most_files = 0
        try:
            started = time.monotonic()
            while time.monotonic() - started < FLOOD_S:
                waits.append(await _served(deployment, pki))
                most_files = max(most_files, _open_files(halves["enterprise"]))
                await asyncio.sleep(1.0)
            metrics = await _metrics(deployment, pki)
        finally:
            stop.set()
            await _gathered([*tasks, *hammers])
        denied = sum(h.result() for h in hammers if not h.exception())
        peak_mib = _peak_memory_mib(halves["enterprise"])

        assert process.poll() is None, "dmzbroker run exited"
        assert _children(process.pid) == halves, "a half exited and was replaced"
        assert len(waits) >= 3 and max(waits) < SERVED_WITHIN_S
        assert denied > 100  # the denied flood did run
        assert most_files < FILE_LIMIT
        assert _metric(metrics, "dmzbroker_connections_limited_total", reason="evicted") > 0
        assert _metric(metrics, "dmzbroker_connections_limited_total", reason="per_address") > 0
        assert _metric(metrics, "dmzbroker_connections_limited_total", reason="header_timeout") > 0
        assert 'dmzbroker_accept_errors_total{error="EMFILE"}' in metrics
        assert 'dmzbroker_spool_read_errors_total{error="EMFILE"}' in metrics
        assert _metric(metrics, "dmzbroker_connections_open") <= FILE_LIMIT

        lines = log.read_text(errors="replace").splitlines()
        assert not [line for line in lines if "out of system resource" in line]
        assert not [line for line in lines if "Traceback" in line]
        assert not [line for line in lines if '"half_exited"' in line]
        assert len([line for line in lines if '"connection_limit_lowered"' in line]) == 1
        limited = [line for line in lines if '"connections_limited"' in line]
        assert 1 <= len(limited) <= 3, limited  # once per episode, not per connection
        print(
            f"historian served in at most {max(waits):.2f} s ({len(waits)} tries), "
            f"{denied} denied requests, enterprise half at most {most_files} open files and "
            f"{peak_mib:.0f} MiB resident, {len(lines)} log lines, "
            f"{_metric(metrics, 'dmzbroker_connections_limited_total')} connections limited"
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
