"""Witness files (broker.audit.witness) and how verify counts the witnesses in them.

A real writer makes the checkpoints; the witness files hold them as a collector would (bare
JSON lines, RFC 5424 syslog lines from the SIEM export), among other lines.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.entry import entry_hash
from broker.audit.export import frame
from broker.audit.log import AuditLog
from broker.audit.verify import verify_writer
from broker.audit.witness import read_file
from broker.errors import ConfigError
from tests.audit.support import CHECKPOINT_EVENT, canonical_text, read_log, record_many

APPLIANCE = "coldstore-1"


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey, list[dict]]:
    key = Ed25519PrivateKey.generate()
    with AuditLog(tmp_path / "audit", "plant", APPLIANCE, key, checkpoint_every=4) as writer:
        record_many(writer, 10)
    checkpoints = [
        e for e in read_log(tmp_path / "audit" / "plant") if e["event"] == CHECKPOINT_EVENT
    ]
    return tmp_path / "audit" / "plant", key, checkpoints


def test_json_and_syslog_lines_are_read_and_other_lines_counted(log, tmp_path: Path) -> None:
    _, _, checkpoints = log
    syslog = frame(checkpoints[1], canonical_text(checkpoints[1]).encode(), "host").decode()
    edited = dict(checkpoints[2], time="2020-01-01T00:00:00.000000Z")  # hash no longer matches
    path = tmp_path / "w.log"
    path.write_text(
        canonical_text(checkpoints[0]) + "\n"
        + syslog.split(" ", 1)[1] + "\n"
        + "<13>1 - host app - - - not an entry\n\n[1, 2]\n"
        + canonical_text(edited) + "\n"
    )  # fmt: skip
    found = read_file(path)
    assert [(w.writer, w.seq, w.hash) for w in found.witnesses] == [
        ("plant", c["seq"], c["hash"]) for c in checkpoints[:2]
    ]
    assert found.witnesses[1].source == f"{path} line 2"
    assert (found.skipped, found.corrupt) == (3, 1)


def test_an_unreadable_witness_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--witness .*missing.log: cannot read"):
        read_file(tmp_path / "missing.log")


def test_witnesses_of_another_appliance_or_with_a_bad_signature_are_not_counted(
    log, tmp_path: Path
) -> None:
    directory, key, checkpoints = log
    other = dict(checkpoints[-1], seq=10_000)
    other["details"] = dict(other["details"], appliance="elsewhere")
    forged = dict(checkpoints[-1], seq=10_001)  # a later seq nobody signed: it would truncate
    for entry in (other, forged):
        entry.pop("hash")
        entry["hash"] = entry_hash(entry)
    path = tmp_path / "w.jsonl"
    path.write_text("".join(canonical_text(e) + "\n" for e in (*checkpoints, other, forged)))
    report = verify_writer(directory, key.public_key(), read_file(path).witnesses)
    assert report.problem is None, report.problem
    assert report.witnesses == len(checkpoints)
    assert "1 witnesses not counted: another appliance" in report.notes
    assert "1 witnesses not counted: a bad signature" in report.notes
    # without the key the forged one cannot be told apart: it says the log was truncated
    unchecked = verify_writer(directory, None, read_file(path).witnesses)
    assert unchecked.problem is not None and "truncated" in unchecked.problem


def test_witnesses_of_what_retention_deleted_count_as_expired_behind_its_anchor(
    tmp_path: Path,
) -> None:
    """A real writer expires its oldest segments: the anchor carries the last deleted
    checkpoint, signed by its own epoch, so the collector's copies of deleted checkpoints
    are expired, not missing; the one the anchor carries is checked against it."""
    key = Ed25519PrivateKey.generate()
    made: list[dict] = []
    writer = AuditLog(tmp_path, "plant", APPLIANCE, key, checkpoint_every=50,
                      segment_bytes=8_000, capacity_bytes=60_000)  # fmt: skip
    writer.on_checkpoint = made.append
    for i in range(400):
        writer.record("device_read_refused", category="device", outcome="failure",
                      details={"i": i})  # fmt: skip
    writer.close()
    file = tmp_path / "siem.jsonl"
    file.write_text("".join(canonical_text(e) + "\n" for e in made))
    report = verify_writer(tmp_path / "plant", key.public_key(), read_file(file).witnesses)
    assert report.intact, report.verdict
    through, _ = report.expired
    assert 0 < through < report.first_seq
    gone = sum(1 for e in made if e["seq"] < through)
    assert gone and f"{gone} witnesses not counted: expired" in report.notes
    assert report.witnesses == len(made) - gone  # the carried one included
