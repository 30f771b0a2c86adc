"""Owners' signing keys: Ed25519, private key 0600 and optionally passphrase-encrypted.

A key id is the SHA-256 (hex) of the raw 32-byte public key, so it can be recomputed from
the public key alone and never has to be trusted as given.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
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
    """Write `<stem>.key` (private, 0600, encrypted if a passphrase is given) and `.pub`."""
    private, public = out / f"{stem}.key", out / f"{stem}.pub"
    for path in (private, public):
        if path.exists():
            raise TrustError(f"{path}: already exists; choose another --name or --out")
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    out.mkdir(parents=True, exist_ok=True)
    write_secret(private, private_pem)
    public.write_text(public_pem(key.public_key()))
    return GeneratedKey(private, public, key_id(key.public_key()))


def load_private(path: Path, passphrase: bytes | None) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise TrustError(f"{path}: key file not found") from e
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as e:  # encrypted but no passphrase given, or the reverse
        hint = (
            "it is not passphrase-protected; drop --passphrase-file"
            if passphrase
            else "it is passphrase-protected; give --passphrase-file"
        )
        raise TrustError(f"{path}: {hint}") from e
    except ValueError as e:
        raise TrustError(f"{path}: cannot load the key (wrong passphrase or not a PEM key)") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustError(f"{path}: not an Ed25519 private key")
    return key


def write_secret(path: Path, data: bytes) -> None:
    """Create a file only its owner can read, without a moment of wider permissions."""
    old_umask = os.umask(0o077)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    finally:
        os.umask(old_umask)
