"""Whether TLS material is fit for its use, judged from the files before any peer sees it:
a leaf certificate's purpose (extended key usage, key usage), that a key is its certificate's,
that a CA file holds what it must. What every peer would refuse at every handshake is found
here, by broker.trust.tls when it builds a context and by broker.preflight before a half
starts.

Every file is read bounded (`read_pem`): a regular file, at most MAX_PEM_BYTES, opened
without blocking, so a FIFO, a device or a folder put at a path is refused at once instead
of stalling a start. A symbolic link to a regular file is followed (certbot keeps
`live/NAME/*.pem` as links into `archive/`). Text taken from a certificate (its subject) is
made inert before it goes into a message, so it cannot forge another line. This module
never writes, and never changes a file or a context.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker.audit.show import inert
from broker.safe_files import read_regular

MAX_PEM_BYTES = 1024 * 1024  # a chain, a key or a CRL of a site fits in far less

CONSUMERS_CA = "give the certificate of the CA that issues the consumers' certificates"
# What a leaf certificate is presented for.
Purpose = Literal["server", "client", "opcua", "opcua-server"]
_NEEDED_EKU = {
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
    "opcua": ExtendedKeyUsageOID.CLIENT_AUTH,  # the plant half is the OPC UA client
    "opcua-server": ExtendedKeyUsageOID.SERVER_AUTH,  # the enterprise half's OPC UA server
}
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


def read_pem(path: Path) -> bytes:
    """The bytes of the PEM file `path` (a link to one is followed); OSError when it is
    missing, unreadable, not a regular file or over MAX_PEM_BYTES."""
    return read_regular(path, MAX_PEM_BYTES, follow_links=True)


def unfit_leaf(cert: Path, key: Path | None, purpose: Purpose | None) -> tuple[Path, str] | None:
    """Why `cert` (PEM, the leaf first, then any intermediates) with `key` cannot serve as
    `purpose` (None: any), as (the file at fault, what is wrong and what to do); None if it can.
    OSError when a file cannot be read."""
    issue = f"issue it with `dmzbroker certs issue {purpose or 'client'}`"
    try:
        leaf = x509.load_pem_x509_certificates(read_pem(cert))[0]
    except ValueError:
        return cert, f"not a PEM certificate; {issue}"
    if purpose is not None:
        problem = _unfit_for(leaf, purpose)
        if problem is not None:
            return cert, f"{problem}; {issue}"
    if key is None:
        return None
    problem = _unfit_key(leaf, cert, key)
    return None if problem is None else (key, f"{problem}{issue} and use its key")


def _unfit_key(leaf: x509.Certificate, cert: Path, key: Path) -> str | None:
    try:
        private = serialization.load_pem_private_key(read_pem(key), password=None)
    except TypeError:
        return "encrypted, and the broker reads keys without a passphrase: decrypt it, or "
    except (ValueError, UnsupportedAlgorithm):
        return "not a PEM private key; give the certificate's key, or "
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        return (
            f"not the private key of {cert} (their public keys differ); give the key the "
            "certificate was issued with, or "
        )
    return None


def _unfit_for(leaf: x509.Certificate, purpose: Purpose) -> str | None:
    """OpenSSL's purpose check: a peer refuses it ("unsuitable certificate purpose"); and
    for the OPC UA server, RSA, which every security policy it offers needs."""
    if purpose == "opcua-server" and not isinstance(leaf.public_key(), rsa.RSAPublicKey):
        return (
            "its key is not RSA, and the server's security policies (Basic256Sha256, "
            "Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss) sign and encrypt with RSA"
        )
    needed = _NEEDED_EKU[purpose]
    try:
        usages = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = [needed]  # no EKU: any purpose
    if needed not in usages:
        named = ", ".join(_EKU_NAMES.get(u, u.dotted_string) for u in usages)
        return (
            f"its extended key usage ({named}) leaves out {_EKU_NAMES[needed]}, so every "
            "peer refuses it in the handshake (unsuitable certificate purpose)"
        )
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not (usage.digital_signature or usage.key_encipherment or usage.key_agreement):
        return (
            "its key usage allows none of digitalSignature, keyEncipherment, keyAgreement, "
            "so no TLS key exchange can use it"
        )
    return None


def unfit_anchors(path: Path, fix: str) -> str | None:
    """Why the file `path` cannot serve as the trust anchors for a server the appliance
    connects to, ending in `fix`; None if it holds PEM certificates. No CA is required: a
    pinned self-signed server certificate (CA:FALSE) is an anchor OpenSSL accepts, and so is
    an old v1 root without extensions. OSError when it is unreadable."""
    try:
        x509.load_pem_x509_certificates(read_pem(path))
    except ValueError:
        return f"not a PEM certificate; {fix}"
    return None


def unfit_ca(path: Path, fix: str) -> str | None:
    """Why the CA file `path` (PEM, one or more certificates) cannot verify the certificates
    it issues to peers, ending in `fix`; None if every certificate in it is a CA. OSError when
    it is unreadable."""
    try:
        certificates = x509.load_pem_x509_certificates(read_pem(path))
    except ValueError:
        return f"not a PEM certificate; {fix}"
    for number, certificate in enumerate(certificates, 1):
        which = f"certificate {number} ({inert(certificate.subject.rfc4514_string())})"
        try:
            is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            return f"{which} is not a CA (no basicConstraints CA:TRUE); {fix}"
        try:
            usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            continue
        if not usage.key_cert_sign:
            return f"{which} is a CA whose key usage leaves out keyCertSign; {fix}"
    return None
