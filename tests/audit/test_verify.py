"""`dmzbroker audit verify` and verify_writer on a real log, intact and tampered with.

The pristine log: writer "plant", checkpoint every 5 entries, opened twice (30 then 12
recorded entries, closed each time), so two segments. Each test tampers with a fresh copy
and checks both the real CLI (exit code, printed text) and verify_writer.
"""

from __future__ import annotations

import base64
import json
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.log import AuditLog
from broker.audit.verify import WriterReport, verify_writer
from broker.trust import keys
from tests.audit.support import (
    CHECKPOINT_EVENT,
    abandon,
    canonical_text,
    read_log,
    read_segment,
    record_many,
    segments,
    sha256_of,
    write_public_key,
    write_segment,
)
from tests.harness import dmzbroker

APPLIANCE, OTHER_APPLIANCE = "coldstore-1", "coldstore-2"
EVERY = 5
OPENS = (30, 12)  # entries recorded per open of the writer
CHECKPOINTS = sum(n // EVERY + 1 for n in OPENS)  # every EVERY entries, and one at each close
ENTRIES = sum(OPENS) + CHECKPOINTS
FIRST_OF_SECOND_OPEN = OPENS[0] + OPENS[0] // EVERY + 1 + 1
RECORD = 14  # seq of an ordinary entry (not a checkpoint) in the first segment
SIGNED = 3 * (EVERY + 1)  # seq of the third checkpoint


@dataclass(frozen=True)
class Logs:
    root: Path  # our audit directory: root/plant
    pubkey: Path
    other_root: Path  # another appliance's, same writer name and the same shape
    other_pubkey: Path


def write_log(root: Path, appliance: str, key: Ed25519PrivateKey) -> None:
    start = 0
    for count in OPENS:
        with AuditLog(root, "plant", appliance, key, checkpoint_every=EVERY) as log:
            record_many(log, count, start=start)
        start += count


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Logs:
    base = tmp_path_factory.mktemp("audit-logs")
    ours, theirs = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    write_log(base / "ours", APPLIANCE, ours)
    write_log(base / "theirs", OTHER_APPLIANCE, theirs)
    return Logs(
        base / "ours",
        write_public_key(ours, base / "audit.pub"),
        base / "theirs",
        write_public_key(theirs, base / "other.pub"),
    )


@pytest.fixture
def root(logs: Logs, tmp_path: Path) -> Path:
    """A fresh copy of our log, to tamper with."""
    copy = tmp_path / "audit"
    shutil.copytree(logs.root, copy)
    return copy


def verify(
    root: Path, pubkey: Path | None
) -> tuple[subprocess.CompletedProcess[str], WriterReport]:
    """The CLI's verdict and verify_writer's report on the same files."""
    args = ["audit", "verify", str(root)] + (["--pubkey", str(pubkey)] if pubkey else [])
    result = dmzbroker(*args, check=False)
    public = keys.parse_public_pem(pubkey.read_text(), str(pubkey)) if pubkey else None
    return result, verify_writer(root / "plant", public)


def assert_broken(
    result: subprocess.CompletedProcess[str], report: WriterReport, seq: int, words: str
) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "NOT INTACT"
    broken = [line for line in result.stdout.splitlines() if "BROKEN at" in line]
    assert len(broken) == 1, result.stdout
    assert f"(seq {seq})" in broken[0]
    assert words in broken[0]
    assert report.problem is not None
    assert f"(seq {seq})" in report.problem
    assert words in report.problem
    assert not report.intact


def locate(root: Path, seq: int) -> tuple[Path, int]:
    """The segment and line index holding entry `seq`."""
    for path in segments(root / "plant"):
        for index, entry in enumerate(read_segment(path)):
            if entry["seq"] == seq:
                return path, index
    raise AssertionError(f"no entry {seq}")


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def edit(root: Path, seq: int, change: Callable[[dict[str, Any]], None]) -> None:
    """Change entry `seq` in place, leaving its hash as it was."""
    path, index = locate(root, seq)
    lines = lines_of(path)
    entry = json.loads(lines[index])
    change(entry)
    lines[index] = canonical_text(entry) + "\n"
    path.write_text("".join(lines))


def rechain(root: Path) -> None:
    """What a forger without the key can do: recompute every prev_hash, head and hash."""
    head = "0" * 64
    for path in segments(root / "plant"):
        entries = read_segment(path)
        for entry in entries:
            entry["prev_hash"] = head
            if entry["event"] == CHECKPOINT_EVENT:
                entry["details"]["head"] = head
                entry["details"]["covers_seq"] = entry["seq"] - 1
            entry["hash"] = head = sha256_of(entry)
        write_segment(path, entries)


def test_pristine_log_is_laid_out_as_the_tests_expect(logs: Logs) -> None:
    first, second = (read_segment(p) for p in segments(logs.root / "plant"))
    entries = first + second
    assert (ENTRIES, CHECKPOINTS, FIRST_OF_SECOND_OPEN) == (52, 10, 38)
    assert len(entries) == ENTRIES
    assert sum(e["event"] == CHECKPOINT_EVENT for e in entries) == CHECKPOINTS
    assert second[0]["seq"] == FIRST_OF_SECOND_OPEN
    assert entries[RECORD - 1]["event"] != CHECKPOINT_EVENT
    assert entries[RECORD]["event"] != CHECKPOINT_EVENT  # the one after it, for the swap
    assert entries[SIGNED - 1]["event"] == CHECKPOINT_EVENT


def test_intact_log_exits_0_with_entries_and_checkpoints_counted(root: Path, logs: Logs) -> None:
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"plant: {ENTRIES} entries, {CHECKPOINTS} checkpoints verified" in lines
    assert lines[-1] == "INTACT"
    assert "NOT checked" not in result.stdout
    assert "BROKEN" not in result.stdout
    assert "UNPROVEN" not in result.stdout
    assert (report.entries, report.checkpoints, report.problem, report.unproven) == (
        ENTRIES,
        CHECKPOINTS,
        None,
        None,
    )
    assert report.intact
    assert [e["seq"] for e in read_log(root / "plant")] == list(range(1, ENTRIES + 1))


def test_without_pubkey_says_signatures_were_not_checked(root: Path) -> None:
    result, report = verify(root, None)
    assert result.returncode == 0
    assert "checkpoint signatures NOT checked" in result.stdout
    assert report.intact


def test_key_made_by_keygen_signs_a_log_that_verifies_with_its_public_key(
    tmp_path: Path,
) -> None:
    dmzbroker("audit", "keygen", "--out", str(tmp_path / "keys"))
    private, public = tmp_path / "keys" / "audit.key", tmp_path / "keys" / "audit.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with AuditLog(
        tmp_path / "audit", "plant", APPLIANCE, keys.load_private(private, None), checkpoint_every=3
    ) as log:
        record_many(log, 7)
    result, report = verify(tmp_path / "audit", public)
    assert result.returncode == 0, result.stdout
    assert "plant: 10 entries, 3 checkpoints verified" in result.stdout
    assert report.intact


