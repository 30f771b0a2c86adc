"""Retention deletes the oldest audit segments, and the log still proves itself from there."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import epochs
from broker.audit import log as log_module
from broker.audit.entry import checkpoint_message
from broker.audit.forward import AuditForwarder
from broker.audit.log import AuditLog
from broker.audit.retention import RESERVE, TRIM_TO
from broker.audit.segments import read_entries, segment_numbers, segment_path
from broker.audit.verify import verify_writer
from broker.trust.keys import verifies
from tests.audit.support import sha256_of
from tests.audit.test_forward import denied, forward


def fill(directory: Path, key: Ed25519PrivateKey, **limits: float) -> AuditLog:
    log = AuditLog(
        directory, "plant", "site-1", key, checkpoint_every=50, segment_bytes=8_000, **limits
    )  # type: ignore[arg-type]
    for i in range(400):
        log.record("device_read_refused", category="device", outcome="failure", details={"i": i})
    return log


def expiry_entries(directory: Path) -> list[dict]:
    return [
        e
        for n in segment_numbers(directory)
        for e in read_entries(directory / f"{n:010d}.jsonl")[0]
        if e["event"] == "audit_segments_expired"
    ]


def test_past_capacity_the_oldest_segments_go_and_the_rest_still_verifies(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    log = fill(tmp_path, key, capacity_bytes=60_000)
    log.close()
    directory = tmp_path / "plant"
    assert segment_numbers(directory)[0] > 1  # the first segments are gone
    assert sum(p.stat().st_size for p in directory.iterdir()) <= 60_000 + 8_000 * 2
    anchors = expiry_entries(directory)
    assert anchors and all(a["details"]["through_seq"] > 0 for a in anchors)
    report = verify_writer(directory, key.public_key())
    assert report.intact, report.problem


def test_segments_older_than_the_retention_age_go(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    log = AuditLog(tmp_path, "plant", "site-1", key, segment_bytes=8_000, retention_s=3600)
    for i in range(60):
        log.record("scan_overrun", category="device", outcome="unknown", details={"i": i})
    first = tmp_path / "plant" / "0000000001.jsonl"
    long_ago = time.time() - 7200
    os.utime(first, (long_ago, long_ago))
    for i in range(60):
        log.record("scan_overrun", category="device", outcome="unknown", details={"i": i})
    log.close()
    assert not first.exists()
    assert verify_writer(tmp_path / "plant", key.public_key()).intact


def test_deleting_the_first_segments_by_hand_is_not_retention(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    fill(tmp_path, key).close()  # default capacity: nothing expires
    directory = tmp_path / "plant"
    first = segment_numbers(directory)[0]
    (directory / f"{first:010d}.jsonl").unlink()
    report = verify_writer(directory, key.public_key())
    assert not report.intact and "deleted" in str(report.problem)


def test_retention_never_removes_the_record_of_the_policy_in_force(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    log = AuditLog(
        tmp_path, "plant", "site-1", key, checkpoint_every=50, segment_bytes=8_000,
        capacity_bytes=40_000,
    )  # fmt: skip
    signers = ["ot:Olga OT:ab12", "it:Ivan IT:cd34"]
    for version in (4, 5):
        log.record(
            "policy_accepted", category="policy", outcome="success", policy_version=version,
            details={"version": version, "sha256": "ee" * 32, "signers": signers},
        )  # fmt: skip
    accepted = read_entries(tmp_path / "plant" / "0000000001.jsonl")[0][-1]
    for i in range(2000):  # many times the capacity: every segment with the policy goes
        log.record("device_read_refused", category="device", outcome="failure", details={"i": i})
    log.close()
    directory = tmp_path / "plant"
    entries = [
        e
        for n in segment_numbers(directory)
        for e in read_entries(directory / f"{n:010d}.jsonl")[0]
    ]
    assert not any(e["event"] == "policy_accepted" for e in entries)
    anchors = expiry_entries(directory)
    # The anchor of the first expiry (a few dozen entries in) is long gone too: what remains
    # was carried from anchor to anchor.
    assert anchors and min(a["seq"] for a in anchors) > 500
    carrying = [a for a in anchors if "last_policy_accepted" in a["details"]]
    assert carrying
    carried = carrying[-1]["details"]["last_policy_accepted"]
    assert carried["seq"] == accepted["seq"] and carried["hash"] == accepted["hash"]
    assert carried["policy_version"] == 5 and carried["details"]["signers"] == signers
    assert verify_writer(directory, key.public_key()).intact


def test_the_anchor_carries_the_highest_accepted_version_not_the_last_one(
    tmp_path: Path,
) -> None:
    """A lower version after a higher one in a deleted segment (a line put in a tail the
    writer never adopted) must not become the record the rollback floor is read from."""
    key = Ed25519PrivateKey.generate()
    log = AuditLog(
        tmp_path, "plant", "site-1", key, checkpoint_every=50, segment_bytes=8_000,
        capacity_bytes=40_000,
    )  # fmt: skip
    for version in (5, 4):
        log.record(
            "policy_accepted", category="policy", outcome="success", policy_version=version,
            details={"version": version, "sha256": f"{version:02d}" * 32},
        )  # fmt: skip
    for i in range(2000):  # every segment with either record goes
        log.record("device_read_refused", category="device", outcome="failure", details={"i": i})
    log.close()
    carrying = [
        a for a in expiry_entries(tmp_path / "plant") if "last_policy_accepted" in a["details"]
    ]
    assert carrying
    assert {a["details"]["last_policy_accepted"]["policy_version"] for a in carrying} == {5}


def test_a_log_that_reached_capacity_is_trimmed_below_the_reserve_line(tmp_path: Path) -> None:
    """Trimming by size ends below the reserve line (it used to stop at 90 %, so a log that
    once filled up stayed in the reserve, consumer events only summarised, for a year)."""
    key = Ed25519PrivateKey.generate()
    audit = AuditLog(tmp_path, "enterprise", "site-1", key, segment_bytes=8_000,
                     capacity_bytes=100_000)  # fmt: skip
    forwarder = AuditForwarder(audit)
    count = 0
    while segment_numbers(tmp_path / "enterprise")[0] == 1:  # until size trimming starts
        assert forward(
            forwarder, {"event": "policy_reload_requested", "by": "operator", "i": count}
        )
        count += 1
        assert count < 5000
    assert audit.usage < RESERVE  # out of the reserve
    assert forward(forwarder, denied())  # consumer events are written in full again
    audit.close()
    assert verify_writer(tmp_path / "enterprise", key.public_key()).intact


def reach_the_reserve(directory: Path, key: Ed25519PrivateKey) -> AuditLog:
    audit = AuditLog(directory, "plant", "site-1", key, segment_bytes=8_000, capacity_bytes=100_000)
    i = 0
    while audit.usage < RESERVE:
        audit.record("device_session_down", category="device", outcome="failure", details={"i": i})
        i += 1
    return audit


def test_in_the_reserve_history_older_than_a_week_goes_and_the_last_week_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_module, "EXPIRY_CHECK_S", 0.0)  # check() looks at once
    key = Ed25519PrivateKey.generate()
    audit = reach_the_reserve(tmp_path, key)
    directory = tmp_path / "plant"
    audit.check()
    assert segment_numbers(directory)[0] == 1  # a flood cannot push out the last week
    assert audit.usage >= RESERVE
    eight_days_ago = time.time() - 8 * 86_400
    for number in segment_numbers(directory)[:-1]:
        os.utime(segment_path(directory, number), (eight_days_ago, eight_days_ago))
    audit.check()  # no new entry needed: in the reserve few come
    assert segment_numbers(directory)[0] > 1
    assert audit.usage <= TRIM_TO + 0.02  # down to 70 %, plus the anchor's entry
    audit.close()
    assert verify_writer(directory, key.public_key()).intact


def test_an_anchor_carries_the_last_deleted_checkpoint_whole_and_is_sealed_at_once(
    tmp_path: Path,
) -> None:
    """A key taken later cannot forge an anchor for history it never signed: the anchor
    carries the rollover checkpoint that ended the deleted segments, signed by its own
    epoch's key; and the expiry checkpoint right after it keeps a healthy log INTACT."""
    key = Ed25519PrivateKey.generate()
    log = fill(tmp_path, key, capacity_bytes=60_000)  # not closed: no stop seal to help
    directory = tmp_path / "plant"
    chain, problem = epochs.read_chain(directory, key.public_key())
    assert problem is None
    entries = [
        e for n in segment_numbers(directory) for e in read_entries(segment_path(directory, n))[0]
    ]
    anchors = [i for i, e in enumerate(entries) if e["event"] == "audit_segments_expired"]
    assert anchors
    for i in anchors:
        details = entries[i]["details"]
        carried = details["checkpoint"]
        assert carried["event"] == "audit_checkpoint"
        assert carried["details"]["reason"] == "rollover"
        assert (carried["seq"], carried["hash"]) == (details["through_seq"], details["head"])
        assert sha256_of(carried) == carried["hash"]  # whole, as written
        epoch = epochs.key_for(chain, carried["seq"])
        assert epoch is not None and epoch.number == carried["details"]["epoch"]
        signature = base64.b64decode(carried["details"]["signature"])
        assert verifies(epoch.key, signature, checkpoint_message("plant", carried["details"]))
        assert "note" not in details
        seal = entries[i + 1]
        assert seal["event"] == "audit_checkpoint" and seal["details"]["reason"] == "expiry"
        assert seal["details"]["head"] == entries[i]["hash"]
    report = verify_writer(directory, key.public_key())
    assert report.intact and not report.problem, report.problem
    log.close()


def test_a_file_with_a_non_ascii_digit_name_is_no_segment(tmp_path: Path) -> None:
    """`².jsonl` (str.isdigit accepts it, int() does not) neither stops a writer's start
    nor its retention."""
    key = Ed25519PrivateKey.generate()
    AuditLog(tmp_path, "plant", "site-1", key).close()
    directory = tmp_path / "plant"
    for name in ("².jsonl", "١٢.jsonl", "12.jsonl", "+000000001.jsonl"):
        (directory / name).write_text("{}\n")
    assert segment_numbers(directory) == [1]
    log = fill(tmp_path, key, capacity_bytes=60_000)  # retention runs with them there
    assert segment_numbers(directory)[0] > 1
    log.close()
    assert (directory / "².jsonl").exists()
    assert verify_writer(directory, key.public_key()).intact
