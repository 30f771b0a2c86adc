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

import msgspec
import structlog
from support import Window, measure_ingest, samples_and_good

from broker.plant.connectors.dnp3 import Dnp3Connector
from broker.policy import Dnp3Device, Signal
from tests.plant.connectors.dnp3_outstation import ONLINE, Dnp3Outstation

POLL_INTERVAL_S = 0.05  # the shortest a policy allows (broker.policy.fields.Seconds)


async def ingest(port: int, points: int, warmup_s: float, measure_s: float) -> Window:
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
    counters = ["scans", "overruns"]
    return await measure_ingest(connector, samples_and_good, counters, warmup_s, measure_s)


def run(points: int, warmup_s: float, measure_s: float) -> None:
    with Dnp3Outstation(size=points) as station:
        for index in range(points):  # online, so that every sample is good
            station.set("analog", index, float(index) + 0.5, flags=ONLINE)
        window = asyncio.run(ingest(station.port, points, warmup_s, measure_s))
    print(
        f"{points:>6} points | {window.per_s('samples'):>9,.0f} points/s ingested "
        f"({window.per_s('good'):,.0f} good) | {window.per_s('scans'):>5.1f} scans/s | "
        f"connector CPU {window.cpu:.0%} | overruns {window.changed['overruns']} | "
        f"session errors {window.errors}"
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
