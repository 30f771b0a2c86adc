"""`dmzbroker audit verify` and verify_writer on a real log, intact and tampered with.

The pristine log: writer "plant", checkpoint every 5 entries, opened twice (30 then 12
recorded entries, closed each time), so two segments, each sealed at start and at close, and
two epochs. Each test tampers with a fresh copy and checks both the real CLI (exit code,
printed text) and verify_writer. The attacks on truncation, chain breaks, epochs, anchors and
witnesses are in the second half.
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

from broker.audit import epochs
from broker.audit.entry import checkpoint_message
from broker.audit.export import frame
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
# Per open: a start checkpoint, one after every EVERY entries (the start's counting as the
# first of the 30: 6 + 1 at seq 37), one at close. test_pristine_log_is_laid_out_as_the_tests_expect
# checks these against the files.
CHECKPOINTS = 12
ENTRIES = sum(OPENS) + CHECKPOINTS
FIRST_OF_SECOND_OPEN = 39
RECORD = 14  # seq of an ordinary entry (not a checkpoint) in the first segment
SIGNED = 19  # seq of the fourth checkpoint


@dataclass(frozen=True)
class Logs:
    root: Path  # our audit directory: root/plant
    pubkey: Path
    other_root: Path  # another appliance's, same writer name and the same shape
    other_pubkey: Path
    key: Ed25519PrivateKey  # our root key


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
        ours,
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
    assert result.stdout.splitlines()[-1] == "BROKEN"
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


def rechain(root: Path, signer: tuple[Ed25519PrivateKey, int] | None = None) -> None:
    """What a forger without the key can do: recompute every prev_hash, head and hash; with
    `signer` (a key and the epoch it claims), also re-sign every checkpoint with that key."""
    head = "0" * 64
    for path in segments(root / "plant"):
        entries = read_segment(path)
        for entry in entries:
            entry["prev_hash"] = head
            if entry["event"] == CHECKPOINT_EVENT:
                d = entry["details"]
                d["head"], d["covers_seq"] = head, entry["seq"] - 1
                if signer is not None:
                    key, d["epoch"] = signer
                    d["keyid"] = keys.key_id(key.public_key())
                    message = checkpoint_message("plant", d)
                    d["signature"] = base64.b64encode(key.sign(message)).decode()
            entry["hash"] = head = sha256_of(entry)
        write_segment(path, entries)


def test_pristine_log_is_laid_out_as_the_tests_expect(logs: Logs) -> None:
    first, second = (read_segment(p) for p in segments(logs.root / "plant"))
    entries = first + second
    assert len(entries) == ENTRIES
    assert sum(e["event"] == CHECKPOINT_EVENT for e in entries) == CHECKPOINTS
    assert second[0]["seq"] == FIRST_OF_SECOND_OPEN
    assert entries[RECORD - 1]["event"] != CHECKPOINT_EVENT
    assert entries[RECORD]["event"] != CHECKPOINT_EVENT  # the one after it, for the swap
    assert entries[SIGNED - 1]["event"] == CHECKPOINT_EVENT
    assert entries[0]["event"] == entries[FIRST_OF_SECOND_OPEN - 1]["event"] == CHECKPOINT_EVENT
    assert [e["details"]["epoch"] for e in (entries[0], second[0])] == [1, 2]


def test_intact_log_exits_0_with_entries_and_checkpoints_counted(root: Path, logs: Logs) -> None:
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"plant: {ENTRIES} entries, {CHECKPOINTS} checkpoints, 0 witnesses verified" in lines
    assert "  plant: INTACT" in lines
    assert lines[-1] == "INTACT"
    assert "NOT checked" not in result.stdout
    assert "BROKEN" not in result.stdout
    assert "UNPROVEN" not in result.stdout
    assert (report.entries, report.checkpoints, report.problem, report.unproven) == (
        ENTRIES,
        CHECKPOINTS,
        None,
        [],
    )
    assert report.window is None
    assert report.verdict == "INTACT"
    assert report.intact
    assert [e["seq"] for e in read_log(root / "plant")] == list(range(1, ENTRIES + 1))


def test_without_pubkey_says_signatures_were_not_checked(root: Path) -> None:
    result, report = verify(root, None)
    assert result.returncode == 0
    assert "checkpoint signatures and the epoch key chain NOT checked" in result.stdout
    assert result.stdout.splitlines()[-1] == "INTACT"
    assert report.intact
    assert not report.signatures_checked


def test_key_made_by_keygen_signs_a_log_that_verifies_with_its_public_key(
    tmp_path: Path,
) -> None:
    private, public = tmp_path / "audit.key", tmp_path / "audit.pub"
    dmzbroker("audit", "keygen", "--out", str(private))
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with AuditLog(
        tmp_path / "audit", "plant", APPLIANCE, keys.load_private(private, None), checkpoint_every=3
    ) as log:
        record_many(log, 7)
    result, report = verify(tmp_path / "audit", public)
    assert result.returncode == 0, result.stdout
    assert "plant: 11 entries, 4 checkpoints, 0 witnesses verified" in result.stdout
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
    assert "BROKEN" in result.stdout.splitlines()
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
    first_foreign_checkpoint = FIRST_OF_SECOND_OPEN  # their start checkpoint
    for pubkey in (None, logs.pubkey):
        result, report = verify(root, pubkey)
        assert_broken(
            result, report, seq=first_foreign_checkpoint, words="spliced from another appliance"
        )
        assert f"{OTHER_APPLIANCE!r}" in report.problem


def test_a_log_verified_with_another_root_key_is_broken_at_its_key_chain(
    root: Path, logs: Logs
) -> None:
    result, report = verify(root, logs.other_pubkey)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "BROKEN"
    expected = "BROKEN at epochs.jsonl line 1: epoch 1 not certified by the root key (audit.pub)"
    assert f"  plant: {expected}" in result.stdout.splitlines()
    assert report.verdict == expected


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
    assert f"plant: {ENTRIES} entries, {CHECKPOINTS} checkpoints, 0 witnesses" in result.stdout
    assert "BROKEN" not in result.stdout
    assert result.returncode == 0  # a note, not a break: the entries before it are intact
    assert (report.entries, report.checkpoints, report.problem) == (ENTRIES, CHECKPOINTS, None)
    assert report.torn == [f"{newest.name}: {len(half)} bytes of a cut-off line at the end"]


def test_log_of_one_writer_copied_in_as_another_writer_is_spliced(root: Path, logs: Logs) -> None:
    shutil.copytree(root / "plant", root / "enterprise")
    result, _ = verify(root, logs.pubkey)
    report = verify_writer(root / "enterprise", None)
    assert result.returncode == 1
    assert f"plant: {ENTRIES} entries, {CHECKPOINTS} checkpoints, 0 witnesses" in result.stdout
    assert "enterprise: 0 entries" in result.stdout
    # its key chain (copied too) certifies another writer; without it, the entries do
    assert "  enterprise: BROKEN at epochs.jsonl line 1: certifies writer 'plant'" in result.stdout
    assert report.problem is not None
    assert "an entry of writer 'plant' in the 'enterprise' log (spliced)" in report.problem
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
    assert result.stdout.splitlines()[-1] == "BROKEN"
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
    assert result.stdout.splitlines()[-1] == "BROKEN"
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


# --- Verdicts of a live log, chain breaks, epochs, anchors and witnesses (issue 13) ---------


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return dmzbroker("audit", "verify", str(root), *args, check=False)


def live_log(root: Path, key: Ed25519PrivateKey, count: int) -> None:
    """A writer that recorded `count` entries after its last checkpoint and is still running
    (as far as its files go: a crash looks the same until the next start)."""
    log = AuditLog(root, "plant", APPLIANCE, key, checkpoint_every=EVERY)
    record_many(log, EVERY * 2 + count)
    abandon(root / "plant")


def test_a_live_log_is_intact_with_a_warning_and_fails_only_under_strict(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    live_log(tmp_path / "audit", key, 3)
    pub = write_public_key(key, tmp_path / "audit.pub")
    result = cli(tmp_path / "audit", "--pubkey", str(pub))
    # seq 1 start checkpoint, 2..6, 7 checkpoint, 8..12, 13 checkpoint, 14..16 unsealed
    warning = "INTACT, 3 newest entries (seq 14..16) not yet under a checkpoint"
    assert result.returncode == 0, result.stdout
    assert f"  plant: {warning}" in result.stdout.splitlines()
    assert result.stdout.splitlines()[-1].startswith("INTACT, 3 newest entries not yet under")
    assert "UNPROVEN" not in result.stdout and "BROKEN" not in result.stdout
    strict = cli(tmp_path / "audit", "--pubkey", str(pub), "--strict")
    assert strict.returncode == 1
    assert f"  plant: {warning}" in strict.stdout.splitlines()
    report = verify_writer(tmp_path / "audit" / "plant", key.public_key())
    assert (report.window, report.intact, report.verdict) == ((14, 16), True, warning)


def checkpoints_of(writer_dir: Path) -> list[dict[str, Any]]:
    return [e for e in read_log(writer_dir) if e["event"] == CHECKPOINT_EVENT]


def syslog_line(entry: dict[str, Any]) -> str:
    """How a collector stores what the SIEM export sent (broker.audit.export.frame)."""
    framed = frame(entry, canonical_text(entry).encode(), "appliance-1").decode()
    return framed.split(" ", 1)[1]  # without the octet count


def test_log_cut_right_after_a_checkpoint_is_truncated_by_a_witness_file(
    root: Path, logs: Logs, tmp_path: Path
) -> None:
    newest = segments(root / "plant")[-1]
    entries = read_segment(newest)
    cut_at = next(i for i, e in enumerate(entries) if e["event"] == CHECKPOINT_EVENT and i > 0)
    write_segment(newest, entries[: cut_at + 1])  # ends with a checkpoint: looks sealed
    assert cli(root, "--pubkey", str(logs.pubkey)).stdout.splitlines()[-1] == "INTACT"
    later = [e for e in entries[cut_at + 1 :] if e["event"] == CHECKPOINT_EVENT]
    witness = tmp_path / "collector.log"
    witness.write_text(
        "a line from something else\n"
        + "".join(syslog_line(e) + "\n" for e in checkpoints_of(logs.root / "plant")[:3])
        + canonical_text(later[-1]) + "\n"
    )  # fmt: skip
    result = cli(root, "--pubkey", str(logs.pubkey), "--witness", str(witness))
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "BROKEN"
    expected = (
        f"  plant: BROKEN at the end (seq {entries[cut_at]['seq']}): the log ends at seq "
        f"{entries[cut_at]['seq']}, but a witness ({witness} line 5) holds a checkpoint at seq "
        f"{later[-1]['seq']}: truncated"
    )
    assert expected in result.stdout.splitlines(), result.stdout
    assert f"witness {witness}: 4 checkpoints, 1 lines skipped" in result.stdout


def witnessed_pair(root: Path, key: Ed25519PrivateKey, opens: int) -> None:
    """A plant and an enterprise writer; every plant checkpoint is recorded by the enterprise
    writer as audit_checkpoint_witnessed, as the enterprise half does when it crosses."""
    for run in range(opens):
        enterprise = AuditLog(root, "enterprise", APPLIANCE, key, checkpoint_every=50)
        plant = AuditLog(root, "plant", APPLIANCE, key, checkpoint_every=EVERY)

        def witness(entry: dict[str, Any], enterprise: AuditLog = enterprise) -> None:
            details = entry["details"]  # what broker.audit.crossing copies: every detail
            enterprise.record(
                "audit_checkpoint_witnessed",
                category="audit",
                outcome="success",
                actor="plant",
                details={"witnessed_writer": "plant", "seq": entry["seq"], "hash": entry["hash"],
                         **details},
            )  # fmt: skip

        plant.on_checkpoint = witness
        record_many(plant, 12, start=run * 12)
        plant.close()
        enterprise.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("witnessed")
    key = Ed25519PrivateKey.generate()
    witnessed_pair(base / "audit", key, opens=2)
    return base / "audit", write_public_key(key, base / "audit.pub")


@pytest.fixture
def pair_copy(pair: tuple[Path, Path], tmp_path: Path) -> Path:
    shutil.copytree(pair[0], tmp_path / "audit")
    return tmp_path / "audit"


def test_the_enterprise_log_witnesses_the_plant_log_without_options(
    pair: tuple[Path, Path], pair_copy: Path
) -> None:
    result = cli(pair_copy, "--pubkey", str(pair[1]))
    held = [e for e in read_log(pair_copy / "enterprise") if e["actor"] == "plant"]
    assert len(held) >= 4  # each run's checkpoints after the hook was set, and its stop
    assert result.returncode == 0, result.stdout
    assert f"checkpoints, {len(held)} witnesses verified" in result.stdout
    assert result.stdout.splitlines()[-1] == "INTACT"


def test_newest_plant_segment_deleted_is_truncation_seen_from_the_enterprise_log(
    pair: tuple[Path, Path], pair_copy: Path
) -> None:
    segments(pair_copy / "plant")[-1].unlink()
    result = cli(pair_copy, "--pubkey", str(pair[1]))
    assert result.returncode == 1
    plant = [line for line in result.stdout.splitlines() if line.startswith("  plant: ")]
    assert plant[0].startswith("  plant: BROKEN at the end (seq "), result.stdout
    assert "holds a checkpoint at seq" in plant[0] and "truncated" in plant[0]
    assert "(enterprise log seq " in plant[0]


def test_newest_segment_of_every_writer_deleted_is_truncation_seen_by_a_witness_file(
    pair: tuple[Path, Path], pair_copy: Path, tmp_path: Path
) -> None:
    witness = tmp_path / "siem.jsonl"
    witness.write_text(
        "".join(
            canonical_text(e) + "\n"
            for w in ("plant", "enterprise")
            for e in checkpoints_of(pair_copy / w)
        )
    )
    for writer in ("plant", "enterprise"):
        segments(pair_copy / writer)[-1].unlink()
    alone = cli(pair_copy, "--pubkey", str(pair[1]))  # only each key chain's end tells
    assert alone.returncode == 1 and alone.stdout.splitlines()[-1] == "UNPROVEN", alone.stdout
    assert alone.stdout.count("newest entries were removed (truncated), or its writer") == 2
    result = cli(pair_copy, "--pubkey", str(pair[1]), "--witness", str(witness))
    assert result.returncode == 1
    for writer in ("plant", "enterprise"):
        assert f"  {writer}: BROKEN at the end (seq " in result.stdout, result.stdout
    assert result.stdout.count(": truncated") == 2


def test_a_witness_the_log_contradicts_is_broken(root: Path, logs: Logs, tmp_path: Path) -> None:
    """The newest segment deleted, then the writer started again: the log ends with a sealed
    checkpoint, so it continues from there, reusing the deleted seqs. On its own the log is
    intact; the collector's copy of a deleted checkpoint says otherwise."""
    witnessed = checkpoints_of(root / "plant")[-3]
    assert witnessed["seq"] > FIRST_OF_SECOND_OPEN
    segments(root / "plant")[-1].unlink()
    with AuditLog(root, "plant", APPLIANCE, logs.key, checkpoint_every=EVERY) as log:
        record_many(log, 20, start=100)
    assert cli(root, "--pubkey", str(logs.pubkey)).returncode == 0
    witness = tmp_path / "w.jsonl"
    witness.write_text(canonical_text(witnessed) + "\n")
    result = cli(root, "--pubkey", str(logs.pubkey), "--witness", str(witness))
    assert result.returncode == 1
    expected = (
        f"  plant: BROKEN at seq {witnessed['seq']}: a witness ({witness} line 1) holds a "
        f"checkpoint there (hash {witnessed['hash'][:16]}…) that the log does not prove"
    )
    assert any(line.startswith(expected) for line in result.stdout.splitlines()), result.stdout


