"""Benchmark: how fast the audit writer makes entries durable (group commit, ADR 0027).

Records N entries (default 500,000) shaped as the enterprise half writes a `consumer_denied`
(actor the identity, object the path, details reason, serial, fingerprint, remote), with the
real writer, checkpoints every 1,000, into a folder on the disk (`--dir`, default a
temporary one under /var/tmp: not a tmpfs, where fdatasync costs nothing). The clock stops
when `close()` returns, that is when every entry is on disk. Prints entries/s written
durably, the fsync/fdatasync calls made (counted by wrapping them), entries per call, the
size of an entry, the largest number of entries written but not yet on disk seen every
1,000 entries, and the CPU an entry of the recording thread and of the committer thread
apart (on a loaded machine the wall-clock rate says more about the neighbours; these do not).
Target: >= 100,000 entries/s. Run:
`.venv/bin/python bench/audit_write.py [--entries N] [--dir DIR]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.log import AuditLog

TARGET = 100_000


def counted(calls: list[int], sync: Callable[[int], None]) -> Callable[[int], None]:
    def wrapper(fd: int) -> None:
        calls[0] += 1
        sync(fd)

    return wrapper


def thread_cpu(name: str) -> float:
    """CPU seconds (user + system) of this process's thread called `name` so far."""
    tid = next(t.native_id for t in threading.enumerate() if t.name == name)
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write(directory: Path, entries: int) -> tuple[float, float, int | None, float, float]:
    """Seconds of wall and of CPU (the process's) until all is durable, the largest lag seen
    (entries written, not yet on disk; None for code without `durable`), and the CPU
    seconds of the recording thread and of the committer (0 for code without one)."""
    log = AuditLog(directory, "enterprise", "bench-site", Ed25519PrivateKey.generate())
    lag: int | None = 0 if hasattr(log, "durable") else None
    committer = "audit enterprise"
    has_committer = any(t.name == committer for t in threading.enumerate())
    started, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
    for i in range(entries):
        log.record(
            "consumer_denied",
            category="access",
            outcome="failure",
            actor="spiffe://bench/consumer/stranger",
            object="/v1/signals/coldstore/machine-room/compressor-1/motor_power",
            details={
                "reason": "forbidden_signal",
                "serial": f"{i:x}",
                "fingerprint": f"{i:064x}",
                "remote": "198.51.100.7",
            },
        )
        if i % 1000 == 999 and lag is not None:
            lag = max(lag, log.head[0] - log.durable)
    own = time.thread_time() - own
    committed = thread_cpu(committer) if has_committer else 0.0  # before close() ends it
    log.close()
    return time.perf_counter() - started, time.process_time() - cpu, lag, own, committed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=500_000)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    calls = [0]
    os.fsync = counted(calls, os.fsync)
    os.fdatasync = counted(calls, os.fdatasync)
    with tempfile.TemporaryDirectory(prefix="dmzbroker-audit-write-", dir=args.dir) as tmp:
        directory = Path(tmp)
        seconds, cpu, lag, own, committed = write(directory, args.entries)
        files = [p for p in (directory / "enterprise").iterdir() if p.suffix == ".jsonl"]
        size = sum(p.stat().st_size for p in files if p.stem.isdigit())
    rate = args.entries / seconds
    print(f"wrote {args.entries:,} entries ({size / args.entries:.0f} B each) durably in "
          f"{seconds:.2f} s: {rate:,.0f} entries/s (target >= {TARGET:,}: "
          f"{'PASS' if rate >= TARGET else 'FAIL'}); CPU {cpu / args.entries * 1e6:.1f} µs "
          f"an entry (recording thread {own / args.entries * 1e6:.1f}, committer "
          f"{committed / args.entries * 1e6:.1f}); {calls[0]:,} fsync/fdatasync calls ({args.entries / max(calls[0], 1):,.0f} "
          f"entries each); largest lag {'n/a' if lag is None else f'{lag:,}'} entries; load {os.getloadavg()[0]:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
