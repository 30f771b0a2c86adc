"""A small certificate authority for the appliance: a CA, server and client certificates.

Keys are ECDSA P-256, written with mode 0600 under a tight umask. Client certificates carry
exactly one URI SAN (the consumer's identity, e.g. spiffe://site/consumer/historian) and the
clientAuth extended key usage; server certificates carry DNS and IP SANs and serverAuth. OPC UA
application instance certificates (`issue_opcua`, `issue_opcua_server`) are RSA and carry the
application URI first.

A CA's key is ECDSA P-256 by default, or RSA (`--key-type rsa`): what it signs (certificates
and CRLs) is then sha256WithRSAEncryption (RSA-PKCS1v15-SHA256), the certificate signature
algorithm the OPC UA security profiles list; RSA-only OPC UA stacks refuse an ECDSA chain.
It never overwrites a CA, and never writes a private key other than through `write_secret`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import TrustError
from broker.trust.keys import write_secret

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
ISSUED = "issued"  # under the CA directory: a copy of every certificate it issued
SERVER_MAX_DAYS = 366  # what browsers and most TLS stacks accept for a server certificate
CA_KEY_TYPES = ("ecdsa", "rsa")
CA_RSA_BITS = 3072  # a CA outlives its leaves (2048-bit): NIST SP 800-57 beyond 2030
CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_SERVER = ExtendedKeyUsageOID.SERVER_AUTH
_CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    der: tuple[Path, ...] = ()  # DER copies: the certificate, then its issuing CA


def init_ca(out: Path, name: str, days: int = 3650, key_type: str = "ecdsa") -> Issued:
    """Create a self-signed CA in `out` (refuses to overwrite an existing one)."""
    if key_type not in CA_KEY_TYPES:
        raise TrustError(f"--key-type {key_type!r}: one of {', '.join(CA_KEY_TYPES)}")
    issued = Issued(out / CA_CERT, out / CA_KEY)
    if issued.cert.exists() or issued.key.exists():
        raise TrustError(f"{out}: a CA already exists here; remove it first or use another --out")
    key: CaKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=CA_RSA_BITS)
        if key_type == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(issued, cert, key)
    return issued


def issue_server(
    ca_dir: Path, out: Path, *, name: str, dns: list[str], ips: list[str], days: int
) -> Issued:
    if not dns and not ips:
        raise TrustError("a server certificate needs at least one --dns or --ip")
    if days > SERVER_MAX_DAYS:
        raise TrustError(
            f"--days {days}: a server certificate may live {SERVER_MAX_DAYS} days at most"
        )
    return _issue(ca_dir, out, name=name, sans=_host_sans(dns, ips), usages=(_SERVER,), days=days)


def issue_client(ca_dir: Path, out: Path, *, name: str, uri: str, days: int) -> Issued:
    if "://" not in uri:
        raise TrustError(f"--uri {uri!r}: expected a URI such as spiffe://site/consumer/historian")
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    return _issue(ca_dir, out, name=name, sans=sans, usages=(_CLIENT,), days=days)


def issue_opcua(
    ca_dir: Path, out: Path, *, name: str, uri: str, dns: list[str], days: int, der: bool = False
) -> Issued:
    """An OPC UA application instance certificate for the plant half's OPC UA client.

    OPC UA's RSA security policies (Basic256Sha256, Aes*_RsaOaep/RsaPss) need an RSA key; the
    application URI goes in the SAN, and the key usages are those the specification lists.
    Files end in `.pem`, which is how OPC UA stacks (asyncua) tell PEM from DER. With `der`,
    the certificate is also written as `NAME-cert.der` and the issuing CA as
    `ca_der_name(ca)` in `out`: what most OPC UA servers' trust stores take (the private key
    stays PEM only).
    """
    return _issue_application(
        ca_dir, out, name=name, uri=uri, hosts=_host_sans(dns, []), usages=(_CLIENT,),
        days=days, der=der,
    )  # fmt: skip


def issue_opcua_server(
    ca_dir: Path,
    out: Path,
    *,
    name: str,
    uri: str,
    dns: list[str],
    ips: list[str],
    days: int,
    der: bool = False,
) -> Issued:
    """The enterprise half's OPC UA server application instance certificate.

    As `issue_opcua`, with serverAuth and clientAuth (OPC UA clients check serverAuth; the
    specification's application instance certificate carries both) and the host names and
    addresses clients connect to: a client compares the endpoint URL's host with them.
    """
    if not dns and not ips:
        raise TrustError("an OPC UA server certificate needs at least one --dns or --ip")
    return _issue_application(
        ca_dir, out, name=name, uri=uri, hosts=_host_sans(dns, ips), usages=(_SERVER, _CLIENT),
        days=days, der=der,
    )  # fmt: skip


def _issue_application(
    ca_dir: Path,
    out: Path,
    *,
    name: str,
    uri: str,
    hosts: list[x509.GeneralName],
    usages: tuple[x509.ObjectIdentifier, ...],
    days: int,
    der: bool,
) -> Issued:
    """An OPC UA application instance certificate: RSA, the application URI first."""
    if ":" not in uri:
        raise TrustError(f"--uri {uri!r}: expected the application URI, e.g. urn:site:dmzbroker")
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri), *hosts]
    return _issue(
        ca_dir, out, name=name, sans=sans, usages=usages, days=days,
        key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        key_usage=_OPCUA_KEY_USAGE, files=(f"{name}-cert.pem", f"{name}-key.pem"),
        der=der,
    )  # fmt: skip


def _host_sans(dns: list[str], ips: list[str]) -> list[x509.GeneralName]:
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as e:
        raise TrustError(f"--ip: {e}") from e
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    return sans + [x509.IPAddress(a) for a in addresses]


_OPCUA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=True,  # nonRepudiation
    key_encipherment=True,
    data_encipherment=True,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _issue(
    ca_dir: Path,
    out: Path,
    *,
    name: str,
    sans: list[x509.GeneralName],
    usages: tuple[x509.ObjectIdentifier, ...],
    days: int,
    key: CaKey | None = None,
    key_usage: x509.KeyUsage | None = None,
    files: tuple[str, str] | None = None,
    der: bool = False,
) -> Issued:
    ca_cert, ca_key = load_ca(ca_dir)
    cert_name, key_name = files or (f"{name}.crt", f"{name}.key")
    ca_der = ca_cert.public_bytes(serialization.Encoding.DER)
    copies = (Path(cert_name).with_suffix(".der").name, ca_der_name(ca_cert)) if der else ()
    issued = Issued(out / cert_name, out / key_name, tuple(out / c for c in copies))
    for path in (issued.cert, issued.key, *issued.der[:1]):
        if path.exists():
            raise TrustError(f"{path}: already exists; choose another --name")
    if der and issued.der[1].exists() and issued.der[1].read_bytes() != ca_der:
        raise TrustError(
            f"{issued.der[1]}: exists and is not this CA's certificate; not overwritten"
        )
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage or _key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(issued, cert, key)
    for path, data in zip(
        issued.der, (cert.public_bytes(serialization.Encoding.DER), ca_der), strict=False
    ):
        path.write_bytes(data)
    inventory = ca_dir / ISSUED
    inventory.mkdir(exist_ok=True)  # the CA's own record, for `certs list` and `certs check`
    (inventory / f"{cert.serial_number:x}.crt").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
    )
    return issued


def ca_der_name(ca_cert: x509.Certificate) -> str:
    """`ca-<the first 8 hex digits of its SHA-256>.der`: the issuing CA's DER copy beside an
    OPC UA certificate. Named after the CA itself, so a second CA's copy never replaces it and
    the TLS CA's `ca.crt` in the same folder is not taken for it."""
    return f"ca-{ca_cert.fingerprint(hashes.SHA256()).hex()[:8]}.der"


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; an ECDSA leaf signs and agrees keys in handshakes."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, CaKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as e:
        raise TrustError(
            f"{e.filename}: not found; create a CA with `dmzbroker certs init-ca`"
        ) from e
    except (ValueError, TypeError) as e:
        raise TrustError(f"{ca_dir}: CA certificate or key is not usable PEM: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TrustError(f"{ca_dir / CA_KEY}: expected an ECDSA or RSA key")
    return cert, key


def _write(issued: Issued, cert: x509.Certificate, key: CaKey) -> None:
    issued.cert.parent.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret(issued.key, key_pem)
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
