"""A real asyncua OPC UA server on 127.0.0.1 for the connector and discover tests.

It counts every service request it receives (by hooking asyncua's request dispatch, the one
place all session services pass through), so tests can prove which services the broker
sent, and it records which user identities logged in.

It can also be strict, as commissioned Kepware- or Siemens-class servers are: client
certificates are checked against a trust folder its administrator fills (`trust()` adds one
while it runs). asyncua checks them at CreateSession (BadCertificateUntrusted); with
`refuse_at="channel"` they are checked when the secure channel opens, and refused with a
fault in the OpenSecureChannel answer, as strict servers do (asyncua's own client then
raises a bare AssertionError). And it can misbehave as no server does on purpose: serve
values as they are set (`hostile=True`: of any type whatever the node's DataType, and with
their value beside a Bad status), and lose its Publish responses (`publishing`).
"""

from __future__ import annotations

import asyncio
import shutil
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.uaprocessor import UaProcessor
from asyncua.server.user_managers import User, UserRole
from asyncua.ua.ua_binary import struct_from_binary
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.harness import dmzbroker, free_port

NAMESPACE = "urn:dmzbroker:test:plant"
SERVER_URI = "urn:dmzbroker:test:server"
CLIENT_URI = "urn:dmzbroker:test:broker"
USERNAME, PASSWORD = "historian", "correct horse"

SECURE = (
    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ua.SecurityPolicyType.Basic256Sha256_Sign,
    ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
    ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
)
INSECURE = (ua.SecurityPolicyType.NoSecurity,)

# Service requests each server received, by name ("ReadRequest"), keyed by its InternalServer.
_SERVICES: weakref.WeakKeyDictionary[Any, Counter[str]] = weakref.WeakKeyDictionary()
_dispatch = UaProcessor._process_message


async def _counted(self: UaProcessor, typeid: ua.NodeId, *args: Any) -> Any:
    name = ua.ObjectIdNames.get(typeid.Identifier, str(typeid))
    _SERVICES.setdefault(self.iserver, Counter())[name.removesuffix("_Encoding_DefaultBinary")] += 1
    return await _dispatch(self, typeid, *args)


UaProcessor._process_message = _counted  # type: ignore[method-assign]

# Servers (by InternalServer) that check client certificates when the channel opens, and
# those whose Publish responses are lost.
_STRICT_CHANNEL: weakref.WeakKeyDictionary[Any, TrustStore] = weakref.WeakKeyDictionary()
_MUTED: weakref.WeakSet[Any] = weakref.WeakSet()
_open_channel = UaProcessor.open_secure_channel
_forward_publish = UaProcessor.forward_publish_response


def _strict_open(self: UaProcessor, algohdr: Any, seqhdr: Any, body: Any) -> None:
    store = _STRICT_CHANNEL.get(self.iserver)
    sender = algohdr.SenderCertificate
    if store is None or not sender or store.is_trusted(x509.load_der_x509_certificate(sender)):
        return _open_channel(self, algohdr, seqhdr, body)
    request = struct_from_binary(ua.OpenSecureChannelRequest, body)
    self._connection.select_policy(
        algohdr.SecurityPolicyURI, sender, request.Parameters.SecurityMode
    )
    fault = ua.ServiceFault()
    fault.ResponseHeader.ServiceResult = ua.StatusCode(ua.StatusCodes.BadSecurityChecksFailed)
    self.send_response(
        request.RequestHeader.RequestHandle, seqhdr, fault, ua.MessageType.SecureOpen
    )
    return None


async def _maybe_lost(self: UaProcessor, result: Any, requestdata: Any) -> None:
    if self.iserver not in _MUTED:
        await _forward_publish(self, result, requestdata)


UaProcessor.open_secure_channel = _strict_open  # type: ignore[method-assign]
UaProcessor.forward_publish_response = _maybe_lost  # type: ignore[method-assign]


@dataclass(frozen=True)
class OpcUaPki:
    """Certificates made by `dmzbroker certs`: the broker's, servers', a user's."""

    ca: Path
    client_cert: Path
    client_key: Path
    server_cert: Path  # from `ca`
    server_key: Path
    rogue_cert: Path  # a server certificate from another CA: never trusted
    rogue_key: Path
    user_cert: Path  # a user identity certificate
    user_key: Path


