"""The audit log cannot be flooded: bench/audit_flood.py, bounded to 15 s, against a real
enterprise half process — denied requests (8 KB `%01` paths among them), failed handshakes
and idle connections from 20 loopback addresses. The audit grows by what the interval
budget allows, every refused request is accounted for in full or in `events_suppressed`, the
log verifies, and a legitimate consumer is still served.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from broker.audit.bound import OUTSIDER, SUMMARY
from broker.audit.throttle import Limits
from tests.harness import REPO

SECONDS = 15
WORKERS = 1
DENIED_CONNECTIONS = 16
ENVELOPE = 1024  # seq, time, boot_id, hashes, category…: generous


def test_a_flood_adds_only_what_the_interval_budget_allows(tmp_path: Path) -> None:
    bench = subprocess.run(
        [sys.executable, str(REPO / "bench" / "audit_flood.py"), "--seconds", str(SECONDS),
         "--workers", str(WORKERS), "--sources", "20", "--workdir", str(tmp_path), "--json"],
        check=False, capture_output=True, text=True, timeout=240, cwd=REPO,
    )  # fmt: skip
    assert bench.stdout, bench.stderr
    result = json.loads(bench.stdout.splitlines()[-1])
    assert result["consumer_status"] == 200  # the data path stayed open
    assert result["exit_code"] == 0  # the half stopped cleanly: it never failed
    assert result["verify_exit"] == 0, result["verify_output"]  # INTACT, signed to the end

    denied = result["denied_requests"]
    assert denied > 1000, result  # a real flood reached the server
    audit = result["audit"]
    # Each refused request is one event (an identity the policy does not name is refused at
    # once); every one is either written or counted. Requests in flight at the end were
    # logged but not answered.
    accounted = audit.get("consumer_denied", 0) + audit.get("consumer_denied_suppressed", 0)
    assert denied <= accounted <= denied + WORKERS * DENIED_CONNECTIONS
    assert audit["summaries"] >= 1

    # One interval of 60 s (or two, if start-up was slow): at most `overall` entries in full
    # each per kind of source (the addresses' and the identities'), each within the outsider
    # bound, plus start, stop, summaries and checkpoints.
    limits = Limits()
    intervals = math.ceil(result["seconds"] / limits.interval_s) + 1
    assert audit["written"] <= intervals * 2 * limits.overall
    entry = OUTSIDER.details_bytes + 2 * OUTSIDER.text_bytes + ENVELOPE
    bound = intervals * (2 * limits.overall * entry + SUMMARY.details_bytes) + 64 * 1024
    assert result["audit_bytes_added"] <= bound
    unbounded = denied * 2 * 600  # what the same flood wrote before (692 B an event at best)
    assert result["audit_bytes_added"] < unbounded / 20

    # What was only counted did not flood the process log either.
    lines = (tmp_path / "enterprise.log").read_text().splitlines()
    assert len(lines) < audit["written"] + 500 < audit["suppressed"]
