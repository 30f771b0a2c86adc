"""`certs list|revoke|crl|check` through the real CLI, on a CA of the test's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.harness import dmzbroker


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    dmzbroker("certs", "init-ca", "--out", str(tmp_path), "--name", "Site CA")
    for name, days in (("historian", "90"), ("soon", "10")):
        dmzbroker("certs", "issue", "client", "--ca", str(tmp_path), "--out", str(tmp_path),
                  "--uri", f"spiffe://site/consumer/{name}", "--days", days)  # fmt: skip
    return tmp_path


def serial_of(ca: Path, name: str) -> str:
    return f"{x509.load_pem_x509_certificate((ca / f'{name}.crt').read_bytes()).serial_number:x}"


def test_list_shows_every_issued_certificate_with_days_left(ca: Path) -> None:
    out = dmzbroker("certs", "list", "--ca", str(ca)).stdout
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {serial_of(ca, "historian"), serial_of(ca, "soon")}
    assert (
        " 10 " in rows[serial_of(ca, "soon")]
        and "spiffe://site/consumer/soon" in rows[serial_of(ca, "soon")]
    )


def test_a_revoked_certificate_is_listed_and_in_the_crl(ca: Path) -> None:
    serial = serial_of(ca, "historian")
    dmzbroker("certs", "revoke", serial, "--reason", "key_compromise", "--ca", str(ca))
    assert "key_compromise" in dmzbroker("certs", "list", "--ca", str(ca)).stdout
    dmzbroker("certs", "crl", "--ca", str(ca), "--days", "7")
    crl = x509.load_pem_x509_crl((ca / "crl.pem").read_bytes())
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    assert [f"{r.serial_number:x}" for r in crl] == [serial]
    assert crl.next_update_utc is not None


def test_revoking_a_serial_this_ca_never_issued_is_refused(ca: Path) -> None:
    result = dmzbroker(
        "certs", "revoke", "abc123", "--reason", "superseded", "--ca", str(ca), check=False
    )
    assert result.returncode == 2 and "did not issue it" in result.stderr


def test_check_warns_on_a_certificate_ending_within_30_days_and_a_stale_crl(ca: Path) -> None:
    dmzbroker("certs", "crl", "--ca", str(ca), "--days", "7")
    result = dmzbroker("certs", "check", "--ca", str(ca), check=False)
    assert result.returncode == 1
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and serial_of(ca, "soon") in warnings[0]

    dmzbroker("certs", "revoke", serial_of(ca, "soon"), "--reason", "superseded", "--ca", str(ca))
    dmzbroker("certs", "crl", "--ca", str(ca), "--days", "0")  # nextUpdate = now: stale at once
    result = dmzbroker("certs", "check", "--ca", str(ca), check=False)
    assert result.returncode == 1
    assert "past its nextUpdate" in result.stdout and serial_of(ca, "soon") not in result.stdout


def test_a_server_certificate_may_not_live_longer_than_366_days(tmp_path: Path) -> None:
    dmzbroker("certs", "init-ca", "--out", str(tmp_path), "--name", "CA")
    result = dmzbroker("certs", "issue", "server", "--ca", str(tmp_path), "--out", str(tmp_path),
                       "--dns", "localhost", "--days", "400", check=False)  # fmt: skip
    assert result.returncode == 2 and "366 days at most" in result.stderr


def test_the_opc_ua_application_certificate_has_what_opc_ua_requires(tmp_path: Path) -> None:
    dmzbroker("certs", "init-ca", "--out", str(tmp_path), "--name", "Plant CA")
    out = dmzbroker("certs", "issue", "opcua", "--ca", str(tmp_path), "--out", str(tmp_path),
                    "--uri", "urn:coldstore:dmzbroker", "--dns", "dmz-plant").stdout  # fmt: skip
    cert_path, key_path = tmp_path / "opcua-client-cert.pem", tmp_path / "opcua-client-key.pem"
    assert str(cert_path) in out and key_path.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert isinstance(load_pem_private_key(key_path.read_bytes(), None), rsa.RSAPrivateKey)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:coldstore:dmzbroker"]
    assert sans.get_values_for_type(x509.DNSName) == ["dmz-plant"]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.content_commitment
    assert usage.key_encipherment and usage.data_encipherment
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert f"{cert.serial_number:x}" in dmzbroker("certs", "list", "--ca", str(tmp_path)).stdout
