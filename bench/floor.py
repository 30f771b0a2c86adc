"""Benchmark: the floors, what CPython and the chosen libraries cost at issue 19's loads.

Some of issue 19's targets may lie below what the stack can reach at all. This bench
measures the libraries alone, each in its cheapest correct use and in a process of its own,
with none of the broker's data path in the figure:

1. Memory (bench/floor_memory.py). The modules each of the three processes held as deployed,
   imported into a fresh `python -I` in groups (asyncio and ssl; the rest of the standard
   library; each library; the broker's own modules), RSS after each group, next to the RSS
   of the processes as they ran at the like-for-like load.
2. CPU at the like-for-like load (1,000 int16 input registers polled every 100 ms, 10,000
   points/s), CPU time of each library's process over a window (bench/floor_cpu.py):
   pymodbus (a bare asyncio client, the scan's 8 requests of 125 registers sent together
   every 100 ms, against a pymodbus server in another process); paho via aiomqtt 2.5's
   `client._client` as the MQTT sink uses it (the sink's messages of a scan, one per asset
   per batch with its payloads, in one burst at QoS 1, retained, over mTLS to a local
   Mosquitto with set_tcp_nodelay, PUBACKs awaited); aiohttp serving /v1/stream's frames over
   mTLS to one consumer, a write per batch of 125; msgspec's JSON of one record. Each as % of
   a core per 1,000 points/s, against the 0.44 % target and the broker's measured figure.
3. The same libraries at the 100,000-signal load (110,000 records/s with bench/pipeline.py's
   context): the pymodbus client at 800 requests/s of 125 registers; paho publishing 10,000
   messages/s of 11 records; aiohttp serving 110,000 records/s; the benches' SSE consumer
   (bench/pipeline.py's StreamConsumer: TLS, framing, a JSON decode of each record); msgspec
   encoding them. Cores needed = CPU per unit x the load's units/s (a library that could not
   reach the rate here is scaled from the CPU per unit it did).

This module chooses the loads, builds their records and messages, and prints the tables.
Run from the repository root: `.venv/bin/python bench/floor.py` (--help). Prints tables; exits
0 whatever the figures, non-zero only on a crash. Every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import psutil
from floor_cpu import (
    REGISTERS_PER_REQUEST,
    Figure,
    TlsFiles,
    encode_floor,
    in_child,
    modbus_client,
    mqtt_publisher,
    sse_consumer,
    sse_server,
)
from floor_memory import measure_memory
from footprint import appliance as like_for_like_appliance
from footprint import policy_document, serve_device
from pipeline import Scanner, make_policy, timed_scans, warmed
from support import device_process, free_port, mosquitto

from broker.enterprise.store import sse_event
from broker.plant.pipeline import PlantPipeline
from broker.policy import parse as policy_parse
from broker.records import Record, to_json

BROKER_CPU_PER_1000 = "3.65-4.28"  # % of a core, docs/performance.md (quiet machine, 2026-12-06)
TARGET_CPU_PER_1000 = 0.44
SCALE_RECORDS_S = 110_000  # 100,000 signals and a derived one per asset of 10, each second
SCALE_REGISTERS_S = 100_000
SCALE_MESSAGES_S = 10_000  # one per asset (11 records) and second
SCALE_DEVICE_REGISTERS = 10_000  # polled 10 times a second: 800 requests/s of 125


# --- the records and messages of each load ----------------------------------------------------


def like_for_like_records(document: dict[str, Any]) -> list[Record]:
    """One scan of the like-for-like policy through the real plant pipeline, seqs stamped."""
    policy = policy_parse.from_payload(msgspec.json.encode(document), "floor policy")
    records = PlantPipeline(policy).process(Scanner(policy).scan(len(policy.signals)))
    return stamped(records)


def scale_records() -> list[Record]:
    """A scan of 1,000 of bench/pipeline.py's signals with their context (100 assets,
    1,100 records, a warmed day of history): what each second of the 100,000 load carries."""
    policy = make_policy(1000, 1)
    batches = timed_scans(policy, 1)
    return stamped(warmed(policy, batches).process(batches[0]))


def stamped(records: list[Record]) -> list[Record]:
    for seq, record in enumerate(records, 1):
        record.seq = seq
    return records


def sink_messages(batches: list[list[Record]], prefix: str) -> list[tuple[str, bytes, int]]:
    """The sink's messages for these batches: one per asset per batch, its records' JSON."""
    messages = []
    for batch in batches:
        by_asset: defaultdict[str, list[Record]] = defaultdict(list)
        for record in batch:
            by_asset[record.signal.rpartition("/")[0]].append(record)
        messages += [(f"{prefix}/{a}", to_json(group), len(group)) for a, group in by_asset.items()]
    return messages


def sse_chunks(records: list[Record], per_write: int) -> list[tuple[bytes, int]]:
    """The API's writes: the SSE frames of a batch joined."""
    return [(b"".join(sse_event(r) for r in records[i : i + per_write]),
             len(records[i : i + per_write])) for i in range(0, len(records), per_write)]  # fmt: skip