def test_edited_field_names_the_entry_as_edited(root: Path, logs: Logs) -> None:
    def flip_outcome(entry: dict[str, Any]) -> None:
        entry["outcome"] = "success" if entry["outcome"] != "success" else "failure"

    edit(root, RECORD, flip_outcome)
    assert_broken(*verify(root, logs.pubkey), seq=RECORD, words="edited")


def test_a_byte_change_that_keeps_the_json_meaning_is_an_edit(root: Path, logs: Logs) -> None:
    path, index = locate(root, RECORD)
    lines = lines_of(path)
    lines[index] = lines[index].replace(",", ", ", 1)
    path.write_text("".join(lines))
    assert json.loads(lines[index]) == read_log(logs.root / "plant")[RECORD - 1]
    assert_broken(*verify(root, logs.pubkey), seq=RECORD, words="edited")


def test_deleted_entry_is_reported_at_the_entry_after_the_gap(root: Path, logs: Logs) -> None:
    path, index = locate(root, RECORD)
    lines = lines_of(path)
    del lines[index]
    path.write_text("".join(lines))
    result, report = verify(root, logs.pubkey)
    assert_broken(result, report, seq=RECORD + 1, words="deleted")
    assert f"from {RECORD - 1} to {RECORD + 1}: 1 entries deleted" in report.problem


def swap(root: Path, seq: int) -> None:
    path, index = locate(root, seq)
    lines = lines_of(path)
    lines[index], lines[index + 1] = lines[index + 1], lines[index]
    path.write_text("".join(lines))


def test_two_swapped_entries_are_reported(root: Path, logs: Logs) -> None:
    swap(root, RECORD)
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 1
    assert "NOT INTACT" in result.stdout
    assert report.problem is not None
    assert f"(seq {RECORD + 1})" in report.problem  # the first entry out of its place


