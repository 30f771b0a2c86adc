"""The audit log writer, on real files with a real Ed25519 key.

Every entry written is validated against docs/audit-entry.schema.json (JSON Schema 2020-12),
which is also the published description of an entry (docs/audit.md).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import itertools
import json
import os
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from broker.audit import log as log_module
from broker.audit.entry import checkpoint_message
from broker.audit.epochs import read_chain
from broker.audit.log import AuditLog
from broker.audit.monitor import AuditMonitor
from broker.audit.verify import verify_writer
from tests.audit.support import (
    CHECKPOINT_EVENT,
    canonical_text,
    fd_of,
    read_log,
    read_segment,
    record_many,
    segments,
    sha256_of,
)
from tests.harness import REPO

APPLIANCE = "coldstore-1"
SCHEMA = json.loads((REPO / "docs" / "audit-entry.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def validate(entry: dict[str, Any]) -> None:
    """Raises jsonschema.ValidationError unless `entry` follows entry.schema.json."""
    VALIDATOR.validate(entry)


def open_log(root: Path, key: Ed25519PrivateKey, **options: Any) -> AuditLog:
    return AuditLog(root, "plant", APPLIANCE, key, **options)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_the_schema_is_a_valid_2020_12_schema_that_refuses_extra_fields() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["additionalProperties"] is False


@pytest.mark.parametrize(
    "change",
    [
        {"seq": True},
        {"seq": 0},
        {"time": "2026-11-25T12:00:00+00:00"},
        {"outcome": "ok"},
        {"category": "data"},
        {"time": "2026-11-25T12:00:00Z"},
        {"policy_version": "3"},
        {"hash": "A" * 64},
        {"extra": 1},
        {"actor": ...},  # ... removes the field
    ],
    ids=str,
)
def test_validator_rejects_an_entry_off_the_schema(
    tmp_path: Path, key: Ed25519PrivateKey, change: dict[str, Any]
) -> None:
    with open_log(tmp_path, key) as log:
        record_many(log, 1, start=1)
    entry = read_log(tmp_path / "plant")[0]
    validate(entry)
    entry.update(change)
    entry = {k: v for k, v in entry.items() if v is not ...}
    with pytest.raises(jsonschema.ValidationError):
        validate(entry)


def test_every_entry_written_carries_every_field_and_matches_the_schema(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key, checkpoint_every=5) as log:
        record_many(log, 12)
    entries = read_log(tmp_path / "plant")
    assert len(entries) == 1 + 12 + 3  # the start seal, two checkpoints, the closing one
    for entry in entries:
        assert list(entry) == sorted(entry)  # written in canonical (sorted) order
        validate(entry)


def test_time_is_rfc3339_utc_with_z_and_falls_within_the_writing(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    before = datetime.now(UTC)
    with open_log(tmp_path, key) as log:
        record_many(log, 5)
    after = datetime.now(UTC)
    times = [e["time"] for e in read_log(tmp_path / "plant")]
    assert len(times) == 7  # the start seal, five, the closing one
    for text in times:
        assert text.endswith("Z")
        parsed = datetime.fromisoformat(text)
        assert parsed.utcoffset() == timedelta(0)
        assert before <= parsed <= after
    assert times == sorted(times)


def test_recorded_fields_are_written_as_given_with_empty_details_for_none(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key) as log:
        recorded = record_many(log, 9)
        log.record("bare", category="device", outcome="unknown")
    written = [e for e in read_log(tmp_path / "plant") if e["event"] != CHECKPOINT_EVENT]
    fields = ("event", "category", "outcome", "actor", "object", "policy_version", "details")
    assert [{f: e[f] for f in fields} for e in written[:-1]] == recorded
    assert written[-1]["details"] == {}
    assert written[-1]["actor"] is None
    assert {e["writer"] for e in written} == {"plant"}


def test_seq_counts_from_one_and_each_entry_names_the_hash_before_it(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key, checkpoint_every=4) as log:
        record_many(log, 10)
    entries = read_log(tmp_path / "plant")
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert entries[0]["prev_hash"] == "0" * 64
    for before, entry in itertools.pairwise(entries):
        assert entry["prev_hash"] == before["hash"]
    for entry in entries:
        assert entry["hash"] == sha256_of(entry)


def test_each_line_on_disk_is_the_canonical_json_of_its_entry(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key) as log:
        record_many(log, 6)
    lines = segments(tmp_path / "plant")[0].read_text().splitlines()
    assert len(lines) == 8
    for line in lines:
        assert line == canonical_text(json.loads(line))


def test_reopening_continues_seq_and_chain_in_a_new_segment_with_a_new_boot_id(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key, checkpoint_every=5) as log:
        record_many(log, 7)
    with open_log(tmp_path, key, checkpoint_every=5) as reopened:
        record_many(reopened, 3, start=7)
    assert [p.name for p in segments(tmp_path / "plant")] == [
        "0000000001.jsonl",
        "0000000002.jsonl",
    ]
    old, new = (read_segment(p) for p in segments(tmp_path / "plant"))
    assert new[0]["seq"] == old[-1]["seq"] + 1
    assert new[0]["prev_hash"] == old[-1]["hash"]
    old_boots, new_boots = {e["boot_id"] for e in old}, {e["boot_id"] for e in new}
    assert len(old_boots) == len(new_boots) == 1
    assert old_boots != new_boots
    assert reopened.head == (new[-1]["seq"], new[-1]["hash"])


def test_checkpoints_come_every_n_recorded_entries_and_at_close(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    every, count = 5, 12
    with open_log(tmp_path, key, checkpoint_every=every) as log:
        record_many(log, count)
    expected = ["checkpoint"]  # the start seal
    for i in range(1, count + 1):
        expected.append("entry")
        if i % every == 0:
            expected.append("checkpoint")
    expected.append("checkpoint")  # at close
    entries = read_log(tmp_path / "plant")
    assert ["checkpoint" if e["event"] == CHECKPOINT_EVENT else "entry" for e in entries] == (
        expected
    )


def test_every_checkpoint_is_signed_over_the_head_it_follows(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key, checkpoint_every=3) as log:
        record_many(log, 10)
    checkpoints = [e for e in read_log(tmp_path / "plant") if e["event"] == CHECKPOINT_EVENT]
    assert len(checkpoints) == 1 + 10 // 3 + 1
    reasons = [c["details"]["reason"] for c in checkpoints]
    assert reasons == ["start", "count", "count", "count", "stop"]
    chain, problem = read_chain(tmp_path / "plant", key.public_key())
    assert problem is None and len(chain) == 1  # epoch 1, certified by the root key
    epoch_key = chain[0].key
    raw = epoch_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    stranger = Ed25519PrivateKey.generate().public_key()
    for entry in checkpoints:
        details = entry["details"]
        assert details["covers_seq"] == entry["seq"] - 1
        assert details["head"] == entry["prev_hash"]
        assert details["appliance"] == APPLIANCE
        assert details["epoch"] == 1
        assert details["keyid"] == hashlib.sha256(raw).hexdigest()
        signature = base64.b64decode(details["signature"], validate=True)
        message = checkpoint_message("plant", details)
        epoch_key.verify(signature, message)  # raises InvalidSignature if not
        # Every detail is signed, the reason too: a "stop" cannot be made into a "time".
        for field, other in (("reason", "forged"), ("keyid", "0" * 64), ("appliance", "x")):
            with pytest.raises(InvalidSignature):
                epoch_key.verify(signature, checkpoint_message("plant", {**details, field: other}))
        with pytest.raises(InvalidSignature):
            epoch_key.verify(signature, checkpoint_message("enterprise", details))
        with pytest.raises(InvalidSignature):
            key.public_key().verify(signature, message)  # the root key signs no checkpoint
        with pytest.raises(InvalidSignature):
            stranger.verify(signature, message)


def test_an_entry_after_checkpoint_s_of_quiet_brings_a_checkpoint(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key, checkpoint_every=1000, checkpoint_s=0.2) as log:
        record_many(log, 1)
        time.sleep(0.3)
        record_many(log, 1, start=1)
        events = [e["event"] for e in read_log(tmp_path / "plant")]
    assert events == [CHECKPOINT_EVENT, "signal_read", "record_published", CHECKPOINT_EVENT]


def test_rotation_at_segment_bytes_ends_the_old_segment_with_a_checkpoint(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    limit = 2000
    with open_log(tmp_path, key, checkpoint_every=1000, segment_bytes=limit) as log:
        record_many(log, 30)
    paths = segments(tmp_path / "plant")
    assert len(paths) >= 3
    for path, following in itertools.pairwise(paths):
        lines = path.read_bytes().splitlines(keepends=True)
        last, before_last = json.loads(lines[-1]), json.loads(lines[-2])
        assert last["event"] == CHECKPOINT_EVENT
        assert last["details"]["covers_seq"] == before_last["seq"]
        size_before_checkpoint = sum(len(line) for line in lines[:-1])
        assert size_before_checkpoint >= limit  # rotated once the limit was reached ...
        assert size_before_checkpoint - len(lines[-2]) < limit  # ... and not before
        assert read_segment(following)[0]["prev_hash"] == last["hash"]
    report = verify_writer(tmp_path / "plant", key.public_key())
    assert report.intact, report


def test_segments_are_0640_and_the_writer_directory_0750(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    old_umask = os.umask(0o022)
    try:
        with open_log(tmp_path, key, segment_bytes=1500) as log:
            record_many(log, 12)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "plant").stat().st_mode) == 0o750
    paths = segments(tmp_path / "plant")
    assert len(paths) >= 2  # the first segment and one made by rotation
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o640] * len(paths)


def refuse_writes(path: Path) -> int:
    """Put a read-only descriptor of `path` where the writer's is: its writes fail (EBADF)."""
    fd = fd_of(path)
    read_only = os.open(path, os.O_RDONLY)
    os.dup2(read_only, fd)
    os.close(read_only)
    return fd


