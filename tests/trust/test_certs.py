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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, SignatureAlgorithmOID

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
    ca_der = f"ca-{root.fingerprint(hashes.SHA256()).hex()[:8]}.der"  # named after the CA
    assert certificate(out / ca_der) == root
    assert sorted(p.name for p in out.iterdir()) == [
        ca_der, "opcua-client-cert.der", "opcua-client-cert.pem", "opcua-client-key.pem",
    ]  # fmt: skip
    for name in (
        ca_der,
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
    named = set(re.findall(r"\b(?:NAME-)?[a-zA-Z-]*\.(?:pem|der|crt|key)\b", shown))
    written = {
        re.sub(r"^ca-[0-9a-f]{8}\.der$", "ca-FINGERPRINT.der", p.name.replace("plc-reader", "NAME"))
        for p in out.iterdir()
    }
    assert written <= named, (written, shown)
    assert "NAME.crt" not in shown and "NAME.key" not in shown  # what it never writes


def test_der_copies_from_two_cas_in_one_folder_never_replace_each_other(tmp_path: Path) -> None:
    """The TLS CA and the OPC UA CA, or a second site's CA, issuing into one folder: each
    CA's DER copy has its own name, and a leaf's DER copy is never replaced."""
    first, second = ca(tmp_path / "one", "--key-type", "rsa"), ca(tmp_path / "two")
    out = tmp_path / "own"
    for authority, name in ((first, "plc-one"), (second, "plc-two")):
        dmzbroker("certs", "issue", "opcua", "--ca", str(authority), "--out", str(out),
                  "--uri", URI, "--name", name, "--der")  # fmt: skip
    copies = [certificate(p) for p in out.glob("ca-*.der")]
    roots = [certificate(first / "ca.crt"), certificate(second / "ca.crt")]
    assert len(copies) == 2 and set(copies) == set(roots)
    # A NAME-cert.der already there (its PEM moved away) is refused, and nothing written.
    (out / "plc-one-cert.pem").rename(tmp_path / "moved.pem")
    (out / "plc-one-key.pem").unlink()
    before = (out / "plc-one-cert.der").read_bytes()
    done = dmzbroker("certs", "issue", "opcua", "--ca", str(second), "--out", str(out),
                     "--uri", URI, "--name", "plc-one", "--der", check=False)  # fmt: skip
    assert done.returncode == 2 and "plc-one-cert.der: already exists" in done.stderr
    assert (out / "plc-one-cert.der").read_bytes() == before
    assert not (out / "plc-one-cert.pem").exists()


def test_a_ca_copy_of_other_content_under_the_ca_name_is_refused(tmp_path: Path) -> None:
    authority = ca(tmp_path)
    root = certificate(authority / "ca.crt")
    out = tmp_path / "own"
    out.mkdir()
    squatter = out / f"ca-{root.fingerprint(hashes.SHA256()).hex()[:8]}.der"
    squatter.write_bytes(b"someone else's file")
    done = dmzbroker("certs", "issue", "opcua", "--ca", str(authority), "--out", str(out),
                     "--uri", URI, "--der", check=False)  # fmt: skip
    assert done.returncode == 2 and "is not this CA's certificate" in done.stderr, done.stderr
    assert squatter.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in out.iterdir()) == [squatter.name]


def test_a_crl_replaces_only_its_own_earlier_output(tmp_path: Path) -> None:
    """`--out` names the PEM and the DER copy goes beside it with .der: neither may replace
    a certificate that happens to be there, or anything but a CRL; a CRL it renews."""
    authority = ca(tmp_path / "one")
    own = tmp_path / "own"
    dmzbroker("certs", "issue", "opcua", "--ca", str(authority), "--out", str(own), "--uri", URI,
              "--der")  # fmt: skip
    (own / "notes.der").write_text("not a CRL")
    kept = {p.name: p.read_bytes() for p in own.iterdir()}
    for target in ("opcua-client-cert.pem", "opcua-client-cert.der", "notes.der"):
        out = own / target.replace(".der", ".crl")  # a .der name is the copy of NAME.crl
        done = dmzbroker("certs", "crl", "--ca", str(authority), "--out", str(out), "--der",
                         check=False)  # fmt: skip
        assert done.returncode == 2 and "is not a CRL; not overwritten" in done.stderr, done.stderr
        assert {p.name: p.read_bytes() for p in own.iterdir()} == kept, target
    assert not (authority / "crl-number").exists()  # nothing was written
    for _ in range(2):  # its own CRL and DER copy: renewed, the copy named after --out
        done = dmzbroker("certs", "crl", "--ca", str(authority), "--out", str(own / "site.crl"),
                         "--der")  # fmt: skip
        assert f"CRL (DER): {own / 'site.der'}" in done.stdout
    assert (
        x509.load_der_x509_crl((own / "site.der").read_bytes())
        .extensions.get_extension_for_class(x509.CRLNumber)
        .value.crl_number
        == 2
    )


