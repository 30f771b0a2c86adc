"""SSLContext factories. Peers are always verified; there is no option to turn that off.

Server side (enterprise API): profile "modern" (TLS 1.3 only, the default) or
"intermediate" (TLS 1.2 and 1.3, ECDHE with AEAD ciphers only); no compression, no
renegotiation, no 0-RTT (Python's ssl never accepts early data); a client certificate from
the configured CA required, and, with a CRL, not revoked. OpenSSL also refuses a client
certificate whose extended key usage does not include clientAuth, and any certificate
outside its validity period.

The endpoint's context is never changed once in use: a reload (`EndpointReloader`) builds a
new one, so nothing an earlier file trusted or revoked lingers in OpenSSL's store.
"""

from __future__ import annotations

import ssl
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import structlog

from broker.config import TlsConfig
from broker.errors import TrustError
from broker.trust.revocation import CrlFacts, read_crl

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


class EndpointReloader:
    """The consumer endpoint's TLS context in force, replaced by a fresh one when its files
    change (checked by `check`, on SIGHUP and every second).

    A reload builds a new context from the current certificate, key, client CA and CRL files
    and swaps it in whole: the listener reads `context` for every new handshake, established
    connections keep the one they were made with. Nothing accumulates from earlier loads: a
    CA removed from the client CA file is no longer trusted, and only the new CRL is in force
    (OpenSSL, given two CRLs of one issuer stamped in the same second, would keep the first).

    A CRL must be signed by a CA of the client CA file, and a new CRL must carry a higher CRL
    number than the one in force: an older CRL put back would un-revoke certificates. At start
    a CRL without a number is accepted (there is nothing to compare it with); at a reload it
    is refused. A reload that fails in any part is refused with `tls_reload_refused`, and the
    context in force stays as it was, CRL included.
    """

    def __init__(self, config: TlsConfig) -> None:
        self._config = config
        self._seen = self._fingerprints()  # first: a change while loading is seen next time
        self._crl = _current_crl(config)
        self.context, self.revoked = _endpoint(config, self._crl)
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
            crl = _current_crl(config)
            _succeeds(crl, self._crl, config)
            context, revoked = _endpoint(config, crl)
        except TrustError as e:
            log.error(
                "tls_reload_refused",
                error=str(e),
                kept="the TLS context in force, CRL number "
                f"{self._crl.number if self._crl is not None else '(none)'}",
            )
            return None
        except OSError as e:  # out of file descriptors, an I/O error: not the files' fault
            self._seen = before  # so the next check tries again
            if not self._deferred:
                self._deferred = True
                log.warning(
                    "tls_reload_deferred",
                    error=str(e),
                    kept="the TLS context in force; the reload is tried at the next check",
                )
            return None
        self._deferred = False
        self.context, self.revoked, self._crl = context, revoked, crl
        log.info(
            "tls_material_reloaded",
            cert=str(config.cert),
            crl_number=crl.number if crl is not None else None,
        )
        return revoked

    def _fingerprints(self) -> tuple[tuple[int, int, int] | None, ...]:
        paths = [self._config.cert, self._config.key, self._config.client_ca, self._config.crl]
        return tuple(_fingerprint(p) for p in paths)


def _current_crl(config: TlsConfig) -> CrlFacts | None:
    return None if config.crl is None else read_crl(config.crl, config.client_ca)


def _succeeds(new: CrlFacts | None, in_force: CrlFacts | None, config: TlsConfig) -> None:
    """Refuse a CRL that cannot be shown newer than the one in force (a rollback)."""
    if new is None or in_force is None or new.pem == in_force.pem:
        return  # no CRL configured, or the same list read again
    fix = "publish a new CRL with `dmzbroker certs crl`, which numbers every CRL it writes"
    if new.number is None:
        raise TrustError(
            f"{config.crl}: the new CRL has no CRL number, so it cannot be told from an older "
            f"one put back; {fix}"
        )
    if in_force.number is not None and new.number <= in_force.number:
        raise TrustError(
            f"{config.crl}: CRL number {new.number} is not higher than {in_force.number}, the "
            "number of the CRL in force: an older CRL put back would un-revoke certificates; "
            f"{fix}"
        )


def _endpoint(config: TlsConfig, crl: CrlFacts | None) -> tuple[ssl.SSLContext, frozenset[str]]:
    """A fresh context for the consumer endpoint, and the serials the API must refuse itself.

    A fresh CRL is enforced in the handshake. A CRL past its nextUpdate is too, by default,
    which refuses every consumer until a new one is published; with `stale_crl: accept` the
    stale list still refuses the serials it names, in the API.
    """
    in_tls = crl
    revoked: frozenset[str] = frozenset()
    if crl is not None and crl.next_update is not None and crl.next_update < datetime.now(UTC):
        accept = config.stale_crl == "accept"
        structlog.get_logger("tls").warning(
            "crl_stale",
            path=str(config.crl),
            next_update=crl.next_update.isoformat(),
            consequence="serials it lists refused by the API"
            if accept
            else "every new connection refused until a new CRL is published",
        )
        if accept:
            in_tls, revoked = None, crl.serials
    if in_tls is None:
        context = server_context(config.cert, config.key, config.client_ca, profile=config.profile)
        return context, revoked
    # The very list whose signature and number were checked, not the file read once more.
    with tempfile.NamedTemporaryFile(suffix=".pem") as copy:
        copy.write(in_tls.pem)
        copy.flush()
        context = server_context(
            config.cert, config.key, config.client_ca, profile=config.profile,
            crl=Path(copy.name),
        )  # fmt: skip
    return context, revoked


def _fingerprint(path: Path | None) -> tuple[int, int, int] | None:
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)