def make_pki(root: Path) -> OpcUaPki:
    ca, other = root / "ca", root / "other-ca"
    dmzbroker("certs", "init-ca", "--out", str(ca), "--name", "plant CA")
    dmzbroker("certs", "init-ca", "--out", str(other), "--name", "someone else")
    issued = [
        (ca, "broker", CLIENT_URI),
        (ca, "server", SERVER_URI),
        (other, "rogue", SERVER_URI),
        (ca, "user", "urn:dmzbroker:test:user"),
    ]
    for issuer, name, uri in issued:
        dmzbroker("certs", "issue", "opcua", "--ca", str(issuer), "--out", str(root),
                  "--name", name, "--uri", uri, "--dns", "localhost")  # fmt: skip
    pem = {name: (root / f"{name}-cert.pem", root / f"{name}-key.pem") for _, name, _ in issued}
    return OpcUaPki(ca / "ca.crt", *pem["broker"], *pem["server"], *pem["rogue"], *pem["user"])


class _Users:
    """Anonymous, one username/password, and the test user certificate; records who logged in."""

    def __init__(self, user_cert: Path) -> None:
        pem = x509.load_pem_x509_certificate(user_cert.read_bytes())
        self.user_cert = pem.public_bytes(serialization.Encoding.DER)
        self.seen: list[str] = []

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        # `certificate` is the X509 identity token's, else the client application's, DER
        if certificate == self.user_cert:
            who = "certificate"
        elif username is not None:
            who = "username" if (username, password) == (USERNAME, PASSWORD) else None
        else:
            who = "anonymous"
        if who is not None:
            self.seen.append(who)
        return User(role=UserRole.User) if who else None