# --- the runs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    what: str
    reached: str  # the rate it ran at
    figure: float  # % of a core per 1,000 points/s, or cores
    broker: bool = True  # the broker's own work; else another process on the same cores


def print_rows(title: str, unit: str, rows: list[Row]) -> None:
    print(f"\n{title}\n  {'library, alone in its process':64} {'ran at':>16} {unit:>8}")
    for row in (r for r in rows if r.broker):
        print(f"  {row.what:64} {row.reached:>16} {row.figure:8.3f}")
    total = sum(r.figure for r in rows if r.broker)
    print(f"  {'sum of the broker-side libraries':64} {'':16} {total:8.3f}")
    for row in (r for r in rows if not r.broker):
        print(f"  {'not the broker: ' + row.what:64} {row.reached:>16} {row.figure:8.3f}")


def per_1000(figure: Figure, unit: str, cpu_s: float | None = None) -> float:
    """% of a core per 1,000 `unit`/s (of this figure's process, or of `cpu_s`)."""
    used = figure.cpu_s if cpu_s is None else cpu_s
    return 100 * used / figure.done[unit] * 1000


@dataclass(frozen=True)
class Rig:
    """The like-for-like appliance (bench/footprint.py's) and what the floors borrow from it."""

    workdir: Path
    config: Path
    api: int
    mqtt: int  # Mosquitto's port
    consumer: Any  # the consumer's ssl.SSLContext
    client: TlsFiles  # the sink's certificate: any client of the floors
    server: TlsFiles  # the API's

    @classmethod
    def made(cls, workdir: Path, args: argparse.Namespace) -> Rig:
        config, api, mqtt, consumer = like_for_like_appliance(workdir, args)
        pki = workdir / "certs"
        client = TlsFiles(pki / "ca.crt", pki / "sink.crt", pki / "sink.key")
        server = TlsFiles(pki / "ca.crt", pki / "server.crt", pki / "server.key")
        return cls(workdir, config, api, mqtt, consumer, client, server)


def run(args: argparse.Namespace, workdir: Path) -> None:
    rig = Rig.made(workdir, args)
    with mosquitto(workdir / "mosquitto.conf") as mqtt_broker:
        mqtt_pid = mqtt_broker.pid
        if "memory" in args.parts or "like" in args.parts:
            with device_process("modbus device", serve_device, args.device_port, args.registers):
                if "memory" in args.parts:
                    measure_memory(workdir, rig.config, rig.api, rig.mqtt, rig.consumer)
                if "like" in args.parts:
                    run_like_for_like(args, rig, mqtt_pid)
        if "scale" in args.parts:
            run_scale(args, rig, mqtt_pid)


def run_like_for_like(args: argparse.Namespace, rig: Rig, mqtt_pid: int) -> None:
    poll_s = args.poll_ms / 1000
    window = (args.warmup, args.seconds)
    records = like_for_like_records(policy_document(args.device_port, args.registers, poll_s))
    batches = [records[i : i + REGISTERS_PER_REQUEST]
               for i in range(0, len(records), REGISTERS_PER_REQUEST)]  # fmt: skip
    messages = sink_messages(batches, "floor")
    rows = []
    with in_child(modbus_client, args.device_port, args.registers, poll_s, *window) as got:
        modbus = got()
    rows.append(Row(f"pymodbus client, {len(batches)} requests of 125 a scan",
                    f"{modbus.per_s('points'):,.0f} points/s", per_1000(modbus, "points")))  # fmt: skip
    with in_child(mqtt_publisher, rig.mqtt, mqtt_pid, rig.client, messages, poll_s, *window) as got:
        mqtt = got()
    reached = f"{mqtt.per_s('records'):,.0f} records/s"
    rows.append(Row(f"paho QoS 1 mTLS, {len(messages)} messages a scan (~{len(messages[0][1]):,} B)",
                    reached, per_1000(mqtt, "records")))  # fmt: skip
    sse_port = free_port()
    chunks = sse_chunks(records, REGISTERS_PER_REQUEST)
    with (
        in_child(sse_server, sse_port, rig.server, chunks, poll_s, *window) as served,
        in_child(sse_consumer, sse_port, rig.client, *window) as consumed,
    ):
        server, consumer = served(), consumed()
    rows.append(Row(f"aiohttp SSE over mTLS, a write of {len(chunks[0][0]):,} B a batch",
                    f"{server.per_s('records'):,.0f} records/s", per_1000(server, "records")))  # fmt: skip
    encode_us = encode_floor(records)
    rows.append(Row(f"msgspec: JSON of one record ({len(to_json(records[0]))} B), "
                    f"{encode_us:.2f} µs", "", encode_us / 10))  # fmt: skip
    rows.append(Row("Mosquitto, receiving paho's messages", reached,
                    per_1000(mqtt, "records", mqtt.peer_cpu_s), broker=False))  # fmt: skip
    rows.append(Row("the SSE consumer (bench/pipeline.py's)",
                    f"{consumer.per_s('records'):,.0f} records/s", per_1000(consumer, "records"),
                    broker=False))  # fmt: skip
    print_rows(f"CPU at the like-for-like load ({args.registers:,} int16 registers every "
               f"{args.poll_ms:g} ms), % of a core per 1,000 points/s; target <= "
               f"{TARGET_CPU_PER_1000}, the broker as deployed {BROKER_CPU_PER_1000} "
               "(docs/performance.md)", "%/1,000", rows)  # fmt: skip


