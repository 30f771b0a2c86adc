"""Benchmark: records/s through the diode channel at 0 % and 1 % datagram loss.

A spool of N records (default 100,000; records with context, as the plant half writes them)
is read by a `DiodeSender` (its own process), sent through a UDP relay on 127.0.0.1 (this
process, dropping the given share of datagrams at random) to a `DiodeReceiver` (its own
process), which writes its own spool. Prints the records that reached the IT spool per
second (first to last delivery), the datagrams lost, and what the receiver reported lost.
Run: `.venv/bin/python bench/diode.py [--records N] [--rate DATAGRAMS_S]`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import random
import socket
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from broker.channel.spool import SpoolReceiver, SpoolSender
from broker.channel.udp import DiodeSender
from broker.channel.udp_receiver import DiodeReceiver
from broker.channel.udp_socket import enlarge_receive_buffer
from broker.config import DiodeConfig, SpoolConfig
from broker.records import Context, Load, Maintenance, Record, Trend, WindowStats

QUIET_S = 1.5  # nothing new in the IT spool for this long: the run is over


def records(count: int) -> list[Record]:
    now = datetime.now(UTC)
    context = Context(
        asset="site/area/compressor-1",
        asset_type="compressor",
        asset_state="running",
        ambient={"site/outdoor/temperature": 21.5},
        load=Load(
            signal="site/area/compressor-1/power", windows={"15m": WindowStats(mean=7.1, max=9.0)}
        ),
        maintenance=Maintenance(status="ok", last_service="2024-04-01", next_due="2024-10-01"),
        trend=Trend(slope_per_h=0.2, direction="steady", window="1h"),
    )
    return [
        Record(
            signal=f"site/area/asset-{i % 2000}/measure",
            value=float(i),
            unit="bar",
            quality="good",
            source_time=now,
            broker_time=now,
            policy_version=1,
            context=context,
        )
        for i in range(count)
    ]


def _quiet() -> None:
    """The figures are the output: no event per gap or per lost record."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def _run(end: str, spool: SpoolConfig, diode: DiodeConfig) -> None:
    _quiet()
    peer = DiodeSender(spool, diode) if end == "send" else DiodeReceiver(spool, diode)
    asyncio.run(peer.run())


class Relay(asyncio.DatagramProtocol):
    def __init__(self, target: tuple[str, int], loss: float) -> None:
        self.target, self.loss, self.rng = target, loss, random.Random(1)
        self.dropped = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.rng.random() < self.loss:
            self.dropped += 1
        else:
            self.transport.sendto(data, self.target)


async def one_run(directory: Path, count: int, loss: float, rate: int) -> dict[str, Any]:
    ot = SpoolConfig(dir=directory / "ot-spool", segment_mib=64, retention_mib=4096)
    it = SpoolConfig(dir=directory / "it-spool", segment_mib=64, retention_mib=4096)
    plant = SpoolSender(ot.dir, 64 << 20, 4096 << 20)
    batch = records(1000)
    for _ in range(count // 1000):
        plant.send(batch)
    plant.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        receive_port = probe.getsockname()[1]
    relay = Relay(("127.0.0.1", receive_port), loss)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    enlarge_receive_buffer(sock)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: relay, sock=sock
    )
    common: dict[str, Any] = {"max_datagrams_s": rate, "resync_s": 3600.0}
    to_relay = DiodeConfig(host="127.0.0.1", port=sock.getsockname()[1],
                           state_dir=directory / "ot-diode", **common)  # fmt: skip
    bound = DiodeConfig(host="127.0.0.1", port=receive_port,
                        state_dir=directory / "it-diode", **common)  # fmt: skip
    spawn = multiprocessing.get_context("spawn")
    receiver = spawn.Process(target=_run, args=("receive", it, bound))
    receiver.start()
    await asyncio.sleep(1.0)  # it binds
    sender = spawn.Process(target=_run, args=("send", ot, to_relay))
    sender.start()
    reader = SpoolReceiver(it.dir, directory / "reader")
    delivered, first, last = 0, 0.0, time.monotonic()
    try:
        while time.monotonic() - last < QUIET_S:
            got = len(reader.receive(20_000))
            if got:
                last = time.monotonic()
                first = first or last
                delivered += got
            else:
                await asyncio.sleep(0.02)
    finally:
        for process in (sender, receiver):
            process.terminate()
            process.join(10)
        transport.close()
        reader.close()
    seconds = max(last - first, 1e-9)
    reported = _reported_lost(it.dir)
    return {"delivered": delivered, "per_s": delivered / seconds, "dropped": relay.dropped,
            "reported": reported}  # fmt: skip


def _reported_lost(spool_dir: Path) -> str:
    for line in (spool_dir / "diode.prom").read_text().splitlines():
        if line.startswith("dmzbroker_diode_datagrams_lost_total"):
            return line.rpartition(" ")[2]
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=20_000, help="diode.max_datagrams_s")
    args = parser.parse_args()
    _quiet()
    for loss in (0.0, 0.01):
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(one_run(Path(tmp), args.records, loss, args.rate))
        print(
            f"diode, {loss:.0%} loss: {result['per_s']:,.0f} records/s "
            f"({result['delivered']:,} of {args.records:,} records delivered; "
            f"{result['dropped']:,} datagrams dropped, {result['reported']} reported lost; "
            f"max_datagrams_s {args.rate:,})"
        )


if __name__ == "__main__":
    main()
