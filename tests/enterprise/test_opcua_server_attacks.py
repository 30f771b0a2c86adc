"""Attacks on the read-only OPC UA mirror, by clients that hold the wrong certificate, none,
or a good one and try what a read-only mirror must refuse (ADR 0025, docs/opcua-server.md).

Each attack is refused, audited (the event logged is in the audit catalogue), and leaves the
served values as they were. Where asyncua's client will not send a request as an attacker
would (no session, a None channel, another client's certificate in CreateSession), the
request is sent through its lower layer (`client.uaclient`), which encodes whatever it is
given. A second, independent stack (o6: open62541, in a child process) reads the same
values and is refused the same way.

One mirror serves the whole module (`served`); each test gets it as the others left it to
find (`mirror`: ROOM and POWER written again, no session or connection of another test
left, the audit log writable) with the events logged during that test only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
import structlog
from asyncua import Client, ua
from asyncua.crypto import security_policies as sp
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker import policy
from broker.audit.catalogue import EVENTS
from broker.audit.log import AuditLog
from broker.config import BrokerConfig
from broker.enterprise.authz import Authorization
from broker.enterprise.outputs import opcua, opcua_session
from broker.enterprise.outputs.base import OutputContext
from broker.enterprise.outputs.opcua import OpcUaServer
from broker.enterprise.outputs.opcua_items import (
    MAX_ITEMS_PER_REQUEST,
    MAX_QUEUE,
    MIN_PUBLISHING_MS,
)
from broker.enterprise.outputs.opcua_session import DROPPED_GRACE_S, MAX_SESSIONS_PER_IDENTITY
from broker.enterprise.store import Store
from broker.metrics import EnterpriseMetrics
from broker.records import Alert, Context, Record
from tests.harness import (
    CONSUMER_URI,
    DEMO_POLICY,
    ENERGY_URI,
    MONITORING_URI,
    REPO,
    STRANGER_URI,
    Pki,
    dmzbroker,
    eventually,
    free_port,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.asyncio(loop_scope="module")]

ROOM = "coldstore/storage/cold-room-1/temperature"  # the historian's, not the energy dashboard's
POWER = "coldstore/machine-room/compressor-1/motor_power"  # granted to both
NAMESPACE = "urn:dmzbroker:coldstore-demo"
SERVER_URI = "urn:test:dmzbroker:mirror"
S = ua.StatusCodes
REFUSED = (S.BadUserAccessDenied, S.BadNotWritable)  # what a mutating service may be answered


@dataclass(frozen=True)
class Keys:
    """Certificates for the attacks: `clients` by name → (certificate, key), PEM."""

    ca_dir: Path  # a copy of the test CA (it revokes one of its certificates)
    ca_der: Path  # its certificate in DER, the server's chain for o6
    crl: Path
    crl_der: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]

    def cert_der(self, name: str) -> bytes:
        cert = x509.load_pem_x509_certificate(self.clients[name][0].read_bytes())
        return cert.public_bytes(serialization.Encoding.DER)


IDENTITIES = {"historian": CONSUMER_URI, "energy": ENERGY_URI, "stranger": STRANGER_URI,
              "prometheus": MONITORING_URI, "revoked": CONSUMER_URI, "intruder": CONSUMER_URI,
              "self-signed": CONSUMER_URI}  # fmt: skip


@pytest.fixture(scope="module")
def keys(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Keys:
    root = tmp_path_factory.mktemp("opcua-attacks")
    ca = root / "ca"
    shutil.copytree(pki.ca.parent, ca)
    out = root / "issued"
    dmzbroker("certs", "issue", "opcua-server", "--ca", str(ca), "--out", str(out), "--der",
              "--uri", SERVER_URI, "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
    for name in ("historian", "energy", "stranger", "prometheus", "revoked"):
        dmzbroker("certs", "issue", "opcua", "--ca", str(ca), "--out", str(out),
                  "--uri", IDENTITIES[name], "--name", name)  # fmt: skip
    other = root / "other-ca"  # a CA the mirror does not trust, issuing the historian's URI
    dmzbroker("certs", "init-ca", "--out", str(other), "--name", "someone else's CA")
    dmzbroker("certs", "issue", "opcua", "--ca", str(other), "--out", str(out),
              "--uri", CONSUMER_URI, "--name", "intruder")  # fmt: skip
    _self_signed(out, "self-signed", CONSUMER_URI)
    revoked = x509.load_pem_x509_certificate((out / "revoked-cert.pem").read_bytes())
    dmzbroker("certs", "revoke", f"{revoked.serial_number:x}", "--reason", "key_compromise",
              "--ca", str(ca))  # fmt: skip
    dmzbroker("certs", "crl", "--ca", str(ca), "--der")
    (ca_der,) = out.glob("ca-*.der")
    names = (*IDENTITIES,)
    return Keys(
        ca, ca_der, ca / "crl.pem", ca / "crl.der", out / "opcua-server-cert.pem",
        out / "opcua-server-key.pem",
        {n: (out / f"{n}-cert.pem", out / f"{n}-key.pem") for n in names},
    )  # fmt: skip


def _self_signed(out: Path, name: str, uri: str) -> None:
    """What an attacker makes for itself: the historian's URI, signed by its own key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (out / f"{name}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{name}-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def served_record(signal: str, value: float, seq: int) -> Record:
    """A record whose broker_time is ahead: it stays `good` however slow the machine (the
    store ages values by broker_time), so what is served can be compared exactly."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return Record(
        signal=signal, value=value, unit="degC", quality="good",
        source_time=now - dt.timedelta(seconds=1), broker_time=now + dt.timedelta(hours=1),
        policy_version=1, context=Context(asset_state="running"), seq=seq,
    )  # fmt: skip


@dataclass
class Mirror:
    server: OpcUaServer
    store: Store
    keys: Keys
    logs: list[dict[str, Any]]  # every structlog event while the test ran
    audit: AuditLog

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def events(self, name: str) -> list[dict[str, Any]]:
        assert name in EVENTS, f"{name} is not an audit event"
        return [e for e in self.logs if e["event"] == name]

    def client(self, name: str = "historian") -> Client:
        client = Client(self.endpoint, timeout=20)
        client.application_uri = IDENTITIES[name]
        return client

    async def secured(
        self,
        name: str = "historian",
        *,
        policy: type[sp.SecurityPolicy] = sp.SecurityPolicyBasic256Sha256,
        mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt,
        key_of: str | None = None,
    ) -> Client:
        """A client with `name`'s certificate (and the key of `key_of`, if given), the
        server's certificate pinned (asyncua checks none by itself)."""
        client = self.client(name)
        cert, key = self.keys.clients[name]
        key = self.keys.clients[key_of][1] if key_of else key
        await client.set_security(
            policy, str(cert), str(key), server_certificate=str(self.keys.server_cert), mode=mode
        )
        return client

    @contextlib.asynccontextmanager
    async def session(self, name: str = "historian") -> AsyncIterator[Client]:
        client = await self.secured(name)
        await client.connect()
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()


