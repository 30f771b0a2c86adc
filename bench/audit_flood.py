"""Benchmark: flood the consumer port as anyone on the IT network could, and measure the audit.

A real enterprise half runs as its own process on a throwaway appliance
(`broker.sim.appliance`). For `--seconds` (default 600) client processes send, as fast as
they can, from `--sources` loopback addresses:
- denied requests: a valid certificate of the site CA for an identity the policy does not
  know (`spiffe://demo/consumer/stranger`) asking for forbidden signals, every other one an
  8 KB path of `%01` (each byte a control character, the costliest to store);
- failed handshakes: no client certificate, or one of another CA;
- idle connections: TCP opened and left silent until the server closes them.
Then a legitimate consumer asks for /v1/signals, the half is stopped, and the script prints
the rates reached, the audit bytes the flood added (the writer's segment files before and
after), the events written in full and counted in `events_suppressed`, whether
`audit verify` finds the log intact, and whether the data path stayed open (200, not 503).
Run: `.venv/bin/python bench/audit_flood.py [--seconds 600] [--json]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import REPO, free_port

from broker import policy
from broker.audit.catalogue import AGGREGATED, SUPPRESSED
from broker.sim.appliance import provision
from broker.trust import certs, tls

CONSUMER = "spiffe://demo/consumer/historian"
STRANGER = "spiffe://demo/consumer/stranger"
LONG_PATH = "/v1/signals/" + "%01" * 2700  # 8 KB on the request line
SHORT_PATH = "/v1/signals/coldstore/storage/cold-room-1/temperature"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Target:
    port: int
    ca: Path
    stranger: tuple[Path, Path]
    other_ca: tuple[Path, Path]  # a client certificate and key of another CA
    sources: int
    seconds: float
    denied_connections: int
    handshake_loops: int
    idle_connections: int


@dataclass
class Tally:
    denied: int = 0  # answers received to denied requests
    handshakes: int = 0  # connections that got no further than the handshake
    idle: int = 0  # idle connections opened
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, e: BaseException) -> None:
        name = type(e).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


def _source(i: int, sources: int) -> tuple[str, int]:
    return f"127.0.0.{2 + i % sources}", 0


async def _denied(target: Target, i: int, tally: Tally, deadline: float) -> None:
    context = tls.client_context(target.ca, *target.stranger)
    n = 0
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", target.port, ssl=context, server_hostname="localhost",
                local_addr=_source(i, target.sources),
            )  # fmt: skip
            try:
                while time.monotonic() < deadline:
                    path = LONG_PATH if n % 2 else SHORT_PATH
                    n += 1
                    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next(
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                    await reader.readexactly(length)
                    tally.denied += 1
                    if b"connection: close" in head.lower():
                        break
            finally:
                writer.close()
        except (OSError, asyncio.IncompleteReadError, StopIteration, ValueError) as e:
            tally.error(e)
            await asyncio.sleep(0.01)


async def _handshake(target: Target, i: int, tally: Tally, deadline: float) -> None:
    anonymous = tls.client_context(target.ca)
    foreign = tls.client_context(target.ca, *target.other_ca)
    while time.monotonic() < deadline:
        context = foreign if i % 2 else anonymous
        i += 1
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", target.port, ssl=context, server_hostname="localhost",
                local_addr=_source(i, target.sources),
            )  # fmt: skip
            try:
                writer.write(b"GET /v1/signals HTTP/1.1\r\nHost: localhost\r\n\r\n")
                async with asyncio.timeout(5):
                    await reader.read(1)  # TLS 1.3: the refusal arrives after the handshake
            finally:
                writer.close()
        except (ssl.SSLError, OSError, TimeoutError) as e:
            if not isinstance(e, ssl.SSLError | ConnectionResetError):
                tally.error(e)
        tally.handshakes += 1


async def _idle(target: Target, i: int, tally: Tally, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", target.port, local_addr=_source(i, target.sources)
            )
            tally.idle += 1
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await reader.read()  # until the server gives up on the handshake
            except TimeoutError:
                pass
            finally:
                writer.close()
        except OSError as e:
            tally.error(e)
            await asyncio.sleep(0.1)


async def _flood(target: Target, worker: int) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + target.seconds
    base = worker * 1000
    await asyncio.gather(
        *(_denied(target, base + i, tally, deadline) for i in range(target.denied_connections)),
        *(_handshake(target, base + i, tally, deadline) for i in range(target.handshake_loops)),
        *(_idle(target, base + i, tally, deadline) for i in range(target.idle_connections)),
    )
    return tally


def flood_worker(target: Target, worker: int) -> Tally:
    return asyncio.run(_flood(target, worker))


def audit_bytes(writer_dir: Path) -> int:
    return sum(p.stat().st_size for p in writer_dir.glob("*.jsonl") if p.stem.isdigit())


def audit_counts(writer_dir: Path) -> dict[str, int]:
    """Outsider events written in full, and counted in `events_suppressed`, by event."""
    counts: dict[str, int] = {"written": 0, "suppressed": 0, "summaries": 0}
    for path in sorted(p for p in writer_dir.glob("*.jsonl") if p.stem.isdigit()):  # segments
        for line in path.read_bytes().splitlines():
            entry = json.loads(line)
            if entry["event"] in AGGREGATED:
                counts["written"] += 1
                counts[entry["event"]] = counts.get(entry["event"], 0) + 1
            elif entry["event"] == SUPPRESSED:
                counts["summaries"] += 1
                counts["suppressed"] += entry["details"]["suppressed"]
                for event, n in entry["details"]["by_event"].items():
                    counts[f"{event}_suppressed"] = counts.get(f"{event}_suppressed", 0) + n
    return counts


async def _status(port: int, context: ssl.SSLContext) -> int:
    """The status of GET /v1/signals for a legitimate consumer (0: no answer)."""
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="localhost"
            )
            writer.write(
                b"GET /v1/signals HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            line = await reader.readline()
            writer.close()
            return int(line.split()[1])
    except (OSError, TimeoutError, IndexError, ValueError):
        return 0


def _ready(port: int, context: ssl.SSLContext) -> None:
    deadline = time.monotonic() + 30
    while asyncio.run(_status(port, context)) != 200:
        if time.monotonic() > deadline:
            raise SystemExit("the enterprise half did not serve /v1/signals within 30 s")
        time.sleep(0.2)


def _pki(workdir: Path) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    pki = workdir / "certs"
    stranger = certs.issue_client(pki, pki, name="stranger", uri=STRANGER, days=2)
    other = workdir / "other-ca"
    certs.init_ca(other, "someone else's CA", days=2)
    intruder = certs.issue_client(other, other, name="intruder", uri="spiffe://elsewhere/x", days=2)
    return (stranger.cert, stranger.key), (intruder.cert, intruder.key)


def run(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    demo = policy.load(REPO / "policies" / "refrigeration.yaml")
    port = free_port()
    appliance = provision(workdir, demo, port=port, consumer_uri=CONSUMER)
    stranger, other_ca = _pki(workdir)
    consumer = tls.client_context(appliance.ca, appliance.client_cert, appliance.client_key)
    with open(workdir / "enterprise.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "broker", "enterprise", "--config", str(appliance.config),
             "--log-format", "json", "--reset-state"],
            stdout=subprocess.DEVNULL, stderr=log, cwd=workdir,
        )  # fmt: skip
        try:
            _ready(port, consumer)
            writer_dir = workdir / "audit" / "enterprise"
            before = audit_bytes(writer_dir)
            target = Target(
                port, appliance.ca, stranger, other_ca, args.sources, args.seconds,
                args.denied_connections, args.handshake_loops, args.idle_connections,
            )  # fmt: skip
            started = time.monotonic()
            with ProcessPoolExecutor(args.workers) as pool:
                tallies = list(pool.map(flood_worker, [target] * args.workers, range(args.workers)))
            elapsed = time.monotonic() - started
            status = asyncio.run(_status(port, consumer))  # the data path, right after
            during = audit_bytes(writer_dir) - before
        finally:
            server.terminate()
            exit_code = server.wait(timeout=30)
    verified = subprocess.run(
        [sys.executable, "-m", "broker", "audit", "verify", str(workdir / "audit"),
         "--pubkey", str(workdir / "audit-key" / "audit.pub")],
        check=False, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    errors: dict[str, int] = {}
    for tally in tallies:
        for name, n in tally.errors.items():
            errors[name] = errors.get(name, 0) + n
    return {
        "seconds": round(elapsed, 1),
        "denied_requests": sum(t.denied for t in tallies),
        "failed_handshakes": sum(t.handshakes for t in tallies),
        "idle_connections": sum(t.idle for t in tallies),
        "client_errors": errors,
        "audit_bytes_during": during,
        "audit_bytes_added": audit_bytes(writer_dir) - before,
        "audit": audit_counts(writer_dir),
        "consumer_status": status,
        "exit_code": exit_code,
        "verify_exit": verified.returncode,
        "verify_output": verified.stdout.strip(),
        "workdir": str(workdir),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--sources", type=int, default=50, help="loopback client addresses")
    parser.add_argument("--denied-connections", type=int, default=16, help="per worker")
    parser.add_argument("--handshake-loops", type=int, default=4, help="per worker")
    parser.add_argument("--idle-connections", type=int, default=50, help="per worker")
    parser.add_argument("--workdir", type=Path, help="keep the appliance here (default: temp)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args.workdir, args)
    else:
        with tempfile.TemporaryDirectory(prefix="dmzbroker-flood-bench-") as tmp:
            result = run(Path(tmp), args)
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)
    intact = result["verify_exit"] == 0
    return 0 if result["consumer_status"] == 200 and intact else 1


def _print(r: dict[str, Any]) -> None:
    s = r["seconds"]
    audit = r["audit"]
    print(f"audit flood: {s:.0f} s against one enterprise half")
    print(f"  denied requests   {r['denied_requests']:>10,}  ({r['denied_requests'] / s:,.0f}/s)")
    print(
        f"  failed handshakes {r['failed_handshakes']:>10,}  ({r['failed_handshakes'] / s:,.0f}/s)"
    )
    print(f"  idle connections  {r['idle_connections']:>10,}  ({r['idle_connections'] / s:,.0f}/s)")
    print(f"  client errors     {r['client_errors']}")
    print(
        f"  audit added       {r['audit_bytes_added'] / MiB:,.2f} MiB "
        f"({r['audit_bytes_during'] / MiB:,.2f} MiB during the flood)"
    )
    print(
        f"  outsider events   {audit['written']:,} written in full, "
        f"{audit['suppressed']:,} counted in {audit['summaries']} events_suppressed entries"
    )
    print(f"  data path         GET /v1/signals -> {r['consumer_status']} after the flood")
    print(f"  audit verify      exit {r['verify_exit']}: {r['verify_output'].splitlines()[-1:]}")


if __name__ == "__main__":
    raise SystemExit(main())