def test_the_current_epoch_key_cannot_re_sign_the_past(root: Path, logs: Logs) -> None:
    """An attacker takes the current epoch key (epoch 2, from seq 39), drops an entry of the
    first run and re-signs everything: seq 1..38 belong to epoch 1, whose key is gone."""
    current = keys.load_private(root / "plant" / "epoch.key", None)
    path, index = locate(root, RECORD)
    entries = read_segment(path)
    del entries[index]
    for later in entries[index:]:
        later["seq"] -= 1
    write_segment(path, entries)
    for claimed, words in ((2, "it claims epoch 2, but seq 1 belongs to epoch 1"),
                           (1, "not made with epoch 1's key")):  # fmt: skip
        rechain(root, (current, claimed))
        assert_broken(*verify(root, logs.pubkey), seq=1, words=words)


def test_a_tampered_tail_restarted_is_a_chain_break_reported_forever(
    root: Path, logs: Logs
) -> None:
    """After the last checkpoint, drop an entry and re-hash the rest (no key needed), then
    restart the writer: it records a chain break instead of adopting, and verify keeps
    saying so, with the break's fields; the tampering belongs to the break."""
    newest = segments(root / "plant")[-1]
    entries = read_segment(newest)
    tail = [e for e in entries if e["seq"] > entries[-1]["seq"] - 1]  # the stop checkpoint
    live = AuditLog(root, "plant", APPLIANCE, logs.key, checkpoint_every=100)
    record_many(live, 4, start=200)
    abandon(root / "plant")
    last = read_segment(segments(root / "plant")[-1])
    del last[3]  # seq s+3: the forger's deletion after the start checkpoint ...
    for entry in last[3:]:
        entry["seq"] -= 1
    head = last[2]["hash"]
    for entry in last[3:]:  # ... hidden by re-hashing the rest
        entry["prev_hash"] = head
        entry["hash"] = head = sha256_of(entry)
    write_segment(segments(root / "plant")[-1], last)
    with AuditLog(root, "plant", APPLIANCE, logs.key, checkpoint_every=100):
        pass
    good, first_after = last[0]["seq"], last[1]["seq"]
    assert tail and last[0]["event"] == CHECKPOINT_EVENT
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "UNPROVEN"
    assert "BROKEN" not in result.stdout
    brk = report.breaks[0]
    assert brk.seq == last[-1]["seq"] + 1
    assert brk.details["last_good_seq"] == good
    assert brk.details["unadopted"] == [first_after, last[-1]["seq"]]
    described = (
        f"chain break at seq {brk.seq} ({segments(root / 'plant')[-1].name} line 1): last good "
        f"seq {good} (hash {last[0]['hash'][:16]}…), first bad none, seq {first_after}.."
        f"{last[-1]['seq']} not adopted: "
    )
    assert f"  plant: {report.verdict}" in result.stdout.splitlines()
    assert report.verdict.startswith(f"UNPROVEN: {described}")
    with AuditLog(root, "plant", APPLIANCE, logs.key, checkpoint_every=100) as log:
        record_many(log, 3)
    again, _ = verify(root, logs.pubkey)
    assert again.returncode == 1 and f"  plant: UNPROVEN: {described}" in again.stdout  # forever