def _config(tmp_path: Path, pki: Pki, keys: Keys) -> BrokerConfig:
    document = {
        "policy": str(tmp_path / "policy.dsse.json"),
        "trust_root": str(tmp_path / "trust-root.yaml"),
        "spool": {"dir": str(tmp_path / "spool")},
        "plant": {"state_dir": str(tmp_path / "plant-state")},
        "enterprise": {
            "state_dir": str(tmp_path / "enterprise-state"),
            "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key),
                    "client_ca": str(keys.ca_dir / "ca.crt"), "crl": str(keys.crl)},
            "opcua": {"host": "127.0.0.1", "port": free_port(),
                      "certificate": str(keys.server_cert), "private_key": str(keys.server_key)},
        },
        "audit": {"dir": str(tmp_path / "audit"), "key": str(tmp_path / "audit.key")},
    }  # fmt: skip
    return msgspec.convert(
        document, BrokerConfig, dec_hook=lambda t, v: Path(v) if t is Path else v
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(
    pki: Pki, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mirror]:
    """The mirror serving ROOM and POWER under the demo policy, on a free port."""
    tmp_path = tmp_path_factory.mktemp("attacked-mirror")
    demo = policy.load(DEMO_POLICY)
    store = Store(demo, queue_limit=100)
    audit = AuditLog(
        tmp_path / "opcua-audit", "enterprise", demo.deployment_id, Ed25519PrivateKey.generate()
    )
    metrics = EnterpriseMetrics(lambda: 0, lambda: audit.failing)
    context = OutputContext(
        _config(tmp_path, pki, keys), Authorization(demo), store, audit, metrics
    )
    server = opcua.configured(context)
    assert isinstance(server, OpcUaServer)
    await server.start()
    task = asyncio.create_task(server.run())
    try:
        await eventually(lambda: server.ready, timeout=60)
        yield Mirror(server, store, keys, [], audit)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.close()
        audit.close()


@pytest_asyncio.fixture(loop_scope="module")
async def mirror(served: Mirror) -> AsyncIterator[Mirror]:
    """The module's mirror as each test expects to find it, logging into the test's list."""
    served.audit.failing = False
    served.store.apply([served_record(ROOM, -18.5, 1), served_record(POWER, 12.25, 2)])
    server = served.server._server
    assert server is not None and server.bserver is not None
    bserver, ns = server.bserver, await server.get_namespace_index(NAMESPACE)

    async def as_found() -> bool:
        if served.server.sessions or bserver.clients:
            return False
        nodes = [server.get_node(ua.NodeId(s, ns)) for s in (ROOM, POWER)]
        values = [await n.read_data_value(raise_on_bad_status=False) for n in nodes]
        return [v.Value.Value for v in values] == [-18.5, 12.25]

    await eventually(as_found, timeout=30)
    with structlog.testing.capture_logs() as logs:
        yield Mirror(served.server, served.store, served.keys, logs, served.audit)


async def unchanged(mirror: Mirror) -> None:
    """What the historian is served afterwards is what the store holds: same value, status,
    name, children; no node an attack tried to add; no server registered."""
    async with mirror.session() as client:
        ns = await client.get_namespace_index(NAMESPACE)
        room = client.get_node(ua.NodeId(ROOM, ns))
        read = await room.read_data_value()
        held = mirror.store.latest(ROOM, dt.datetime.now(dt.UTC))
        assert held is not None
        assert read.Value.Value == held.value == -18.5
        assert read.StatusCode.is_good() and read.SourceTimestamp == held.source_time
        assert (await room.read_display_name()).Text == "temperature"
        asset = client.get_node(ua.NodeId("coldstore/storage/cold-room-1", ns))
        children = {c.nodeid.Identifier for c in await asset.get_children()}
        assert ROOM in children and "evil" not in children
        evil = await client.uaclient.read(_read_params(ua.NodeId("evil", ns)))
        assert evil[0].StatusCode.value == S.BadNodeIdUnknown
        servers = await client.find_servers()
        assert [s.ApplicationUri for s in servers] == [SERVER_URI]


def _read_params(*nodes: ua.NodeId, attribute: int = ua.AttributeIds.Value) -> ua.ReadParameters:
    return ua.ReadParameters(
        NodesToRead=[ua.ReadValueId(NodeId=n, AttributeId=attribute) for n in nodes]
    )


async def status_of(call: Awaitable[Any]) -> int:
    """The status a service answered: its ServiceFault's, or else the one of each result
    (which must all agree)."""
    try:
        results = await call
    except UaStatusCodeError as e:
        return e.code
    codes = {getattr(r, "StatusCode", r).value for r in (results or [ua.StatusCode()])}
    assert len(codes) == 1, codes
    return codes.pop()


def session_params(client: Client, certificate: bytes | None) -> ua.CreateSessionParameters:
    """A CreateSession request as a client sends one, with the certificate it is given."""
    return ua.CreateSessionParameters(
        ClientDescription=ua.ApplicationDescription(
            ApplicationUri=client.application_uri, ApplicationType=ua.ApplicationType.Client
        ),
        EndpointUrl=client.server_url.geturl(), SessionName="attack", ClientNonce=os.urandom(32),
        ClientCertificate=certificate, RequestedSessionTimeout=60_000, MaxResponseMessageSize=0,
    )  # fmt: skip


def evil_server() -> ua.RegisteredServer:
    return ua.RegisteredServer(
        ServerUri="urn:evil", ProductUri="urn:evil", ServerNames=[ua.LocalizedText("evil")],
        ServerType=ua.ApplicationType.Server, DiscoveryUrls=["opc.tcp://evil:4840"], IsOnline=True,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def none_channel(mirror: Mirror) -> AsyncIterator[Client]:
    """A channel without security (which only discovery may use), no session."""
    client = mirror.client()
    await client.connect_sessionless()
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect_sessionless()


def fingerprint(keys: Keys, name: str) -> str:
    return hashlib.sha256(keys.cert_der(name)).hexdigest()


def no_session_with(mirror: Mirror, name: str) -> None:
    """No session was ever opened with `name`'s certificate."""
    mine = fingerprint(mirror.keys, name)
    assert not [e for e in mirror.events("opcua_session_opened") if e["fingerprint"] == mine]


def refused(mirror: Mirror, stage: str, reason: str) -> dict[str, Any]:
    """The one `opcua_client_refused` of that stage and reason (audited)."""
    found = [e for e in mirror.events("opcua_client_refused")
             if e["stage"] == stage and e["reason"] == reason]  # fmt: skip
    assert len(found) == 1, mirror.events("opcua_client_refused")
    return found[0]


# -- the secure channel -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [("intruder", "certificate_untrusted"), ("self-signed", "certificate_untrusted"),
     ("revoked", "revoked")],
)  # fmt: skip
async def test_a_certificate_the_trust_list_refuses_gets_no_channel(
    mirror: Mirror, name: str, reason: str
) -> None:
    """Another CA's certificate, a self-signed one and a revoked one all name the
    historian's URI: each is refused when the channel opens, before any session."""
    client = await mirror.secured(name)
    with pytest.raises((UaError, ConnectionError, OSError)) as raised:
        await client.connect()
    assert "BadSecurityChecksFailed" in repr(raised.value) or isinstance(
        raised.value, (ConnectionError, OSError)
    ), repr(raised.value)
    event = refused(mirror, "channel", reason)
    assert event["fingerprint"] == fingerprint(mirror.keys, name)
    no_session_with(mirror, name)
    await unchanged(mirror)


