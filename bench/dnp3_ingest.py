"""Benchmark: DNP3 points/s ingested by the real connector from opendnp3's outstation.

The outstation (the tests' device: `tests/plant/connectors/dnp3_outstation.py`, yadnp3 in a
child process, its own core) holds N analog inputs; the real `Dnp3Connector` in this process
reads all of them with `read: static` (range reads of g30v5, float32) at the shortest poll
interval a policy allows (0.05 s), and counts the samples it emits over a measured window,
good ones apart. The values do not change between scans: a static read returns each point
every scan whatever it holds, so the count is the connector's (and the outstation's) pace.
Run: `.venv/bin/python bench/dnp3_ingest.py` (`--help` for the knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import msgspec
import structlog

from broker.plant.connectors.base import RawSample
from broker.plant.connectors.dnp3 import Dnp3Connector
from broker.policy import Dnp3Device, Signal
from tests.plant.connectors.dnp3_outstation import ONLINE, Dnp3Outstation

POLL_INTERVAL_S = 0.05  # the shortest a policy allows (broker.policy.fields.Seconds)


async def ingest(
    port: int, points: int, warmup_s: float, measure_s: float
) -> tuple[float, float, float, float, int, int]:
    device = msgspec.convert(
        {"name": "bench", "protocol": "dnp3", "host": "127.0.0.1", "port": port,
         "outstation_address": 1024, "poll_interval_s": POLL_INTERVAL_S, "timeout_s": 10.0},
        Dnp3Device,
    )  # fmt: skip
    signals = [
        msgspec.convert(
            {
                "path": f"bench/analog/a{i}",
                "device": "bench",
                "source": {"protocol": "dnp3", "group": 30, "variation": 5, "index": i},
            },
            Signal,
        )
        for i in range(points)
    ]
    connector = Dnp3Connector(device, signals)
    received = good = 0

    async def emit(samples: list[RawSample]) -> None:
        nonlocal received, good
        received += len(samples)
        good += sum(1 for sample in samples if sample.quality == "good")

    task = asyncio.create_task(connector.run(emit))
    try:
        await asyncio.sleep(warmup_s)
        start_received, start_good, start_scans = received, good, connector.scans
        start_overruns = connector.overruns
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.sleep(measure_s)
        elapsed = time.perf_counter() - started
        return (
            (received - start_received) / elapsed,
            (good - start_good) / elapsed,
            (connector.scans - start_scans) / elapsed,
            (time.process_time() - cpu) / elapsed,
            connector.overruns - start_overruns,
            connector.errors,
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def run(points: int, warmup_s: float, measure_s: float) -> None:
    with Dnp3Outstation(size=points) as station:
        for index in range(points):  # online, so that every sample is good
            station.set("analog", index, float(index) + 0.5, flags=ONLINE)
        rate, good, scans, busy, overruns, errors = asyncio.run(
            ingest(station.port, points, warmup_s, measure_s)
        )
    print(
        f"{points:>6} points | {rate:>9,.0f} points/s ingested ({good:,.0f} good) | "
        f"{scans:>5.1f} scans/s | connector CPU {busy:.0%} | overruns {overruns} | "
        f"session errors {errors}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[100, 1000, 10_000])
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds measured")
    args = parser.parse_args()
    # the connector's scan_overrun events at 10,000 points are the figure's "overruns"
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    print(f"DNP3 ingest: read static, g30v5 range reads, poll interval {POLL_INTERVAL_S} s")
    for points in args.points:
        run(points, args.warmup, args.seconds)


if __name__ == "__main__":
    main()
