"""The CA's inventory: list issued certificates, revoke them, publish a CRL, check expiries.

The CA directory keeps a copy of every certificate it issued (`issued/`), the revocations
(`revoked.json`) and the CRL number; `certs crl` writes a CRL signed by the CA with a
nextUpdate and the next CRL number, which the enterprise half loads to refuse revoked
consumers, and OPC UA servers load (`--der`: a DER copy beside it) to check the plant's
certificate. `read_crl` never returns a CRL that no CA of the client CA file signed, and
reads both files bounded (`read_pem`), so a FIFO put at either path is refused at once
instead of stalling the enterprise half's reload.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from broker.errors import TrustError
from broker.trust.certs import CA_CERT, ISSUED, load_ca
from broker.trust.fitness import read_pem

REVOKED = "revoked.json"
CRL_NUMBER = "crl-number"
CRL_FILE = "crl.pem"
WARN_DAYS = 30
_SIGNING_KEYS = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
    dsa.DSAPublicKey,
)  # a CA key of another type (X25519...) signs nothing
REASONS = {flag.name: flag for flag in x509.ReasonFlags if flag.name not in ("remove_from_crl",)}


class Revocation(msgspec.Struct, frozen=True):
    reason: str
    time: dt.datetime


@dataclass(frozen=True)
class Listed:
    serial: str
    subject: str
    sans: list[str]
    not_after: dt.datetime
    days_left: float
    revoked: Revocation | None


def _revocations(ca_dir: Path) -> dict[str, Revocation]:
    try:
        return msgspec.json.decode((ca_dir / REVOKED).read_bytes(), type=dict[str, Revocation])
    except FileNotFoundError:
        return {}
    except (OSError, msgspec.DecodeError) as e:
        raise TrustError(f"{ca_dir / REVOKED}: unreadable: {e}") from e


def inventory(ca_dir: Path, now: dt.datetime | None = None) -> list[Listed]:
    now = now or dt.datetime.now(dt.UTC)
    revoked = _revocations(ca_dir)
    listed = []
    for path in sorted((ca_dir / ISSUED).glob("*.crt")):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        serial = f"{cert.serial_number:x}"
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            sans = [str(n.value) for n in names]
        except x509.ExtensionNotFound:
            sans = []
        days = (cert.not_valid_after_utc - now).total_seconds() / 86_400
        listed.append(
            Listed(
                serial,
                cert.subject.rfc4514_string(),
                sans,
                cert.not_valid_after_utc,
                days,
                revoked.get(serial),
            )
        )
    return sorted(listed, key=lambda c: c.not_after)


def revoke(ca_dir: Path, serial: str, reason: str) -> None:
    serial = serial.lower().removeprefix("0x")
    if reason not in REASONS:
        raise TrustError(f"--reason {reason!r}: one of {', '.join(sorted(REASONS))}")
    if not (ca_dir / ISSUED / f"{serial}.crt").exists():
        raise TrustError(
            f"serial {serial}: this CA ({ca_dir}) did not issue it; see `dmzbroker certs list`"
        )
    revoked = _revocations(ca_dir)
    revoked.setdefault(serial, Revocation(reason, dt.datetime.now(dt.UTC)))
    (ca_dir / REVOKED).write_bytes(msgspec.json.encode(revoked))


def write_crl(ca_dir: Path, days: int = 7, out: Path | None = None, *, der: bool = False) -> Path:
    """A CRL of every revocation, valid for `days` (its nextUpdate), signed as the CA signs
    (ECDSA or RSA-PKCS1v15, SHA-256); returns its path. With `der`, a DER copy is written
    beside it (`der_copy(path)`). Neither replaces a file that is not a CRL (an earlier one,
    or a wrong CA's put there by mistake): a mistyped --out must not destroy a certificate."""
    path = out or ca_dir / CRL_FILE
    if der and der_copy(path) == path:
        raise TrustError(
            f"--out {path}: with --der, name the PEM file (e.g. crl.pem); the DER copy goes beside it"
        )
    ca_cert, ca_key = load_ca(ca_dir)
    targets = [(path, x509.load_pem_x509_crl)]
    targets += [(der_copy(path), x509.load_der_x509_crl)] if der else []
    for target, load in targets:
        if not _replaceable(target, load):
            raise TrustError(
                f"{target}: exists and is not a CRL; not overwritten (choose another --out)"
            )
    number_file = ca_dir / CRL_NUMBER
    number = int(number_file.read_text()) + 1 if number_file.exists() else 1
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial, revocation in _revocations(ca_dir).items():
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(serial, 16))
            .revocation_date(revocation.time)
            .add_extension(x509.CRLReason(REASONS[revocation.reason]), critical=False)
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    if der:
        der_copy(path).write_bytes(crl.public_bytes(serialization.Encoding.DER))
    number_file.write_text(str(number))
    return path