async def test_another_clients_certificate_without_its_key_gets_no_channel(
    mirror: Mirror,
) -> None:
    """The energy dashboard's certificate is public; presenting it with another key fails
    the OpenSecureChannel signature: no channel, no session as the dashboard."""
    client = await mirror.secured("energy", key_of="historian")
    with pytest.raises((UaError, ConnectionError, OSError, asyncio.TimeoutError)):
        await client.connect()
    no_session_with(mirror, "energy")
    await unchanged(mirror)


@pytest.mark.parametrize(
    "policy",
    [sp.SecurityPolicyBasic256Sha256, sp.SecurityPolicyAes128Sha256RsaOaep,
     sp.SecurityPolicyAes256Sha256RsaPss],
)  # fmt: skip
async def test_sign_without_encrypt_gets_no_channel(
    mirror: Mirror, policy: type[sp.SecurityPolicy]
) -> None:
    client = await mirror.secured(policy=policy, mode=ua.MessageSecurityMode.Sign)
    with pytest.raises((UaError, ConnectionError, OSError)):
        await client.connect_sessionless()
    refused(mirror, "channel", "security_mode_refused")


async def test_discovery_without_security_offers_only_the_three_sign_and_encrypt_endpoints(
    mirror: Mirror,
) -> None:
    async with none_channel(mirror) as client:
        endpoints = await client.get_endpoints()
    offered = {(e.SecurityPolicyUri, e.SecurityMode) for e in endpoints}
    encrypt = ua.MessageSecurityMode.SignAndEncrypt
    assert offered == {
        (sp.SecurityPolicyBasic256Sha256.URI, encrypt),
        (sp.SecurityPolicyAes128Sha256RsaOaep.URI, encrypt),
        (sp.SecurityPolicyAes256Sha256RsaPss.URI, encrypt),
    }


# -- the session ----------------------------------------------------------------------------


async def test_a_session_over_a_channel_without_security_is_refused(mirror: Mirror) -> None:
    """asyncua would create it (ADR 0025); the mirror answers BadSecurityModeRejected, with a
    certificate in the request or without."""
    for certificate in (None, mirror.keys.cert_der("historian")):
        async with none_channel(mirror) as client:
            code = await status_of(
                client.uaclient.create_session(session_params(client, certificate))
            )
            assert code == S.BadSecurityModeRejected, hex(code)
            # Nor can a read be slipped in without a session.
            code = await status_of(client.uaclient.read(_read_params(ua.NodeId(ROOM, 2))))
            assert code != S.Good
    assert len(mirror.events("opcua_client_refused")) >= 2
    assert all(e["reason"] == "security_none" for e in mirror.events("opcua_client_refused"))
    await unchanged(mirror)


@pytest.mark.parametrize("swapped", ["energy", "intruder", None])
async def test_a_session_certificate_other_than_the_channels_is_refused(
    mirror: Mirror, swapped: str | None
) -> None:
    """A channel opened with the historian's certificate, then CreateSession naming the
    energy dashboard's, an untrusted one, or none: the identity would come from it."""
    client = await mirror.secured("historian")
    await client.connect_sessionless()
    try:
        certificate = mirror.keys.cert_der(swapped) if swapped else None
        code = await status_of(client.uaclient.create_session(session_params(client, certificate)))
    finally:
        client.disconnect_socket()
    assert code == S.BadCertificateInvalid, hex(code)
    refused(mirror, "session", "certificate_not_channels")
    no_session_with(mirror, "energy")
    await unchanged(mirror)


async def test_a_user_token_of_another_clients_certificate_is_refused(mirror: Mirror) -> None:
    """ActivateSession with an X509 user token carrying the energy dashboard's certificate,
    on the historian's channel and session."""
    client = await mirror.secured("historian")
    client.user_certificate = x509.load_der_x509_certificate(mirror.keys.cert_der("energy"))
    client.user_private_key = serialization.load_pem_private_key(
        mirror.keys.clients["historian"][1].read_bytes(), None
    )
    with pytest.raises(UaStatusCodeError) as raised:
        await client.connect()
    assert raised.value.code == S.BadIdentityTokenRejected, hex(raised.value.code)
    refused(mirror, "session", "user_certificate_not_channels")
    no_session_with(mirror, "energy")


async def test_an_identity_the_policy_does_not_know_gets_no_session(mirror: Mirror) -> None:
    client = await mirror.secured("stranger")
    with pytest.raises(UaStatusCodeError) as raised:
        await client.connect()
    assert raised.value.code == S.BadUserAccessDenied, hex(raised.value.code)
    assert refused(mirror, "session", "unknown_identity")["identity"] == STRANGER_URI
    no_session_with(mirror, "stranger")


async def test_an_identity_granted_nothing_gets_no_session(mirror: Mirror) -> None:
    """Prometheus may read /metrics and no signal: a session would only let it load the
    half (monitored items on standard nodes, the session slots)."""
    client = await mirror.secured("prometheus")
    with pytest.raises(UaStatusCodeError) as raised:
        await connect_or_leave(client)
    assert raised.value.code == S.BadUserAccessDenied, hex(raised.value.code)
    assert refused(mirror, "session", "nothing_granted")["identity"] == MONITORING_URI
    no_session_with(mirror, "prometheus")


async def connect_or_leave(client: Client) -> None:
    """Connect, or fail, or (should it connect) disconnect and fail the test."""
    await client.connect()
    await client.disconnect()
    pytest.fail("connected")


