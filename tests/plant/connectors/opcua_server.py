"""A real asyncua OPC UA server on 127.0.0.1 for the connector and discover tests.

It counts every service request it receives (by hooking asyncua's request dispatch, the one
place all session services pass through), so tests can prove which services the broker
sent, and it records which user identities logged in.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.server.uaprocessor import UaProcessor
from asyncua.server.user_managers import User, UserRole
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
    ) -> None:
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
        self.namespace = await server.register_namespace(NAMESPACE)
        plant = await server.nodes.objects.add_object(self.namespace, "Plant")
        for name, value in self._variables.items():
            variable = await plant.add_variable(ua.NodeId(name, self.namespace), name, value)
            units = ua.EUInformation(DisplayName=ua.LocalizedText("kW"))
            units_id = ua.NodeId(f"{name}.EngineeringUnits", self.namespace)
            await variable.add_property(units_id, ua.QualifiedName("EngineeringUnits", 0), units)
        await server.start()

    async def stop(self) -> None:
        await self.server.stop()

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
        await self.server.write_attribute_value(
            ua.NodeId(name, self.namespace),
            ua.DataValue(
                ua.Variant(value),
                StatusCode=ua.StatusCode(status),
                SourceTimestamp=source_time or datetime.now(UTC),
                ServerTimestamp=datetime.now(UTC),
            ),
        )
