"""Group commit (ADR 0027): entries share fdatasyncs, `durable` says what is on disk, a
checkpoint is witnessed only once it is, a failed fdatasync fails closed for good, and a crash
of the process loses no entry it recorded. The lines are the bytes they were (no format
change)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.entry import canonical, sealed_line, timestamp
from broker.audit.log import AuditLog
from broker.audit.verify import verify_writer
from tests.audit.support import (
    CHECKPOINT_EVENT,
    body,
    canonical_text,
    fd_of,
    read_log,
    record_many,
    segments,
)
from tests.harness import REPO

APPLIANCE = "coldstore-1"


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(0.01)


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the real fdatasync calls (each still made)."""
    calls = [0]
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        calls[0] += 1
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return calls


def test_a_sealed_line_is_the_canonical_entry_with_its_hash() -> None:
    """Encoded once and spliced, the line is byte for byte what the format says (keys
    sorted, no spaces, `hash` the SHA-256 of the rest), also when details hold an `object`
    key or strings that look like one."""
    tricky: list[dict[str, Any]] = [
        {"object": {"hash": "x", "object": 1}},
        {"text": ',"object":"', "quote": '\\",\\"object\\":'},
    ]
    for i in range(40):
        fields = body(i)
        if i < len(tricky):
            fields["details"] = tricky[i]
            fields["object"] = ',"object":' if i else None
        entry = {"seq": i + 1, "time": timestamp(), "boot_id": "b", "writer": "plant",
                 **fields, "prev_hash": "0" * 64}  # fmt: skip
        line = sealed_line(entry)
        unhashed = {k: v for k, v in entry.items() if k != "hash"}
        assert entry["hash"] == hashlib.sha256(canonical_text(unhashed).encode()).hexdigest()
        assert line == canonical_text(entry).encode() + b"\n" == canonical(entry) + b"\n"


def test_a_timestamp_is_rfc3339_utc_with_microseconds_and_now() -> None:
    before = datetime.now(UTC)
    stamp = timestamp()
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before <= parsed <= after


def test_entries_share_fdatasyncs_and_are_all_durable_when_close_returns(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting(monkeypatch)
    log = AuditLog(tmp_path, "plant", APPLIANCE, key, segment_bytes=64 * 1024)
    record_many(log, 3000)  # several segments: rollovers sync the segment they leave
    seq = log.head[0]
    log.close()
    assert log.durable == log.head[0] > seq  # the stop checkpoint too
    assert 0 < calls[0] < 3000 // 10  # group commit: far fewer syncs than entries
    assert len(segments(tmp_path / "plant")) > 3
    report = verify_writer(tmp_path / "plant", key.public_key())
    assert report.intact, report
    written = [e for e in read_log(tmp_path / "plant") if e["event"] != CHECKPOINT_EVENT]
    assert [e["object"] for e in written] == [body(i)["object"] for i in range(3000)]


def test_the_committer_makes_entries_durable_without_another_call(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    log = AuditLog(tmp_path, "plant", APPLIANCE, key)
    try:
        record_many(log, 50)
        wait_for(lambda: log.durable == log.head[0])  # no check(), no close(): the thread
        record_many(log, 1, start=50)
        assert log.sync() and log.durable == log.head[0]
    finally:
        log.close()


def test_a_checkpoint_is_witnessed_once_on_disk_in_order(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    log = AuditLog(tmp_path, "plant", APPLIANCE, key, checkpoint_every=7)
    seen: list[tuple[int, int]] = []
    log.on_checkpoint = lambda entry: seen.append((entry["seq"], log.durable))
    record_many(log, 100)
    log.checkpoint("time")  # the public one: witnessed when it returns
    assert seen[-1][0] == log.head[0]
    log.close()
    assert all(durable >= seq for seq, durable in seen)  # never before it was on disk
    checkpoints = [e["seq"] for e in read_log(tmp_path / "plant") if e["event"] == CHECKPOINT_EVENT]
    assert [seq for seq, _ in seen] == checkpoints[1:]  # all but the start's (set after it)


def test_a_failed_fdatasync_fails_closed_for_good(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """A real failure: a pipe put in the segment's place takes the writes, but fdatasync on
    it fails (EINVAL), and what was written meanwhile is lost for real (it went into the
    pipe). A later fdatasync of the segment succeeds but cannot bring it back, as on Linux
    after a failed writeback: the log stays failing, `durable` stays before the loss (the old
    code counted it durable and recovered), and `audit verify` names the break."""
    log = AuditLog(tmp_path, "plant", APPLIANCE, key)
    try:
        record_many(log, 3)
        assert log.sync()
        path = segments(tmp_path / "plant")[0]
        fd = fd_of(path)
        read_end, write_end = os.pipe()
        saved = os.dup(fd)
        os.dup2(write_end, fd)
        try:
            durable = log.durable
            record_many(log, 2, start=3)
            wait_for(lambda: log.failing)  # found by the committer, not only by check()
            assert not log.sync()
            assert log.durable == durable and log.failing
        finally:
            os.dup2(saved, fd)
            for descriptor in (saved, read_end, write_end):
                os.close(descriptor)
        record_many(log, 1, start=5)
        log.check()
        assert not log.sync()  # its fdatasync succeeded: not enough
        assert log.failing and log.durable == durable
    finally:
        log.close()
    report = verify_writer(tmp_path / "plant", key.public_key())
    assert not report.intact and report.problem is not None, report.verdict
    assert f"{path.name} line" in report.problem, report.problem


_KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from broker.audit.log import AuditLog
from tests.audit.support import record_many, write_public_key

root = Path(sys.argv[1])
key = Ed25519PrivateKey.generate()
write_public_key(key, root / "audit.pub")
log = AuditLog(root, "plant", "coldstore-1", key, checkpoint_every=1_000_000)
record_many(log, 500)
print(log.head[0], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_process_loses_no_entry_it_recorded(tmp_path: Path) -> None:
    """Each entry is written when recorded, only its fdatasync is shared: kill -9 right
    after the last record leaves every entry in the segment (unsealed, as before)."""
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    head = int(child.stdout.split()[0])
    entries = read_log(tmp_path / "plant")
    assert [e["seq"] for e in entries] == list(range(1, head + 1))
    from broker.trust.keys import parse_public_pem  # noqa: PLC0415

    pubkey = parse_public_pem((tmp_path / "audit.pub").read_text(), "audit.pub")
    report = verify_writer(tmp_path / "plant", pubkey)
    assert report.window == (2, head)  # all there, the tail not yet under a checkpoint
