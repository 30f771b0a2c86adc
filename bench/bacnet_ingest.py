"""Benchmark: BACnet/IP points/s ingested by the real connector from the simulated device.

The simulated device (`broker/sim/bacnet_device.py`, bacpypes3, in a child process: its own
core) holds N analog-value objects in percent; the real `BacnetConnector` in this process
polls the present-value of all of them (ReadPropertyMultiple batches sized to the device's
APDU, with status-flags and reliability) at the shortest poll interval a policy allows
(0.05 s), and counts the samples it emits over a measured window, good ones apart. It runs
once with the default request budget (20 requests/s, ADR 0008: what a policy gets unless
its owners raise it) and once with the highest a policy may set (10,000/s), which shows
the pace of the connector and the device.
Run: `.venv/bin/python bench/bacnet_ingest.py` (`--help` for the knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

import msgspec
import structlog
from support import SPAWN, Window, device_process, free_port, measure_ingest, samples_and_good

from broker.plant.connectors.bacnet import BacnetConnector
from broker.policy import BacnetDevice, Signal
from broker.policy.device_schema import DEFAULT_MAX_REQUESTS_PER_S, MAX_REQUESTS_PER_S
from broker.sim.bacnet_device import SimObject, SimulatedBacnetDevice

POLL_INTERVAL_S = 0.05  # the shortest a policy allows (broker.policy.fields.Seconds)
INSTANCE = 1001


def serve(port: int, objects: int, cpu_s: Any, ready: Any, stop: Any) -> None:
    """The child: the simulated device until `stop` is set; its CPU seconds in `cpu_s`."""
    logging.disable(logging.WARNING)

    async def main() -> None:
        device = SimulatedBacnetDevice(
            "127.0.0.1", port, INSTANCE,
            [SimObject("analog-value", i, f"av-{i}", i + 0.5, "percent") for i in range(objects)],
        )  # fmt: skip
        await device.start()
        ready.set()
        while not stop.is_set():
            cpu_s.value = time.process_time()
            await asyncio.sleep(0.1)
        await device.stop()

    asyncio.run(main())


async def ingest(
    port: int, objects: int, per_s: float, warmup_s: float, measure_s: float
) -> Window:
    device = msgspec.convert(
        {"name": "bench", "protocol": "bacnet", "host": "127.0.0.1", "port": port,
         "device_instance": INSTANCE, "poll_interval_s": POLL_INTERVAL_S, "timeout_s": 10.0,
         "max_requests_per_s": per_s},
        BacnetDevice,
    )  # fmt: skip
    signals = [
        msgspec.convert(
            {
                "path": f"bench/values/av{i}",
                "device": "bench",
                "unit": "%",
                "source": {"protocol": "bacnet", "object_type": "analog-value", "instance": i},
            },
            Signal,
        )
        for i in range(objects)
    ]
    connector = BacnetConnector(device, signals)
    counters = ["requests", "overruns"]
    return await measure_ingest(connector, samples_and_good, counters, warmup_s, measure_s)


def run(objects: int, per_s: float, warmup_s: float, measure_s: float) -> None:
    cpu_s = SPAWN.Value("d", 0.0)
    port = free_port()  # a TCP port free now; UDP's is almost always free with it
    with device_process("the simulated BACnet device", serve, port, objects, cpu_s):
        device_cpu, started = cpu_s.value, time.perf_counter()
        window = asyncio.run(ingest(port, objects, per_s, warmup_s, measure_s))
        device_busy = (cpu_s.value - device_cpu) / (time.perf_counter() - started)
    print(
        f"{objects:>6} objects | budget {per_s:>6,.0f} req/s | {window.per_s('samples'):>8,.0f} "
        f"points/s ingested ({window.per_s('good'):,.0f} good) | "
        f"{window.per_s('requests'):>6,.0f} requests/s | connector CPU {window.cpu:.0%}, device "
        f"CPU {device_busy:.0%} | overruns {window.changed['overruns']} | session errors "
        f"{window.errors}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 5,000 objects need --seconds 60 or more: one scan takes longer than the default window
    parser.add_argument("--objects", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--budgets", type=float, nargs="+",
                        default=[DEFAULT_MAX_REQUESTS_PER_S, MAX_REQUESTS_PER_S],
                        help="max_requests_per_s of the device")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds measured")
    args = parser.parse_args()
    # the connector's scan_overrun events are the figure's "overruns"
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    print(f"BACnet/IP ingest: read poll, ReadPropertyMultiple, poll interval {POLL_INTERVAL_S} s")
    for objects in args.objects:
        for per_s in args.budgets:
            run(objects, per_s, args.warmup, args.seconds)


if __name__ == "__main__":
    main()
