"""The committer (broker.audit.committer): checkpoints witnessed once on disk, whichever
fdatasync puts them there, and a writer that goes on while an fdatasync runs."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.log import AuditLog
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
