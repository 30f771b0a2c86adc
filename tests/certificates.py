"""Certificates our CLI refuses to make (expired, wrong key usage, no EKU, hostile subjects),
built with `cryptography` for tests that need them. Test helper only: never used by broker/."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Extension = tuple[x509.ExtensionType, bool]  # (extension, critical)


def localhost() -> Extension:
    return x509.SubjectAlternativeName([x509.DNSName("localhost")]), False


def certificate(
    directory: Path,
    name: str,
    extensions: Sequence[Extension],
    *,
    issuer: Path | None = None,
    common_name: str | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """`directory/name.crt` and `.key` (EC P-256) with exactly `extensions`, issued by the CA
    certificate `issuer` (its key beside it as .key) or self-signed; valid from 5 minutes ago
    for a day unless `start`/`end` say otherwise. The two paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or name)])
    issuer_name, signer = subject, key
    if issuer is not None:
        issuer_name = x509.load_pem_x509_certificate(issuer.read_bytes()).subject
        signer = serialization.load_pem_private_key(issuer.with_suffix(".key").read_bytes(), None)  # type: ignore[assignment]
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start or now - dt.timedelta(minutes=5))
        .not_valid_after(end or now + dt.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(
        builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file
