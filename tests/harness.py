"""Helpers for tests that drive real processes, servers and files (no fixtures here)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import yaml
from aiohttp import web

from broker import policy
from broker.enterprise.listener import ContextInForce, listen
from broker.policy import envelope as envelopes
from broker.policy import trustroot
from broker.policy.activation import TrustedPolicy, load_trusted
from broker.trust import keys, tls

REPO = Path(__file__).resolve().parent.parent
DEMO_POLICY = REPO / "policies" / "refrigeration.yaml"
CONSUMER_URI = "spiffe://demo/consumer/historian"  # sees every signal in the demo policy
ENERGY_URI = "spiffe://demo/consumer/energy-dashboard"  # sees a few
STRANGER_URI = "spiffe://demo/consumer/stranger"  # valid certificate, not in the policy
MONITORING_URI = "spiffe://demo/consumer/prometheus"  # may read /metrics only


def dmzbroker(
    *args: str, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True, text=True, timeout=timeout, check=check, cwd=REPO,
    )  # fmt: skip


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # from `ca`, identity CONSUMER_URI
    client_key: Path
    energy_cert: Path  # from `ca`, identity ENERGY_URI
    energy_key: Path
    stranger_cert: Path  # from `ca`, identity STRANGER_URI
    stranger_key: Path
    monitoring_cert: Path  # from `ca`, identity MONITORING_URI
    monitoring_key: Path
    other_ca: Path
    other_client_cert: Path  # from another CA: must never get in
    other_client_key: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Owners:
    """Policy signing keys made by `dmzbroker keys generate`, and a trust root naming some."""

    ot_key: Path
    it_key: Path
    second_ot_key: Path  # in the trust root too: a second OT owner
    stranger_key: Path  # an OT key the trust root does not list
    trust_root: Path
    audit_key: Path  # the appliance's audit key (`dmzbroker audit keygen`)


def demo_policy(
    port: int, poll_interval_s: float = 0.2, bacnet_port: int | None = None, **changes: Any
) -> dict[str, Any]:
    """The demo policy as a document, pointed at a simulator on `port` and polled faster.

    Its 8 requests per scan need 40 requests/s at 0.2 s, above the default budget of 20: the
    budget is raised explicitly (the simulator on loopback takes 200, enough down to 0.05 s).
    Its BACnet room controller is pointed at `bacnet_port`, else at a free UDP port where
    nothing answers (never at 47808, where a developer's `make demo` may be running).
    """
    document = yaml.safe_load(DEMO_POLICY.read_text())
    document["devices"][0].update(
        port=port, poll_interval_s=poll_interval_s, max_requests_per_s=200
    )
    for device in document["devices"][1:]:
        if device["protocol"] == "bacnet":
            device.update(port=bacnet_port or free_udp_port(), poll_interval_s=poll_interval_s)
    document.update(changes)
    return document


def write_policy_yaml(directory: Path, document: dict[str, Any], name: str = "policy") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def sign_policy(
    directory: Path,
    document: dict[str, Any],
    signers: list[Path],
    name: str = "policy",
) -> Path:
    """Compile the document and sign it with each key in turn; the envelope's path."""
    envelope = envelopes.compile_policy(policy.load(write_policy_yaml(directory, document, name)))
    for key in signers:
        envelope = envelopes.sign(envelope, keys.load_private(key, passphrase=None))
    path = directory / f"{name}.dsse.json"
    envelopes.write(envelope, path)
    return path


def write_config(
    directory: Path, policy_file: Path, pki: Pki, api_port: int, owners: Owners
) -> Path:
    path = directory / "broker.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "policy": str(policy_file),
                "trust_root": str(owners.trust_root),
                "spool": {"dir": "spool", "segment_mib": 1},
                "plant": {"state_dir": "plant-state"},
                "enterprise": {
                    "state_dir": "enterprise-state",
                    "listen": {"host": "127.0.0.1", "port": api_port},
                    "tls": {
                        "cert": str(pki.server_cert),
                        "key": str(pki.server_key),
                        "client_ca": str(pki.ca),
                    },
                },
                "audit": {"dir": "audit", "key": str(owners.audit_key)},
                "log": {"format": "json"},
            }
        )
    )
    return path


@dataclass
class Deployment:
    """A config and policy for the broker, pointed at a running simulator."""

    directory: Path
    config: Path
    policy: Path  # the signed envelope the config names
    document: dict[str, Any]  # what it was compiled from, to derive new versions
    api_port: int

    @property
    def spool(self) -> Path:
        return self.directory / "spool"

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.api_port}"