class OpcUaTestServer:
    """One server; `variables` name the nodes `ns=2;s=NAME` with their first values."""

    def __init__(
        self,
        pki: OpcUaPki,
        variables: dict[str, Any],
        policies: Iterable[ua.SecurityPolicyType] = (*SECURE, *INSECURE),
        rogue: bool = False,
        trusted_clients: Path | None = None,
        refuse_at: Literal["session", "channel"] = "session",
        hostile: bool = False,
        revocations: Path | None = None,
    ) -> None:
        """With `trusted_clients` (a folder of certificates, not empty), only clients whose
        certificate it holds, or whose issuer it holds, may open a session; and with
        `revocations` (a folder of CRLs), only those no CRL there revokes."""
        self.port = free_port()
        self.endpoint = f"opc.tcp://127.0.0.1:{self.port}/dmzbroker-test"
        self.users = _Users(pki.user_cert)
        self.server = Server(user_manager=self.users)  # type: ignore[arg-type]
        self.cert, self.key = (
            (pki.rogue_cert, pki.rogue_key) if rogue else (pki.server_cert, pki.server_key)
        )
        self._policies = list(policies)
        self._variables = variables
        self.namespace = 0
        self.trusted_clients = trusted_clients
        self._refuse_at = refuse_at
        self._trust: TrustStore | None = None
        self._hostile = hostile
        self._revocations = revocations

    @property
    def services(self) -> Counter[str]:
        return _SERVICES.get(self.server.iserver, Counter())

    def node(self, name: str) -> str:
        return f"ns={self.namespace};s={name}"

    async def start(self) -> None:
        server = self.server
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("dmzbroker test server")
        await server.set_application_uri(SERVER_URI)
        await server.load_certificate(str(self.cert))
        await server.load_private_key(str(self.key))
        server.set_security_policy(self._policies)
        server.set_identity_tokens(
            [ua.AnonymousIdentityToken, ua.UserNameIdentityToken, ua.X509IdentityToken]
        )
        if self.trusted_clients is not None:
            self._trust = TrustStore(
                [self.trusted_clients], [self._revocations] if self._revocations else []
            )
            await self._trust.load()
            options = CertificateValidatorOptions
            server.set_certificate_validator(
                CertificateValidator(options.TRUSTED_VALIDATION | options.PEER_CLIENT, self._trust)
            )
            if self._refuse_at == "channel":
                _STRICT_CHANNEL[server.iserver] = self._trust
        self.namespace = await server.register_namespace(NAMESPACE)
        plant = await server.nodes.objects.add_object(self.namespace, "Plant")
        for name, value in self._variables.items():
            variable = await plant.add_variable(ua.NodeId(name, self.namespace), name, value)
            units = ua.EUInformation(DisplayName=ua.LocalizedText("kW"))
            units_id = ua.NodeId(f"{name}.EngineeringUnits", self.namespace)
            await variable.add_property(units_id, ua.QualifiedName("EngineeringUnits", 0), units)
        await server.start()

    async def stop(self) -> None:
        _STRICT_CHANNEL.pop(self.server.iserver, None)
        _MUTED.discard(self.server.iserver)
        await self.server.stop()

    async def trust(self, certificate: Path) -> None:
        """What the administrator does: put the client's certificate in the trust folder
        and have the server reload it, while it keeps running."""
        assert self.trusted_clients is not None and self._trust is not None
        shutil.copy(certificate, self.trusted_clients / certificate.name)
        await self.reload_trust()

    async def reload_trust(self) -> None:
        """Read the trust and CRL folders again, as an administrator has the server do."""
        assert self._trust is not None
        await self._trust.load()

    @property
    def publishing(self) -> bool:
        return self.server.iserver not in _MUTED

    @publishing.setter
    def publishing(self, on: bool) -> None:
        """Off: every Publish response is lost on the way, and the requests stay unanswered."""
        if on:
            _MUTED.discard(self.server.iserver)
        else:
            _MUTED.add(self.server.iserver)

    def revise_keep_alive(
        self,
        to_at_least: int,
        modify: Literal["honoured", "ignored", "refused"] = "honoured",
    ) -> None:
        """Revise every keep-alive count asked for up to `to_at_least` (node-opcua makes 1
        into 2). ModifySubscription
        is then "honoured" as the specification says (asyncua ignores it: "ignored" answers
        with the subscription unchanged, as a server that cannot change it does), or
        "refused" with BadServiceUnsupported, as a minimal embedded server does."""
        service = self.server.iserver.subscription_service
        service._clamp_keep_alive_count = lambda requested: max(requested, to_at_least)
        ignore = service.modify_subscription

        def modified(params: ua.ModifySubscriptionParameters) -> ua.ModifySubscriptionResult:
            if modify == "refused":
                raise ServiceError(ua.StatusCodes.BadServiceUnsupported)
            if modify == "honoured":
                data = service.subscriptions[params.SubscriptionId].data
                data.RevisedPublishingInterval = params.RequestedPublishingInterval
                data.RevisedMaxKeepAliveCount = max(params.RequestedMaxKeepAliveCount, to_at_least)
                subscription = service.subscriptions[params.SubscriptionId]
                if subscription._task is not None:  # its loop read the period when it began
                    subscription._task.cancel()
                    subscription._task = asyncio.create_task(subscription._subscription_loop())
            return ignore(params)

        service.modify_subscription = modified

    async def restart(self) -> None:
        """Back on the same port with the same address space, as after a power cycle."""
        await self.server.start()

    async def set(
        self,
        name: str,
        value: Any,
        status: int = ua.StatusCodes.Good,
        source_time: datetime | None = None,
    ) -> None:
        node = ua.NodeId(name, self.namespace)
        data = ua.DataValue(
            value if isinstance(value, ua.Variant) else ua.Variant(value),
            StatusCode=ua.StatusCode(status),
            SourceTimestamp=source_time or datetime.now(UTC),
            ServerTimestamp=datetime.now(UTC),
        )
        if not self._hostile:
            await self.server.write_attribute_value(node, data)
            return
        # asyncua would refuse another type than the node's, and null a value beside a Bad
        # status (as servers shall): set it as it is, and notify the monitored items.
        attribute = self.server.iserver.aspace._nodes[node].attributes[ua.AttributeIds.Value]
        attribute.value, attribute.value_callback = data, None
        for handle, notify in list(attribute.datachange_callbacks.items()):
            await notify(handle, data)