async def test_one_identity_holds_at_most_its_share_of_sessions(mirror: Mirror) -> None:
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(MAX_SESSIONS_PER_IDENTITY):
            await stack.enter_async_context(mirror.session("historian"))
        client = await mirror.secured("historian")
        with pytest.raises(UaStatusCodeError) as raised:
            await connect_or_leave(client)
        assert raised.value.code == S.BadTooManySessions, hex(raised.value.code)
        refused(mirror, "session", "too_many_sessions_of_identity")
        async with mirror.session("energy") as energy:  # another identity still gets one
            assert await energy.get_namespace_index(NAMESPACE) > 1


async def test_sessions_whose_connection_dropped_end_soon_and_free_their_slots(
    mirror: Mirror,
) -> None:
    """asyncua keeps a session with subscriptions for its whole timeout (60 s) after its
    connection is gone, for a client that comes back: an identity could hold the slots
    with connections it dropped. The mirror ends them after DROPPED_GRACE_S."""
    clients = []
    try:
        for _ in range(MAX_SESSIONS_PER_IDENTITY):
            client = await mirror.secured("historian")
            clients.append(client)
            await client.connect()
            await client.create_subscription(60_000, _Changes())
        await eventually(lambda: mirror.server.sessions == MAX_SESSIONS_PER_IDENTITY)
        for client in clients:
            client.uaclient.protocol.transport.abort()  # gone without CloseSession
        await eventually(lambda: mirror.server.sessions == 0, timeout=DROPPED_GRACE_S + 20)
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.disconnect()
    ended = [e for e in mirror.logs if e["event"] == "opcua_session_ending"]
    assert [e["reason"] for e in ended] == ["connection_lost"] * MAX_SESSIONS_PER_IDENTITY
    async with mirror.session("historian") as client:  # the slots are free again
        assert await client.get_namespace_index(NAMESPACE) > 1


async def test_monitored_items_only_on_granted_values_and_one_per_node(mirror: Mirror) -> None:
    """Each item costs the half's event loop a notification per value written: a session
    may watch each of its granted values once, and of the standard nodes only the few of
    ServerStatus (asyncua writes CurrentTime every second), in requests of at most
    MAX_ITEMS_PER_REQUEST items."""
    current_time = ua.NodeId(ua.ObjectIds.Server_ServerStatus_CurrentTime)
    async with mirror.session("historian") as client:
        ns = await client.get_namespace_index(NAMESPACE)
        first = await client.create_subscription(100, _Changes())
        second = await client.create_subscription(100, _Changes())
        room, power = ua.NodeId(ROOM, ns), ua.NodeId(POWER, ns)
        display_name = _monitor(power, 99)
        display_name.ItemToMonitor.AttributeId = ua.AttributeIds.DisplayName
        asked = [
            *(_monitor(current_time, h) for h in range(50)),
            _monitor(ua.NodeId(ua.ObjectIds.Server_NamespaceArray), 50),
            _monitor(room, 51),
            _monitor(room, 52),
            display_name,
        ]
        made = await client.uaclient.create_monitored_items(_items(first, asked))
        codes = [r.StatusCode.value for r in made]
        assert codes[:50] == [S.Good] + [S.BadTooManyMonitoredItems] * 49
        assert codes[50:] == [S.BadNotSupported, S.Good, S.BadTooManyMonitoredItems,
                              S.BadAttributeIdInvalid]  # fmt: skip
        again = await client.uaclient.create_monitored_items(_items(second, [_monitor(room, 53)]))
        assert again[0].StatusCode.value == S.BadTooManyMonitoredItems  # one per session
        too_many = [_monitor(power, h) for h in range(MAX_ITEMS_PER_REQUEST + 1)]
        code = await status_of(client.uaclient.create_monitored_items(_items(second, too_many)))
        assert code == S.BadTooManyOperations, hex(code)
        deleted = await client.uaclient.delete_monitored_items(
            ua.DeleteMonitoredItemsParameters(
                SubscriptionId=first.subscription_id, MonitoredItemIds=[made[51].MonitoredItemId]
            )
        )
        assert deleted[0].is_good()
        again = await client.uaclient.create_monitored_items(_items(second, [_monitor(room, 54)]))
        assert again[0].StatusCode.value == S.Good  # its node free again


async def test_subscriptions_and_items_are_revised_to_the_mirrors_bounds(mirror: Mirror) -> None:
    """asyncua takes a publishing interval as asked (0.001 ms: a subscription spinning on
    the loop) and gives a queue of 10,000 values per item when 0 is asked for."""
    async with mirror.session("historian") as client:
        ns = await client.get_namespace_index(NAMESPACE)
        asked = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=0.001, RequestedLifetimeCount=4_000_000_000,
            RequestedMaxKeepAliveCount=4_000_000_000, MaxNotificationsPerPublish=0,
            PublishingEnabled=True, Priority=0,
        )  # fmt: skip
        made = await client.uaclient.create_subscription(asked, lambda _: None)
        interval = made.RevisedPublishingInterval
        assert interval >= MIN_PUBLISHING_MS, made
        assert made.RevisedMaxKeepAliveCount * interval <= 60_000, made
        assert 3 * made.RevisedMaxKeepAliveCount <= made.RevisedLifetimeCount, made
        assert made.RevisedLifetimeCount * interval <= 300_000, made
        modified = await client.uaclient.update_subscription(
            ua.ModifySubscriptionParameters(
                SubscriptionId=made.SubscriptionId, RequestedPublishingInterval=0.001,
                RequestedLifetimeCount=4_000_000_000, RequestedMaxKeepAliveCount=4_000_000_000,
            )
        )  # fmt: skip
        assert modified.RevisedPublishingInterval >= MIN_PUBLISHING_MS, modified
        items = [_monitor(ua.NodeId(ROOM, ns), 1), _monitor(ua.NodeId(POWER, ns), 2)]
        items[0].RequestedParameters.QueueSize = 0
        items[1].RequestedParameters.QueueSize = 1_000_000
        sub = _Subscribed(made.SubscriptionId)
        created = await client.uaclient.create_monitored_items(_items(sub, items))
        assert [r.RevisedQueueSize for r in created] == [1, MAX_QUEUE], created
        change = ua.MonitoredItemModifyRequest(
            MonitoredItemId=created[1].MonitoredItemId,
            RequestedParameters=ua.MonitoringParameters(
                ClientHandle=2, SamplingInterval=0.001, QueueSize=1_000_000, DiscardOldest=True
            ),
        )
        (modified_item,) = await client.uaclient.modify_monitored_items(
            ua.ModifyMonitoredItemsParameters(
                SubscriptionId=made.SubscriptionId, ItemsToModify=[change],
                TimestampsToReturn=ua.TimestampsToReturn.Both,
            )
        )  # fmt: skip
        assert modified_item.RevisedQueueSize == MAX_QUEUE, modified_item
        assert modified_item.RevisedSamplingInterval >= MIN_PUBLISHING_MS, modified_item