def _replaceable(
    path: Path,
    load: Callable[[bytes], x509.CertificateRevocationList],
) -> bool:
    """Whether `path` is free, or holds a CRL in `load`'s encoding."""
    try:
        load(path.read_bytes())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):  # a folder, unreadable, or not such a CRL
        return False
    return True


def der_copy(crl: Path) -> Path:
    """Where `write_crl(..., der=True)` writes the DER copy of the CRL at `crl`."""
    return crl.with_suffix(".der")


def problems(ca_dir: Path, crl: Path | None, now: dt.datetime | None = None) -> list[str]:
    """What needs an operator: certificates ending within 30 days, a CRL past nextUpdate."""
    now = now or dt.datetime.now(dt.UTC)
    found = []
    ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    ca_days = (ca_cert.not_valid_after_utc - now).total_seconds() / 86_400
    if ca_days < WARN_DAYS:
        found.append(
            f"the CA itself ends in {ca_days:.0f} days ({ca_cert.not_valid_after_utc:%Y-%m-%d})"
        )
    for cert in inventory(ca_dir, now):
        if cert.revoked is None and cert.days_left < WARN_DAYS:
            state = "ended" if cert.days_left < 0 else f"ends in {cert.days_left:.0f} days"
            found.append(
                f"serial {cert.serial} ({cert.subject}) {state} ({cert.not_after:%Y-%m-%d})"
            )
    crl_path = crl or ca_dir / CRL_FILE
    if crl_path.exists():
        revocation_list = x509.load_pem_x509_crl(crl_path.read_bytes())
        next_update = revocation_list.next_update_utc
        if next_update is not None and next_update < now:
            found.append(
                f"{crl_path}: past its nextUpdate ({next_update:%Y-%m-%d %H:%M}Z); run `dmzbroker certs crl`"
            )
    elif crl is not None:
        found.append(f"{crl}: no CRL there; run `dmzbroker certs crl`")
    return found


@dataclass(frozen=True)
class CrlFacts:
    """What the TLS endpoint needs of a CRL whose signature a client CA checked."""

    number: int | None  # its CRLNumber extension; our `certs crl` always writes one
    next_update: dt.datetime | None
    serials: frozenset[str]  # revoked, hex
    pem: bytes  # the list as checked: what the handshake enforces
    issuer: str  # RFC 4514: CRL numbers are comparable only between lists of one issuer
    sha256: str  # of the list (DER), hex: what tells two lists of one number apart


def read_crl(path: Path, client_ca: Path) -> CrlFacts:
    """A CRL signed by a CA of the `client_ca` file (the one that issues consumer
    certificates): a list signed by anyone else would revoke nothing or the wrong serials."""
    try:
        crl = x509.load_pem_x509_crl(read_pem(path))
    except FileNotFoundError as e:
        raise TrustError(f"{path}: CRL not found; write one with `dmzbroker certs crl`") from e
    except OSError as e:  # a FIFO, a device, a folder, too large: the file's fault
        raise TrustError(f"{path}: cannot read the CRL: {e.strerror}") from e
    except ValueError as e:
        raise TrustError(f"{path}: not a PEM CRL") from e
    if not any(_signed_by(crl, ca) for ca in _certificates(client_ca)):
        raise TrustError(
            f"{path}: not signed by a CA of the client CA file {client_ca} "
            f"(its issuer: {crl.issuer.rfc4514_string()}); publish the CRL of the CA that "
            "issues the consumer certificates (`dmzbroker certs crl --ca DIR`)"
        )
    try:
        extension = crl.extensions.get_extension_for_class(x509.CRLNumber)
    except x509.ExtensionNotFound:
        extension = None
    number = extension.value.crl_number if extension is not None else None
    return CrlFacts(
        number,
        crl.next_update_utc,
        frozenset(f"{r.serial_number:x}" for r in crl),
        crl.public_bytes(serialization.Encoding.PEM),
        crl.issuer.rfc4514_string(),
        hashlib.sha256(crl.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )


def _certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(read_pem(path))
    except FileNotFoundError as e:
        raise TrustError(f"{path}: CA file not found") from e
    except OSError as e:
        raise TrustError(f"{path}: cannot read the CA file: {e.strerror}") from e
    except ValueError as e:
        raise TrustError(f"{path}: not a PEM CA certificate file") from e


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    if ca.subject != crl.issuer or not isinstance(key, _SIGNING_KEYS):
        return False
    return crl.is_signature_valid(key)