def run_scale(args: argparse.Namespace, rig: Rig, mqtt_pid: int) -> None:
    window = (args.warmup, args.seconds)
    records = scale_records()
    rows: list[Row] = []
    port = free_port()
    with (
        device_process("modbus device", serve_device, port, SCALE_DEVICE_REGISTERS),
        in_child(modbus_client, port, SCALE_DEVICE_REGISTERS, 0.1, *window) as got,
    ):
        modbus = got()
    rows.append(Row(f"pymodbus client, {SCALE_REGISTERS_S // REGISTERS_PER_REQUEST} requests/s "
                    "of 125", f"{modbus.per_s('points'):,.0f} points/s",
                    modbus.cores_at("points", SCALE_REGISTERS_S)))  # fmt: skip
    assets = sink_messages([records], "floor")
    messages = [(f"{topic}/{i}", payload, n) for i in range(SCALE_MESSAGES_S // 10 // len(assets))
                for topic, payload, n in assets]  # fmt: skip
    with in_child(mqtt_publisher, rig.mqtt, mqtt_pid, rig.client, messages, 0.1, *window) as got:
        mqtt = got()
    reached = f"{mqtt.per_s('messages'):,.0f} msg/s"
    rows.append(Row(f"paho QoS 1 mTLS, {SCALE_MESSAGES_S:,} messages/s of 11 "
                    f"(~{len(assets[0][1]):,} B)", reached,
                    mqtt.cores_at("messages", SCALE_MESSAGES_S)))  # fmt: skip
    sse_port = free_port()
    chunks = sse_chunks(records, len(records)) * (SCALE_RECORDS_S // 10 // len(records))
    with (
        in_child(sse_server, sse_port, rig.server, chunks, 0.1, *window) as served,
        in_child(sse_consumer, sse_port, rig.client, *window) as consumed,
    ):
        server, consumer = served(), consumed()
    rows.append(Row(f"aiohttp SSE over mTLS, frames of ~{len(sse_event(records[1]))} B, "
                    f"writes of {len(records):,}", f"{server.per_s('records'):,.0f} rec/s",
                    server.cores_at("records", SCALE_RECORDS_S)))  # fmt: skip
    encode_us = encode_floor(records)
    rows.append(Row(f"msgspec: JSON of a record with context, {encode_us:.2f} µs", "",
                    encode_us * SCALE_RECORDS_S / 1e6))  # fmt: skip
    rows.append(Row("Mosquitto, receiving paho's messages", reached,
                    mqtt.peer_cpu_s / mqtt.done["messages"] * SCALE_MESSAGES_S, broker=False))  # fmt: skip
    rows.append(Row("SSE consumer (bench/pipeline.py's): TLS, JSON decode",
                    f"{consumer.per_s('records'):,.0f} rec/s",
                    consumer.cores_at("records", SCALE_RECORDS_S), broker=False))  # fmt: skip
    print_rows(f"Cores at the 100,000-signal load ({SCALE_RECORDS_S:,} records/s; cores = CPU "
               "per unit here x the load's rate)", "cores", rows)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("memory", "like", "scale"),
                        default=["memory", "like", "scale"], help="what to measure")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each window")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each window")
    parser.add_argument("--tmpdir", type=Path, default=None)
    args = parser.parse_args()
    args.registers, args.poll_ms, args.device_port = 1000, 100.0, free_port()  # the load
    load = " ".join(f"{x:.2f}" for x in psutil.getloadavg())
    print(
        f"floors of CPython {sys.version.split()[0]} and the chosen libraries; load average {load}"
    )
    with tempfile.TemporaryDirectory(prefix="dmzbroker-floor-", dir=args.tmpdir) as tmp:
        run(args, Path(tmp))
    load = " ".join(f"{x:.2f}" for x in psutil.getloadavg())
    print(f"\nload average at the end {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