def test_an_opcua_server_certificate_names_its_uri_hosts_and_both_usages(tmp_path: Path) -> None:
    """What OPC UA clients check of a server: an RSA key, serverAuth (and clientAuth, as the
    specification's application instance certificate), the application URI and the endpoint
    URL's host among the SANs; the private key 0600."""
    authority = ca(tmp_path, "--key-type", "rsa")
    out = tmp_path / "out"
    done = dmzbroker("certs", "issue", "opcua-server", "--ca", str(authority), "--out", str(out),
                     "--uri", "urn:site:dmzbroker:mirror", "--dns", "mirror.example",
                     "--ip", "127.0.0.1", "--der")  # fmt: skip
    leaf = certificate(out / "opcua-server-cert.pem")
    assert str(out / "opcua-server-key.pem") in done.stdout
    assert (out / "opcua-server-key.pem").stat().st_mode & 0o077 == 0
    key = serialization.load_pem_private_key((out / "opcua-server-key.pem").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert key.public_key() == leaf.public_key()
    leaf.verify_directly_issued_by(certificate(authority / "ca.crt"))
    assert certificate(out / "opcua-server-cert.der") == leaf
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:site:dmzbroker:mirror"]
    assert sans.get_values_for_type(x509.DNSName) == ["mirror.example"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert key_usage.digital_signature and key_usage.content_commitment
    assert key_usage.key_encipherment and key_usage.data_encipherment
    assert not key_usage.key_cert_sign
    # The plant half's client certificate keeps clientAuth only.
    dmzbroker("certs", "issue", "opcua", "--ca", str(authority), "--out", str(out),
              "--uri", URI)  # fmt: skip
    client = certificate(out / "opcua-client-cert.pem")
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]


def test_an_opcua_server_certificate_without_a_host_or_with_a_bad_address_is_refused(
    tmp_path: Path,
) -> None:
    authority = ca(tmp_path, "--key-type", "rsa")
    out = tmp_path / "out"
    for hosts, said in (
        ((), "an OPC UA server certificate needs at least one --dns or --ip"),
        (("--ip", "mirror.example"), "--ip: "),
    ):
        done = dmzbroker("certs", "issue", "opcua-server", "--ca", str(authority),
                         "--out", str(out), "--uri", "urn:site:mirror", *hosts,
                         check=False)  # fmt: skip
        assert done.returncode == 2 and said in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_issue_opcua_server_help_names_every_file_it_writes(tmp_path: Path) -> None:
    authority = ca(tmp_path)
    out = tmp_path / "out"
    dmzbroker("certs", "issue", "opcua-server", "--ca", str(authority), "--out", str(out),
              "--uri", URI, "--dns", "localhost", "--name", "mirror", "--der")  # fmt: skip
    env = {**os.environ, "COLUMNS": "400"}
    shown = subprocess.run(
        [sys.executable, "-m", "broker", "certs", "issue", "opcua-server", "--help"],
        capture_output=True, text=True, check=True, cwd=REPO, env=env,
    ).stdout  # fmt: skip
    named = set(re.findall(r"\b(?:NAME-)?[a-zA-Z-]*\.(?:pem|der|crt|key)\b", shown))
    written = {
        re.sub(r"^ca-[0-9a-f]{8}\.der$", "ca-FINGERPRINT.der", p.name.replace("mirror", "NAME"))
        for p in out.iterdir()
    }
    assert written <= named, (written, shown)
    assert "--ip" in shown and "opcua-server" in shown
