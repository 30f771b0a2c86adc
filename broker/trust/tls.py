"""SSLContext factories. Peers are always verified; there is no option to turn that off.

Server side (enterprise API): profile "modern" (TLS 1.3 only, the default) or
"intermediate" (TLS 1.2 and 1.3, ECDHE with AEAD ciphers only); no compression, no
renegotiation, no 0-RTT (Python's ssl never accepts early data); a client certificate from
the configured CA required, and, with a CRL, not revoked. OpenSSL also refuses a client
certificate whose extended key usage does not include clientAuth, and any certificate
outside its validity period.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from pathlib import Path

import structlog

from broker.config import TlsConfig
from broker.errors import TrustError
from broker.trust.revocation import read_crl

_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # TLS 1.3 suites are AEAD-only already


PROFILES = {"modern": ssl.TLSVersion.TLSv1_3, "intermediate": ssl.TLSVersion.TLSv1_2}


def server_context(
    cert: Path, key: Path, client_ca: Path, *, profile: str = "modern", crl: Path | None = None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = PROFILES[profile]
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_chain(ctx, cert, key)
    _load_ca(ctx, client_ca)
    if crl is not None:
        _load_ca(ctx, crl)  # a PEM CRL loads like a CA file
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """For consumers of the API (and our own readiness checks): verifies the server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(ctx, ca)
    if cert is not None:
        _load_chain(ctx, cert, key)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    for path in (cert, key):
        if path is not None and not path.is_file():
            raise TrustError(f"{path}: file not found")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise TrustError(
            f"{cert}: cannot use certificate with key {key}: {e.reason or e}; "
            "check that both are PEM and belong together"
        ) from e


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    if not ca.is_file():
        raise TrustError(f"{ca}: CA file not found")
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:
        raise TrustError(f"{ca}: not a usable PEM CA certificate: {e.reason or e}") from e


def endpoint_context(config: TlsConfig) -> tuple[ssl.SSLContext, frozenset[str]]:
    """The consumer endpoint's context, and the serials the API must refuse itself, if any.

    A fresh CRL is enforced in the handshake. A CRL past its nextUpdate is too, by default,
    which refuses every consumer until a new one is published; with `stale_crl: accept` the
    stale list still refuses the serials it names, in the API.
    """
    crl = config.crl
    revoked: frozenset[str] = frozenset()
    if crl is not None:
        next_update, serials = read_crl(crl)
        if next_update is not None and next_update < datetime.now(UTC):
            accept = config.stale_crl == "accept"
            structlog.get_logger("tls").warning(
                "crl_stale",
                path=str(crl),
                next_update=next_update.isoformat(),
                consequence="serials it lists refused by the API"
                if accept
                else "every new connection refused until a new CRL is published",
            )
            if accept:
                crl, revoked = None, serials
    context = server_context(
        config.cert, config.key, config.client_ca, profile=config.profile, crl=crl
    )
    return context, revoked
