"""No silent adoption (ADR 0016): a writer continues its chain only from a checkpoint that
verifies at the very end of its log; a forged, cut or unsealed tail gets an
`audit_chain_break` and is never covered by a later checkpoint, and a stolen epoch key
cannot sign for the seqs before its epoch."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import epochs
from broker.audit import segments as segments_module
from broker.audit.entry import checkpoint_message
from broker.audit.log import AuditLog
from broker.errors import ConfigError
from broker.trust.keys import verifies
from tests.audit.support import (
    CHECKPOINT_EVENT,
    abandon,
    read_log,
    read_segment,
    record_many,
    segments,
    sha256_of,
    write_segment,
)

APPLIANCE = "coldstore-1"
BREAK = "audit_chain_break"


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def open_log(root: Path, key: Ed25519PrivateKey | epochs.RootKey, **options: Any) -> AuditLog:
    return AuditLog(root, "plant", APPLIANCE, key, checkpoint_every=5, **options)


def rehash(entries: list[dict[str, Any]], prev: str) -> list[dict[str, Any]]:
    """What an attacker without the key can do: renumber and re-chain entries."""
    out = []
    for original in entries:
        entry = {**original, "prev_hash": prev}
        entry["hash"] = sha256_of(entry)
        out.append(entry)
        prev = entry["hash"]
    return out


def crash_after(root: Path, key: Ed25519PrivateKey, count: int) -> dict[str, Any]:
    """A writer that recorded `count` entries and died; its last checkpoint entry."""
    log = open_log(root, key)
    record_many(log, count)
    abandon(root / "plant")
    return [e for e in read_log(root / "plant") if e["event"] == CHECKPOINT_EVENT][-1]


def started_break(root: Path) -> dict[str, Any]:
    first = read_segment(segments(root / "plant")[-1])[0]
    assert first["event"] == BREAK, first
    return first


def test_a_clean_stop_and_restart_adopts_with_start_and_stop_seals(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key) as log:
        record_many(log, 7)
    with open_log(tmp_path, key) as log:
        record_many(log, 2, start=7)
    entries = read_log(tmp_path / "plant")
    assert BREAK not in {e["event"] for e in entries}
    reasons = [e["details"]["reason"] for e in entries if e["event"] == CHECKPOINT_EVENT]
    assert reasons == ["start", "count", "stop", "start", "stop"]
    second = read_segment(segments(tmp_path / "plant")[1])
    assert second[0]["prev_hash"] == entries[len(entries) - len(second) - 1]["hash"]
    chain, problem = epochs.read_chain(tmp_path / "plant", key.public_key())
    assert problem is None
    assert [(e.number, e.root_certified) for e in chain] == [(1, True), (2, False)]
    assert chain[1].from_seq == second[0]["seq"]  # a new epoch at every start


def test_a_dropped_and_rehashed_tail_is_not_adopted(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    last_good = crash_after(tmp_path, key, 8)  # checkpoint at seq 7, entries 8..10 after it
    path = segments(tmp_path / "plant")[0]
    entries = read_segment(path)
    upto = entries.index(last_good) + 1
    tail = [e for e in entries[upto:] if e["seq"] != last_good["seq"] + 1]  # drop one
    forged = rehash(
        [{**e, "seq": last_good["seq"] + 1 + i} for i, e in enumerate(tail)], last_good["hash"]
    )
    write_segment(path, entries[:upto] + forged)
    with open_log(tmp_path, key) as log:
        record_many(log, 1)
    found = started_break(tmp_path)
    assert found["prev_hash"] == last_good["hash"]  # the forgery is under no later checkpoint
    assert found["seq"] == forged[-1]["seq"] + 1
    assert found["details"]["last_good_seq"] == last_good["seq"]
    assert found["details"]["last_good_hash"] == last_good["hash"]
    assert found["details"]["unadopted"] == [forged[0]["seq"], forged[-1]["seq"]]
    assert "never sealed" in found["details"]["reason"]
    later = [e for e in read_log(tmp_path / "plant") if e["seq"] > found["seq"]]
    assert later[0]["event"] == CHECKPOINT_EVENT and later[0]["details"]["reason"] == "start"
    assert later[0]["details"]["head"] == found["hash"]


def test_a_fake_expiry_anchor_after_the_last_checkpoint_is_not_adopted(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key) as log:
        record_many(log, 3)
    path = segments(tmp_path / "plant")[0]
    entries = read_segment(path)
    anchor = {
        **entries[1],
        "seq": entries[-1]["seq"] + 1,
        "event": "audit_segments_expired",
        "category": "audit",
        "outcome": "success",
        "details": {"segments": [1], "through_seq": 1, "head": entries[0]["hash"]},
    }
    write_segment(path, entries + rehash([anchor], entries[-1]["hash"]))
    with open_log(tmp_path, key):
        pass
    found = started_break(tmp_path)
    assert found["prev_hash"] == entries[-1]["hash"]
    assert found["details"]["unadopted"] == [anchor["seq"], anchor["seq"]]


def test_a_crash_with_a_torn_tail_gives_a_break_naming_the_unsealed_range(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    last_good = crash_after(tmp_path, key, 7)  # checkpoint at seq 7, seqs 8 and 9 unsealed
    path = segments(tmp_path / "plant")[0]
    with path.open("ab") as f:
        f.write(b'{"actor":null,"boot_id":"cut-off')
    with open_log(tmp_path, key):
        pass
    found = started_break(tmp_path)
    assert found["details"]["unadopted"] == [last_good["seq"] + 1, last_good["seq"] + 2]
    assert found["details"]["first_bad"] == f"{path.name} line {last_good['seq'] + 3}"
    assert found["seq"] == last_good["seq"] + 3
    assert found["prev_hash"] == last_good["hash"]


def test_the_break_is_written_once_though_also_logged(
    tmp_path: Path, key: Ed25519PrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    crash_after(tmp_path, key, 7)
    with open_log(tmp_path, key) as log:
        # the forwarder hands the process log's copy back: it is not written again
        log.record(BREAK, category="audit", outcome="failure", details={"reason": "copy"})
    assert [e["event"] for e in read_log(tmp_path / "plant")].count(BREAK) == 1
    assert BREAK in capsys.readouterr().out


def test_a_stolen_epoch_key_cannot_sign_before_its_epoch(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key, epoch_s=0.0) as log:  # a new epoch at every checkpoint
        record_many(log, 12)
    stolen = serialization.load_pem_private_key(
        (tmp_path / "plant" / epochs.KEY_FILE).read_bytes(), password=None
    )
    assert isinstance(stolen, Ed25519PrivateKey)
    chain, problem = epochs.read_chain(tmp_path / "plant", key.public_key())
    assert problem is None and len(chain) >= 3
    current = chain[-1]
    assert current.keyid == epochs.key_for(chain, 10**9).keyid  # type: ignore[union-attr]
    for entry in read_log(tmp_path / "plant"):
        if entry["seq"] >= current.from_seq:
            continue
        epoch = epochs.key_for(chain, entry["seq"])
        assert epoch is not None and epoch.keyid != current.keyid
        for number in (epoch.number, current.number):
            details = {
                "appliance": APPLIANCE,
                "covers_seq": entry["seq"] - 1,
                "head": entry["prev_hash"],
                "epoch": number,
                "keyid": current.keyid,
                "reason": "time",
            }
            message = checkpoint_message("plant", details)
            signature = stolen.sign(message)
            assert not verifies(epoch.key, signature, message)  # the only key valid there
    # The chain cannot be extended backwards either: a certificate by the stolen key for an
    # earlier from_seq is refused.
    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    key_b64 = base64.b64encode(raw).decode()
    line = {
        "epoch": current.number + 1,
        "from_seq": 2,
        "key": key_b64,
        "certified_by": current.keyid,
        "appliance": APPLIANCE,
        "writer": "plant",
        "signature": base64.b64encode(
            stolen.sign(
                epochs.certificate_message(APPLIANCE, "plant", current.number + 1, 2, key_b64)
            )
        ).decode(),
    }
    with (tmp_path / "plant" / epochs.CHAIN_FILE).open("ab") as f:
        f.write(epochs.canonical(line) + b"\n")
    _, problem = epochs.read_chain(tmp_path / "plant", key.public_key())
    assert problem is not None and "from_seq 2 goes back" in problem


def test_a_lost_epoch_key_gives_a_break_and_a_root_certified_epoch(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key) as log:
        record_many(log, 3)
    (tmp_path / "plant" / epochs.KEY_FILE).unlink()
    with open_log(tmp_path, key):
        pass
    found = started_break(tmp_path)
    assert "epoch.key: missing" in found["details"]["reason"]
    assert "a new epoch certified by the root key" in found["details"]["reason"]
    assert found["details"]["unadopted"] is None
    chain, problem = epochs.read_chain(tmp_path / "plant", key.public_key())
    assert problem is None
    assert chain[-1].root_certified and chain[-1].from_seq == found["seq"]


def test_a_writer_with_its_epoch_key_needs_no_root_private_key(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key):
        pass

    def unavailable() -> Ed25519PrivateKey:
        raise ConfigError("/etc/dmzbroker/audit.key: key file not found")

    offline = epochs.RootKey(key.public_key(), unavailable)
    with open_log(tmp_path, offline) as log:
        record_many(log, 2)
    assert BREAK not in {e["event"] for e in read_log(tmp_path / "plant")}
    (tmp_path / "plant" / epochs.KEY_FILE).unlink()
    with pytest.raises(ConfigError, match=r"epoch.key: missing: .*audit.key: key file not found"):
        open_log(tmp_path, offline)
    with pytest.raises(ConfigError, match="first start"):
        open_log(tmp_path / "fresh", offline)


def test_open_reads_the_root_public_key_from_audit_pub_beside_audit_key(tmp_path: Path) -> None:
    from broker.trust.keys import generate_pair  # noqa: PLC0415

    made = generate_pair(tmp_path, "audit", passphrase=None)
    root = epochs.RootKey.from_files(made.private)
    with AuditLog(tmp_path / "audit", "plant", APPLIANCE, root):
        pass
    made.private.unlink()  # taken off the appliance
    root = epochs.RootKey.from_files(made.private)
    with AuditLog(tmp_path / "audit", "plant", APPLIANCE, root):
        pass
    (tmp_path / "audit" / "plant" / epochs.KEY_FILE).unlink()
    with pytest.raises(ConfigError, match=r"audit\.key: key file not found.*put it back"):
        AuditLog(tmp_path / "audit", "plant", APPLIANCE, root)


def test_adopted_seq_is_the_last_checkpoint_recovery_found_valid(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key) as log:
        assert log.adopted_seq == 0  # a new log
        record_many(log, 7)
    stop = read_log(tmp_path / "plant")[-1]
    assert stop["details"]["reason"] == "stop"
    with open_log(tmp_path, key) as log:
        assert log.adopted_seq == stop["seq"]  # the log ended with it: adopted
        assert log.chain_break is None
    last_good = crash_after(tmp_path, key, 8)
    with open_log(tmp_path, key) as log:
        assert log.chain_break is not None
        assert log.adopted_seq == last_good["seq"] == log.chain_break["last_good_seq"]


def test_a_torn_last_certificate_line_is_an_interrupted_epoch_change_not_a_break(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """A crash while appending a certificate leaves half a line; the old epoch key is still
    the certified one, so the next start drops the torn line (kept in epochs.rejected)."""
    log = open_log(tmp_path, key)
    record_many(log, 3)
    log.checkpoint()  # the log ends sealed, as it does when an epoch change starts
    folder = tmp_path / "plant"
    whole = (folder / epochs.CHAIN_FILE).read_bytes()
    torn = whole.splitlines()[-1][:40]
    with (folder / epochs.CHAIN_FILE).open("ab") as chain:
        chain.write(torn)
    abandon(folder)
    with open_log(tmp_path, key) as log:
        assert log.chain_break is None
        record_many(log, 1)
    assert BREAK not in {e["event"] for e in read_log(folder)}
    assert torn in (folder / epochs.REJECTED_FILE).read_bytes()
    chain, problem = epochs.read_chain(folder, key.public_key())
    assert problem is None and len(chain) == 2


def test_a_precreated_world_readable_epoch_key_next_never_receives_a_key(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    log = open_log(tmp_path, key, epoch_s=0.0)
    folder = tmp_path / "plant"
    planted = folder / epochs.NEXT_KEY_FILE
    planted.touch()
    planted.chmod(0o666)
    watcher = planted.open("rb")  # the attacker keeps it open, to read what comes
    try:
        record_many(log, 2)
        log.checkpoint()  # an epoch change
        assert watcher.read() == b""  # the key went into a file of its own
    finally:
        watcher.close()
    mode = (folder / epochs.KEY_FILE).stat().st_mode & 0o777
    assert mode == 0o600
    log.close()


def test_an_epoch_key_readable_by_others_is_not_used(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key) as log:
        record_many(log, 2)
    folder = tmp_path / "plant"
    (folder / epochs.KEY_FILE).chmod(0o644)
    with open_log(tmp_path, key) as log:
        assert log.chain_break is not None
        assert "mode 0644" in log.chain_break["reason"]
        assert "certified by the root key" in log.chain_break["reason"]
    chain, problem = epochs.read_chain(folder, key.public_key())
    assert problem is None and chain[-1].root_certified


def test_an_empty_key_chain_without_segments_is_a_first_start(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """As a first start that found the disk full leaves it (advance cut the chain back)."""
    folder = tmp_path / "plant"
    folder.mkdir()
    (folder / epochs.CHAIN_FILE).write_bytes(b"")
    with open_log(tmp_path, key) as log:
        assert log.chain_break is None
        record_many(log, 1)
    assert read_log(folder)[0]["details"]["reason"] == "start"


def test_an_empty_key_chain_beside_segments_is_a_break(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with open_log(tmp_path, key) as log:
        record_many(log, 2)
    folder = tmp_path / "plant"
    (folder / epochs.CHAIN_FILE).write_bytes(b"")
    with open_log(tmp_path, key) as log:
        assert log.chain_break is not None
        assert "no certified epoch" in log.chain_break["reason"]


@pytest.mark.parametrize("hostile", ["fifo", "directory", "symlink", "huge"])
def test_a_segment_that_cannot_be_read_is_a_break_not_a_refusal(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    hostile: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with open_log(tmp_path, key) as log:
        record_many(log, 3)
    folder = tmp_path / "plant"
    planted = folder / "0000000009.jsonl"
    if hostile == "fifo":
        os.mkfifo(planted)  # a blocking read would hang the start forever
    elif hostile == "directory":
        planted.mkdir()
    elif hostile == "symlink":
        planted.symlink_to("/dev/zero")
    else:
        limit = segments(folder)[0].stat().st_size  # the real segment is still read
        monkeypatch.setattr(segments_module, "MAX_SEGMENT_BYTES", limit)
        planted.write_bytes(b"x" * (limit + 1))
    with open_log(tmp_path, key) as log:
        assert log.chain_break is not None
        assert "cannot read 0000000009.jsonl" in log.chain_break["reason"]
        assert log.chain_break["first_bad"] == "0000000009.jsonl line 1"
        record_many(log, 1)
    assert [p.name for p in segments(folder)][-1] == "0000000010.jsonl"


@pytest.mark.parametrize("name", [epochs.KEY_FILE, epochs.CHAIN_FILE])
def test_a_key_file_linked_to_dev_zero_is_never_read(
    tmp_path: Path, key: Ed25519PrivateKey, name: str
) -> None:
    with open_log(tmp_path, key) as log:
        record_many(log, 2)
    target = tmp_path / "plant" / name
    target.unlink()
    target.symlink_to("/dev/zero")
    with open_log(tmp_path, key) as log:
        assert log.chain_break is not None
        assert f"{name}: cannot read" in log.chain_break["reason"]
    assert not target.is_symlink()  # replaced by the new epoch's file