def test_a_forged_expiry_anchor_after_the_stop_checkpoint_is_broken(root: Path, logs: Logs) -> None:
    """Delete the oldest segment and append an anchor for it after the writer's closing
    checkpoint, chained correctly (no key needed), then restart the writer: the writer never
    writes after its stop checkpoint, so no chain break accounts for it, and the anchor is
    never trusted."""
    oldest, newest = segments(root / "plant")
    deleted = read_segment(oldest)
    oldest.unlink()
    entries = read_segment(newest)
    assert entries[-1]["details"]["reason"] == "stop"
    anchor = dict(entries[-1], seq=entries[-1]["seq"] + 1, event="audit_segments_expired",
                  category="audit", prev_hash=entries[-1]["hash"],
                  details={"segments": [1], "through_seq": deleted[-1]["seq"],
                           "head": deleted[-1]["hash"], "checkpoint": deleted[-1]})  # fmt: skip
    anchor["hash"] = sha256_of(anchor)
    write_segment(newest, [*entries, anchor])
    for restarted in (False, True):
        if restarted:
            with AuditLog(root, "plant", APPLIANCE, logs.key, checkpoint_every=EVERY):
                pass
        result, report = verify(root, logs.pubkey)
        assert result.returncode == 1, result.stdout
        assert report.problem is not None and report.expired == (0, ""), report
        assert result.stdout.splitlines()[-1] == "BROKEN"