async def test_a_client_that_does_not_read_its_answers_is_cut_off(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It keeps asking (Publish) and never reads: asyncua would buffer its answers without
    bound. Past MAX_UNREAD_BYTES (lowered here, with small socket buffers, so that a few
    answers of large alert texts pass it) its session and connection are ended."""
    monkeypatch.setattr(opcua_session, "MAX_UNREAD_BYTES", 256 * 1024)
    views = policy.load(DEMO_POLICY)
    signals = [s.path for s in views.signals if s.lifecycle == "approved"]
    pending: list[asyncio.Future[Any]] = []
    async with mirror.session("historian") as client:
        ns = await client.get_namespace_index(NAMESPACE)
        subscription = await client.create_subscription(100, _Changes())
        alerts = [client.get_node(ua.NodeId(f"{s}.ActiveAlerts", ns)) for s in signals]
        await subscription.subscribe_data_change(alerts)
        (session,) = opcua_session_of(mirror)
        assert isinstance(session.transport, asyncio.Transport)
        session.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        protocol = client.uaclient.protocol
        assert protocol is not None and protocol.transport is not None
        protocol.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 4096
        )
        protocol.transport.pause_reading()  # never reads again
        seq = 10

        def flood() -> bool:
            nonlocal seq
            seq += 1
            text = f"{seq} " + "x" * 20_000
            alert = Alert(rule="r", severity="warning", message=text, action="-", outcome="energy")
            mirror.store.apply([_alerted(s, seq, alert) for s in signals])
            pending.append(asyncio.ensure_future(protocol.send_request(ua.PublishRequest())))
            return mirror.server.sessions == 0

        try:
            await eventually(flood, timeout=60, interval=0.1)
        finally:
            for request in pending:
                request.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    ended = [e for e in mirror.logs if e["event"] == "opcua_session_ending"]
    assert [e["reason"] for e in ended] == ["not_reading"], ended


def opcua_session_of(mirror: Mirror) -> list[opcua_session.GuardedSession]:
    rules = mirror.server._rules
    assert rules is not None
    return list(rules.sessions)


def _alerted(signal: str, seq: int, alert: Alert) -> Record:
    record = served_record(signal, float(seq), seq)
    record.context = Context(asset_state="running", alerts=[alert])
    return record


# -- services a read-only mirror refuses ---------------------------------------------------

Service = Callable[[Client, int], Awaitable[Any]]


def _write(attribute: int, value: ua.Variant) -> Service:
    def call(client: Client, ns: int) -> Awaitable[Any]:
        write = ua.WriteValue(
            NodeId=ua.NodeId(ROOM, ns), AttributeId=attribute, Value=ua.DataValue(value)
        )
        return client.uaclient.write(ua.WriteParameters(NodesToWrite=[write]))

    return call


def _call(client: Client, ns: int) -> Awaitable[Any]:
    method = ua.CallMethodRequest(
        ObjectId=ua.NodeId(ua.ObjectIds.Server),
        MethodId=ua.NodeId(ua.ObjectIds.Server_GetMonitoredItems),
        InputArguments=[ua.Variant(1, ua.VariantType.UInt32)],
    )
    return client.uaclient.call([method])


def _add_nodes(client: Client, ns: int) -> Awaitable[Any]:
    item = ua.AddNodesItem(
        ParentNodeId=ua.NodeId("coldstore/storage/cold-room-1", ns),
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasComponent),
        RequestedNewNodeId=ua.NodeId("evil", ns),
        BrowseName=ua.QualifiedName("evil", ns),
        NodeClass=ua.NodeClass.Variable,
        NodeAttributes=ua.VariableAttributes(Value=ua.Variant(1.0)),
        TypeDefinition=ua.NodeId(ua.ObjectIds.BaseDataVariableType),
    )
    return client.uaclient.add_nodes([item])


def _delete_nodes(client: Client, ns: int) -> Awaitable[Any]:
    item = ua.DeleteNodesItem(NodeId=ua.NodeId(ROOM, ns), DeleteTargetReferences=True)
    return client.uaclient.delete_nodes(ua.DeleteNodesParameters(NodesToDelete=[item]))


def _add_references(client: Client, ns: int) -> Awaitable[Any]:
    item = ua.AddReferencesItem(
        SourceNodeId=ua.NodeId(ua.ObjectIds.ObjectsFolder),
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.Organizes), IsForward=True,
        TargetNodeId=ua.NodeId(ROOM, ns), TargetNodeClass=ua.NodeClass.Variable,
    )  # fmt: skip
    return client.uaclient.add_references([item])


def _delete_references(client: Client, ns: int) -> Awaitable[Any]:
    item = ua.DeleteReferencesItem(
        SourceNodeId=ua.NodeId("coldstore/storage/cold-room-1", ns),
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasComponent), IsForward=True,
        TargetNodeId=ua.NodeId(ROOM, ns), DeleteBidirectional=True,
    )  # fmt: skip
    return client.uaclient.delete_references([item])


def _history_update(client: Client, ns: int) -> Awaitable[Any]:
    details = ua.UpdateDataDetails(
        NodeId=ua.NodeId(ROOM, ns), PerformInsertReplace=ua.PerformUpdateType.Replace,
        UpdateValues=[ua.DataValue(ua.Variant(99.0))],
    )  # fmt: skip
    return client.uaclient.history_update(
        ua.HistoryUpdateParameters(HistoryUpdateDetails=[details])
    )


def _transfer_subscriptions(client: Client, ns: int) -> Awaitable[Any]:
    params = ua.TransferSubscriptionsParameters(SubscriptionIds=[1, 2, 3], SendInitialValues=True)
    return client.uaclient.transfer_subscriptions(params)


def _register_server(client: Client, ns: int) -> Awaitable[Any]:
    return client.uaclient.register_server(evil_server())


def _register_server2(client: Client, ns: int) -> Awaitable[Any]:
    params = ua.RegisterServer2Parameters(Server=evil_server(), DiscoveryConfiguration=[])
    return client.uaclient.register_server2(params)


SERVICES: dict[str, tuple[str, Service]] = {  # test id → (service as logged, the request)
    "write-value": ("Write", _write(ua.AttributeIds.Value, ua.Variant(99.0, ua.VariantType.Double))),
    "write-display-name": ("Write", _write(ua.AttributeIds.DisplayName, ua.Variant(ua.LocalizedText("pwned")))),
    "call": ("Call", _call),
    "add-nodes": ("AddNodes", _add_nodes),
    "delete-nodes": ("DeleteNodes", _delete_nodes),
    "add-references": ("AddReferences", _add_references),
    "delete-references": ("DeleteReferences", _delete_references),
    "history-update": ("HistoryUpdate", _history_update),
    "transfer-subscriptions": ("TransferSubscriptions", _transfer_subscriptions),
    "register-server": ("RegisterServer", _register_server),
    "register-server2": ("RegisterServer2", _register_server2),
}  # fmt: skip


@pytest.mark.parametrize("service", SERVICES)
async def test_a_mutating_service_is_refused_audited_and_changes_nothing(
    mirror: Mirror, service: str
) -> None:
    logged, request = SERVICES[service]
    async with mirror.session() as client:
        ns = await client.get_namespace_index(NAMESPACE)
        code = await status_of(request(client, ns))
    assert code in REFUSED, hex(code)
    events = [e for e in mirror.events("opcua_service_refused") if e["service"] == logged]
    assert len(events) == 1 and events[0]["identity"] == CONSUMER_URI, events
    await unchanged(mirror)


@pytest.mark.parametrize("service", ["register-server", "register-server2"])
async def test_register_server_without_a_session_is_refused_and_audited(
    mirror: Mirror, service: str
) -> None:
    """asyncua serves RegisterServer(2) to anyone, without a session (ADR 0025): an
    anonymous client on a channel without security registered a server FindServers then
    listed."""
    logged, request = SERVICES[service]
    async with none_channel(mirror) as client:
        code = await status_of(request(client, 0))
        servers = await client.find_servers()
    assert code in REFUSED, hex(code)
    assert [s.ApplicationUri for s in servers] == [SERVER_URI]
    events = [e for e in mirror.events("opcua_service_refused") if e["service"] == logged]
    assert len(events) == 1 and events[0]["remote"], events
    await unchanged(mirror)


# -- another identity's nodes ---------------------------------------------------------------


async def test_nodes_not_granted_cannot_be_read_browsed_or_translated_by_guessing(
    mirror: Mirror,
) -> None:
    """The energy dashboard knows the NodeId scheme (`ns;s=<signal path>`) and guesses the
    historian's cold room: each service answers as if the node did not exist, while the
    historian's own session is served (the control)."""
    room_path = ["coldstore", "storage", "cold-room-1", "temperature"]
    answers: dict[str, dict[str, Any]] = {}
    for name in ("energy", "historian"):
        async with mirror.session(name) as client:
            ns = await client.get_namespace_index(NAMESPACE)
            room = ua.NodeId(ROOM, ns)
            asset = ua.NodeId("coldstore/storage/cold-room-1", ns)
            reads = await client.uaclient.read(
                _read_params(room, ua.NodeId(f"{ROOM}.EngineeringUnits", ns))
            )
            reads += await client.uaclient.read(
                _read_params(room, asset, attribute=ua.AttributeIds.DisplayName)
            )
            browse = ua.BrowseParameters(NodesToBrowse=[
                ua.BrowseDescription(NodeId=n, BrowseDirection=ua.BrowseDirection.Both,
                                     IncludeSubtypes=True, ResultMask=63)
                for n in (room, ua.NodeId("coldstore", ns))
            ])  # fmt: skip
            browsed = await client.uaclient.browse(browse)
            elements = [
                ua.RelativePathElement(
                    ReferenceTypeId=ua.NodeId(ua.ObjectIds.HierarchicalReferences),
                    IsInverse=False,  # asyncua's default is True
                    IncludeSubtypes=True,
                    TargetName=ua.QualifiedName(part, ns),
                )
                for part in room_path
            ]
            path = ua.BrowsePath(
                StartingNode=ua.NodeId(ua.ObjectIds.ObjectsFolder),
                RelativePath=ua.RelativePath(Elements=elements),
            )
            (translated,) = await client.uaclient.translate_browsepaths_to_nodeids([path])
            historian_ns = ns
            answers[name] = {
                "reads": [r.StatusCode.value for r in reads],
                "browse_room": browsed[0].StatusCode.value,
                "below_coldstore": {r.NodeId.Identifier for r in browsed[1].References},
                "translated": (
                    translated.StatusCode.value,
                    [t.TargetId for t in translated.Targets],
                ),
            }
    energy, historian = answers["energy"], answers["historian"]
    assert historian["reads"] == [S.Good] * 4
    assert energy["reads"] == [S.BadNodeIdUnknown] * 4
    assert historian["browse_room"] == S.Good and energy["browse_room"] == S.BadNodeIdUnknown
    assert "coldstore/storage" in historian["below_coldstore"]
    assert "coldstore/storage" not in energy["below_coldstore"]
    assert "coldstore/machine-room" in energy["below_coldstore"]  # its own part is there
    assert historian["translated"] == (S.Good, [ua.NodeId(ROOM, historian_ns)])
    assert energy["translated"] == (S.BadNoMatch, [])
    await unchanged(mirror)


async def test_translate_never_walks_through_a_node_not_granted(mirror: Mirror) -> None:
    """A browse path may end at a standard node (a type definition) after passing through
    the historian's assets: the answer must not tell the energy dashboard whether those
    assets and signals exist (the same as for a path through names that do not)."""

    def step(reference: int, name: str, ns: int) -> ua.RelativePathElement:
        return ua.RelativePathElement(
            ReferenceTypeId=ua.NodeId(reference), IsInverse=False, IncludeSubtypes=True,
            TargetName=ua.QualifiedName(name, ns),
        )  # fmt: skip

    down, typed = ua.ObjectIds.HierarchicalReferences, ua.ObjectIds.HasTypeDefinition
    async with mirror.session("energy") as client:
        ns = await client.get_namespace_index(NAMESPACE)
        answers = []
        for names, end in (
            (["coldstore", "storage"], "BaseObjectType"),
            (["coldstore", "no-such-area"], "BaseObjectType"),
            (["coldstore", "storage", "cold-room-1", "temperature"], "BaseDataVariableType"),
            (["coldstore", "storage", "cold-room-1", "no-such-signal"], "BaseDataVariableType"),
        ):
            elements = [step(down, n, ns) for n in names] + [step(typed, end, 0)]
            path = ua.BrowsePath(
                StartingNode=ua.NodeId(ua.ObjectIds.ObjectsFolder),
                RelativePath=ua.RelativePath(Elements=elements),
            )
            (result,) = await client.uaclient.translate_browsepaths_to_nodeids([path])
            answers.append((result.StatusCode.value, len(result.Targets)))
    not_granted, absent = answers[0::2], answers[1::2]
    assert not_granted == absent == [(S.BadNoMatch, 0)] * 2, answers


# Nodes the energy dashboard is not granted, each beside nodes that do not exist at all: every
# service that names a node must answer both alike, or the answer is an existence oracle.
NOT_GRANTED = (ROOM, "coldstore/storage", f"{ROOM}.EngineeringUnits", f"{ROOM}.State")
ABSENT = ("coldstore/storage/cold-room-1/no-such-signal", "coldstore/no-such-area",
          f"{POWER}.NoSuchProperty")  # fmt: skip
ABSENT_STANDARD = ua.NodeId(987_654, 0)  # nor in the standard namespace


async def _read(client: Client, node: ua.NodeId) -> object:
    attributes = (ua.AttributeIds.Value, ua.AttributeIds.DisplayName, ua.AttributeIds.BrowseName,
                  ua.AttributeIds.NodeClass, ua.AttributeIds.AccessLevel, 999)  # fmt: skip
    read = ua.ReadParameters(
        TimestampsToReturn=ua.TimestampsToReturn.Both,
        NodesToRead=[ua.ReadValueId(NodeId=node, AttributeId=a) for a in attributes]
        + [ua.ReadValueId(NodeId=node, AttributeId=ua.AttributeIds.Value, IndexRange="0:1")],
    )
    return await client.uaclient.read(read)


async def _browse(client: Client, node: ua.NodeId) -> object:
    descriptions = [
        ua.BrowseDescription(NodeId=node, BrowseDirection=direction, IncludeSubtypes=True,
                             ResultMask=63)
        for direction in (ua.BrowseDirection.Forward, ua.BrowseDirection.Inverse,
                          ua.BrowseDirection.Both)
    ]  # fmt: skip
    # the node as the reference type a granted node is browsed by, too
    descriptions.append(
        ua.BrowseDescription(NodeId=ua.NodeId(ua.ObjectIds.ObjectsFolder), ReferenceTypeId=node,
                             BrowseDirection=ua.BrowseDirection.Both, ResultMask=63)
    )  # fmt: skip
    return await client.uaclient.browse(ua.BrowseParameters(NodesToBrowse=descriptions))


async def _translate_from(client: Client, node: ua.NodeId) -> object:
    """Paths starting at the node: one level down, up to its parent, to its type."""
    elements = (
        (ua.ObjectIds.HierarchicalReferences, False, ua.QualifiedName("temperature", node.NamespaceIndex)),
        (ua.ObjectIds.HierarchicalReferences, True, ua.QualifiedName("storage", node.NamespaceIndex)),
        (ua.ObjectIds.HasTypeDefinition, False, ua.QualifiedName("BaseDataVariableType", 0)),
    )  # fmt: skip
    paths = [
        ua.BrowsePath(StartingNode=node, RelativePath=ua.RelativePath(Elements=[
            ua.RelativePathElement(ReferenceTypeId=ua.NodeId(kind), IsInverse=inverse,
                                   IncludeSubtypes=True, TargetName=name)
        ]))
        for kind, inverse, name in elements
    ]  # fmt: skip
    return await client.uaclient.translate_browsepaths_to_nodeids(paths)


async def _register_nodes(client: Client, node: ua.NodeId) -> object:
    """Registered ids are the ones asked for (asyncua echoes any): a function of the request."""
    return [r == node for r in await client.uaclient.register_nodes([node])]


async def _monitor_item(client: Client, node: ua.NodeId) -> object:
    subscription = await client.create_subscription(1000, _Changes())
    try:
        made = await client.uaclient.create_monitored_items(
            ua.CreateMonitoredItemsParameters(
                SubscriptionId=subscription.subscription_id,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                ItemsToCreate=[_monitor(node, 1)],
            )
        )
        return [(r.StatusCode, r.RevisedSamplingInterval, r.RevisedQueueSize, r.FilterResult)
                for r in made]  # fmt: skip
    finally:
        await subscription.delete()


async def _browse_next(client: Client, node: ua.NodeId) -> object:
    """A continuation point is opaque to the client: one that names the node, guessed."""
    point = str(node).encode()
    params = ua.BrowseNextParameters(ReleaseContinuationPoints=False, ContinuationPoints=[point])
    return await status_of(client.uaclient.browse_next(params))


async def _history_read(client: Client, node: ua.NodeId) -> object:
    now = dt.datetime.now(dt.UTC)
    details = ua.ReadRawModifiedDetails(
        IsReadModified=False, StartTime=now - dt.timedelta(hours=1), EndTime=now,
        NumValuesPerNode=10, ReturnBounds=False,
    )  # fmt: skip
    params = ua.HistoryReadParameters(
        HistoryReadDetails=details, NodesToRead=[ua.HistoryReadValueId(NodeId=node)]
    )
    return await status_of(client.uaclient.history_read(params))


async def _query_first(client: Client, node: ua.NodeId) -> object:
    """QueryFirst for instances of the node as a type (asyncua's client has no method)."""
    described = ua.NodeTypeDescription(
        TypeDefinitionNode=ua.ExpandedNodeId(node.Identifier, node.NamespaceIndex)
    )
    request = ua.QueryFirstRequest(
        Parameters=ua.QueryFirstParameters(NodeTypes=[described], MaxDataSetsToReturn=10)
    )
    protocol = client.uaclient.protocol
    assert protocol is not None

    async def ask() -> Any:
        data = await protocol.send_request(request)
        protocol.check_answer(data, "QueryFirst")  # raises the ServiceFault's status
        return data

    return await status_of(ask())


NAMING_SERVICES: dict[str, Callable[[Client, ua.NodeId], Awaitable[object]]] = {
    "read": _read, "browse": _browse, "translate": _translate_from,
    "register-nodes": _register_nodes, "create-monitored-items": _monitor_item,
    "browse-next": _browse_next, "history-read": _history_read, "query-first": _query_first,
}  # fmt: skip


@pytest.mark.parametrize("service", NAMING_SERVICES)
async def test_a_node_not_granted_is_answered_as_one_that_does_not_exist(
    mirror: Mirror, service: str
) -> None:
    """Every service that takes a NodeId answers the energy dashboard alike for the
    historian's nodes (a signal, an area, a signal's properties) and for nodes that exist
    nowhere (in the site's namespace or the standard one): nothing tells it which of the
    historian's nodes exist. The historian is answered for its own nodes (the control)."""
    ask = NAMING_SERVICES[service]
    async with mirror.session("energy") as client:
        ns = await client.get_namespace_index(NAMESPACE)
        nodes = [ua.NodeId(n, ns) for n in (*NOT_GRANTED, *ABSENT)] + [ABSENT_STANDARD]
        answers = [await ask(client, node) for node in nodes]
    assert all(a == answers[-1] for a in answers), list(zip(nodes, answers, strict=True))
    if service in ("read", "browse", "translate", "create-monitored-items"):
        async with mirror.session("historian") as client:
            assert await ask(client, ua.NodeId(ROOM, ns)) != answers[0]
    await unchanged(mirror)


class _Changes:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
        self.seen.append((node.nodeid.Identifier, value))


async def test_a_subscription_to_a_node_not_granted_delivers_nothing(mirror: Mirror) -> None:
    """The dashboard monitors the cold room by NodeId and its own power signal: the first is
    refused, and a new cold room value never reaches it while new power values do; nor can
    it add items to, or delete, the historian's subscription by guessing its id."""
    async with mirror.session("historian") as historian, mirror.session("energy") as energy:
        ns = await energy.get_namespace_index(NAMESPACE)
        theirs_changes, mine = _Changes(), _Changes()
        theirs = await historian.create_subscription(50, theirs_changes)
        await theirs.subscribe_data_change(historian.get_node(ua.NodeId(ROOM, ns)))
        subscription = await energy.create_subscription(50, mine)
        nodes = (ua.NodeId(ROOM, ns), ua.NodeId(f"{ROOM}.State", ns), ua.NodeId(POWER, ns))
        results = await subscription.subscribe_data_change([energy.get_node(n) for n in nodes])
        assert [getattr(r, "value", None) for r in results[:2]] == [S.BadNodeIdUnknown] * 2
        assert isinstance(results[2], int)  # a handle: made
        # Items on the historian's subscription, or deleting it: not the dashboard's to touch.
        foreign = ua.CreateMonitoredItemsParameters(
            SubscriptionId=theirs.subscription_id, TimestampsToReturn=ua.TimestampsToReturn.Both,
            ItemsToCreate=[_monitor(ua.NodeId(POWER, ns), 9)],
        )  # fmt: skip
        code = await status_of(energy.uaclient.create_monitored_items(foreign))
        assert code == S.BadSubscriptionIdInvalid, hex(code)
        deleted = await energy.uaclient.delete_subscriptions([theirs.subscription_id])
        assert [c.value for c in deleted] == [S.BadSubscriptionIdInvalid]

        mirror.store.apply([served_record(ROOM, -21.0, 3)])
        mirror.store.apply([served_record(POWER, 13.5, 4)])
        await eventually(lambda: (POWER, 13.5) in mine.seen, timeout=30)
        await eventually(lambda: (ROOM, -21.0) in theirs_changes.seen, timeout=30)
        assert {node for node, _ in mine.seen} == {POWER}, mine.seen


@dataclass(frozen=True)
class _Subscribed:
    subscription_id: int


def _items(
    subscription: Any, items: list[ua.MonitoredItemCreateRequest]
) -> ua.CreateMonitoredItemsParameters:
    return ua.CreateMonitoredItemsParameters(
        SubscriptionId=subscription.subscription_id, ItemsToCreate=items,
        TimestampsToReturn=ua.TimestampsToReturn.Both,
    )  # fmt: skip


def _monitor(node: ua.NodeId, handle: int) -> ua.MonitoredItemCreateRequest:
    return ua.MonitoredItemCreateRequest(
        ItemToMonitor=ua.ReadValueId(NodeId=node, AttributeId=ua.AttributeIds.Value),
        MonitoringMode=ua.MonitoringMode.Reporting,
        RequestedParameters=ua.MonitoringParameters(
            ClientHandle=handle, SamplingInterval=0, QueueSize=10, DiscardOldest=True
        ),
    )


# -- a second, independent stack (o6: open62541) ----------------------------------------------


needs_o6 = pytest.mark.skipif(
    importlib.util.find_spec("o6") is None,  # found, not imported (importing starts its timer)
    reason="o6 (the second OPC UA stack) is not installed: its wheels are for Linux x86_64 "
    "and aarch64 only (pyproject's dev extra)",
)


def o6_client(mirror: Mirror, name: str, read: list[str], write: list[str]) -> dict[str, Any]:
    """Run tests/enterprise/opcua_o6.py in a child process; its JSON answer."""
    cert, key = mirror.keys.clients[name]
    request = {
        "url": mirror.endpoint, "certificate": str(cert), "private_key": str(key),
        "trust": str(mirror.keys.ca_der), "crl": str(mirror.keys.crl_der),
        "application_uri": IDENTITIES[name], "namespace": NAMESPACE, "read": read, "write": write,
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "tests.enterprise.opcua_o6"], input=json.dumps(request),
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()  # o6 prints a banner first
    assert done.returncode == 0 and lines, done.stderr[-2000:]
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer


TICKS_EPOCH = dt.datetime(1601, 1, 1, tzinfo=dt.UTC)  # OPC UA DateTime: 100 ns ticks since


def ticks(moment: dt.datetime) -> int:
    return (moment - TICKS_EPOCH) // dt.timedelta(microseconds=1) * 10


@needs_o6
async def test_a_second_stack_reads_what_the_store_serves_and_cannot_write(
    mirror: Mirror,
) -> None:
    """o6 over Basic256Sha256 SignAndEncrypt, verifying the server's chain and CRL: the
    historian's values with their status and both timestamps; a Value write refused and
    audited; the energy dashboard's guess at the cold room unknown."""
    answer = await asyncio.to_thread(o6_client, mirror, "historian", [ROOM, POWER], [ROOM])
    now = dt.datetime.now(dt.UTC)
    for signal in (ROOM, POWER):
        held = mirror.store.latest(signal, now)
        assert held is not None
        assert answer["values"][signal] == [
            held.value,
            S.Good,
            ticks(held.source_time),
            ticks(held.broker_time),
        ]
    assert answer["writes"] == {ROOM: S.BadUserAccessDenied}
    events = [e for e in mirror.events("opcua_service_refused") if e["service"] == "Write"]
    assert len(events) == 1 and events[0]["identity"] == CONSUMER_URI
    guess = await asyncio.to_thread(o6_client, mirror, "energy", [POWER, ROOM], [])
    assert guess["values"][POWER][:2] == [12.25, S.Good]
    assert guess["values"][ROOM][1] == S.BadNodeIdUnknown
    await unchanged(mirror)


@needs_o6
@pytest.mark.parametrize(("name", "reason"), [("intruder", "certificate_untrusted"),
                                              ("revoked", "revoked")])  # fmt: skip
async def test_a_second_stack_with_a_refused_certificate_gets_no_channel(
    mirror: Mirror, name: str, reason: str
) -> None:
    answer = await asyncio.to_thread(o6_client, mirror, name, [ROOM], [ROOM])
    assert "values" not in answer and answer["refused"] != S.Good, answer
    refused(mirror, "channel", reason)
    no_session_with(mirror, name)
    await unchanged(mirror)
