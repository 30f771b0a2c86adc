"""The committer (broker.audit.committer): checkpoints witnessed once on disk, whichever
fdatasync puts them there, a writer that goes on while an fdatasync runs, and a failed
fdatasync at rollover that no later one makes good."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from broker.audit.log import AuditLog
from broker.audit.monitor import AuditMonitor
from broker.audit.verify import verify_writer
from tests.audit.support import record_many, segments
from tests.audit.test_group_commit import wait_for

APPLIANCE = "coldstore-1"


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_a_rollover_checkpoint_is_witnessed_with_no_entry_after_it(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """The rollover syncs the segment it leaves, its checkpoint last: that checkpoint used to
    be queued for witnessing only after that fdatasync, so on a quiet log it waited for the
    next entry (a plant checkpoint that did not cross, a SIEM witness missing)."""
    log = AuditLog(tmp_path, "plant", APPLIANCE, key, segment_bytes=4096)
    witnessed: list[dict[str, Any]] = []
    log.on_checkpoint = witnessed.append
    try:
        for i in range(100):  # a few 600-byte entries fill a 4 KiB segment
            record_many(log, 1, start=i)
            if len(segments(tmp_path / "plant")) > 1:
                break
        assert len(segments(tmp_path / "plant")) == 2
        last = log.head[0]  # the rollover checkpoint: nothing is recorded after it
        wait_for(lambda: any(e["seq"] == last for e in witnessed))
        assert witnessed[-1]["details"]["reason"] == "rollover"
        assert log.durable >= last
    finally:
        log.close()


def test_entries_are_recorded_while_an_fdatasync_is_under_way(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committer holds nothing the writer needs during an fdatasync: an fdatasync held
    back (a slow disk) leaves record() free, and what was recorded meanwhile shares the next."""
    log = AuditLog(tmp_path, "plant", APPLIANCE, key)
    inside, release = threading.Event(), threading.Event()
    real = os.fdatasync

    def held(fd: int) -> None:
        if threading.current_thread().name.startswith("audit "):  # the committer's only
            inside.set()
            release.wait(60)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", held)
    try:
        record_many(log, 1)
        assert inside.wait(30)  # the committer is in its fdatasync, and stays there
        durable = log.durable
        record_many(log, 200, start=1)  # would wait for the release if the writer waited
        assert log.durable == durable < log.head[0]
        release.set()
        wait_for(lambda: log.durable == log.head[0])
    finally:
        release.set()
        log.close()


def _path_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def test_a_failed_fdatasync_at_rollover_is_not_made_good_by_the_next_segment(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review F7: the switch closed the old segment whatever its last fdatasync said, and the
    next fdatasync of the new segment counted the old one's entries durable. A disk cannot be
    made to fail on demand, so os.fdatasync fails here for the old segment once the new one
    exists: the switch's (and the committer's, if it comes first), nothing else."""
    directory = tmp_path / "plant"
    log = AuditLog(tmp_path, "plant", APPLIANCE, key, segment_bytes=4096)
    witnessed: list[dict[str, Any]] = []
    log.on_checkpoint = witnessed.append
    first = str(segments(directory)[0].resolve())
    test_thread = threading.current_thread()
    failed_in: list[str] = []
    new_segment_synced = [0]
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        path = _path_of(fd)
        if path == first and len(segments(directory)) > 1:
            failed_in.append("switch" if threading.current_thread() is test_thread else "thread")
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)
        if path != first:
            new_segment_synced[0] += 1

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        monitor = AuditMonitor(log, "nothing crosses until it can be written")
        for i in range(100):  # a few 600-byte entries fill a 4 KiB segment
            record_many(log, 1, start=i)
            if len(segments(directory)) > 1:
                break
        assert len(segments(directory)) == 2
        rollover = log.head[0]  # the old segment's last entry: its checkpoint
        assert "switch" in failed_in
        assert log.durable < rollover and log.failing

        record_many(log, 5, start=100)  # into the new segment, whose fdatasyncs succeed
        synced = new_segment_synced[0]
        assert not log.sync()  # a writer waiting for durability sees the failure
        assert new_segment_synced[0] > synced  # though that fdatasync succeeded
        log.checkpoint("time")
        log.check()
        assert log.durable < rollover and log.failing  # for good, not until the next success
        assert all(e["seq"] <= log.durable for e in witnessed)  # none vouched for past it
        assert rollover not in [e["seq"] for e in witnessed]

        with capture_logs() as logs:
            assert monitor.check() and monitor.check()  # told once, still failing
        told = [e for e in logs if e["event"] == "audit_write_failed"]
        assert len(told) == 1 and told[0]["log_level"] == "critical"
        assert told[0]["error"] == "fdatasync: Input/output error"
        assert told[0]["durable_seq"] == log.durable
        assert f"after seq {log.durable}" in told[0]["action"]
        assert "restart" in told[0]["action"]
    finally:
        log.close()
        monkeypatch.undo()

    report = verify_writer(directory, key.public_key())  # no entry was lost: whole and sealed
    assert report.intact and report.window is None, report.verdict

    restarted = AuditLog(tmp_path, "plant", APPLIANCE, key, segment_bytes=4096)
    try:  # a new start adopts the log and is healthy again
        assert restarted.chain_break is None and not restarted.failing
        record_many(restarted, 3, start=200)
        assert restarted.sync() and restarted.durable == restarted.head[0]
    finally:
        restarted.close()
    assert verify_writer(directory, key.public_key()).intact


def test_a_failed_fdatasync_is_failing_at_once_and_told_once(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review R2: the committer sets `sync_error` under its own lock and only then takes the
    log's lock to report it; a monitor check in between logged the failure but let data cross
    one more interval, and the next check logged it again. The test holds the log's lock so
    the committer's thread stops in that gap (os.fdatasync mocked: a disk cannot fail on
    demand), checks there, then lets the report through and checks again."""
    log = AuditLog(tmp_path, "plant", APPLIANCE, key)
    monitor = AuditMonitor(log, "nothing crosses until it can be written")

    def fdatasync(_: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    try:
        assert log.sync()
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        with capture_logs() as logs:
            with log._lock:  # the committer's thread cannot report what it finds
                record_many(log, 1)
                wait_for(lambda: log.sync_error is not None)  # found, not yet reported
                assert monitor.check()  # nothing crosses from the moment it failed
            assert not log.sync()  # reported now, whichever thread comes first
            assert monitor.check()
        told = [e for e in logs if e["event"] == "audit_write_failed"]
        assert len(told) == 1 and told[0]["error"] == "fdatasync: Input/output error"
    finally:
        log.close()
        monkeypatch.undo()