def test_two_swapped_entries_are_reported_as_reordered(root: Path, logs: Logs) -> None:
    swap(root, RECORD)
    _, report = verify(root, logs.pubkey)
    assert report.problem is not None
    assert "reorder" in report.problem
    assert "deleted" not in report.problem


def test_duplicated_line_comes_again(root: Path, logs: Logs) -> None:
    path, index = locate(root, RECORD)
    lines = lines_of(path)
    lines.insert(index + 1, lines[index])
    path.write_text("".join(lines))
    result, report = verify(root, logs.pubkey)
    assert_broken(result, report, seq=RECORD, words=f"seq {RECORD} comes again after {RECORD}")


def test_old_segment_replayed_as_the_newest_is_reported(root: Path, logs: Logs) -> None:
    first, newest = segments(root / "plant")[0], segments(root / "plant")[-1]
    replay = root / "plant" / f"{int(newest.stem) + 1:010d}.jsonl"
    shutil.copyfile(first, replay)
    result, report = verify(root, logs.pubkey)
    assert_broken(result, report, seq=1, words=f"seq 1 comes again after {ENTRIES}")
    assert report.problem.startswith(f"{replay.name} line 1 ")
    assert report.entries == ENTRIES


def test_other_appliances_segments_placed_after_ours_are_reported(root: Path, logs: Logs) -> None:
    theirs = segments(logs.other_root / "plant")
    for number, path in enumerate(theirs, start=len(segments(root / "plant")) + 1):
        shutil.copyfile(path, root / "plant" / f"{number:010d}.jsonl")
    assert_broken(*verify(root, logs.pubkey), seq=1, words="comes again")


def test_other_appliances_segment_in_place_of_our_newest_breaks_the_chain(
    root: Path, logs: Logs
) -> None:
    ours, theirs = segments(root / "plant")[-1], segments(logs.other_root / "plant")[-1]
    assert read_segment(theirs)[0]["seq"] == read_segment(ours)[0]["seq"]
    shutil.copyfile(theirs, ours)
    assert_broken(*verify(root, logs.pubkey), seq=FIRST_OF_SECOND_OPEN, words="does not follow")


def test_other_appliances_segment_rechained_onto_ours_is_caught_at_its_checkpoint(
    root: Path, logs: Logs
) -> None:
    shutil.copyfile(segments(logs.other_root / "plant")[-1], segments(root / "plant")[-1])
    rechain(root)
    first_foreign_checkpoint = FIRST_OF_SECOND_OPEN + EVERY
    for pubkey in (None, logs.pubkey):
        result, report = verify(root, pubkey)
        assert_broken(
            result, report, seq=first_foreign_checkpoint, words="spliced from another appliance"
        )
        assert f"{OTHER_APPLIANCE!r}" in report.problem


def test_checkpoints_verified_with_another_key_have_a_bad_signature(root: Path, logs: Logs) -> None:
    assert_broken(*verify(root, logs.other_pubkey), seq=EVERY + 1, words="bad checkpoint signature")


def alter_signature(entry: dict[str, Any]) -> None:
    signature = bytearray(base64.b64decode(entry["details"]["signature"]))
    signature[10] ^= 0x01
    entry["details"]["signature"] = base64.b64encode(bytes(signature)).decode()


def test_checkpoint_with_altered_signature_bytes_is_an_edited_entry(root: Path, logs: Logs) -> None:
    assert read_log(root / "plant")[SIGNED - 1]["event"] == CHECKPOINT_EVENT
    edit(root, SIGNED, alter_signature)
    assert_broken(*verify(root, logs.pubkey), seq=SIGNED, words="edited")


def test_checkpoint_with_altered_signature_and_rebuilt_chain_has_a_bad_signature(
    root: Path, logs: Logs
) -> None:
    edit(root, SIGNED, alter_signature)
    rechain(root)
    assert_broken(*verify(root, logs.pubkey), seq=SIGNED, words="bad checkpoint signature")


