"""Who a consumer is (the one URI SAN of its client certificate) and what it may see.

The TLS layer has already verified the certificate chain; this module only names the peer
and asks the policy (casbin, through `broker.policy.access`) for its view, once per identity
and policy. Every denial is logged with identity, certificate serial and remote address.
It also holds the serials of the CRL in force, and ends the open streams of a certificate
when a newly loaded CRL revokes it: a handshake checks only connections made after.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from typing import Protocol

import structlog
from cryptography import x509

from broker.policy import Policy
from broker.policy.access import Access

log = structlog.get_logger("authz")


@dataclass(frozen=True)
class Peer:
    identity: str | None  # None when the certificate does not name exactly one URI
    serial: str
    remote: str | None
    problem: str | None = None  # why there is no identity
    fingerprint: str = ""  # SHA-256 of the certificate (DER), hex

    def described(self) -> dict[str, str | None]:
        """The fields every consumer event carries."""
        return {
            "identity": self.identity,
            "serial": self.serial,
            "fingerprint": self.fingerprint,
            "remote": self.remote,
        }


def peer_of(ssl_object: ssl.SSLObject | None, remote: str | None) -> Peer:
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if der is None:  # not reachable through the mTLS listener; refuse rather than assume
        return Peer(None, "", remote, "no_certificate")
    cert = x509.load_der_x509_certificate(der)
    serial = format(cert.serial_number, "x")
    fingerprint = hashlib.sha256(der).hexdigest()
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        problem = "no_uri_san" if not uris else "several_uri_sans"
        return Peer(None, serial, remote, problem, fingerprint)
    return Peer(uris[0], serial, remote, fingerprint=fingerprint)


def denied(peer: Peer, reason: str, **details: object) -> None:
    log.warning("consumer_denied", reason=reason, **peer.described(), **details)


class Stream(Protocol):
    """An open stream (store.Subscription), as far as a revocation needs it."""

    def close(self) -> None: ...


class Authorization:
    """The current policy's answer to "what may this identity see", cached per identity;
    the serials the CRL in force revokes, refused at every request."""

    def __init__(self, policy: Policy, revoked: frozenset[str] = frozenset()) -> None:
        self.revoked = revoked  # the CRL's serials, fresh or stale (tls.EndpointReloader)
        self._streams: dict[str, set[Stream]] = {}  # open streams by certificate serial
        self.use_policy(policy)

    def use_revoked(self, revoked: frozenset[str]) -> None:
        """The serials of a CRL just put in force: refused from the next request on, and
        every open stream of one of them ended now (its handler logs `consumer_cut_off`)."""
        self.revoked = revoked
        for serial in revoked & self._streams.keys():
            for stream in self._streams[serial]:
                stream.close()

    def stream_opened(self, serial: str, stream: Stream) -> None:
        self._streams.setdefault(serial, set()).add(stream)

    def stream_closed(self, serial: str, stream: Stream) -> None:
        streams = self._streams.get(serial)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._streams[serial]

    def use_policy(self, policy: Policy) -> None:
        self.policy = policy
        self._access = Access(policy)
        self._views: dict[str, frozenset[str]] = {}
        monitoring = {r.name for r in policy.roles if r.metrics}
        self._metrics_readers = frozenset(
            c.identity for c in policy.consumers if monitoring.intersection(c.roles)
        )

    def may_read_metrics(self, identity: str) -> bool:
        return identity in self._metrics_readers

    def knows(self, identity: str) -> bool:
        return self._access.knows(identity)

    def view(self, identity: str) -> frozenset[str]:
        view = self._views.get(identity)
        if view is None:
            view = self._views[identity] = self._access.visible_to(identity)
        return view
