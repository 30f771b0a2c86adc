"""Benchmark: records/s delivered over /v1/stream to 1, 10 and 100 concurrent mTLS consumers.

The enterprise half runs as its own process on a throwaway appliance
(`broker.sim.appliance`); K consumers connect to /v1/stream, then N records (default 5,000)
are written to the spool at once, and the time until every consumer has received all of
them gives deliveries/s (N x K / seconds). Run: `.venv/bin/python bench/sse_fanout.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from support import REPO, free_port

from broker import policy
from broker.channel.spool import SpoolSender
from broker.records import Context, Record
from broker.sim.appliance import provision
from broker.trust import tls

CONSUMER = "spiffe://demo/consumer/historian"


async def consume(
    session: aiohttp.ClientSession,
    url: str,
    context: object,
    count: int,
    ready: asyncio.Event,
    counter: list[int],
) -> None:
    async with session.get(url, ssl=context, timeout=aiohttp.ClientTimeout(total=600)) as response:  # type: ignore[arg-type]
        counter[0] += 1
        if counter[0] == counter[1]:
            ready.set()
        received = 0
        async for line in response.content:
            if line.startswith(b"data: "):
                received += 1
                if received == count:
                    return


async def run(workdir: Path, consumers: int, records: int) -> float:
    demo = policy.load(REPO / "policies" / "refrigeration.yaml")
    port = free_port()
    appliance = provision(workdir, demo, port=port, consumer_uri=CONSUMER)
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "enterprise", "--config", str(appliance.config),
        "--log-format", "json", "--reset-state", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        context = tls.client_context(appliance.ca, appliance.client_cert, appliance.client_key)
        url = f"https://localhost:{port}/v1/stream"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(100):  # wait for the API (bounded: 10 s)
                try:
                    async with session.get(
                        f"https://localhost:{port}/v1/signals", ssl=context
                    ) as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            ready, counter = asyncio.Event(), [0, consumers]
            tasks = [
                asyncio.create_task(consume(session, url, context, records, ready, counter))
                for _ in range(consumers)
            ]
            await asyncio.wait_for(ready.wait(), 60)
            await asyncio.sleep(0.5)  # every subscription registered
            now = datetime.now(UTC)
            batch = [
                Record(signal=demo.signals[i % len(demo.signals)].path, value=float(i), unit="",
                       quality="good", source_time=now, broker_time=now, policy_version=1, context=Context())
                for i in range(records)
            ]  # fmt: skip
            started = time.perf_counter()
            sender = SpoolSender(workdir / "spool", segment_bytes=16 << 20, retention_bytes=1 << 30)
            sender.send(batch)
            sender.close()
            await asyncio.wait_for(asyncio.gather(*tasks), 300)
            return records * consumers / (time.perf_counter() - started)
    finally:
        server.terminate()
        await server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5_000)
    args = parser.parse_args()
    for consumers in (1, 10, 100):
        with tempfile.TemporaryDirectory(prefix="dmzbroker-sse-bench-") as tmp:
            rate = asyncio.run(run(Path(tmp), consumers, args.records))
        print(
            f"SSE fan-out: {consumers:>3} consumers x {args.records:,} records: {rate:,.0f} deliveries/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
