"""Owners' signing keys: Ed25519, private key 0600 and optionally passphrase-encrypted.

A key id is the SHA-256 (hex) of the raw 32-byte public key, so it can be recomputed from
the public key alone and never has to be trusted as given. Key files are only ever created new:
never over an existing file, and never through a symbolic link (a link planted at the name would
put the key wherever it points). Reading a key never blocks on a FIFO put in its place.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.errors import TrustError

Role = Literal["ot", "it"]
ROLES: tuple[Role, ...] = ("ot", "it")


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def parse_public_pem(pem: str, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError as e:
        if _pem_label(pem.encode()) in ("PRIVATE KEY", "ENCRYPTED PRIVATE KEY"):
            raise TrustError(
                f"{where}: a private key where its public key is meant; give the .pub file"
            ) from e
        raise TrustError(f"{where}: not a PEM public key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise TrustError(f"{where}: not an Ed25519 public key")
    return key


def verifies(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class GeneratedKey:
    private: Path
    public: Path
    keyid: str


def generate(out: Path, name: str, role: Role, passphrase: bytes | None) -> GeneratedKey:
    """Write `<role>-<name>.key` (private, 0600) and `.pub` (public) for an owner."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{role}-{name}".lower()).strip("-")
    return generate_pair(out, slug, passphrase)


def generate_pair(out: Path, stem: str, passphrase: bytes | None) -> GeneratedKey:
    """Write `<stem>.key` and `<stem>.pub` in the folder `out`, made if missing."""
    out.mkdir(parents=True, exist_ok=True)
    return generate_at(out / f"{stem}.key", passphrase)


def generate_at(private: Path, passphrase: bytes | None) -> GeneratedKey:
    """Write the private key to `private` (0600, encrypted if a passphrase is given) and its
    public key beside it with the suffix `.pub`, where `audit.key`'s readers look for it."""
    public = private.with_suffix(".pub")
    if public == private:
        raise RuntimeError(f"{private}: the private key cannot be named .pub")
    for path in (private, public):
        if (there := _existing(path)) is not None:
            raise there
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    try:
        write_secret(private, private_pem)
    except OSError as e:  # made or linked there since the check above, or a read-only folder
        raise _cannot_create(private, e) from e
    try:
        _write_new(public, public_pem(key.public_key()).encode(), 0o644)
    except OSError as e:
        private.unlink()  # ours, made new just now: a retry must not find it
        raise _cannot_create(public, e) from e
    return GeneratedKey(private, public, key_id(key.public_key()))


def _existing(path: Path) -> TrustError | None:
    """Why a new key cannot be written at `path`, if something (even a dangling link) is there."""
    if path.is_symlink():
        return TrustError(
            f"{path}: a symbolic link; not writing a key through it (choose another --out)"
        )
    if os.path.lexists(path):
        return TrustError(f"{path}: already exists; not overwriting it (choose another --out)")
    return None


def _cannot_create(path: Path, error: OSError) -> TrustError:
    return _existing(path) or TrustError(f"{path}: cannot create it: {error.strerror}")


