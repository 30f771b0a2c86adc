"""Opening an OPC UA session exactly as the policy and the appliance config say, never weaker.

The server must offer the policy's security policy and mode; its certificate must be pinned
by the policy (SHA-256) or be in the plant's trust list, and it is checked *before* the
secure channel is opened with it: asyncua itself would take whatever certificate a server
offers. Security None only when the policy says so, and then each session is audited.
This module opens and closes sessions; it sends no service that reads or writes data.

It is also where asyncua's exceptions become ours (`session_error`, `failure`): whatever the
library raises, a caller gets a `DeviceError` whose message says what happened in words an
operator can act on, never a library traceback. A strict server that refuses the broker's
own certificate (the usual first step of commissioning) is named as such, with what to give
its administrator to trust.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import traceback
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog
from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import security_policies
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.config import OpcUaConfig, OpcUaUserConfig
from broker.errors import ConfigError, DeviceError, TrustError
from broker.plant.connectors.base import raise_if_cancelled
from broker.plant.connectors.opcua_limits import bounded_client
from broker.policy import OpcUaDevice

POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
    "None": security_policies.SecurityPolicyNone,
}
MODES = {
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
    "Sign": ua.MessageSecurityMode.Sign,
    "None": ua.MessageSecurityMode.None_,
}
_CERTIFICATE_FILES = (".pem", ".crt", ".der")
# What a server answers when it does not (yet) trust the client's certificate. Many answer
# BadSecurityChecksFailed on purpose, so as not to tell a stranger why.
_NOT_TRUSTED = frozenset({
    StatusCodes.BadCertificateUntrusted,
    StatusCodes.BadSecurityChecksFailed,
    StatusCodes.BadCertificateChainIncomplete,
    StatusCodes.BadCertificateRevocationUnknown,
    StatusCodes.BadCertificateIssuerRevocationUnknown,
})  # fmt: skip

T = TypeVar("T")


class CertificateRefused(DeviceError):
    """The server refused the broker's own certificate: its administrator must trust it (or
    a new one must be issued). A trust problem, so the CLI exits 2 as for a TrustError."""

    exit_code = 2


class ServerCertificateUntrusted(TrustError):
    """The server's certificate is neither pinned nor in the trust list (or not the pinned
    one): carries what an operator compares before pinning or trusting it."""

    def __init__(self, message: str, certificate: x509.Certificate) -> None:
        super().__init__(message)
        self.sha256 = fingerprint(certificate)
        self.subject = subject_of(certificate)


def subject_of(certificate: x509.Certificate) -> str:
    """The certificate's subject on one line, its control and other unprintable characters
    escaped (`\\n`, `\\x1b`): a server's certificate is chosen by whoever runs the server, and
    must not break a one-line error or colour the fingerprint an operator compares."""
    shown = certificate.subject.rfc4514_string()
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in shown)


def fingerprint(certificate: x509.Certificate) -> str:
    """What `server_certificate_sha256` pins: the SHA-256 of the DER certificate, hex."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class TrustList:
    """Server certificates the plant trusts, and CAs whose direct issues it trusts."""

    certificates: tuple[x509.Certificate, ...] = ()

    @classmethod
    def load(cls, paths: Sequence[Path]) -> TrustList:
        files: list[Path] = []
        for path in paths:
            if path.is_dir():
                files += sorted(p for p in path.iterdir() if p.suffix in _CERTIFICATE_FILES)
            else:
                files.append(path)
        return cls(tuple(_read_certificate(f) for f in files))

    def check(self, unverified: x509.Certificate, pin: str | None) -> x509.Certificate:
        """The certificate, now trusted; raises TrustError naming why it is not."""
        now = dt.datetime.now(dt.UTC)
        if not unverified.not_valid_before_utc <= now <= unverified.not_valid_after_utc:
            raise TrustError(
                f"server certificate {fingerprint(unverified)} is outside its validity period "
                f"({unverified.not_valid_before_utc:%Y-%m-%d} to "
                f"{unverified.not_valid_after_utc:%Y-%m-%d})"
            )
        if pin is not None:
            if fingerprint(unverified) != pin:
                raise ServerCertificateUntrusted(
                    f"server certificate {fingerprint(unverified)} does not match the policy's "
                    f"server_certificate_sha256 {pin}",
                    unverified,
                )
            return unverified
        if unverified in self.certificates or any(
            _issued_by(unverified, ca) for ca in self.certificates
        ):
            return unverified
        raise ServerCertificateUntrusted(
            f"server certificate {fingerprint(unverified)} ({subject_of(unverified)})"
            " is neither pinned by the policy nor in plant.opcua.trust_list: if it is the "
            "right server, add its certificate to the trust list or pin its SHA-256",
            unverified,
        )


def _issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        certificate.verify_directly_issued_by(ca)
    except (x509.ExtensionNotFound, ValueError, TypeError, InvalidSignature):
        return False
    return is_ca


