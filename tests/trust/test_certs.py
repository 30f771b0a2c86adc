"""`dmzbroker certs` as an OPC UA commissioning engineer uses it: the CA's key type and the
signature algorithm of what it signs, the DER copies OPC UA trust stores take, and a `--help`
that names the files the command really writes. Through the real CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from tests.harness import REPO, dmzbroker

URI = "urn:site:dmzbroker"


def ca(root: Path, *key_type: str) -> Path:
    out = root / "ca"
    dmzbroker("certs", "init-ca", "--out", str(out), "--name", "site CA", *key_type)
    return out


def certificate(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if path.suffix == ".der":
        return x509.load_der_x509_certificate(data)
    return x509.load_pem_x509_certificate(data)


def test_the_default_ca_is_still_ecdsa_and_without_der_only_pem_is_written(
    tmp_path: Path,
) -> None:
    authority = ca(tmp_path)
    key = serialization.load_pem_private_key((authority / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    out = tmp_path / "out"
    dmzbroker("certs", "issue", "opcua", "--ca", str(authority), "--out", str(out), "--uri", URI)
    dmzbroker("certs", "crl", "--ca", str(authority))
    issued = certificate(out / "opcua-client-cert.pem")
    assert issued.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert sorted(p.name for p in out.iterdir()) == [
        "opcua-client-cert.pem",
        "opcua-client-key.pem",
    ]
    assert not (authority / "crl.der").exists()


def test_an_rsa_ca_signs_certificates_and_crls_with_sha256_rsa(tmp_path: Path) -> None:
    authority = ca(tmp_path, "--key-type", "rsa")
    key = serialization.load_pem_private_key((authority / "ca.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072
    assert (authority / "ca.key").stat().st_mode & 0o077 == 0
    out = tmp_path / "out"
    done = dmzbroker("certs", "issue", "opcua", "--ca", str(authority), "--out", str(out),
                     "--uri", URI, "--der")  # fmt: skip
    root = certificate(authority / "ca.crt")
    leaf = certificate(out / "opcua-client-cert.pem")
    for signed in (root, leaf):
        assert signed.signature_algorithm_oid == SignatureAlgorithmOID.RSA_WITH_SHA256
    leaf.verify_directly_issued_by(root)  # raises if the signature does not verify
    # The DER copies are the same certificates, and the report names every file written.
    assert certificate(out / "opcua-client-cert.der") == leaf
    assert certificate(out / "ca.der") == root
    assert sorted(p.name for p in out.iterdir()) == [
        "ca.der", "opcua-client-cert.der", "opcua-client-cert.pem", "opcua-client-key.pem",
    ]  # fmt: skip
    for name in (
        "ca.der",
        "opcua-client-cert.der",
        "opcua-client-cert.pem",
        "opcua-client-key.pem",
    ):
        assert str(out / name) in done.stdout, done.stdout
    # ECDSA leaves for TLS from the same CA verify too.
    dmzbroker("certs", "issue", "server", "--ca", str(authority), "--out", str(out),
              "--dns", "localhost")  # fmt: skip
    certificate(out / "server.crt").verify_directly_issued_by(root)

    serial = f"{leaf.serial_number:x}"
    dmzbroker("certs", "revoke", serial, "--reason", "key_compromise", "--ca", str(authority))
    done = dmzbroker("certs", "crl", "--ca", str(authority), "--der")
    assert f"CRL (DER): {authority / 'crl.der'}" in done.stdout
    pem = x509.load_pem_x509_crl((authority / "crl.pem").read_bytes())
    der = x509.load_der_x509_crl((authority / "crl.der").read_bytes())
    assert pem == der
    assert der.signature_algorithm_oid == SignatureAlgorithmOID.RSA_WITH_SHA256
    assert der.is_signature_valid(root.public_key())
    assert der.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None


def test_a_der_crl_never_overwrites_its_pem(tmp_path: Path) -> None:
    authority = ca(tmp_path)
    done = dmzbroker("certs", "crl", "--ca", str(authority), "--der", "--out",
                     str(tmp_path / "crl.der"), check=False)  # fmt: skip
    assert done.returncode == 2 and "name the PEM file" in done.stderr, done.stderr
    assert not (tmp_path / "crl.der").exists() and not (authority / "crl-number").exists()


def test_an_unknown_key_type_is_refused(tmp_path: Path) -> None:
    done = dmzbroker("certs", "init-ca", "--out", str(tmp_path / "ca"), "--name", "x",
                     "--key-type", "dsa", check=False)  # fmt: skip
    assert done.returncode == 2 and "invalid choice: 'dsa'" in done.stderr
    assert not (tmp_path / "ca").exists()


def test_issue_opcua_help_names_every_file_it_writes(tmp_path: Path) -> None:
    authority = ca(tmp_path)
    out = tmp_path / "out"
    dmzbroker("certs", "issue", "opcua", "--ca", str(authority), "--out", str(out), "--uri", URI,
              "--name", "plc-reader", "--der")  # fmt: skip
    env = {**os.environ, "COLUMNS": "400"}  # one line per option: file names unbroken
    shown = subprocess.run(
        [sys.executable, "-m", "broker", "certs", "issue", "opcua", "--help"],
        capture_output=True, text=True, check=True, cwd=REPO, env=env,
    ).stdout  # fmt: skip
    named = set(re.findall(r"\b(?:NAME-)?[a-z-]*\.(?:pem|der|crt|key)\b", shown))
    written = {p.name.replace("plc-reader", "NAME") for p in out.iterdir()}
    assert written <= named, (written, shown)
    assert "NAME.crt" not in shown and "NAME.key" not in shown  # what it never writes