def fresh_install(command: str, config: Path) -> bool:
    """Whether a half `command` would start has no record of an accepted policy yet: an
    operator starts such an installation once with `--reset-state`."""
    from broker import config as broker_config  # noqa: PLC0415 - only for process tests

    cfg = broker_config.load(config)
    dirs = {"plant": [cfg.plant.state_dir], "enterprise": [cfg.enterprise.state_dir]}
    state_dirs = dirs.get(command, dirs["plant"] + dirs["enterprise"])
    return any(not (d / "policy-accepted.json").exists() for d in state_dirs)


class BrokerProcess:
    """One `python -m broker COMMAND --config FILE` child; stderr goes to a log file.
    A fresh installation is started with `--reset-state` unless `reset_state` says."""

    def __init__(
        self, command: str, config: Path, log: Path, reset_state: bool | None = None
    ) -> None:
        self.log = log
        self._stderr = open(log, "ab")  # noqa: SIM115 - closed in stop()
        if reset_state is None:
            reset_state = fresh_install(command, config)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "broker", command, "--config", str(config)]
            + (["--reset-state"] if reset_state else [])
            # A test's folders are its own user's (tmp_path is 0700): both halves run as it.
            + (["--same-user"] if command == "run" else []),
            stdout=subprocess.DEVNULL, stderr=self._stderr, cwd=REPO,
            start_new_session=True,  # its own process group, as under a terminal
        )  # fmt: skip

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        code = stop_process(self.process, timeout)
        self._stderr.close()
        return code

    def events(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


async def eventually(
    condition: Callable[[], object], timeout: float = 15, interval: float = 0.05
) -> None:
    """Wait until `condition()` (a plain or async function) is truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running(*coroutines: Coroutine[Any, Any, object]) -> AsyncIterator[None]:
    """Each coroutine in its own task for the block; cancelled and awaited afterwards."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def get_json(url: str, context: ssl.SSLContext) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as response:
        return response.status, await response.json()


def consumer_ssl(pki: Pki) -> ssl.SSLContext:
    """A consumer with the good client certificate."""
    return tls.client_context(pki.ca, pki.client_cert, pki.client_key)


async def read_events(
    response: aiohttp.ClientResponse, count: int
) -> list[tuple[int, dict[str, Any]]]:
    """The next `count` Server-Sent Events as (id, decoded JSON); fails after 10 s."""
    events: list[tuple[int, dict[str, Any]]] = []
    event_id = 0
    async with asyncio.timeout(10):
        async for line in response.content:
            if line.startswith(b"id: "):
                event_id = int(line[4:])
            elif line.startswith(b"data: "):
                events.append((event_id, msgspec.json.decode(line[6:])))
                if len(events) == count:
                    break
    return events


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> int:
    """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


@dataclass
class Daemon:
    """A real peer program (a syslog collector, an MQTT broker) a test starts and stops."""

    argv: list[str]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


async def _ok(_: web.Request) -> web.Response:
    return web.Response(text="ok")


@contextlib.asynccontextmanager
async def ok_server(context: ssl.SSLContext | ContextInForce) -> AsyncIterator[int]:
    """A one-route app behind the broker's own TLS listener on a free loopback port."""
    app = web.Application()
    app.router.add_get("/", _ok)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    server = await listen(runner, "127.0.0.1", port, context)
    try:
        yield port
    finally:
        server.close()
        await runner.cleanup()


async def keep_alive_get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/v1/signals"
) -> int:
    """One HTTP/1.1 request on an open (kept-alive) connection, its body read; its status."""
    writer.write(b"GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % path.encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await asyncio.wait_for(reader.readexactly(length), timeout=10)
    return int(head.split(b" ", 2)[1])


def accepted_first_policy(directory: Path, owners: Owners) -> tuple[Path, Path, TrustedPolicy]:
    """A co-signed version 1 of the demo policy at `directory/policy.dsse.json`, admitted into
    `directory/state` as a half does at start: the envelope, the state dir and the
    TrustedPolicy (for a PolicyWatcher to start from)."""
    envelope = directory / "policy.dsse.json"
    os.replace(
        sign_policy(directory, demo_policy(5020), [owners.ot_key, owners.it_key], "v1"), envelope
    )
    state = directory / "state"
    current = load_trusted(
        envelope, trustroot.load(owners.trust_root), state, datetime.now(UTC), floor=None
    )
    return envelope, state, current