def test_missing_key_chain_is_unproven_and_an_edited_one_broken(root: Path, logs: Logs) -> None:
    chain = root / "plant" / "epochs.jsonl"
    lines = chain.read_text().splitlines(keepends=True)
    chain.unlink()
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "UNPROVEN"
    assert report.verdict == (
        "UNPROVEN: epochs.jsonl: missing (the key chain from audit.pub): no checkpoint "
        "signature can be checked"
    )
    edited = json.loads(lines[1])
    edited["from_seq"] = 2  # epoch 2 would sign from seq 2: the past
    chain.write_text(lines[0] + canonical_text(edited) + "\n")
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "BROKEN"
    assert (
        report.verdict
        == "BROKEN at epochs.jsonl line 2: epoch 2 not certified by epoch 1's key or the root key (audit.pub)"
    )


def test_an_edit_in_the_unadopted_tail_belongs_to_the_break_not_a_separate_broken(
    root: Path, logs: Logs
) -> None:
    live = AuditLog(root, "plant", APPLIANCE, logs.key, checkpoint_every=100)
    record_many(live, 4, start=300)
    abandon(root / "plant")
    newest = segments(root / "plant")[-1]
    edited_seq = read_segment(newest)[2]["seq"]
    edit(root, edited_seq, lambda entry: entry.update(outcome="success"))  # hash left stale
    before, _ = verify(root, logs.pubkey)
    assert before.stdout.splitlines()[-1] == "BROKEN"  # not restarted: the edit is a break
    with AuditLog(root, "plant", APPLIANCE, logs.key, checkpoint_every=100):
        pass
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "UNPROVEN", result.stdout
    assert report.problem is None
    assert report.breaks[0].details["first_bad"] == f"{newest.name} line 3"
    assert f"first bad {newest.name} line 3" in report.verdict