def test_writer_killed_without_closing_leaves_an_unproven_window(tmp_path: Path) -> None:
    count = 12
    signer = Ed25519PrivateKey.generate()
    log = AuditLog(tmp_path / "audit", "plant", APPLIANCE, signer, checkpoint_every=EVERY)
    record_many(log, count)
    abandon(tmp_path / "audit" / "plant")
    last_checkpoint = (count // EVERY) * (EVERY + 1)
    window = (last_checkpoint + 1, count + count // EVERY)
    pub = write_public_key(signer, tmp_path / "audit.pub")
    result, report = verify(tmp_path / "audit", pub)
    assert result.returncode == 1
    assert f"UNPROVEN: seq {window[0]}..{window[1]} come after the last checkpoint" in (
        result.stdout
    )
    assert result.stdout.splitlines()[-1] == "NOT INTACT"
    assert "BROKEN" not in result.stdout
    assert report.unproven == window
    assert report.problem is None
    assert report.entries == window[1]


def test_tail_truncated_after_a_checkpoint_is_unproven(root: Path, logs: Logs) -> None:
    newest = segments(root / "plant")[-1]
    kept = read_segment(newest)[:-4]
    write_segment(newest, kept)
    last_checkpoint = max(e["seq"] for e in kept if e["event"] == CHECKPOINT_EVENT)
    window = (last_checkpoint + 1, kept[-1]["seq"])
    assert window[0] <= window[1]
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 1
    assert f"UNPROVEN: seq {window[0]}..{window[1]}" in result.stdout
    assert result.stdout.splitlines()[-1] == "NOT INTACT"
    assert report.unproven == window
    assert report.problem is None


def test_torn_last_line_is_a_note_and_the_entries_before_still_verify(
    root: Path, logs: Logs
) -> None:
    newest = segments(root / "plant")[-1]
    half = lines_of(newest)[-1][:90]
    with newest.open("a") as f:
        f.write(half)
    result, report = verify(root, logs.pubkey)
    assert f"  note: {newest.name}: {len(half)} bytes of a cut-off line at the end" in (
        result.stdout.splitlines()
    )
    assert f"plant: {ENTRIES} entries, {CHECKPOINTS} checkpoints verified" in result.stdout
    assert "BROKEN" not in result.stdout
    assert result.returncode == 0  # a note, not a break: the entries before it are intact
    assert (report.entries, report.checkpoints, report.problem) == (ENTRIES, CHECKPOINTS, None)
    assert report.torn == [f"{newest.name}: {len(half)} bytes of a cut-off line at the end"]


def test_log_of_one_writer_copied_in_as_another_writer_is_spliced(root: Path, logs: Logs) -> None:
    shutil.copytree(root / "plant", root / "enterprise")
    result, _ = verify(root, logs.pubkey)
    report = verify_writer(root / "enterprise", None)
    assert result.returncode == 1
    assert f"plant: {ENTRIES} entries, {CHECKPOINTS} checkpoints verified" in result.stdout
    assert "enterprise: 0 entries" in result.stdout
    assert "an entry of writer 'plant' in the 'enterprise' log (spliced)" in result.stdout
    assert report.problem is not None
    assert "(seq 1)" in report.problem


def test_garbled_line_after_a_checkpoint_in_the_last_segment_is_not_intact(
    root: Path, logs: Logs
) -> None:
    checkpoint = FIRST_OF_SECOND_OPEN + EVERY
    path, index = locate(root, checkpoint + 1)
    lines = lines_of(path)
    lines[index] = lines[index].replace('"outcome":', '"outcome"=', 1)  # no longer JSON
    path.write_text("".join(lines))
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 1, result.stdout
    assert "INTACT" not in result.stdout.splitlines()
    assert report.problem is not None
    assert report.problem.startswith(f"{path.name} line {index + 1}")


def test_line_replaced_by_json_that_is_not_an_object_is_reported_not_a_crash(
    root: Path, logs: Logs
) -> None:
    path, index = locate(root, RECORD)
    lines = lines_of(path)
    lines[index] = "[]\n"
    path.write_text("".join(lines))
    result = dmzbroker("audit", "verify", str(root), "--pubkey", str(logs.pubkey), check=False)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "NOT INTACT"
    report = verify_writer(root / "plant", None)
    assert report.problem is not None
    assert f"line {index + 1}" in report.problem


def test_untouched_entry_whose_details_hold_a_hash_key_verifies_intact(tmp_path: Path) -> None:
    signer = Ed25519PrivateKey.generate()
    with AuditLog(tmp_path / "audit", "plant", APPLIANCE, signer) as log:
        log.record(
            "document_stored",
            category="channel",
            outcome="success",
            details={"hash": "ab" * 32, "size": 10},
        )
    result, report = verify(tmp_path / "audit", write_public_key(signer, tmp_path / "audit.pub"))
    assert report.problem is None, report.problem
    assert result.returncode == 0, result.stdout
