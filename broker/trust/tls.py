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
    """The consumer endpoint's context, and the serials the API must refuse itself, if any."""
    crl, revoked = _crl_in_use(config)
    context = server_context(
        config.cert, config.key, config.client_ca, profile=config.profile, crl=crl
    )
    return context, revoked


def _crl_in_use(config: TlsConfig) -> tuple[Path | None, frozenset[str]]:
    """Which CRL the handshake enforces, and which serials the API must refuse instead.

    A fresh CRL is enforced in the handshake. A CRL past its nextUpdate is too, by default,
    which refuses every consumer until a new one is published; with `stale_crl: accept` the
    stale list still refuses the serials it names, in the API.
    """
    if config.crl is None:
        return None, frozenset()
    next_update, serials = read_crl(config.crl)
    if next_update is None or next_update >= datetime.now(UTC):
        return config.crl, frozenset()
    accept = config.stale_crl == "accept"
    structlog.get_logger("tls").warning(
        "crl_stale",
        path=str(config.crl),
        next_update=next_update.isoformat(),
        consequence="serials it lists refused by the API"
        if accept
        else "every new connection refused until a new CRL is published",
    )
    return (None, serials) if accept else (config.crl, frozenset())


class EndpointReloader:
    """Reloads the endpoint's certificate, key, client CA and CRL when their files change.

    New material goes into the running context, so new handshakes use it and established
    connections are not touched. A CA removed from the client CA file stays trusted until
    a restart (OpenSSL's store only grows); a newer CRL takes precedence over older ones.
    Unusable new files are refused with `tls_reload_refused`, and the old material stays.
    """

    def __init__(self, config: TlsConfig, context: ssl.SSLContext) -> None:
        self._config = config
        self._context = context
        self._seen = self._fingerprints()
        self._deferred = False  # a reload put off by an OS error, logged once until it works

    def check(self, *, force: bool = False) -> frozenset[str] | None:
        """New revoked serials for the API (stale CRL accepted), or None if nothing changed."""
        seen, before = self._fingerprints(), self._seen
        if seen == before and not force:
            return None
        self._seen = seen
        log = structlog.get_logger("tls")
        config = self._config
        try:
            server_context(config.cert, config.key, config.client_ca)  # every file usable?
            crl, revoked = _crl_in_use(config)
            _load_chain(self._context, config.cert, config.key)
            _load_ca(self._context, config.client_ca)
            if crl is not None:
                _load_ca(self._context, crl)
        except TrustError as e:
            log.error("tls_reload_refused", error=str(e), kept="the material in use")
            return None
        except OSError as e:  # out of file descriptors, an I/O error: not the files' fault
            self._seen = before  # so the next check tries again
            if not self._deferred:
                self._deferred = True
                log.warning(
                    "tls_reload_deferred",
                    error=str(e),
                    kept="what was loaded before the error; the rest is tried at the next check",
                )
            return None
        self._deferred = False
        log.info("tls_material_reloaded", cert=str(config.cert))
        return revoked

    def _fingerprints(self) -> tuple[tuple[int, int, int] | None, ...]:
        paths = [self._config.cert, self._config.key, self._config.client_ca, self._config.crl]
        return tuple(_fingerprint(p) for p in paths)


def _fingerprint(path: Path | None) -> tuple[int, int, int] | None:
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)