# --- Review 1 of issue 13: what the verifier must not take an attacker's word for ----------


def siem_file(root: Path, path: Path, writers: tuple[str, ...] = ("plant",)) -> Path:
    """A collector's file of every checkpoint the writers made so far."""
    path.write_text(
        "".join(canonical_text(e) + "\n" for w in writers for e in checkpoints_of(root / w))
    )
    return path


def cut_chain(writer_dir: Path, through_seq: int) -> None:
    """Keep only the certificates of the epochs the log up to `through_seq` uses."""
    chain = writer_dir / "epochs.jsonl"
    lines = chain.read_text().splitlines(keepends=True)
    chain.write_text("".join(x for x in lines if json.loads(x)["from_seq"] <= through_seq))


def test_log_and_key_chain_cut_together_are_truncated_by_a_witness_not_a_bad_signature(
    root: Path, logs: Logs, tmp_path: Path
) -> None:
    """No key needed: delete the newest segment and the epoch that signed it. Its witnesses
    name an epoch the chain no longer has: that is the cut, not a forged witness."""
    witness = siem_file(root, tmp_path / "siem.jsonl")
    segments(root / "plant")[-1].unlink()
    cut_chain(root / "plant", FIRST_OF_SECOND_OPEN - 1)
    result, _ = verify(root, logs.pubkey)
    assert result.returncode == 0, result.stdout  # on its own the log cannot tell
    result = cli(root, "--pubkey", str(logs.pubkey), "--witness", str(witness))
    assert result.returncode == 1 and result.stdout.splitlines()[-1] == "BROKEN", result.stdout
    expected = (
        f"  plant: BROKEN at the end (seq {FIRST_OF_SECOND_OPEN - 1}): the key chain ends at "
        f"epoch 1 (epochs.jsonl line 1), but a witness ({witness} line "
    )
    assert any(line.startswith(expected) for line in result.stdout.splitlines()), result.stdout
    assert "signed in epoch 2: the log and its key chain were cut (truncated)" in result.stdout
    assert "a bad signature" not in result.stdout


