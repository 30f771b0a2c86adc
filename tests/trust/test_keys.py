"""Owner signing keys: Ed25519 files, optional passphrase, key ids of the raw public key."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.errors import TrustError
from broker.trust import keys

MESSAGE = b"DSSEv1 4 test 5 hello"


def _public_from_file(path: Path) -> Ed25519PublicKey:
    return keys.parse_public_pem(path.read_text(), str(path))


def test_unencrypted_key_round_trips_and_signs_for_its_public_key(tmp_path: Path) -> None:
    generated = keys.generate(tmp_path, "Jane Doe", "ot", None)
    loaded = keys.load_private(generated.private, None)
    signature = loaded.sign(MESSAGE)
    assert keys.verifies(_public_from_file(generated.public), signature, MESSAGE)
    assert keys.key_id(loaded.public_key()) == generated.keyid


def test_encrypted_key_round_trips_with_its_passphrase(tmp_path: Path) -> None:
    generated = keys.generate(tmp_path, "Jane Doe", "it", b"s3cret phrase")
    loaded = keys.load_private(generated.private, b"s3cret phrase")
    signature = loaded.sign(MESSAGE)
    assert keys.verifies(_public_from_file(generated.public), signature, MESSAGE)
    assert keys.key_id(loaded.public_key()) == generated.keyid


def test_encrypted_key_without_passphrase_is_refused(tmp_path: Path) -> None:
    generated = keys.generate(tmp_path, "Jane Doe", "ot", b"s3cret phrase")
    with pytest.raises(TrustError, match="passphrase"):
        keys.load_private(generated.private, None)


def test_encrypted_key_with_wrong_passphrase_is_refused(tmp_path: Path) -> None:
    generated = keys.generate(tmp_path, "Jane Doe", "ot", b"s3cret phrase")
    with pytest.raises(TrustError):
        keys.load_private(generated.private, b"another phrase")


def test_unencrypted_key_given_a_passphrase_is_refused(tmp_path: Path) -> None:
    generated = keys.generate(tmp_path, "Jane Doe", "ot", None)
    with pytest.raises(TrustError, match="not passphrase-protected"):
        keys.load_private(generated.private, b"s3cret phrase")


def test_key_id_is_sha256_of_the_raw_public_key() -> None:
    public = Ed25519PrivateKey.generate().public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert keys.key_id(public) == hashlib.sha256(raw).hexdigest()


def test_key_id_is_the_same_from_the_private_key_and_from_the_public_pem() -> None:
    private = Ed25519PrivateKey.generate()
    reparsed = keys.parse_public_pem(keys.public_pem(private.public_key()), "test")
    assert keys.key_id(private.public_key()) == keys.key_id(reparsed)
    assert keys.key_id(reparsed) == keys.key_id(reparsed)


def test_different_keys_have_different_key_ids() -> None:
    first, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    assert keys.key_id(first.public_key()) != keys.key_id(second.public_key())


def test_verifies_is_false_for_a_signature_over_other_bytes() -> None:
    private = Ed25519PrivateKey.generate()
    signature = private.sign(b"other bytes")
    assert keys.verifies(private.public_key(), signature, b"other bytes")
    assert not keys.verifies(private.public_key(), signature, MESSAGE)


def test_verifies_is_false_for_another_keys_signature() -> None:
    signature = Ed25519PrivateKey.generate().sign(MESSAGE)
    assert not keys.verifies(Ed25519PrivateKey.generate().public_key(), signature, MESSAGE)


def test_generated_private_key_file_has_mode_0600(tmp_path: Path) -> None:
    generated = keys.generate(tmp_path, "Jane Doe", "ot", None)
    assert generated.private.stat().st_mode & 0o777 == 0o600


def test_generate_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    first = keys.generate(tmp_path, "Jane Doe", "ot", None)
    before = first.private.read_bytes()
    with pytest.raises(TrustError, match="already exists"):
        keys.generate(tmp_path, "Jane Doe", "ot", None)
    assert first.private.read_bytes() == before


# --- what load_private says about a file that is not the private key ------------------------


def test_a_public_key_is_named_with_the_private_key_beside_it(tmp_path: Path) -> None:
    generated = keys.generate(tmp_path, "Jane Doe", "ot", None)
    with pytest.raises(TrustError) as refused:
        keys.load_private(generated.public, None)
    assert str(refused.value) == (
        f"{generated.public}: a public key, which cannot sign; "
        f"sign with its private key {generated.private}"
    )


def test_an_encrypted_key_asks_only_when_no_passphrase_is_given(tmp_path: Path) -> None:
    generated = keys.generate(tmp_path, "Jane Doe", "ot", b"s3cret phrase")
    asked: list[bool] = []

    def ask() -> bytes:
        asked.append(True)
        return b"s3cret phrase"

    loaded = keys.load_private(generated.private, None, ask=ask)
    assert keys.key_id(loaded.public_key()) == generated.keyid
    assert asked == [True]
    plain = keys.generate(tmp_path, "Jim Doe", "ot", None)
    keys.load_private(plain.private, None, ask=ask)
    assert asked == [True]  # a key without a passphrase is never asked for one


def test_a_wrong_passphrase_is_named_not_confused_with_a_broken_file(tmp_path: Path) -> None:
    generated = keys.generate(tmp_path, "Jane Doe", "ot", b"s3cret phrase")
    with pytest.raises(TrustError, match="wrong passphrase: the one given does not decrypt"):
        keys.load_private(generated.private, b"another phrase")


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"deployment_id: site-1\n", "not a key: no PEM private key in it"),
        (b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI jane@host\n", "an OpenSSH public key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "a damaged"),
        (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "a revocation list"),
        (b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
         "an OpenSSH private key"),
        (b"-" * (keys.MAX_KEY_BYTES + 1), "over 65536 bytes: not a key"),
    ],
)  # fmt: skip
def test_a_file_that_is_not_a_key_says_what_it_is(
    tmp_path: Path, content: bytes, said: str
) -> None:
    path = tmp_path / "owner.key"
    path.write_bytes(content)
    with pytest.raises(TrustError) as refused:
        keys.load_private(path, None)
    assert str(refused.value).startswith(f"{path}: {said}")
    assert "passphrase" not in str(refused.value)


def test_a_folder_and_a_missing_file_are_named(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="a folder, not a key file"):
        keys.load_private(tmp_path, None)
    with pytest.raises(TrustError, match="key file not found"):
        keys.load_private(tmp_path / "missing.key", None)


def test_generate_at_writes_the_public_key_beside_the_private_one(tmp_path: Path) -> None:
    generated = keys.generate_at(tmp_path / "audit.key", None)
    assert generated.public == tmp_path / "audit.pub"
    loaded = keys.load_private(generated.private, None)
    assert keys.key_id(_public_from_file(generated.public)) == keys.key_id(loaded.public_key())
    assert generated.private.stat().st_mode & 0o777 == 0o600


def test_a_private_key_given_for_a_public_one_says_so(tmp_path: Path) -> None:
    generated = keys.generate_at(tmp_path / "audit.key", None)
    with pytest.raises(TrustError, match="a private key where its public key is meant; give"):
        keys.parse_public_pem(generated.private.read_text(), str(generated.private))


# --- key files are made new, never through a link (review L4) --------------------------------


@pytest.mark.parametrize("linked", ["audit.key", "audit.pub"])
@pytest.mark.parametrize("dangling", [True, False])
def test_generate_at_never_writes_through_a_link(
    tmp_path: Path, linked: str, dangling: bool
) -> None:
    target = tmp_path / "target"
    if not dangling:
        target.write_text("left alone\n")
    (tmp_path / linked).symlink_to(target)
    with pytest.raises(TrustError) as refused:
        keys.generate_at(tmp_path / "audit.key", None)
    assert str(refused.value) == (
        f"{tmp_path / linked}: a symbolic link; not writing a key through it (choose another --out)"
    )
    assert target.exists() is not dangling
    assert dangling or target.read_text() == "left alone\n"
    assert sorted(tmp_path.iterdir()) == sorted({tmp_path / linked, *[target][: not dangling]})


def test_a_link_planted_after_the_check_is_not_written_through_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private, target = tmp_path / "audit.key", tmp_path / "target.pub"
    write_new = keys._write_new

    def plant_then_write(path: Path, data: bytes, mode: int) -> None:
        if path.suffix == ".pub":  # a race a real attacker wins: the link appears in between
            path.symlink_to(target)
        write_new(path, data, mode)

    monkeypatch.setattr(keys, "_write_new", plant_then_write)
    with pytest.raises(TrustError, match=r"audit\.pub: a symbolic link; not writing a key"):
        keys.generate_at(private, None)
    assert not target.exists()
    assert not private.exists()  # the half-made pair is removed: a retry can succeed


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_the_private_key_is_0600_and_the_public_key_0644_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    old = os.umask(umask)
    try:
        generated = keys.generate_at(tmp_path / "audit.key", None)
    finally:
        os.umask(old)
    assert generated.private.stat().st_mode & 0o777 == 0o600
    assert generated.public.stat().st_mode & 0o777 == 0o644


# --- a folder or a FIFO given as the key (review L5) -----------------------------------------


def test_the_folder_hint_names_a_real_key_file_with_a_printable_name(tmp_path: Path) -> None:
    (tmp_path / "a-dangling.key").symlink_to(tmp_path / "nowhere")
    (tmp_path / "b-link.key").symlink_to(tmp_path / "d-real.key")
    (tmp_path / "c-\x1b[31m\nFAKE.key").write_text("x")
    (tmp_path / "c-folder.key").mkdir()
    (tmp_path / "d-real.key").write_text("x")
    with pytest.raises(TrustError) as refused:
        keys.load_private(tmp_path, None)
    assert str(refused.value) == (
        f"{tmp_path}: a folder, not a key file; name the .key file, e.g. {tmp_path}/d-real.key"
    )


def test_a_folder_with_no_key_file_to_name_gives_no_example(tmp_path: Path) -> None:
    (tmp_path / "a.key").symlink_to(tmp_path / "nowhere")
    (tmp_path / "b\x07.key").write_text("x")
    with pytest.raises(TrustError) as refused:
        keys.load_private(tmp_path, None)
    assert str(refused.value) == f"{tmp_path}: a folder, not a key file; name the .key file"


def test_a_fifo_in_place_of_the_key_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "owner.key"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            keys.load_private(fifo, None)
        except BaseException as e:  # handed to the test thread
            outcome.append(e)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # blocked in open(): a writer end lets it go, then fail
        with open(fifo, "wb"):
            pass
        worker.join(timeout=10)
        pytest.fail("load_private blocked on a FIFO")
    assert [str(e) for e in outcome] == [
        f"{fifo}: not a regular file; give the .key file that `dmzbroker keys generate` "
        "(or `audit keygen`) wrote"
    ]
