"""The epoch key chain: certified from the root, each epoch by the one before; any edit,
reorder, removal, a non-root first certifier or a from_seq that goes back is refused by name;
an interrupted epoch change is finished or undone at the next start."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import epochs
from broker.audit.log import AuditLog
from broker.errors import ConfigError
from broker.trust import keys
from broker.trust.keys import key_id
from tests.harness import dmzbroker

NOBODY = 65534


@pytest.fixture
def root() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "plant"
    path.mkdir()
    return path


def build(folder: Path, root: Ed25519PrivateKey, starts: list[int]) -> list[Ed25519PrivateKey]:
    """A chain with epochs from these from_seqs, each certified by the one before; the keys."""
    chain: list[epochs.Epoch] = []
    made = []
    certifier = root
    for from_seq in starts:
        epoch, key = epochs.advance(folder, "site", chain, from_seq, certifier)
        chain.append(epoch)
        made.append(key)
        certifier = key
    return made


def lines(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (folder / epochs.CHAIN_FILE).read_text().splitlines()]


def write_lines(folder: Path, entries: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in entries)
    (folder / epochs.CHAIN_FILE).write_text(text)


def certificate(
    folder: Path, certifier: Ed25519PrivateKey, number: int, from_seq: int
) -> dict[str, Any]:
    """A certificate line made by hand (signed by `certifier`), as an attacker could."""
    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    key_b64 = base64.b64encode(raw).decode()
    message = epochs.certificate_message("site", folder.name, number, from_seq, key_b64)
    return {
        "epoch": number,
        "from_seq": from_seq,
        "key": key_b64,
        "certified_by": key_id(certifier.public_key()),
        "appliance": "site",
        "writer": folder.name,
        "signature": base64.b64encode(certifier.sign(message)).decode(),
    }


def test_a_chain_reads_back_verified_from_the_root(folder: Path, root: Ed25519PrivateKey) -> None:
    made = build(folder, root, [1, 10, 25])
    chain, problem = epochs.read_chain(folder, root.public_key())
    assert problem is None
    assert [(e.number, e.from_seq, e.line) for e in chain] == [(1, 1, 1), (2, 10, 2), (3, 25, 3)]
    assert [e.keyid for e in chain] == [key_id(k.public_key()) for k in made]
    assert [e.root_certified for e in chain] == [True, False, False]
    assert stat.S_IMODE((folder / epochs.KEY_FILE).stat().st_mode) == 0o600
    assert not (folder / epochs.NEXT_KEY_FILE).exists()
    key, why = epochs.current_key(folder, chain)
    assert key is not None and key_id(key.public_key()) == chain[-1].keyid, why


def test_key_for_picks_the_epoch_of_a_seq(folder: Path, root: Ed25519PrivateKey) -> None:
    build(folder, root, [3, 10, 25])
    chain, _ = epochs.read_chain(folder, root.public_key())
    assert epochs.key_for(chain, 2) is None  # before the first epoch: no key may sign it
    assert [epochs.key_for(chain, s).number for s in (3, 9, 10, 24, 25, 10**9)] == [  # type: ignore[union-attr]
        1,
        1,
        2,
        2,
        3,
        3,
    ]


def test_a_missing_chain_is_named(folder: Path, root: Ed25519PrivateKey) -> None:
    assert epochs.read_chain(folder, root.public_key()) == (
        [],
        "epochs.jsonl: missing (the key chain from audit.pub)",
    )


def test_a_first_epoch_not_certified_by_the_root_is_refused(
    folder: Path, root: Ed25519PrivateKey
) -> None:
    other = Ed25519PrivateKey.generate()
    write_lines(folder, [certificate(folder, other, 1, 1)])
    chain, problem = epochs.read_chain(folder, root.public_key())
    assert chain == []
    assert problem == "epochs.jsonl line 1: epoch 1 not certified by the root key (audit.pub)"


def test_a_later_epoch_certified_by_a_stranger_is_refused(
    folder: Path, root: Ed25519PrivateKey
) -> None:
    build(folder, root, [1, 10])
    write_lines(folder, [*lines(folder), certificate(folder, Ed25519PrivateKey.generate(), 3, 20)])
    chain, problem = epochs.read_chain(folder, root.public_key())
    assert len(chain) == 2
    assert problem == (
        "epochs.jsonl line 3: epoch 3 not certified by epoch 2's key or the root key (audit.pub)"
    )


def test_a_root_certified_epoch_starts_a_new_link(folder: Path, root: Ed25519PrivateKey) -> None:
    build(folder, root, [1, 10])
    write_lines(folder, [*lines(folder), certificate(folder, root, 3, 40)])
    chain, problem = epochs.read_chain(folder, root.public_key())
    assert problem is None
    assert [e.root_certified for e in chain] == [True, False, True]


def test_reordered_lines_are_refused(folder: Path, root: Ed25519PrivateKey) -> None:
    build(folder, root, [1, 10, 25])
    first, second, third = lines(folder)
    write_lines(folder, [first, third, second])
    chain, problem = epochs.read_chain(folder, root.public_key())
    assert len(chain) == 1
    assert problem == "epochs.jsonl line 2: epoch 3 where epoch 2 must come (reordered or removed)"


def test_a_removed_line_is_refused(folder: Path, root: Ed25519PrivateKey) -> None:
    build(folder, root, [1, 10, 25])
    first, _, third = lines(folder)
    write_lines(folder, [first, third])
    _, problem = epochs.read_chain(folder, root.public_key())
    assert problem == "epochs.jsonl line 2: epoch 3 where epoch 2 must come (reordered or removed)"


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("from_seq", 2, "not certified by epoch 1's key or the root key"),
        ("writer", "enterprise", "certifies writer 'enterprise', not 'plant'"),
        ("appliance", "other", "appliance 'other' differs from the earlier epochs'"),
        ("epoch", "2", "epoch and from_seq must be integers, the other fields text"),
        ("key", "!!", "key or signature is not base64"),
    ],
)
def test_an_edited_line_is_refused(
    folder: Path, root: Ed25519PrivateKey, field: str, value: object, problem: str
) -> None:
    build(folder, root, [1, 10])
    first, second = lines(folder)
    second[field] = value
    write_lines(folder, [first, second])
    chain, found = epochs.read_chain(folder, root.public_key())
    assert len(chain) == 1
    assert found is not None and found.startswith("epochs.jsonl line 2: ") and problem in found


def test_a_line_not_in_canonical_form_is_refused(folder: Path, root: Ed25519PrivateKey) -> None:
    build(folder, root, [1])
    path = folder / epochs.CHAIN_FILE
    path.write_text(json.dumps(lines(folder)[0], sort_keys=True) + "\n")  # spaces: same meaning
    assert epochs.read_chain(folder, root.public_key())[1] == (
        "epochs.jsonl line 1: not in canonical form (edited)"
    )


def test_a_from_seq_that_goes_back_is_refused(folder: Path, root: Ed25519PrivateKey) -> None:
    keys = build(folder, root, [1, 10])
    write_lines(folder, [*lines(folder), certificate(folder, keys[-1], 3, 10)])
    _, problem = epochs.read_chain(folder, root.public_key())
    assert problem == (
        "epochs.jsonl line 3: from_seq 10 goes back: it must be after epoch 2's from_seq 10"
    )


def test_a_torn_last_line_is_named_and_cut_off_into_the_rejected_file(
    folder: Path, root: Ed25519PrivateKey
) -> None:
    build(folder, root, [1, 10])
    path = folder / epochs.CHAIN_FILE
    with path.open("ab") as f:
        f.write(b'{"certified_by":"ab')
    chain, problem = epochs.read_chain(folder, root.public_key())
    assert len(chain) == 2 and problem == "epochs.jsonl line 3: incomplete (a torn write)"
    epochs.cut(folder, chain)
    assert epochs.read_chain(folder, root.public_key()) == (chain, None)
    assert (folder / epochs.REJECTED_FILE).read_bytes() == b'{"certified_by":"ab\n'


def test_an_interrupted_change_with_a_certified_next_key_is_finished(
    folder: Path, root: Ed25519PrivateKey
) -> None:
    build(folder, root, [1, 10])
    chain, _ = epochs.read_chain(folder, root.public_key())
    # The crash came after the certificate was appended, before the rename.
    (folder / epochs.KEY_FILE).rename(folder / epochs.NEXT_KEY_FILE)
    key, why = epochs.current_key(folder, chain)
    assert key is not None, why
    assert key_id(key.public_key()) == chain[-1].keyid
    assert not (folder / epochs.NEXT_KEY_FILE).exists()


def test_an_interrupted_change_without_a_certificate_is_undone(
    folder: Path, root: Ed25519PrivateKey
) -> None:
    build(folder, root, [1])
    chain, _ = epochs.read_chain(folder, root.public_key())
    before = (folder / epochs.KEY_FILE).read_bytes()
    # The crash came after the next key was written, before its certificate.
    (folder / epochs.NEXT_KEY_FILE).write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key, _ = epochs.current_key(folder, chain)
    assert key is not None and key_id(key.public_key()) == chain[-1].keyid
    assert not (folder / epochs.NEXT_KEY_FILE).exists()
    assert (folder / epochs.KEY_FILE).read_bytes() == before


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("delete", "epoch.key: missing"),
        ("garble", "epoch.key: not a PEM private key"),
        ("swap", "epoch.key: not the key of epoch 1 (epochs.jsonl line 1)"),
    ],
)
def test_a_lost_or_wrong_epoch_key_is_named(
    folder: Path, root: Ed25519PrivateKey, damage: str, why: str
) -> None:
    build(folder, root, [1])
    chain, _ = epochs.read_chain(folder, root.public_key())
    path = folder / epochs.KEY_FILE
    if damage == "delete":
        path.unlink()
    elif damage == "garble":
        path.write_text("not a key")
    else:
        other = folder.parent / folder.name / "plant"  # another writer folder named alike
        other.mkdir()
        build(other, root, [1])
        path.write_bytes((other / epochs.KEY_FILE).read_bytes())
    assert epochs.current_key(folder, chain) == (None, why)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a writer's files to another user needs root")
def test_an_enrolled_writer_starts_as_its_user_without_the_root_key_and_verifies_intact() -> None:
    """Review r1 #5: root certifies epoch 1 for the writer's user, so the writer never reads
    audit.key (root's alone, 0600); a writer never enrolled is told how to be."""
    with tempfile.TemporaryDirectory(prefix="dmzbroker-enroll-", dir="/tmp") as place:
        base = Path(place)
        base.chmod(0o755)  # the writer's user must reach its folder; not tmp_path (0700)
        made = keys.generate_pair(base, "audit", passphrase=None)
        (base / "audit").mkdir(mode=0o755)
        root = epochs.RootKey.from_files(made.private)
        writer = base / "audit" / "plant"
        writer.mkdir()
        os.chown(writer, NOBODY, NOBODY)
        assert epochs.enroll(writer, "site", root, (NOBODY, NOBODY)) is None
        assert epochs.enroll(writer, "site", root, (NOBODY, NOBODY)) == (
            "has a key chain (epochs.jsonl) already"
        )
        for name, mode in ((epochs.KEY_FILE, 0o600), (epochs.CHAIN_FILE, 0o640)):
            status = (writer / name).stat()
            assert (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) == (
                NOBODY, NOBODY, mode,
            )  # fmt: skip
        unenrolled = base / "audit" / "enterprise"
        unenrolled.mkdir()
        os.chown(unenrolled, NOBODY, NOBODY)

        os.setegid(NOBODY)
        os.seteuid(NOBODY)  # the writer's user: audit.key (root's, 0600) is unreadable now
        try:
            with pytest.raises(PermissionError):
                made.private.read_bytes()
            with AuditLog(
                base / "audit", "plant", "site", epochs.RootKey.from_files(made.private)
            ) as log:
                log.record("process_started", category="process", outcome="success")
            with pytest.raises(ConfigError) as refused:
                AuditLog(
                    base / "audit", "enterprise", "site", epochs.RootKey.from_files(made.private)
                )
        finally:
            os.seteuid(0)
            os.setegid(0)
        assert "this is the writer's first start" in str(refused.value)
        assert "Permission denied" in str(refused.value)
        assert "run `dmzbroker audit enroll --config FILE` as root" in str(refused.value)
        shutil.rmtree(unenrolled)

        verified = dmzbroker(
            "audit", "verify", str(base / "audit"), "--pubkey", str(made.public), check=False
        )
        assert verified.returncode == 0, verified.stdout
        assert "plant: INTACT" in verified.stdout
        assert verified.stdout.splitlines()[-1] == "INTACT"
