"""Benchmark: data-change notifications/s the read-only OPC UA server sends to 10 clients.

The enterprise half runs as its own process on a throwaway appliance
(`broker.sim.appliance`, with its OPC UA server), serving the demo policy with each signal
made `--copies` signals (1,007 by default) and K consumers (default 10, each its own
identity: the server gives one identity at most 4 sessions). Each client connects over
Basic256Sha256 SignAndEncrypt with its certificate and monitors every signal once (the
server allows one item per node and session; sampling 0, queue 1: the latest value, as a
mirror's client wants), in requests of at most 500 items, in one subscription publishing
every `--publish-ms`. The plant side is the spool: a new value of every signal is written
every `--batch-ms`, so every item changes between two publishes. For `--seconds`, the clients
count what they receive; the server's CPU time over the same window is read from /proc
(psutil), so the figure means something on a shared machine too.

Run: `.venv/bin/python bench/opcua_server.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import psutil
from asyncua import Client, ua
from asyncua.crypto import security_policies as sp
from asyncua.ua.uaerrors import UaStatusCodeError
from support import REPO, free_port

from broker import policy
from broker.channel.spool import SpoolSender
from broker.enterprise.authz import Authorization
from broker.enterprise.outputs.opcua_items import MAX_ITEMS_PER_REQUEST
from broker.policy import Policy
from broker.records import Context, Record
from broker.sim.appliance import DAYS, OpcUaAccess, provision
from broker.trust import certs

CONSUMER = "spiffe://demo/consumer/bench-{}"
NAMESPACE = "urn:dmzbroker:{deployment}"


class Counter:
    """The subscription handler: counts, nothing else (its cost is the client's)."""

    def __init__(self) -> None:
        self.received = 0
        self.ended: Any = None  # the status that ended the subscription (checked after the window)

    def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
        self.received += 1

    def status_change_notification(self, status: Any) -> None:
        self.ended = status  # raising here would end asyncio.run from asyncua's task


def bench_policy(demo: Policy, copies: int, clients: int) -> Policy:
    """The demo policy, each signal `copies` signals, and `clients` consumers seeing all."""
    signals = [
        msgspec.structs.replace(s, path=f"{s.path}_{k}") if k else s
        for s in demo.signals
        for k in range(copies)
    ]
    historian = next(c for c in demo.consumers if "historian" in c.roles)
    consumers = [
        msgspec.structs.replace(historian, identity=CONSUMER.format(i)) for i in range(clients)
    ]
    return msgspec.structs.replace(demo, signals=signals, consumers=[*demo.consumers, *consumers])


def reader(workdir: Path, first: OpcUaAccess, identity: str) -> OpcUaAccess:
    """An OPC UA application certificate of `identity` from the appliance's CA."""
    pki = workdir / "certs"
    name = identity.rpartition("/")[2]
    issued = certs.issue_opcua(pki, pki, name=f"{name}-opcua", uri=identity, dns=[], days=DAYS)
    return OpcUaAccess(first.port, issued.cert, issued.key, first.server_cert)


async def connect(access: OpcUaAccess, identity: str) -> Client:
    for _ in range(100):  # the half starting (bounded: about 10 s)
        # a new one each try (a refused one is spent); its health probe waits 10 s, not 1 s:
        # a loaded machine's late answer is not a lost connection for a benchmark
        client = Client(access.url, timeout=30, watchdog_intervall=10)
        client.application_uri = identity
        await client.set_security(
            sp.SecurityPolicyBasic256Sha256, str(access.cert), str(access.key),
            server_certificate=str(access.server_cert),
        )  # fmt: skip
        try:
            await client.connect()
            return client
        except (OSError, TimeoutError, UaStatusCodeError):  # not listening, or starting
            await asyncio.sleep(0.1)
    raise SystemExit(f"the OPC UA server at {access.url} did not answer")


async def subscribe(
    client: Client, signals: list[str], deployment: str, publish_ms: int
) -> Counter:
    ns = await client.get_namespace_index(NAMESPACE.format(deployment=deployment))
    counter = Counter()
    subscription = await client.create_subscription(publish_ms, counter)
    nodes = [client.get_node(ua.NodeId(s, ns)) for s in signals]
    for start in range(0, len(nodes), MAX_ITEMS_PER_REQUEST):  # the server's per-request cap
        made = await subscription.subscribe_data_change(
            nodes[start : start + MAX_ITEMS_PER_REQUEST], sampling_interval=0, queuesize=1
        )
        refused = [r for r in made if not isinstance(r, int)]
        if refused:
            raise SystemExit(f"monitored items refused: {refused[0]}")
    return counter


def feed(sender: SpoolSender, signals: list[str], step: int) -> None:
    now = datetime.now(UTC)
    sender.send(
        [
            Record(signal=s, value=float(step * 1000 + i), unit="", quality="good",
                   source_time=now, broker_time=now, policy_version=1, context=Context())
            for i, s in enumerate(signals)
        ]
    )  # fmt: skip


@dataclass(frozen=True)
class Figures:
    rate: float  # notifications/s, all clients
    slowest: float  # notifications/s of the client that got the fewest
    server_cores: float  # CPU time of the enterprise half per second of wall time
    client_cores: float  # of this process: the clients and the spool writer
    items: int  # per client


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def run(workdir: Path, args: argparse.Namespace) -> Figures:
    demo = policy.load(REPO / "policies" / "refrigeration.yaml")
    served = bench_policy(demo, args.copies, args.clients)
    identities = [CONSUMER.format(i) for i in range(args.clients)]
    signals = sorted(Authorization(served).view(identities[0]))
    appliance = provision(
        workdir, served, port=free_port(), consumer_uri=identities[0], opcua_port=free_port()
    )
    assert appliance.opcua is not None
    readers = [appliance.opcua] + [reader(workdir, appliance.opcua, i) for i in identities[1:]]
    half = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "enterprise", "--config", str(appliance.config),
        "--log-format", "json", "--reset-state", cwd=workdir,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    clients: list[Client] = []
    sender = SpoolSender(workdir / "spool", segment_bytes=16 << 20, retention_bytes=1 << 30)
    try:
        for access, identity in zip(readers, identities, strict=True):
            clients.append(await connect(access, identity))
        counters = [
            await subscribe(c, signals, demo.deployment_id, args.publish_ms) for c in clients
        ]
        step = 0
        warm_until = time.monotonic() + 3  # initial values and the first publishes
        while time.monotonic() < warm_until:
            feed(sender, signals, step := step + 1)
            await asyncio.sleep(args.batch_ms / 1000)
        processes = (psutil.Process(half.pid), psutil.Process())  # the server, the clients
        before, cpu_before = [c.received for c in counters], [_cpu(p) for p in processes]
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            feed(sender, signals, step := step + 1)
            await asyncio.sleep(args.batch_ms / 1000)
        elapsed = time.monotonic() - started
        cpu = [(_cpu(p) - b) / elapsed for p, b in zip(processes, cpu_before, strict=True)]
        received = [c.received - b for c, b in zip(counters, before, strict=True)]
        ended = [c.ended for c in counters if c.ended is not None]
        if ended:
            raise SystemExit(f"a subscription ended in the window: {ended[0]}")
        if min(received) == 0:
            raise SystemExit(f"a client received nothing in the window: {received}")
        return Figures(sum(received) / elapsed, min(received) / elapsed, *cpu,
                       len(signals))  # fmt: skip
    finally:
        sender.close()
        for client in clients:
            with contextlib.suppress(Exception):  # teardown: the figures are taken
                await client.disconnect()
        half.terminate()
        await half.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--copies", type=int, default=53, help="signals made of each of the demo's")
    parser.add_argument("--publish-ms", type=int, default=100)
    parser.add_argument("--batch-ms", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    logging.getLogger("asyncua").setLevel(logging.ERROR)  # its per-client warnings, x10
    with tempfile.TemporaryDirectory(prefix="dmzbroker-opcua-bench-") as tmp:
        got = asyncio.run(run(Path(tmp), args))
    print(
        f"OPC UA server: {args.clients} clients x {got.items:,} items, publishing every "
        f"{args.publish_ms} ms: {got.rate:,.0f} notifications/s (slowest client "
        f"{got.slowest:,.0f}/s); CPU: server {got.server_cores:.2f} cores "
        f"({got.server_cores / got.rate * 1e6:,.1f} us per notification), "
        f"clients {got.client_cores:.2f} cores"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
