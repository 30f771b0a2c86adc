"""Benchmark: how fast `dmzbroker audit verify` proves a large audit log.

Writes N entries (default 500,000, of the size a `consumer_denied` event has) with the real
writer, checkpoints every 1,000, into a temporary directory; then verifies them as the CLI
does, signatures included, and prints entries/s. Target: >= 500,000 entries/s on the
reference machine, 2 cores (issue 19; it was 200,000 at issue 4). Run:
`.venv/bin/python bench/audit_verify.py [--entries N]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.log import AuditLog
from broker.audit.verify import verify_writer

TARGET = 500_000


def write(directory: Path, entries: int, key: Ed25519PrivateKey) -> float:
    log = AuditLog(directory, "enterprise", "bench-site", key, checkpoint_every=1000)
    started = time.perf_counter()
    for i in range(entries):
        log.record(
            "consumer_denied",
            category="access",
            outcome="failure",
            actor="spiffe://bench/consumer/stranger",
            object="coldstore/machine-room/compressor-1/motor_power",
            details={"reason": "forbidden_signal", "serial": f"{i:x}", "remote": "198.51.100.7"},
        )
    log.close()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=500_000)
    args = parser.parse_args()
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="dmzbroker-audit-bench-") as tmp:
        directory = Path(tmp)
        seconds = write(directory, args.entries, key)
        size = sum(p.stat().st_size for p in (directory / "enterprise").iterdir())
        print(f"wrote  {args.entries:,} entries ({size / 2**20:.0f} MiB) in {seconds:.1f} s: "
              f"{args.entries / seconds:,.0f} entries/s")  # fmt: skip
        started = time.perf_counter()
        report = verify_writer(directory / "enterprise", key.public_key())
        seconds = time.perf_counter() - started
        rate = report.entries / seconds
        print(f"verify {report.entries:,} entries, {report.checkpoints:,} checkpoints in "
              f"{seconds:.2f} s: {rate:,.0f} entries/s (target >= {TARGET:,}: "
              f"{'PASS' if rate >= TARGET else 'FAIL'}); intact: {report.intact}; "
              f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
