"""Benchmark: OPC UA notifications/s ingested by the real connector, 1,000 and 10,000 items.

An asyncua server in a child process (its own core) holds N Double variables and rewrites
them round-robin as fast as it can; the real `OpcUaConnector` in this process subscribes to
all of them (Basic256Sha256 SignAndEncrypt, certificates from `dmzbroker certs`, publishing
interval 100 ms, queue size 1) and counts the new values it emits over a measured window
(and, apart, the unchanged items each message re-emits as still current).
Run: `.venv/bin/python bench/opcua_ingest.py` (`--help` for the knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import msgspec
from asyncua import Server, ua
from support import SPAWN, Window, cli, device_process, free_port, measure_ingest

from broker.config import OpcUaConfig
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.opcua import OpcUaConnector
from broker.plant.connectors.opcua_session import SessionSettings
from broker.policy import OpcUaDevice, Signal

YIELD_EVERY = 100  # server writes between two turns of its event loop


def serve(
    pki: Path, port: int, items: int, writes: mp.Value, ready: mp.Event, stop: mp.Event
) -> None:  # type: ignore[type-arg]
    """The child: a server whose values change as fast as it can write them."""
    logging.disable(logging.WARNING)

    async def main() -> None:
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench")
        await server.set_application_uri("urn:dmzbroker:bench:server")
        await server.load_certificate(str(pki / "server-cert.pem"))
        await server.load_private_key(str(pki / "server-key.pem"))
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        ns = await server.register_namespace("urn:dmzbroker:bench")
        folder = await server.nodes.objects.add_object(ns, "Bench")
        ids = [ua.NodeId(f"v{i}", ns) for i in range(items)]
        for node_id in ids:
            await folder.add_variable(node_id, node_id.Identifier, 0.0)
        await server.start()
        ready.set()
        value = 0.0
        while not stop.is_set():
            for node_id in ids:
                value += 1.0
                await server.write_attribute_value(node_id, ua.DataValue(ua.Variant(value)))
                if value % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # let the server sample and publish
            writes.value += len(ids)
        await server.stop()

    asyncio.run(main())


async def ingest(pki: Path, port: int, items: int, warmup_s: float, measure_s: float) -> Window:
    device = msgspec.convert(
        {"name": "bench", "endpoint": f"opc.tcp://127.0.0.1:{port}/bench", "poll_interval_s": 0.1,
         "timeout_s": 10.0},
        OpcUaDevice,
    )  # fmt: skip
    signals = [
        msgspec.convert(
            {
                "path": f"bench/items/v{i}",
                "device": "bench",
                "source": {"protocol": "opcua", "node": f"ns=2;s=v{i}"},
            },
            Signal,
        )
        for i in range(items)
    ]
    config = OpcUaConfig(
        certificate=pki / "broker-cert.pem",
        private_key=pki / "broker-key.pem",
        trust_list=[pki / "ca" / "ca.crt"],
    )
    connector = OpcUaConnector(device, signals, SessionSettings.build(device, config))
    last: dict[str, datetime] = {}  # each signal's last source time

    def tally(samples: list[RawSample], counts: Counter[str]) -> None:
        """New values; the others are unchanged items re-emitted as still current."""
        new = 0
        for sample in samples:
            if last.get(sample.signal) != sample.source_time:
                last[sample.signal] = sample.source_time
                new += 1
        counts["new"] += new
        counts["repeated"] += len(samples) - new

    return await measure_ingest(connector, tally, ["overruns"], warmup_s, measure_s)


def run(pki: Path, items: int, warmup_s: float, measure_s: float) -> None:
    writes = SPAWN.Value("q", 0)
    port = free_port()
    with device_process("the OPC UA server", serve, pki, port, items, writes):
        before, started = writes.value, time.perf_counter()
        window = asyncio.run(ingest(pki, port, items, warmup_s, measure_s))
        written = (writes.value - before) / (time.perf_counter() - started)
    print(
        f"{items:>6} items | {window.per_s('new'):>9,.0f} notifications/s ingested | "
        f"{window.per_s('repeated'):>9,.0f} unchanged re-emitted/s | server wrote "
        f"{written:>9,.0f} values/s | connector CPU {window.cpu:.0%} | overflow-flagged "
        f"{window.changed['overruns']} | session errors {window.errors}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds measured")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp)
        cli("certs", "init-ca", "--out", str(pki / "ca"), "--name", "bench CA")
        for name, uri in (
            ("broker", "urn:dmzbroker:bench"),
            ("server", "urn:dmzbroker:bench:server"),
        ):
            cli("certs", "issue", "opcua", "--ca", str(pki / "ca"), "--out", tmp, "--name", name,
                "--uri", uri, "--dns", "localhost")  # fmt: skip
        print("OPC UA ingest: Basic256Sha256 SignAndEncrypt, publishing interval 100 ms, queue 1")
        for items in args.items:
            run(pki, items, args.warmup, args.seconds)


if __name__ == "__main__":
    main()
