"""Benchmark: records/s the PostgreSQL historian sink writes into a local PostgreSQL 15.

Starts a throwaway PostgreSQL (the tests' server, `tests/enterprise/postgres_server.py`:
initdb as an unprivileged user, 127.0.0.1 on a free port, TLS 1.3, a server certificate from
our CLI), with an owner role (password file) and the sink's role (client certificate, INSERT
only). For each count it fills a spool with a real `SpoolSender` (records of the demo's
signals, each with a full context), then times the real `PostgresSink` (sslmode=verify-full,
schema made by the owner on first start) from its start until its spool position, which
moves only after each COMMIT, reaches the last record. Then the same spool again from
position 0 (the idempotent path: every row is a conflict, nothing is inserted). Row counts
are checked after each run. The CPU figures (this process, the server's processes) say
where the time goes on a machine that other work shares. Target: >= 50,000 records/s. Run:
`.venv/bin/python bench/postgres_sink.py` (`--help` for the knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import structlog

from broker import policy
from broker.channel.spool import SpoolSender
from broker.config import PostgresConfig
from broker.enterprise.authz import Authorization
from broker.enterprise.outputs.postgres import PostgresSink
from broker.metrics import EnterpriseMetrics
from broker.records import Alert, Assessment, Context, Load, Record, Trend, WindowStats
from tests.enterprise.postgres_server import PG_BIN, PostgresServer, make_pki
from tests.harness import CONSUMER_URI, DEMO_POLICY

TARGET = 50_000  # records/s, issue 17
DEADLINE_S = 600.0
POLL_S = 0.01  # how often the position file is read: the figure's resolution
ALERT = Alert(rule="warm-room", severity="warning", message="room above -16 °C for 10 min",
              action="check the door and the evaporator", outcome="product_quality")  # fmt: skip


@dataclass(frozen=True)
class Run:
    seconds: float
    sink_cpu: float  # this process's CPU time over the run, as a share of one core
    server_cpu: float  # the PostgreSQL processes' CPU time, likewise
    rows: int  # rows in the records table afterwards

    def per_s(self, count: int) -> float:
        return count / self.seconds


def context_of(signal: str, i: int, full: bool = True) -> Context:
    """A context as a modelled asset gives it: state, ambient, load, assessment, trend, an
    alert on one record in four (430-610 bytes of JSON); not `full`: the asset alone."""
    if not full:
        return Context(asset=signal.rpartition("/")[0])
    window = WindowStats(mean=11.5 + i % 7, max=14.0)
    return Context(
        asset=signal.rpartition("/")[0], asset_type="cold-room", asset_state="running",
        ambient={"outdoor": 21.5},
        load=Load(signal="coldstore/storage/compressor-1/power",
                  windows={"15m": window, "24h": window}),
        assessment=Assessment(expected=-18.0, deviation_pct=1.25, label="expected",
                              direction="above"),
        trend=Trend(slope_per_h=0.04, direction="steady", window="1h"),
        alerts=[ALERT] if i % 4 == 0 else [],
    )  # fmt: skip


def fill(spool: Path, signals: list[str], count: int, full: bool) -> None:
    sender = SpoolSender(spool, segment_bytes=64 << 20, retention_bytes=4 << 30)
    start = datetime.now(UTC)
    for first in range(0, count, 1000):
        batch = []
        for i in range(first, min(count, first + 1000)):
            signal, at = signals[i % len(signals)], start + timedelta(milliseconds=i)
            batch.append(Record(signal=signal, value=-18.0 + (i % 100) / 50, unit="°C",
                                quality="good", source_time=at, broker_time=at,
                                policy_version=1, context=context_of(signal, i, full)))  # fmt: skip
        sender.send(batch)
    sender.close()


def position(state: Path) -> int:
    try:
        return int(json.loads((state / "spool-position-postgres.json").read_bytes())["seq"])
    except FileNotFoundError:
        return 0


def server_cpu_s(server: PostgresServer) -> dict[int, float]:
    """CPU seconds of the postmaster and each backend, by pid."""
    pid = int((server.data / "postmaster.pid").read_text().split("\n", 1)[0])
    parent = psutil.Process(pid)
    used = {}
    for process in [parent, *parent.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        used[process.pid] = times.user + times.system
    return used


async def deliver(
    server: PostgresServer, config: PostgresConfig, spool: Path, state: Path, count: int
) -> Run:
    """Run the sink on `spool` from the position saved in `state` until it reaches `count`."""
    authz = Authorization(policy.load(DEMO_POLICY))
    sink = PostgresSink(config, spool, state, authz, EnterpriseMetrics(lambda: 0, lambda: False))
    await sink.start()
    server_before = server_cpu_s(server)
    started, cpu = time.perf_counter(), time.process_time()
    task = asyncio.create_task(sink.run())
    try:
        while position(state) < count:
            if time.perf_counter() - started > DEADLINE_S:
                raise SystemExit(f"the sink did not reach seq {count} within {DEADLINE_S:.0f} s")
            await asyncio.sleep(POLL_S)
        elapsed = time.perf_counter() - started
        sink_cpu = (time.process_time() - cpu) / elapsed
        # Before the sink stops: its backend's CPU goes with the process when it ends.
        server_after = server_cpu_s(server)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()
    used = sum(t - server_before.get(pid, 0.0) for pid, t in server_after.items())
    (rows,) = server.sql("SELECT count(*) FROM dmzbroker.records", database=config.database)[0]
    return Run(elapsed, sink_cpu, used / elapsed, int(rows))


def report(what: str, count: int, run: Run, expected_rows: int, judged: bool) -> bool:
    """Prints the run; whether every row is there once and, where `judged`, the rate met."""
    rate = run.per_s(count)
    rows_ok = run.rows == expected_rows
    sink_us, server_us = (
        share * run.seconds / count * 1e6 for share in (run.sink_cpu, run.server_cpu)
    )
    print(
        f"{what:<24} {count:>8,} records | {rate:>7,.0f} records/s | {run.seconds:6.2f} s | "
        f"sink CPU {run.sink_cpu:4.0%} = {sink_us:4.1f} µs/record | "
        f"PostgreSQL CPU {run.server_cpu:4.0%} = {server_us:4.1f} µs | "
        f"rows {run.rows:,}{'' if rows_ok else f' (expected {expected_rows:,}: WRONG)'}"
    )
    return rows_ok and (rate >= TARGET or not judged)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument(
        "--context",
        choices=["full", "asset"],
        default="full",
        help="each record's context: a modelled asset's, or its path alone",
    )
    args = parser.parse_args()
    if not (PG_BIN / "postgres").exists():
        raise SystemExit(f"{PG_BIN}/postgres not found: install postgresql-15 (`make test` does)")
    # warnings (an unreachable or refusing server) stay visible; connected/created do not
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    demo = policy.load(DEMO_POLICY)
    signals = [s.path for s in demo.signals if s.path in Authorization(demo).view(CONSUMER_URI)]
    print(f"PostgreSQL sink: COPY into a temp table + INSERT ... ON CONFLICT DO NOTHING, "
          f"TLS 1.3 verify-full, client certificate, {len(signals)} signals, "
          f"context: {args.context}")  # fmt: skip
    passed = True
    with tempfile.TemporaryDirectory(prefix="dmzbroker-pg-bench-") as tmp:
        workdir = Path(tmp)
        server = PostgresServer(make_pki(workdir / "pki"))
        try:
            server.start()
            owner = server.create_role("historian_owner", password="bench owner")
            sink = server.create_role("dmzbroker_sink")
            for count in dict.fromkeys(args.records):  # each count once: a database each
                database = f"bench_{count}"
                server.create_database(database, owner=owner.user)
                config = server.sink_config(CONSUMER_URI, sink, owner=owner, database=database)
                spool = workdir / f"spool-{count}"
                fill(spool, signals, count, args.context == "full")
                # The target is for the largest count: a small one is mostly the TLS
                # connection and, for the first, the schema's creation.
                judged = count == max(args.records)
                run = asyncio.run(deliver(server, config, spool, workdir / f"state-{count}", count))
                passed &= report("new rows", count, run, count, judged)
                replay = workdir / f"state-{count}-replay"  # no position: from seq 1 again
                run = asyncio.run(deliver(server, config, spool, replay, count))
                passed &= report("replay (all conflicts)", count, run, count, judged)
        finally:
            server.close()
    print(f"target >= {TARGET:,} records/s at {max(args.records):,} records, every row once: {'PASS' if passed else 'FAIL'} "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
