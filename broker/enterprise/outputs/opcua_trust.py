"""Who an OPC UA client is, decided by our checks, not asyncua's (ADR 0025).

A client's application certificate (the secure channel's, as the OpenSecureChannel request
carries it) must be issued by a CA of `enterprise.tls.client_ca` itself, be within its validity, carry
clientAuth, and not be revoked: neither by the CRL of `enterprise.tls.crl` (its signature
checked by `broker.trust.revocation.read_crl`) nor by the serials the consumer endpoint holds
in force (`authz.revoked`, which also keeps a rolled-back CRL from un-revoking anyone). A CRL
past its nextUpdate refuses everyone unless `stale_crl: accept`, as at the HTTPS endpoint.
The identity is the certificate's single URI SAN (`broker.enterprise.authz.peer_of`).
asyncua's own trust store matches CRL serials only and is never used.

Everything here runs on the half's event loop, for anyone who can reach the port, before the
client proved it holds the key: the work is bounded before it starts. A certificate field
over `MAX_CERTIFICATE_BYTES` or carrying more than one certificate after the leaf is refused
unparsed, and certificates a client sends after its leaf are never used: handed to a path
builder as intermediates, a few self-made CA certificates sharing one key and the site CA's
name make it explore paths for minutes (one 2 KB message held the loop 64 s).

This module reads the CA and CRL files (bounded) and nothing else; it never writes.
"""

from __future__ import annotations

import ssl
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from broker.config import TlsConfig
from broker.enterprise.authz import Authorization, Peer, peer_of
from broker.errors import TrustError
from broker.trust.fitness import read_pem
from broker.trust.revocation import CrlFacts, read_crl

RELOAD_CHECK_S = 1.0  # how often the CA and CRL files are looked at for a change
MAX_CERTIFICATE_BYTES = 8192  # a certificate field, leaf and any chain (an RSA-4096 leaf ~2 KB)
MAX_CHAIN = 2  # the leaf and, as some stacks send it, its issuer (which is not used)


class Untrusted(Exception):
    """A certificate refused: `reason` is a short code for the audit, `detail` says why."""

    def __init__(self, reason: str, detail: str, peer: Peer | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.peer = peer


class _Der:
    """A DER certificate as `peer_of` reads one (an SSLObject's getpeercert)."""

    def __init__(self, der: bytes) -> None:
        self._der = der

    def getpeercert(self, binary_form: bool) -> bytes:
        return self._der


def split_chain(unverified: bytes) -> list[bytes]:
    """The DER certificates of an OPC UA certificate field: one, or a chain end to end."""
    certificates = []
    rest = unverified
    while rest:
        if len(rest) < 2 or rest[0] != 0x30:
            raise ValueError("not a DER certificate")
        size, head = rest[1], 2
        if size & 0x80:  # long form: the next (size & 0x7F) bytes are the length
            count = size & 0x7F
            if not 1 <= count <= 4 or len(rest) < 2 + count:
                raise ValueError("not a DER certificate")
            size, head = int.from_bytes(rest[2 : 2 + count], "big"), 2 + count
        if len(rest) < head + size:
            raise ValueError("a truncated DER certificate")
        certificates.append(rest[: head + size])
        rest = rest[head + size :]
    if not certificates:
        raise ValueError("no certificate")
    return certificates


class ClientTrust:
    """The enterprise trust list, as the OPC UA server applies it to each new channel."""

    def __init__(self, config: TlsConfig, authz: Authorization) -> None:
        self._config = config
        self._authz = authz
        self._checked_at = -RELOAD_CHECK_S
        self._seen: tuple[tuple[int, int, int] | None, ...] = ()
        self._cas: list[x509.Certificate] = []
        self._crl: CrlFacts | None = None
        self._problem: str | None = None  # why nobody can be trusted now (files unusable)
        self._reload()

    def verify(self, unverified: bytes, remote: str | None) -> Peer:
        """The peer of a channel certificate (the leaf, first in the field); raises
        Untrusted, naming why, for any certificate our trust list does not accept."""
        if len(unverified) > MAX_CERTIFICATE_BYTES:
            raise Untrusted(
                "certificate_too_large",
                f"{len(unverified)} bytes of certificates, at most {MAX_CERTIFICATE_BYTES}",
            )
        try:
            ders = split_chain(unverified)
            leaf = x509.load_der_x509_certificate(ders[0])
        except ValueError as e:
            raise Untrusted("unreadable_certificate", str(e)) from None
        if len(ders) > MAX_CHAIN:
            raise Untrusted(
                "chain_too_long",
                f"{len(ders)} certificates; send the certificate alone, issued by the site CA",
            )
        peer = peer_of(cast(ssl.SSLObject, _Der(ders[0])), remote)
        self._reload()
        if self._problem is not None:
            raise Untrusted("trust_list_unusable", self._problem, peer)
        now = datetime.now(UTC)
        builder = PolicyBuilder().store(Store(self._cas)).time(now).max_chain_depth(0)
        try:  # against the site CAs alone: what the client sent after its leaf is not used
            builder.build_client_verifier().verify(leaf, [])
        except VerificationError as e:
            raise Untrusted("certificate_untrusted", str(e), peer) from None
        crl = self._crl
        stale = crl is not None and crl.next_update is not None and crl.next_update < now
        if stale and self._config.stale_crl == "refuse":
            raise Untrusted(
                "crl_stale",
                f"{self._config.crl} is past its nextUpdate; publish a new CRL",
                peer,
            )
        revoked = self._authz.revoked | (crl.serials if crl is not None else frozenset())
        if peer.serial in revoked:
            raise Untrusted("revoked", f"serial {peer.serial} is revoked", peer)
        if peer.identity is None:
            raise Untrusted(peer.problem or "no_uri_san", "the identity is the one URI SAN", peer)
        return peer

    def revoked(self, peer: Peer) -> bool:
        """Whether a peer trusted earlier has been revoked since (checked at renewals)."""
        self._reload()
        crl = self._crl
        return peer.serial in self._authz.revoked or (
            crl is not None and peer.serial in crl.serials
        )

    def _reload(self) -> None:
        """Read the CA and CRL files again when they changed (looked at once a second)."""
        now = time.monotonic()
        if now - self._checked_at < RELOAD_CHECK_S:
            return
        self._checked_at = now
        config = self._config
        seen = tuple(_stat(p) for p in (config.client_ca, config.crl))
        if seen == self._seen:
            return
        self._seen = seen
        try:
            cas = x509.load_pem_x509_certificates(read_pem(config.client_ca))
            crl = None if config.crl is None else read_crl(config.crl, config.client_ca)
        except (OSError, ValueError, TrustError) as e:
            # Like the HTTPS endpoint's reload: the lists in force stay; with none (at
            # start) nobody is trusted until the files are fixed.
            if not self._cas:
                self._problem = str(e)
            return
        self._cas, self._crl, self._problem = cas, crl, None


def _stat(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
