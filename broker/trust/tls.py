"""SSLContext factories. Peers are always verified; there is no option to turn that off.

Server side (enterprise API): profile "modern" (TLS 1.3 only, the default) or
"intermediate" (TLS 1.2 and 1.3, ECDHE with AEAD ciphers only); no compression, no
renegotiation, no 0-RTT (Python's ssl never accepts early data); a client certificate from
the configured CA required, and, with a CRL, not revoked. OpenSSL also refuses a client
certificate whose extended key usage does not include clientAuth, and any certificate
outside its validity period.

What every peer would refuse at every handshake (broker.trust.fitness: a certificate unfit
for its purpose, a key that is not the certificate's, a client CA file with a certificate
that is no CA) is found when a context is built, and before a half starts (broker.preflight).
Every file is read bounded (a regular file, at most fitness.MAX_PEM_BYTES, without blocking):
a FIFO or a device at a path is refused, never waited on.

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
from broker.trust.crlstate import AcceptedCrl, read_accepted, record_accepted
from broker.trust.fitness import CONSUMERS_CA, Purpose, read_pem, unfit_ca, unfit_leaf
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
    _load_chain(ctx, cert, key, "server")
    _load_ca(ctx, client_ca, must_be_ca=True)
    if crl is not None:
        _load_ca(ctx, crl)  # a PEM CRL loads like a CA file
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_context(
    ca: Path,
    cert: Path | None = None,
    key: Path | None = None,
    *,
    cls: type[ssl.SSLContext] = ssl.SSLContext,
) -> ssl.SSLContext:
    """For consumers of the API (and our own readiness checks): verifies the server. `cls`
    is a subclass for a client that must adjust how sockets are wrapped (the MQTT sink)."""
    ctx = cls(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(ctx, ca)
    if cert is not None:
        _load_chain(ctx, cert, key)
    return ctx


def _load_chain(
    ctx: ssl.SSLContext, cert: Path, key: Path | None, purpose: Purpose | None = None
) -> None:
    try:
        unfit = unfit_leaf(cert, key, purpose)
    except OSError as e:
        raise TrustError(_unreadable(e)) from e
    if unfit is not None:
        raise TrustError(f"{unfit[0]}: {unfit[1]}")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise TrustError(
            f"{cert}: cannot use certificate with key {key}: {e.reason or e}; "
            "check that both are PEM and belong together"
        ) from e


def _load_ca(ctx: ssl.SSLContext, ca: Path, *, must_be_ca: bool = False) -> None:
    """Load the CA file (or CRL: OpenSSL reads both from a file, not from `cadata`) `ca`,
    once a bounded read has shown it a regular file of sensible size."""
    try:
        unfit = unfit_ca(ca, CONSUMERS_CA) if must_be_ca else None
        read_pem(ca)
    except OSError as e:
        raise TrustError(_unreadable(e)) from e
    if unfit is not None:
        raise TrustError(f"{ca}: {unfit}")
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:
        raise TrustError(f"{ca}: not a usable PEM CA certificate: {e.reason or e}") from e


def _unreadable(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return f"{e.filename}: file not found"
    return f"{e.filename}: cannot read: {e.strerror}"


class EndpointReloader:
    """The consumer endpoint's TLS context in force, replaced by a fresh one when its files
    change (checked by `check`, on SIGHUP and every second), and the serials of the CRL in
    force, which the API refuses at every request (so a revocation also reaches connections
    made before it).

    A reload builds a new context from the current certificate, key, client CA and CRL files
    and swaps it in whole: the listener reads `context` for every new handshake, established
    connections keep the one they were made with. Nothing accumulates from earlier loads: a
    CA removed from the client CA file is no longer trusted, and only the new CRL is in force
    (OpenSSL, given two CRLs of one issuer stamped in the same second, would keep the first).

    A CRL must be signed by a CA of the client CA file, and must be shown at least as new as
    the last one accepted from its issuer: a higher CRL number, or the very same list. An
    older CRL put back would un-revoke certificates; so would another list under the same
    number. With a `state_dir` the accepted number and hash of each issuer are recorded there
    (crlstate) before the context that enforces them is swapped in, and compared at the next
    start as at a reload. A CRL without a number is accepted only first (nothing to compare
    it with). A reload that fails in any part is refused with `tls_reload_refused`, and the
    context in force stays as it was, CRL included. At start, a CRL older than the one
    recorded is refused the same way, and the half starts refusing every consumer in the
    handshake until a CRL at least as new is installed: an endpoint that serves no one is
    safer than one that serves a revoked certificate.
    """

    def __init__(self, config: TlsConfig, state_dir: Path | None = None) -> None:
        self._config = config
        self._state_dir = state_dir
        self._seen = self._fingerprints()  # first: a change while loading is seen next time
        self._accepted = read_accepted(state_dir) if state_dir is not None else {}
        self._deferred = False  # a reload put off by an OS error, logged once until it works
        crl = _current_crl(config)
        try:
            _succeeds(crl, self._accepted, config, first=True)
        except TrustError as e:
            self._crl: CrlFacts | None = None
            self.context, self.revoked = _refusing_everyone(config), frozenset[str]()
            structlog.get_logger("tls").error("tls_reload_refused", error=str(e), kept=self._kept())
            return
        self.context, self.revoked = _endpoint(config, crl)
        try:
            self._record(crl)
        except OSError as e:
            raise TrustError(
                f"{state_dir}: cannot record the CRL accepted ({e.strerror}); the half needs "
                "its state dir writable"
            ) from e
        self._crl = crl

    @property
    def refusing_everyone(self) -> bool:
        """At start the CRL was older than the one accepted before: no consumer is served."""
        return self._crl is None and self._config.crl is not None

    def check(self, *, force: bool = False) -> frozenset[str] | None:
        """The serials of the CRL in force after a reload, or None if nothing changed."""
        seen, before = self._fingerprints(), self._seen
        if seen == before and not force:
            return None
        self._seen = seen
        log = structlog.get_logger("tls")
        config = self._config
        try:
            crl = _current_crl(config)
            _succeeds(crl, self._accepted, config, first=False)
            context, revoked = _endpoint(config, crl)
            self._record(crl)  # before it takes effect: a restart never goes below it
        except TrustError as e:
            log.error("tls_reload_refused", error=str(e), kept=self._kept())
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

    def _record(self, crl: CrlFacts | None) -> None:
        if crl is None:
            return
        accepted = AcceptedCrl(crl.issuer, crl.number, crl.sha256)
        if self._accepted.get(crl.issuer) == accepted:
            return
        updated = self._accepted | {crl.issuer: accepted}
        if self._state_dir is not None:
            record_accepted(self._state_dir, updated)
        self._accepted = updated

    def _kept(self) -> str:
        if self.refusing_everyone:
            return (
                "every consumer refused in the handshake until a CRL at least as new as the "
                "one accepted before is installed"
            )
        number = self._crl.number if self._crl is not None else "(none)"
        return f"the TLS context in force, CRL number {number}"

    def _fingerprints(self) -> tuple[tuple[int, int, int] | None, ...]:
        paths = [self._config.cert, self._config.key, self._config.client_ca, self._config.crl]
        return tuple(_fingerprint(p) for p in paths)


def _current_crl(config: TlsConfig) -> CrlFacts | None:
    return None if config.crl is None else read_crl(config.crl, config.client_ca)


def _succeeds(
    new: CrlFacts | None, accepted: dict[str, AcceptedCrl], config: TlsConfig, *, first: bool
) -> None:
    """Refuse a CRL that cannot be shown at least as new as the last one accepted from its
    issuer (a rollback)."""
    if new is None:
        return  # no CRL configured
    before = accepted.get(new.issuer)
    if before is not None and before.sha256 == new.sha256:
        return  # the same list read again
    fix = "publish a new CRL with `dmzbroker certs crl`, which numbers every CRL it writes"
    if new.number is None:
        if first and before is None:
            return  # nothing to compare it with
        raise TrustError(
            f"{config.crl}: the new CRL has no CRL number, so it cannot be told from an older "
            f"one put back; {fix}"
        )
    if before is None or before.crl_number is None:
        return
    if new.number < before.crl_number:
        raise TrustError(
            f"{config.crl}: CRL number {new.number} is not higher than {before.crl_number}, the "
            f"number of the CRL last accepted from {new.issuer}: an older CRL put back would "
            f"un-revoke certificates; {fix}"
        )
    if new.number == before.crl_number:
        raise TrustError(
            f"{config.crl}: CRL number {new.number} is not higher than {before.crl_number}, and "
            f"the list differs from the one accepted under that number from {new.issuer} "
            f"(sha256 {before.sha256}): a CRL must not be replaced under its number; {fix}"
        )


def _refusing_everyone(config: TlsConfig) -> ssl.SSLContext:
    """A context in which every client certificate fails: it must be checked against a CRL
    and none is loaded (OpenSSL: "unable to get certificate CRL")."""
    context = server_context(config.cert, config.key, config.client_ca, profile=config.profile)
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def _endpoint(config: TlsConfig, crl: CrlFacts | None) -> tuple[ssl.SSLContext, frozenset[str]]:
    """A fresh context for the consumer endpoint, and the serials the API must refuse itself:
    every serial of the CRL, fresh or stale, so that a connection made before the CRL was in
    force is refused at its next request (the handshake checks only new connections).

    A fresh CRL is enforced in the handshake too. A CRL past its nextUpdate is, by default,
    which refuses every consumer until a new one is published; with `stale_crl: accept` the
    stale list refuses the serials it names in the API only.
    """
    in_tls = crl
    revoked = crl.serials if crl is not None else frozenset[str]()
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
            in_tls = None
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