def test_a_witness_of_a_known_epoch_with_a_bad_signature_is_noted_not_counted(
    root: Path, logs: Logs, tmp_path: Path
) -> None:
    forged = checkpoints_of(root / "plant")[-1]
    forged["details"]["signature"] = base64.b64encode(bytes(64)).decode()
    forged["hash"] = sha256_of(forged)
    witness = tmp_path / "w.jsonl"
    witness.write_text(canonical_text(forged) + "\n")
    result = cli(root, "--pubkey", str(logs.pubkey), "--witness", str(witness))
    assert result.returncode == 0, result.stdout
    assert "  note: 1 witnesses not counted: a bad signature" in result.stdout.splitlines()


def test_every_segment_deleted_and_every_chain_emptied_is_never_intact(
    pair: tuple[Path, Path], pair_copy: Path, tmp_path: Path
) -> None:
    witness = siem_file(pair_copy, tmp_path / "siem.jsonl", ("plant", "enterprise"))
    for writer in ("plant", "enterprise"):
        for path in segments(pair_copy / writer):
            path.unlink()
        (pair_copy / writer / "epochs.jsonl").write_bytes(b"")
    alone = cli(pair_copy, "--pubkey", str(pair[1]))
    assert alone.returncode == 1 and alone.stdout.splitlines()[-1] == "UNPROVEN", alone.stdout
    for writer in ("plant", "enterprise"):
        assert f"  {writer}: UNPROVEN: the log of '{writer}' holds no entry: empty log" in (
            alone.stdout
        )
    assert "epochs.jsonl holds no epoch: empty key chain" in alone.stdout
    result = cli(pair_copy, "--pubkey", str(pair[1]), "--witness", str(witness))
    assert result.returncode == 1 and result.stdout.splitlines()[-1] == "BROKEN"
    assert result.stdout.count("the key chain (epochs.jsonl) holds no epoch, but a witness") == 2


def test_newest_segment_deleted_with_its_key_chain_untouched_is_unproven(
    root: Path, logs: Logs
) -> None:
    segments(root / "plant")[-1].unlink()
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 1 and result.stdout.splitlines()[-1] == "UNPROVEN"
    assert report.unproven == [
        f"the log ends at seq {FIRST_OF_SECOND_OPEN - 1}, but epoch 2 (epochs.jsonl line 2) "
        f"starts at seq {FIRST_OF_SECOND_OPEN}: its newest entries were removed (truncated), "
        "or its writer crashed right after an epoch change, before writing (its next start "
        "shows which)"
    ]