def load_private(
    path: Path, passphrase: bytes | None, ask: Callable[[], bytes | None] | None = None
) -> Ed25519PrivateKey:
    """The Ed25519 private key in `path`, decrypted with `passphrase`, else with what `ask()`
    returns when the key turns out to be encrypted. A refusal names the file and says what it
    is instead: missing, a folder, a public key or certificate, not a key, a wrong passphrase."""
    data = _read_key_file(path)
    label = _pem_label(data)
    if label is None or data.lstrip().startswith(b"ssh-"):
        what = "an OpenSSH public key" if data.lstrip().startswith(b"ssh-") else "not a key"
        raise TrustError(f"{path}: {what}: no PEM private key in it; {_WHICH_FILE}")
    if not label.endswith("PRIVATE KEY"):
        raise TrustError(f"{path}: {_not_private(path, label)}")
    encrypted = label == "ENCRYPTED PRIVATE KEY"
    if encrypted and passphrase is None and ask is not None:
        try:
            passphrase = ask()
        except TrustError as e:  # no terminal to ask on, or the answers differed
            raise TrustError(f"{path}: it is passphrase-protected: {e}") from e
    if encrypted and passphrase is None:
        raise TrustError(f"{path}: it is passphrase-protected; give --passphrase-file")
    if not encrypted and passphrase is not None:
        raise TrustError(f"{path}: it is not passphrase-protected; drop --passphrase-file")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except ValueError as e:
        problem = (
            "wrong passphrase: the one given does not decrypt this key"
            if encrypted
            else "an OpenSSH private key; dmzbroker reads PEM (PKCS#8) keys: " + _WHICH_FILE
            if label == "OPENSSH PRIVATE KEY"
            else f"a damaged or unsupported {label!r} block: cannot load it"
        )
        raise TrustError(f"{path}: {problem}") from e
    except (TypeError, UnsupportedAlgorithm) as e:  # e.g. an old-style encrypted PEM
        raise TrustError(f"{path}: cannot load the key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
        raise TrustError(f"{path}: the key is {kind}, not Ed25519; {_WHICH_FILE}")
    return key


# What to give instead, for a file that is not a private key made by this CLI.
_WHICH_FILE = "give the .key file that `dmzbroker keys generate` (or `audit keygen`) wrote"
_PUBLIC_LABELS = ("PUBLIC KEY", "CERTIFICATE", "X509 CRL", "CERTIFICATE REQUEST")
MAX_KEY_BYTES = 64 * 1024  # a PEM key is under 1 KiB: anything larger is not one


def _read_key_file(path: Path) -> bytes:
    # A key named on the command line may be a link (followed), but never a FIFO to wait on.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            data = b""
            if stat.S_ISREG(mode):
                with os.fdopen(fd, "rb", closefd=False) as file:
                    data = file.read(MAX_KEY_BYTES + 1)
        finally:
            os.close(fd)
    except FileNotFoundError as e:
        raise TrustError(f"{path}: key file not found") from e
    except OSError as e:
        raise TrustError(f"{path}: cannot read the key file: {e.strerror}") from e
    if stat.S_ISDIR(mode):
        example = next(iter(_key_files(path)), None)
        hint = f", e.g. {example}" if example is not None else ""
        raise TrustError(f"{path}: a folder, not a key file; name the .key file{hint}")
    if not stat.S_ISREG(mode):
        raise TrustError(f"{path}: not a regular file; {_WHICH_FILE}")
    if len(data) > MAX_KEY_BYTES:
        raise TrustError(f"{path}: over {MAX_KEY_BYTES} bytes: not a key; {_WHICH_FILE}")
    return data


def _key_files(folder: Path) -> list[Path]:
    """The `.key` files in `folder` worth naming: regular files (no links), printable names."""
    found = []
    for path in sorted(folder.glob("*.key")):
        try:
            regular = stat.S_ISREG(path.lstat().st_mode)
        except OSError:  # gone since the listing
            continue
        if regular and path.name.isprintable():
            found.append(path)
    return found


def _pem_label(data: bytes) -> str | None:
    """The label of the first PEM block (`PRIVATE KEY`, `PUBLIC KEY`, …), None if there is none."""
    found = re.search(rb"-----BEGIN ([A-Z0-9 ]+)-----", data)
    return found.group(1).decode() if found else None


def _not_private(path: Path, label: str) -> str:
    if not label.endswith(_PUBLIC_LABELS):
        return f"a PEM {label!r} block, not a private key; {_WHICH_FILE}"
    what = (
        "a public key"
        if "PUBLIC" in label
        else "a revocation list"
        if "CRL" in label
        else "a certificate"
    )
    private = path.with_suffix(".key")
    instead = (
        f"sign with its private key {private}"
        if path.suffix == ".pub" and private.is_file()
        else _WHICH_FILE
    )
    return f"{what}, which cannot sign; {instead}"


def write_secret(path: Path, data: bytes) -> None:
    """Create a file only its owner can read, without a moment of wider permissions."""
    old_umask = os.umask(0o077)
    try:
        _write_new(path, data, 0o600)
    finally:
        os.umask(old_umask)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` new with `mode`: FileExistsError if anything, even a dangling link, is
    there (O_EXCL never follows a link; O_NOFOLLOW says so once more)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        file.write(data)