def _read_certificate(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (OSError, ValueError) as e:
        raise TrustError(f"{path}: not a readable certificate (PEM or DER): {e}") from e


@dataclass(frozen=True)
class ClientCertificate:
    """The plant's application instance certificate, with the URI its SAN names."""

    certificate: Path
    private_key: Path
    application_uri: str
    sha256: str  # what a server's administrator compares before trusting it
    subject: str

    @classmethod
    def load(cls, certificate: Path, private_key: Path) -> ClientCertificate:
        for path in (certificate, private_key):
            if path.suffix != ".pem":  # asyncua tells PEM from DER by the file name
                raise TrustError(f"{path}: expected a .pem file (`dmzbroker certs issue opcua`)")
        cert = _read_certificate(certificate)
        try:
            key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise TrustError(f"{private_key}: not a readable PEM private key: {e}") from e
        if not isinstance(key, rsa.RSAPrivateKey) or key.public_key() != cert.public_key():
            raise TrustError(f"{private_key}: not the RSA key of {certificate}")
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uri = san.value.get_values_for_type(x509.UniformResourceIdentifier)[0]
        except (x509.ExtensionNotFound, IndexError) as e:
            raise TrustError(f"{certificate}: no application URI in its SAN") from e
        return cls(certificate, private_key, uri, fingerprint(cert), subject_of(cert))


@dataclass(frozen=True)
class SessionSettings:
    """Everything one device's sessions need, checked once when the connector is built."""

    device: OpcUaDevice
    client: ClientCertificate | None  # None only for security None without a user certificate
    trust: TrustList
    user: OpcUaUserConfig | None
    password: str | None = None

    @classmethod
    def build(
        cls, device: OpcUaDevice, config: OpcUaConfig | None, *, require_trust: bool = True
    ) -> SessionSettings:
        """Raises ConfigError or TrustError naming the device and what to configure. Without
        `require_trust` (discover), nothing to trust the server by is not an error here: the
        session then refuses the server's certificate, naming its SHA-256."""
        where = f"OPC UA device {device.name!r}"
        user = config.users.get(device.name) if config else None
        wanted = {"username": "username", "certificate": "certificate"}.get(device.user_identity)
        if wanted is not None and (user is None or getattr(user, wanted) is None):
            raise ConfigError(
                f"{where}: its policy asks for {device.user_identity} identity; give it in "
                f"broker.yaml plant.opcua.users.{device.name}"
            )
        if device.user_identity == "anonymous":
            user = None
        if config is None:
            if not device.unsecured:
                raise ConfigError(
                    f"{where}: {device.security_policy} needs the plant's OPC UA certificate: "
                    "set plant.opcua.certificate and private_key in broker.yaml "
                    "(`dmzbroker certs issue opcua`)"
                )
            return cls(device, None, TrustList(), None)
        if (
            require_trust
            and not device.unsecured
            and device.server_certificate_sha256 is None
            and not (config.trust_list)
        ):
            raise ConfigError(
                f"{where}: nothing to trust its server certificate by: pin it in the policy "
                "(server_certificate_sha256) or set plant.opcua.trust_list in broker.yaml"
            )
        password = None
        if user is not None and user.password_file is not None:
            try:
                password = user.password_file.read_text().splitlines()[0]
            except (OSError, IndexError) as e:
                raise ConfigError(f"{where}: cannot read {user.password_file}: {e}") from e
        return cls(
            device,
            ClientCertificate.load(config.certificate, config.private_key),
            TrustList.load(config.trust_list),
            user,
            password,
        )


@contextlib.asynccontextmanager
async def open_session(settings: SessionSettings) -> AsyncIterator[Client]:
    """A connected client; raises DeviceError (no answer, no such endpoint) or TrustError."""
    device = settings.device
    log = structlog.get_logger("opcua").bind(device=device.name)
    client = bounded_client(device.endpoint, device.timeout_s)  # what a server can make us hold
    client.name = client.description = "dmzbroker"
    if settings.client is not None:
        client.application_uri = settings.client.application_uri
    try:
        await _secure(client, settings, log)
        await _identify(client, settings)
        await client.connect(auto_reconnect=False)  # reconnects are the connector's, with backoff
    except (DeviceError, TrustError):
        raise
    except Exception as e:  # whatever asyncua raises: it never leaves as a library error
        raise session_error(e, settings) from e
    finally:
        raise_if_cancelled()
    if device.unsecured:
        log.warning("opcua_security_none", endpoint=device.endpoint)  # audited, each session
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def _secure(client: Client, settings: SessionSettings, log: structlog.BoundLogger) -> None:
    """Pick the policy's endpoint and, when secured, trust its certificate first."""
    device = settings.device
    policy, mode = POLICIES[device.security_policy], MODES[device.security_mode]
    offered = await client.connect_and_get_server_endpoints()  # discovery over a None channel
    raise_if_cancelled()
    endpoint = next(
        (e for e in offered if e.SecurityPolicyUri == policy.URI and e.SecurityMode == mode), None
    )
    if endpoint is None:
        offers = sorted(
            {f"{_policy_name(e.SecurityPolicyUri)}/{e.SecurityMode.name}" for e in offered}
        )
        log.warning(
            "opcua_endpoint_refused",
            wanted=f"{device.security_policy}/{device.security_mode}",
            offered=offers,
        )
        raise DeviceError(
            f"{device.endpoint} offers no {device.security_policy}/{device.security_mode} "
            f"endpoint (it offers {', '.join(offers) or 'none'}); the policy decides security"
        )
    if device.unsecured:
        return
    assert settings.client is not None  # SessionSettings.build requires it when secured
    try:
        unverified = x509.load_der_x509_certificate(_first_certificate(endpoint.ServerCertificate))
    except ValueError as e:
        raise TrustError(f"{device.endpoint}: the server sent no usable certificate") from e
    try:
        trusted = settings.trust.check(unverified, device.server_certificate_sha256)
    except TrustError as e:
        log.warning(
            "opcua_server_certificate_refused",
            sha256=fingerprint(unverified),
            subject=subject_of(unverified),
            error=str(e),
        )
        raise
    await client.set_security(
        policy,
        str(settings.client.certificate),
        str(settings.client.private_key),
        server_certificate=trusted.public_bytes(serialization.Encoding.DER),
        mode=mode,
    )


async def _identify(client: Client, settings: SessionSettings) -> None:
    user = settings.user
    if user is None:
        return
    if user.username is not None:
        client.set_user(user.username)
        client.set_password(settings.password or "")
    elif user.certificate is not None and user.private_key is not None:
        await client.load_client_certificate(str(user.certificate))
        await client.load_private_key(user.private_key)


def _first_certificate(der: bytes | None) -> bytes:
    """A server may send its certificate followed by its chain; the leaf comes first."""
    if not der or len(der) < 2 or der[0] != 0x30:
        raise ValueError("not a DER certificate")
    if der[1] < 0x80:
        return der[: 2 + der[1]]
    size = der[1] & 0x7F
    return der[: 2 + size + int.from_bytes(der[2 : 2 + size], "big")]


def _policy_name(uri: str) -> str:
    return uri.rpartition("#")[2]


def session_error(e: Exception, settings: SessionSettings) -> DeviceError:
    """Why a session could not be opened, from what asyncua raised while opening it."""
    endpoint = settings.device.endpoint
    client = settings.client
    status = e.code if isinstance(e, UaStatusCodeError) else None
    if client is not None and (status in _NOT_TRUSTED or _secure_channel_refused(e)):
        why = ua.StatusCode(status).name if status is not None else "it refused the secure channel"
        return CertificateRefused(
            f"{endpoint}: the server refused the broker's certificate ({why}): give its "
            f"administrator {client.certificate} (SHA-256 {client.sha256}, subject "
            f"{client.subject}) to trust, then the device comes up by itself"
        )
    if (
        client is not None
        and status is not None
        and ua.StatusCode(status).name.startswith("BadCertificate")
    ):  # expired, revoked, wrong URI or key usage: trusting it again would not help
        return CertificateRefused(
            f"{endpoint}: the server refused the broker's certificate {client.certificate} "
            f"({failure(e)}): issue a new one (`dmzbroker certs issue opcua`)"
        )
    return DeviceError(f"cannot open a session with {endpoint}: {failure(e)}")


async def call(request: Awaitable[T]) -> T:
    """One service call: whatever asyncua raises leaves as a DeviceError (`failure`)."""
    try:
        result = await request
    except Exception as e:  # whatever asyncua raises: it never leaves as a library error
        raise DeviceError(failure(e)) from e
    raise_if_cancelled()
    return result


def failure(e: BaseException) -> str:
    """What asyncua raised, in one line: its own errors as they are, anything else named
    as unexpected (an assertion or a bug inside the library, never a device's answer)."""
    if isinstance(e, UaStatusCodeError):
        return str(e)  # the status' description and name: "The certificate … (BadCertificate…)"
    if isinstance(e, OSError | TimeoutError | UaError):
        return str(e) or type(e).__name__
    return f"unexpected {type(e).__name__} in asyncua" + (f": {e}" if str(e) else "")


def _secure_channel_refused(e: Exception) -> bool:
    """asyncua 2.1 raises a bare AssertionError (ua_client.py, open_secure_channel) when a
    server answers OpenSecureChannel with a fault instead of a channel, as strict servers
    do when they do not trust the client's certificate: the status is lost on the way."""
    return isinstance(e, AssertionError) and any(
        frame.name == "open_secure_channel" for frame in traceback.extract_tb(e.__traceback__)
    )