def test_a_restart_after_a_crash_right_after_an_epoch_change_is_intact(
    root: Path, logs: Logs
) -> None:
    """The writer certified its start's epoch and died before writing: the next start
    continues with that epoch, so the log reaches it again."""
    newest = segments(root / "plant")[-1]
    newest.unlink()  # as if the second start had crashed before its start checkpoint
    with AuditLog(root, "plant", APPLIANCE, logs.key, checkpoint_every=EVERY) as log:
        record_many(log, 3)
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 0, result.stdout
    assert report.verdict == "INTACT"


def test_entries_forged_after_the_stop_checkpoint_are_broken_even_after_a_restart(
    root: Path, logs: Logs
) -> None:
    newest = segments(root / "plant")[-1]
    entries = read_segment(newest)
    assert entries[-1]["details"]["reason"] == "stop"
    forged = dict(entries[-2], seq=entries[-1]["seq"] + 1, event="policy_accepted",
                  prev_hash=entries[-1]["hash"], details={"version": 99})  # fmt: skip
    forged["hash"] = sha256_of(forged)
    write_segment(newest, [*entries, forged])
    expected = (
        f"{newest.name} line {len(entries) + 1} (seq {forged['seq']}): an entry after the "
        f"writer's closing checkpoint (seq {entries[-1]['seq']}): added"
    )
    for restart in (False, True):
        if restart:  # the writer's chain break does not account for it
            with AuditLog(root, "plant", APPLIANCE, logs.key, checkpoint_every=EVERY):
                pass
        result, report = verify(root, logs.pubkey)
        assert result.returncode == 1 and report.verdict == f"BROKEN at {expected}"


def test_a_segment_added_after_a_stopped_writer_must_open_as_the_writer_opens_one(
    root: Path, logs: Logs
) -> None:
    last = read_segment(segments(root / "plant")[-1])[-1]
    forged = dict(last, seq=last["seq"] + 1, event="policy_accepted", prev_hash=last["hash"],
                  details={"version": 99})  # fmt: skip
    forged["hash"] = sha256_of(forged)
    added = root / "plant" / "0000000003.jsonl"
    write_segment(added, [forged])
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 1
    assert report.verdict.startswith(
        f"BROKEN at {added.name} line 1 (seq {forged['seq']}): a segment that follows no "
        "rollover checkpoint opens with 'policy_accepted'"
    )


def forged_break(root: Path, good: dict[str, Any], seq: int, reason: str) -> Path:
    """A new segment opening with an audit_chain_break nobody sealed (no key needed)."""
    entry = {
        "seq": seq, "time": good["time"], "boot_id": "forged", "writer": "plant",
        "event": "audit_chain_break", "category": "audit", "outcome": "failure",
        "actor": None, "object": None, "policy_version": None,
        "details": {"last_good_seq": good["seq"], "last_good_hash": good["hash"],
                    "first_bad": None, "unadopted": [good["seq"] + 1, seq - 1],
                    "reason": reason},
        "prev_hash": good["hash"],
    }  # fmt: skip
    entry["hash"] = sha256_of(entry)
    path = root / "plant" / f"{len(segments(root / 'plant')) + 1:010d}.jsonl"
    write_segment(path, [entry])
    return path


def test_a_forged_chain_break_does_not_hide_a_deletion_under_checkpoints(
    root: Path, logs: Logs
) -> None:
    path, index = locate(root, RECORD)
    entries = read_segment(path)
    del entries[index]
    write_segment(path, entries)
    _, before = verify(root, logs.pubkey)
    assert before.problem is not None and f"(seq {RECORD + 1})" in before.problem
    all_entries = read_log(root / "plant")
    good = next(e for e in all_entries if e["seq"] == 7)  # a checkpoint before the deletion
    forged_break(root, good, all_entries[-1]["seq"] + 1, "power loss")
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 1 and result.stdout.splitlines()[-1] == "BROKEN"
    assert report.problem == before.problem and not report.breaks


def test_a_break_from_the_last_valid_checkpoint_still_needs_its_seal(
    root: Path, logs: Logs
) -> None:
    """Even naming the log's last checkpoint, a break no epoch key sealed is BROKEN."""
    last = read_log(root / "plant")[-1]
    path = forged_break(root, last, last["seq"] + 1, "clean restart")
    result, report = verify(root, logs.pubkey)
    assert result.returncode == 1
    assert report.verdict == (
        f"BROKEN at {path.name} line 1 (seq {last['seq'] + 1}): a chain break no checkpoint "
        "seals (forged, or its writer crashed right after writing it)"
    )