def accept_writes(path: Path, fd: int) -> None:
    writable = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(writable, fd)
    os.close(writable)


def test_a_segment_that_refuses_writes_turns_failing_on_and_writes_nothing(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    log = open_log(tmp_path, key, checkpoint_every=1000)
    record_many(log, 3)
    path = segments(tmp_path / "plant")[0]
    size = path.stat().st_size
    refuse_writes(path)
    assert not log.failing
    record_many(log, 4, start=3)  # no exception: the caller learns it from `failing`
    assert log.failing
    assert path.stat().st_size == size
    assert log.head[0] == 8  # the chain went on in memory (after the start seal)
    log.close()


def test_check_writes_the_kept_entries_in_order_and_clears_failing(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    log = open_log(tmp_path, key, checkpoint_every=5)
    recorded = record_many(log, 3)
    path = segments(tmp_path / "plant")[0]
    fd = refuse_writes(path)
    recorded += record_many(log, 4, start=3)  # crosses a checkpoint while failing
    assert log.failing
    accept_writes(path, fd)
    log.check()
    assert not log.failing
    entries = read_segment(path)
    assert [e["seq"] for e in entries] == list(range(1, 10))
    written = [e for e in entries if e["event"] != CHECKPOINT_EVENT]
    assert [e["event"] for e in written] == [r["event"] for r in recorded]
    assert entries[0]["event"] == entries[6]["event"] == CHECKPOINT_EVENT
    log.close()
    report = verify_writer(tmp_path / "plant", key.public_key())
    assert report.intact, report
    assert (report.entries, report.checkpoints) == (10, 3)


def test_a_failed_fdatasync_is_told_to_the_operator_even_while_failing_for_a_write(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write refused first (the monitor says: free space), then an fdatasync that fails
    (mocked: a disk cannot fail on demand). That one does not recover while the half runs,
    so the monitor says so once more, with the last seq known on disk and what to do."""
    log = open_log(tmp_path, key)
    monitor = AuditMonitor(log, "nothing crosses until it can be written")
    try:
        record_many(log, 3)
        assert log.sync()
        path = segments(tmp_path / "plant")[0]
        fd = refuse_writes(path)
        record_many(log, 2, start=3)

        def fdatasync(_: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        with capture_logs() as logs:
            assert monitor.check()
            monkeypatch.setattr(os, "fdatasync", fdatasync)
            accept_writes(path, fd)
            assert monitor.check() and monitor.check()
        told = [e for e in logs if e["event"] == "audit_write_failed"]
        assert [e.get("error") for e in told] == [None, "fdatasync: Input/output error"]
        assert "free space" in told[0]["action"]
        assert told[1]["durable_seq"] == log.durable < log.head[0]
        assert "restart" in told[1]["action"] and "audit verify" in told[1]["action"]
        assert all(e["event"] != "audit_write_recovered" for e in logs)
    finally:
        monkeypatch.undo()
        log.close()


_FILE_SIZE_LIMIT_CHILD = """
import os, resource, signal, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from broker.audit.log import AuditLog
from tests.audit.support import record_many, segments, write_public_key

root = Path(sys.argv[1])
key = Ed25519PrivateKey.generate()
write_public_key(key, root / "audit.pub")
log = AuditLog(root, "plant", "coldstore-1", key, checkpoint_every=5)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
count = 0
while not log.failing and count < 100:
    record_many(log, 1, start=count)
    count += 1
cut = not segments(root / "plant")[0].read_bytes().endswith(b"\\n")
record_many(log, 2, start=count)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
log.check()
print(count + 2, int(cut), int(log.failing))
log.close()
"""


def test_a_write_cut_short_by_the_file_size_limit_is_retried_without_a_torn_line(
    tmp_path: Path,
) -> None:
    child = subprocess.run(
        [sys.executable, "-c", _FILE_SIZE_LIMIT_CHILD, str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=True, cwd=REPO,
    )  # fmt: skip
    recorded, cut, failing = (int(x) for x in child.stdout.split())
    assert cut == 1  # the limit did cut a line in the middle: the case under test
    assert failing == 0
    from broker.trust.keys import parse_public_pem  # noqa: PLC0415

    pubkey = parse_public_pem((tmp_path / "audit.pub").read_text(), "audit.pub")
    report = verify_writer(tmp_path / "plant", pubkey)
    assert report.torn == []
    assert report.intact, report
    written = [e for e in read_log(tmp_path / "plant") if e["event"] != CHECKPOINT_EVENT]
    assert len(written) == recorded


_ROLLOVER_REFUSED_CHILD = """
import resource, signal, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from broker.audit.entry import canonical
from broker.audit.log import AuditLog
from tests.audit.support import body, record_many, segments, write_public_key

root = Path(sys.argv[1])
key = Ed25519PrivateKey.generate()
write_public_key(key, root / "audit.pub")
limit = 8192
log = AuditLog(root, "plant", "coldstore-1", key, segment_bytes=limit)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
first = segments(root / "plant")[0]
for i in range(200):
    seq = log.head[0] + 1
    line = canonical({"seq": seq, "time": "2026-12-05T00:00:00.000000Z", "boot_id": log.boot_id,
        "writer": "plant", **body(i), "prev_hash": "0" * 64, "hash": "0" * 64}) + b"\\n"
    size = first.stat().st_size
    if size + len(line) >= limit:  # this entry starts the rollover: it fits, its checkpoint not
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + len(line) + 10, hard))
        record_many(log, 1, start=i)
        break
    record_many(log, 1, start=i)
refused = log.failing
cut = not first.read_bytes().endswith(b"\\n")  # the checkpoint's first 10 bytes only
record_many(log, 2, start=500)  # while the checkpoint waits: behind it, in the new segment
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
log.check()
record_many(log, 2, start=600)
log.close()
print(int(refused), int(cut))
"""


def test_a_rollover_checkpoint_the_disk_refuses_stays_in_the_old_segment(
    tmp_path: Path,
) -> None:
    """The new segment is opened, then the disk takes only part of the rollover checkpoint:
    the writer goes on in the new segment only once that checkpoint is whole in the old one,
    so no line is split between segments and the new one opens after a rollover checkpoint."""
    child = subprocess.run(
        [sys.executable, "-c", _ROLLOVER_REFUSED_CHILD, str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=True, cwd=REPO,
    )  # fmt: skip
    assert child.stdout.split() == ["1", "1"]  # the checkpoint was cut: the case under test
    from broker.trust.keys import parse_public_pem  # noqa: PLC0415

    pubkey = parse_public_pem((tmp_path / "audit.pub").read_text(), "audit.pub")
    report = verify_writer(tmp_path / "plant", pubkey)
    assert report.intact, report
    first, second = segments(tmp_path / "plant")
    assert read_segment(first)[-1]["details"]["reason"] == "rollover"
    assert read_segment(second)[0]["object"] == "plant/tag/500"  # recorded while it waited


def test_an_outcome_other_than_success_failure_unknown_is_never_written(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key) as log:
        with contextlib.suppress(Exception):  # refusing it is as good as recording "unknown"
            log.record("valve_opened", category="device", outcome="maybe")
        record_many(log, 1)
    for entry in read_log(tmp_path / "plant"):
        validate(entry)


_NO_DESCRIPTOR_CHILD = """
import os, resource, socket, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from broker.audit.log import AuditLog
from tests.audit.support import record_many, segments, write_public_key

root = Path(sys.argv[1])
key = Ed25519PrivateKey.generate()
write_public_key(key, root / "audit.pub")
log = AuditLog(root, "plant", "coldstore-1", key, segment_bytes=2_000)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
lowest = os.open(os.devnull, os.O_RDONLY)  # the limit bounds descriptor numbers, not counts
os.close(lowest)
resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
record_many(log, 40)  # several segments' worth: every rollover meets EMFILE
failing = log.failing
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
stuck = len(segments(root / "plant"))
peer, other = socket.socketpair()  # whatever takes the next free number, e.g. a consumer
log.check()  # retries the rollover
record_many(log, 40, start=40)
log.close()
try:
    leaked = len(other.recv(65536, socket.MSG_DONTWAIT))
except BlockingIOError:
    leaked = 0
print(stuck, int(failing), len(segments(root / "plant")), leaked)
"""


def test_a_rollover_without_a_free_descriptor_keeps_writing_and_is_retried(
    tmp_path: Path,
) -> None:
    """A real EMFILE at rollover: no exception reaches the caller, nothing is lost, the
    log is not failing (it can still be written), and check() rolls over once it can."""
    child = subprocess.run(
        [sys.executable, "-c", _NO_DESCRIPTOR_CHILD, str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-2000:]
    stuck, failing, after, leaked = (int(x) for x in child.stdout.split())
    assert leaked == 0  # no entry went to a descriptor number the log no longer owned
    assert stuck == 1  # every rollover failed: all 40 entries went on in the first segment
    assert failing == 0
    assert after > 2  # rolled over once descriptors were back, and went on rolling
    from broker.trust.keys import parse_public_pem  # noqa: PLC0415

    pubkey = parse_public_pem((tmp_path / "audit.pub").read_text(), "audit.pub")
    report = verify_writer(tmp_path / "plant", pubkey)
    assert report.intact, report
    written = [e for e in read_log(tmp_path / "plant") if e["event"] != CHECKPOINT_EVENT]
    assert [e["details"].get("i") for e in written if e["details"]] == [
        i for i in range(80) if i % 4
    ]  # record_many gives empty details to every fourth entry


def test_entries_dropped_at_the_pending_limit_leave_the_chain_whole_and_are_reported(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropped entries take no seq and no place in the chain (the log stays INTACT, not
    BROKEN forever); one `audit_entries_dropped` entry says what was lost once writing
    resumes."""
    monkeypatch.setattr(log_module, "PENDING_LIMIT", 3)
    log = open_log(tmp_path, key, checkpoint_every=1000)
    record_many(log, 2)
    path = segments(tmp_path / "plant")[0]
    fd = refuse_writes(path)
    record_many(log, 8, start=2)  # 3 kept in memory, 5 dropped
    assert log.failing and log.dropped == 5
    accept_writes(path, fd)
    log.check()
    assert not log.failing
    log.close()
    entries = read_segment(path)
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    dropped = [e for e in entries if e["event"] == "audit_entries_dropped"]
    assert len(dropped) == 1
    details = dropped[0]["details"]
    assert details["count"] == 5 and sum(details["events"].values()) == 5
    assert details["first"] <= details["last"]
    assert (dropped[0]["category"], dropped[0]["outcome"]) == ("audit", "failure")
    assert dropped[0]["seq"] == 7  # 1 start checkpoint, 2 entries, 3 kept, then this
    report = verify_writer(tmp_path / "plant", key.public_key())
    assert report.intact, report