def test_text_from_the_log_reaches_the_terminal_inert(root: Path, logs: Logs) -> None:
    last = read_log(root / "plant")[-1]
    forged_break(root, last, last["seq"] + 1, "ok\n  plant: INTACT\nINTACT\x1b[8m")
    entries = read_segment(segments(root / "plant")[-1])
    entries[0]["details"]["first_bad"] = "\x1b[2K\r"
    entries[0]["hash"] = sha256_of(entries[0])
    write_segment(segments(root / "plant")[-1], entries)
    (root / "evil\x1b[31m").mkdir()
    for command in ("verify", "report"):
        extra = ("--html", str(root.parent / "r.html")) if command == "report" else ()
        result = dmzbroker("audit", command, str(root), "--pubkey", str(logs.pubkey), *extra,
                           check=False)  # fmt: skip
        assert "\x1b" not in result.stdout and "\r" not in result.stdout, repr(result.stdout)
        assert "evil\\x1b[31m" in result.stdout


def test_verify_reads_the_key_chain_after_the_segments(tmp_path: Path) -> None:
    """An epoch change and a checkpoint signed with the new key between verify's reading of
    the segments and of epochs.jsonl: it sees the log as it was, never a later key."""
    key = Ed25519PrivateKey.generate()
    log = AuditLog(tmp_path, "plant", APPLIANCE, key, checkpoint_every=EVERY, epoch_s=0.0)
    try:
        record_many(log, 7)
        real = epochs.read_chain

        def writer_runs_meanwhile(
            directory: Path, root: Any
        ) -> tuple[list[epochs.Epoch], str | None]:
            record_many(log, 12, start=7)  # checkpoints, each followed by an epoch change
            return real(directory, root)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(epochs, "read_chain", writer_runs_meanwhile)
            report = verify_writer(tmp_path / "plant", key.public_key())
        assert report.intact, report.verdict
    finally:
        log.close()


def signed_checkpoint(
    last: dict[str, Any], key: Ed25519PrivateKey, epoch: int, reason: str
) -> dict[str, Any]:
    """The checkpoint the holder of `key` can make after `last`."""
    details = {"appliance": APPLIANCE, "covers_seq": last["seq"], "head": last["hash"],
               "epoch": epoch, "keyid": keys.key_id(key.public_key()), "reason": reason}  # fmt: skip
    details["signature"] = base64.b64encode(key.sign(checkpoint_message("plant", details))).decode()
    entry = dict(last, seq=last["seq"] + 1, event=CHECKPOINT_EVENT, category="audit",
                 outcome="success", prev_hash=last["hash"], details=details)  # fmt: skip
    entry["hash"] = sha256_of(entry)
    return entry


def test_the_stolen_current_key_cannot_expire_the_past(
    root: Path, logs: Logs, tmp_path: Path
) -> None:
    """With epoch.key: delete the first run's segment, then add a segment the key can seal
    with an expiry anchor for it. The anchor's deleted checkpoint must be signed by ITS
    epoch's key (gone), so it is not trusted, and the witnesses of what went are not
    'expired': the log no longer holds them."""
    witness = siem_file(root, tmp_path / "siem.jsonl")
    stolen = keys.load_private(root / "plant" / "epoch.key", None)
    oldest, newest = segments(root / "plant")
    deleted, kept = read_segment(oldest), read_segment(newest)
    oldest.unlink()
    forged_old = signed_checkpoint(deleted[-2], stolen, 2, "rollover")  # seq 38, in epoch 1
    for carried in (None, forged_old):
        start = signed_checkpoint(kept[-1], stolen, 2, "start")
        anchor = dict(start, seq=start["seq"] + 1, event="audit_segments_expired",
                      prev_hash=start["hash"],
                      details={"segments": [1], "through_seq": FIRST_OF_SECOND_OPEN - 1,
                               "head": kept[0]["prev_hash"], "checkpoint": carried})  # fmt: skip
        anchor["hash"] = sha256_of(anchor)
        write_segment(root / "plant" / "0000000003.jsonl",
                      [start, anchor, signed_checkpoint(anchor, stolen, 2, "expiry")])  # fmt: skip
        result, report = verify(root, logs.pubkey)
        assert result.returncode == 1 and report.expired == (0, "")
        assert report.verdict.startswith(
            f"UNPROVEN: the log starts at seq {FIRST_OF_SECOND_OPEN}, and the expiry anchor"
        )
        assert "carries" in report.verdict and "not trusted" in report.verdict
        result = cli(root, "--pubkey", str(logs.pubkey), "--witness", str(witness))
        assert result.returncode == 1 and result.stdout.splitlines()[-1] == "BROKEN"
        assert "no trusted expiry anchor accounts for it: deleted" in result.stdout
        assert "witnesses not counted: expired" not in result.stdout
