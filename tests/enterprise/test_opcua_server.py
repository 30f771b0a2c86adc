"""The read-only OPC UA mirror against real asyncua clients over SignAndEncrypt, with
certificates made by our CLI: the address space's shape, units and ranges; values and
qualities equal to the API's; subscriptions; each identity sees only its granted nodes; and
one test for every hook into asyncua's internals (docs/opcua-server.md), so an upgrade that
moves one fails here.

One mirror serves the tests of this module that leave it as they found it (`mirror`: each
starts with the demo policy's grants, nobody revoked, the audit log writable and no session
or connection of another test left); a test that changes its policy, its configuration or
its start gets its own (`own_mirror`, or `start_mirror` in the test).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
import structlog
from asyncua import Client, Server, ua
from asyncua.crypto import security_policies as sp
from asyncua.crypto.permission_rules import UserRole
from asyncua.server.address_space import AddressSpace as AddressSpaceOfAsyncua
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession
from asyncua.server.monitored_item_service import MonitoredItemService
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.uaerrors import BadNodeIdUnknown, BadUserAccessDenied, UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding

from broker import policy
from broker.audit.log import AuditLog
from broker.config import BrokerConfig
from broker.enterprise.authz import Authorization
from broker.enterprise.outputs import REGISTRY, opcua
from broker.enterprise.outputs.base import OutputContext
from broker.enterprise.outputs.opcua import OpcUaServer
from broker.enterprise.outputs.opcua_guard import GuardedProcessor, GuardedServer
from broker.enterprise.outputs.opcua_session import (
    MAX_OPERATIONS,
    MAX_SUBSCRIPTIONS,
    GuardedSession,
)
from broker.enterprise.outputs.opcua_space import STATUS, UNECE, AddressSpace, unit_id
from broker.enterprise.store import Store
from broker.errors import ConfigError
from broker.metrics import EnterpriseMetrics
from broker.records import Alert, Assessment, Context, Record
from tests.enterprise.served import Api, get
from tests.harness import (
    CONSUMER_URI,
    DEMO_POLICY,
    ENERGY_URI,
    STRANGER_URI,
    Pki,
    dmzbroker,
    eventually,
    free_port,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]

ROOM = "coldstore/storage/cold-room-1/temperature"
POWER = "coldstore/machine-room/compressor-1/motor_power"
DOOR = "coldstore/storage/cold-room-1/door_open"
SERVER_URI = "urn:test:dmzbroker:opcua"


@dataclass(frozen=True)
class OpcUaPki:
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # identity → (certificate, key), RSA, from pki.ca


@pytest.fixture(scope="session")
def opcua_pki(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> OpcUaPki:
    out = tmp_path_factory.mktemp("opcua-pki")
    ca = pki.ca.parent
    dmzbroker("certs", "issue", "opcua-server", "--ca", str(ca), "--out", str(out),
              "--uri", SERVER_URI, "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
    clients = {}
    for name, uri in (
        ("historian", CONSUMER_URI),
        ("energy", ENERGY_URI),
        ("stranger", STRANGER_URI),
    ):
        dmzbroker("certs", "issue", "opcua", "--ca", str(ca), "--out", str(out),
                  "--uri", uri, "--name", name)  # fmt: skip
        clients[uri] = (out / f"{name}-cert.pem", out / f"{name}-key.pem")
    return OpcUaPki(out / "opcua-server-cert.pem", out / "opcua-server-key.pem", clients)


@dataclass
class Mirror:
    server: OpcUaServer
    store: Store
    authz: Authorization
    audit: AuditLog
    pki: OpcUaPki

    def client(
        self, identity: str = CONSUMER_URI, policy: type[Any] = sp.SecurityPolicyBasic256Sha256
    ) -> Client:
        return _client(self.server.endpoint, self.pki, identity, policy)


def _client(
    endpoint: str, pki: OpcUaPki, identity: str, policy: type[Any] = sp.SecurityPolicyBasic256Sha256
) -> Client:
    """A client that pins the server's certificate (asyncua checks none by itself)."""
    cert, key = pki.clients[identity]
    client = Client(endpoint, timeout=20)
    client.application_uri = identity
    client._opcua_security = (policy, cert, key)  # type: ignore[attr-defined]
    return client


async def secured(client: Client, pki: OpcUaPki) -> Client:
    """The client set up for SignAndEncrypt; `async with` it connects."""
    policy, cert, key = client._opcua_security  # type: ignore[attr-defined]
    await client.set_security(policy, str(cert), str(key), server_certificate=str(pki.server_cert))
    return client


async def connect(client: Client, pki: OpcUaPki) -> Client:
    await (await secured(client, pki)).connect()
    return client


def broker_config(
    tmp_path: Path, pki: Pki, opcua_pki: OpcUaPki, port: int, **opcua_changes: Any
) -> BrokerConfig:
    section = {
        "host": "127.0.0.1", "port": port, "certificate": str(opcua_pki.server_cert),
        "private_key": str(opcua_pki.server_key), **opcua_changes,
    }  # fmt: skip
    document = {
        "policy": str(tmp_path / "policy.dsse.json"),
        "trust_root": str(tmp_path / "trust-root.yaml"),
        "spool": {"dir": str(tmp_path / "spool")},
        "plant": {"state_dir": str(tmp_path / "plant-state")},
        "enterprise": {
            "state_dir": str(tmp_path / "enterprise-state"),
            "tls": {
                "cert": str(pki.server_cert),
                "key": str(pki.server_key),
                "client_ca": str(pki.ca),
            },
            "opcua": section,
        },
        "audit": {"dir": str(tmp_path / "audit"), "key": str(tmp_path / "audit.key")},
    }
    return msgspec.convert(
        document, BrokerConfig, dec_hook=lambda t, v: Path(v) if t is Path else v
    )


async def start_mirror(
    tmp_path: Path, pki: Pki, opcua_pki: OpcUaPki, store: Store | None = None,
    authz: Authorization | None = None, **opcua_changes: Any,
) -> Mirror:  # fmt: skip
    demo = policy.load(DEMO_POLICY)
    store = store or Store(demo, queue_limit=100)
    authz = authz or Authorization(demo)
    audit = AuditLog(
        tmp_path / "opcua-audit", "enterprise", demo.deployment_id, Ed25519PrivateKey.generate()
    )
    metrics = EnterpriseMetrics(lambda: 0, lambda: audit.failing)
    config = broker_config(tmp_path, pki, opcua_pki, **({"port": free_port()} | opcua_changes))
    output = opcua.configured(OutputContext(config, authz, store, audit, metrics))
    assert isinstance(output, OpcUaServer)
    try:
        await output.start()
    except BaseException:
        audit.close()
        raise
    return Mirror(output, store, authz, audit, opcua_pki)


@contextlib.asynccontextmanager
async def serving(mirror: Mirror) -> AsyncIterator[Mirror]:
    task = asyncio.create_task(mirror.server.run())
    try:
        await eventually(lambda: mirror.server.ready or task.done(), timeout=60)
        if task.done():
            task.result()  # run failed: its error, not a timeout further on
        yield mirror
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await mirror.server.close()
        mirror.audit.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_mirror(
    pki: Pki, opcua_pki: OpcUaPki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mirror]:
    started = await start_mirror(tmp_path_factory.mktemp("shared-mirror"), pki, opcua_pki)
    async with serving(started) as served:
        yield served


@pytest_asyncio.fixture(loop_scope="module")
async def mirror(shared_mirror: Mirror) -> Mirror:
    """The module's mirror, as a test expects to find it."""
    await as_found(shared_mirror)
    return shared_mirror


async def as_found(mirror: Mirror) -> None:
    """The demo policy's grants (a test that changes the policy has its own mirror), nobody
    revoked, the audit log writable, every session and connection of another test gone."""
    mirror.audit.failing = False
    mirror.authz.use_revoked(frozenset())
    server = mirror.server._server
    assert server is not None and server.bserver is not None
    bserver = server.bserver
    await eventually(lambda: mirror.server.sessions == 0 and not bserver.clients, timeout=30)


@pytest_asyncio.fixture(loop_scope="module")
async def own_mirror(tmp_path: Path, pki: Pki, opcua_pki: OpcUaPki) -> AsyncIterator[Mirror]:
    """A mirror of the test's own (it changes what others would find)."""
    async with serving(await start_mirror(tmp_path, pki, opcua_pki)) as served:
        yield served


def record(signal: str, value: Any, seq: int, quality: str = "good", **context: Any) -> Record:
    now = datetime.now(UTC)
    return Record(
        signal=signal, value=value, unit="degC", quality=quality,  # type: ignore[arg-type]
        source_time=now - timedelta(seconds=1), broker_time=now, policy_version=1,
        context=Context(**context), seq=seq,
    )  # fmt: skip


def node_of(client: Client, ns: int, path: str, part: str = "") -> Any:
    return client.get_node(ua.NodeId(f"{path}.{part}" if part else path, ns))


async def namespace(client: Client) -> int:
    return await client.get_namespace_index("urn:dmzbroker:coldstore-demo")


async def test_the_registry_builds_it_only_where_configured(
    tmp_path: Path, pki: Pki, opcua_pki: OpcUaPki
) -> None:
    assert ("opcua", "opcua") in REGISTRY
    demo = policy.load(DEMO_POLICY)
    config = broker_config(tmp_path, pki, opcua_pki, port=free_port())
    without = msgspec.structs.replace(
        config, enterprise=msgspec.structs.replace(config.enterprise, opcua=None)
    )
    store, authz = Store(demo, queue_limit=10), Authorization(demo)
    audit = AuditLog(
        tmp_path / "audit", "enterprise", demo.deployment_id, Ed25519PrivateKey.generate()
    )
    try:
        metrics = EnterpriseMetrics(lambda: 0, lambda: False)
        assert opcua.configured(OutputContext(without, authz, store, audit, metrics)) is None
        built = opcua.configured(OutputContext(config, authz, store, audit, metrics))
        assert built is not None and built.name == "opcua"
    finally:
        audit.close()


async def test_address_space_has_assets_as_objects_and_signals_with_units_and_ranges(
    mirror: Mirror,
) -> None:
    async with await secured(mirror.client(), mirror.pki) as client:
        ns = await namespace(client)
        objects = client.nodes.objects
        site = await objects.get_child([f"{ns}:coldstore"])
        room = await site.get_child([f"{ns}:storage", f"{ns}:cold-room-1"])
        assert (await room.read_node_class()) == ua.NodeClass.Object
        variable = await room.get_child([f"{ns}:temperature"])
        assert variable.nodeid == ua.NodeId(ROOM, ns)
        assert (await variable.read_node_class()) == ua.NodeClass.Variable
        assert (await variable.read_data_type()) == ua.NodeId(ua.ObjectIds.Double)
        units = await node_of(client, ns, ROOM, "EngineeringUnits").read_value()
        assert units.DisplayName.Text == "degC"
        assert units.UnitId == unit_id(UNECE["degC"]) == 4408652  # "CEL", OPC UA Part 8
        span = await node_of(client, ns, ROOM, "EURange").read_value()
        demo = policy.load(DEMO_POLICY)
        spec = next(s for s in demo.signals if s.path == ROOM)
        assert spec.range is not None and (span.Low, span.High) == (spec.range.min, spec.range.max)
        description = await variable.read_description()
        assert description.Text == spec.description
        door = await room.get_child([f"{ns}:open" if False else f"{ns}:door_open"])
        assert (await door.read_data_type()) == ua.NodeId(ua.ObjectIds.Boolean)
        # the value is read-only by its access level too, not only by the service refusal
        assert ua.AccessLevel.CurrentWrite not in await variable.get_access_level()


@pytest_asyncio.fixture
async def mirror_of_api(
    api: Api, tmp_path: Path, pki: Pki, opcua_pki: OpcUaPki
) -> AsyncIterator[Mirror]:
    """The mirror on the very store and authorization the served HTTPS API answers from."""
    started = await start_mirror(tmp_path, pki, opcua_pki, store=api.store, authz=api.authz)
    async with serving(started) as served:
        yield served


@pytest.mark.asyncio(loop_scope="function")  # the api fixture's loop
async def test_values_qualities_times_and_context_equal_the_apis(
    api: Api, mirror_of_api: Mirror
) -> None:
    alert = Alert(
        rule="door_left_open",
        severity="warning",
        message="door open 5 min",
        action="close it",
        outcome="energy",
    )
    assessment = Assessment(expected=-18.0, deviation_pct=5.5, label="drifting", direction="above")
    api.store.apply([
        record(ROOM, -17.0, 1, asset_state="running", assessment=assessment, alerts=[alert]),
        record(POWER, 12, 2, quality="uncertain"),
        record(DOOR, True, 3),
        record("coldstore/storage/cold-room-2/temperature", None, 4, quality="bad"),
    ])  # fmt: skip
    _, body = await get(api, "/v1/snapshot", api.consumer_ssl())
    served = {r["signal"]: r for r in body["records"]}  # type: ignore[index]
    assert len(served) == 4
    async with await secured(mirror_of_api.client(), mirror_of_api.pki) as client:
        ns = await namespace(client)

        async def all_written() -> bool:
            values = await client.read_values([node_of(client, ns, p) for p in served])
            return None not in values[:3]

        await eventually(all_written)
        for path, expected in served.items():
            value = await node_of(client, ns, path).read_data_value(raise_on_bad_status=False)
            assert value.StatusCode.value == STATUS[expected["quality"]], path
            assert value.Value.Value == expected["value"], path
            assert value.SourceTimestamp == _time(expected["source_time"])
            assert value.ServerTimestamp == _time(expected["broker_time"])
        assert await node_of(client, ns, ROOM, "State").read_value() == "running"
        assert await node_of(client, ns, ROOM, "Assessment").read_value() == "drifting"
        assert await node_of(client, ns, ROOM, "ActiveAlerts").read_value() == [
            "warning door_left_open: door open 5 min"
        ]


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.asyncio(loop_scope="function")
async def test_a_value_the_api_serves_stale_turns_stale_in_the_mirror(
    api: Api, mirror_of_api: Mirror
) -> None:
    old = record(ROOM, -18.0, 1)
    old.broker_time = old.source_time = datetime.now(UTC) - timedelta(hours=1)
    api.store.apply([old])
    _, body = await get(api, "/v1/snapshot", api.consumer_ssl())
    assert body["records"][0]["quality"] == "stale"  # type: ignore[index]
    async with await secured(mirror_of_api.client(), mirror_of_api.pki) as client:
        node = node_of(client, ns := await namespace(client), ROOM)

        async def stale() -> bool:
            value = await node.read_data_value(raise_on_bad_status=False)
            return value.StatusCode.value == ua.StatusCodes.UncertainLastUsableValue

        await eventually(stale)
        assert ns
        assert (await node.read_data_value(raise_on_bad_status=False)).Value.Value == -18.0


class Changes:
    def __init__(self) -> None:
        self.values: list[Any] = []

    def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
        self.values.append(value)


async def test_a_subscription_delivers_every_value_change(mirror: Mirror) -> None:
    async with await secured(mirror.client(), mirror.pki) as client:
        changes = Changes()
        subscription = await client.create_subscription(100, changes)
        await subscription.subscribe_data_change(node_of(client, await namespace(client), ROOM))
        await eventually(lambda: changes.values)  # the value it holds (another test's, or none)
        for seq in range(1, 6):
            mirror.store.apply([record(ROOM, -20.0 + seq, seq)])
            await eventually(lambda seq=seq: -20.0 + seq in changes.values)  # type: ignore[misc]
        assert changes.values[1:] == [-19.0, -18.0, -17.0, -16.0, -15.0]


async def test_a_client_of_another_identity_sees_only_its_granted_nodes(mirror: Mirror) -> None:
    mirror.store.apply([record(ROOM, -18.0, 1), record(POWER, 10.0, 2)])
    view = mirror.authz.view(ENERGY_URI)
    assert POWER in view and ROOM not in view
    async with await secured(mirror.client(ENERGY_URI), mirror.pki) as client:
        ns = await namespace(client)
        await eventually(lambda: node_of(client, ns, POWER).read_value())
        with pytest.raises(BadNodeIdUnknown):
            await node_of(client, ns, ROOM).read_value()
        with pytest.raises(BadNodeIdUnknown):
            await node_of(client, ns, ROOM, "EngineeringUnits").read_value()
        with pytest.raises(BadNodeIdUnknown):
            await node_of(client, ns, "coldstore/storage").read_browse_name()
        site = await client.nodes.objects.get_child([f"{ns}:coldstore"])
        areas = {(await c.read_browse_name()).Name for c in await site.get_children()}
        assert areas == {"machine-room", "outdoor"}  # storage holds nothing it is granted
        found = await client.nodes.objects.get_child([f"{ns}:coldstore", f"{ns}:machine-room"])
        seen = {
            n.nodeid.Identifier for c in await found.get_children() for n in await c.get_children()
        }
        assert seen == {p for p in view if p.startswith("coldstore/machine-room/")}
        subscription = await client.create_subscription(50, Changes())
        with pytest.raises(BadNodeIdUnknown):
            await subscription.subscribe_data_change(node_of(client, ns, ROOM))
        with pytest.raises(UaStatusCodeError):  # translating a path to it finds nothing
            await client.nodes.objects.get_child([f"{ns}:coldstore", f"{ns}:storage"])


async def test_an_identity_the_policy_does_not_know_gets_no_session(mirror: Mirror) -> None:
    with structlog.testing.capture_logs() as logs, pytest.raises(UaStatusCodeError):
        await connect(mirror.client(STRANGER_URI), mirror.pki)
    refused = [e for e in logs if e["event"] == "opcua_client_refused"]
    assert refused and refused[0]["reason"] == "unknown_identity"
    assert refused[0]["identity"] == STRANGER_URI
    assert mirror.server.sessions == 0


async def test_a_write_is_refused_audited_and_changes_nothing(mirror: Mirror) -> None:
    mirror.store.apply([record(ROOM, -18.0, 1)])
    async with await secured(mirror.client(), mirror.pki) as client:
        node = node_of(client, await namespace(client), ROOM)
        await eventually(node.read_value)
        with structlog.testing.capture_logs() as logs, pytest.raises(BadUserAccessDenied):
            await node.write_value(ua.DataValue(ua.Variant(99.0, ua.VariantType.Double)))
        assert await node.read_value() == -18.0
    refused = [e for e in logs if e["event"] == "opcua_service_refused"]
    assert refused == [
        {"event": "opcua_service_refused", "log_level": "warning", "service": "Write",
         "identity": CONSUMER_URI, **{k: refused[0][k] for k in ("serial", "fingerprint", "remote")}}
    ]  # fmt: skip


async def test_the_session_is_a_plain_user_never_asyncuas_admin(mirror: Mirror) -> None:
    async with await secured(mirror.client(), mirror.pki):
        await eventually(lambda: mirror.server.sessions == 1)
        (session,) = mirror.server._rules.sessions  # type: ignore[union-attr]
        assert session.user.role is UserRole.User


async def test_max_sessions_bounds_sessions_and_the_store_keeps_feeding_others(
    tmp_path: Path, pki: Pki, opcua_pki: OpcUaPki
) -> None:
    started = await start_mirror(tmp_path, pki, opcua_pki, max_sessions=2)
    async with serving(started) as mirror:
        seen: list[int] = []
        mirror.store.listen(lambda records: seen.extend(r.seq for r in records))
        clients = [await connect(mirror.client(), mirror.pki) for _ in range(2)]
        try:
            with (
                structlog.testing.capture_logs() as logs,
                pytest.raises(UaStatusCodeError) as refused,
            ):
                await connect(mirror.client(), mirror.pki)
            assert refused.value.code == ua.StatusCodes.BadTooManySessions
            assert [e["reason"] for e in logs if e["event"] == "opcua_client_refused"] == [
                "too_many_sessions"
            ]
            mirror.store.apply([record(ROOM, -18.0, 7)])
            assert seen == [7]  # another store reader (the API, a sink) is not held up
        finally:
            for client in clients:
                await client.disconnect()
        await eventually(lambda: mirror.server.sessions == 0)
        async with await secured(mirror.client(), mirror.pki):
            pass  # room again once they closed


async def test_a_client_certificate_from_another_ca_is_refused_at_the_secure_channel(
    mirror: Mirror, pki: Pki, tmp_path: Path
) -> None:
    dmzbroker("certs", "issue", "opcua", "--ca", str(pki.other_ca.parent), "--out", str(tmp_path),
              "--uri", CONSUMER_URI, "--name", "intruder")  # fmt: skip
    pki_of_intruder = OpcUaPki(
        mirror.pki.server_cert, mirror.pki.server_key,
        {CONSUMER_URI: (tmp_path / "intruder-cert.pem", tmp_path / "intruder-key.pem")},
    )  # fmt: skip
    client = _client(mirror.server.endpoint, pki_of_intruder, CONSUMER_URI)
    with structlog.testing.capture_logs() as logs, pytest.raises(Exception):  # noqa: B017
        await connect(client, mirror.pki)
    await client.disconnect()
    refused = [e for e in logs if e["event"] == "opcua_client_refused"]
    assert [(e["stage"], e["reason"]) for e in refused] == [("channel", "certificate_untrusted")]
    assert mirror.server.sessions == 0


async def test_a_session_over_an_unsecured_channel_is_refused(mirror: Mirror) -> None:
    client = Client(mirror.server.endpoint, timeout=20)
    client.application_uri = CONSUMER_URI
    with structlog.testing.capture_logs() as logs, pytest.raises(UaStatusCodeError) as refused:
        await client.connect()  # no security: discovery only
    await client.disconnect()
    assert refused.value.code == ua.StatusCodes.BadSecurityModeRejected
    assert [e["reason"] for e in logs if e["event"] == "opcua_client_refused"] == ["security_none"]
    endpoints = await Client(mirror.server.endpoint, timeout=20).connect_and_get_server_endpoints()
    assert {(e.SecurityPolicyUri.rpartition("#")[2], e.SecurityMode) for e in endpoints} == {
        (name, ua.MessageSecurityMode.SignAndEncrypt)
        for name in ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")
    }


@pytest.mark.parametrize(
    "security", [sp.SecurityPolicyAes128Sha256RsaOaep, sp.SecurityPolicyAes256Sha256RsaPss]
)
async def test_each_offered_policy_serves(mirror: Mirror, security: type[Any]) -> None:
    async with await secured(mirror.client(policy=security), mirror.pki) as client:
        assert await namespace(client) > 1


async def test_a_port_in_use_or_an_unusable_certificate_stops_start_with_one_line(
    tmp_path: Path, pki: Pki, opcua_pki: OpcUaPki
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ConfigError, match=rf"enterprise.opcua: cannot listen on 127.0.0.1:{port}: "
        ):
            await start_mirror(tmp_path, pki, opcua_pki, port=port)
    with pytest.raises(ConfigError, match="not an RSA key"):  # the API's ECDSA certificate
        await start_mirror(tmp_path, pki, opcua_pki, certificate=str(pki.server_cert),
                           private_key=str(pki.server_key))  # fmt: skip
    with pytest.raises(ConfigError, match=r"missing\.pem: cannot read"):
        await start_mirror(tmp_path, pki, opcua_pki, certificate=str(tmp_path / "missing.pem"))


async def test_start_only_binds_and_sessions_wait_for_the_space_run_builds(
    tmp_path: Path, pki: Pki, opcua_pki: OpcUaPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`start` (before the half's spool reader starts) reads the files and binds, nothing
    more: asyncua is not initialised yet and nothing accepts a connection. `run` initialises
    it and builds the space; until that is done a session is refused, audited as `starting`;
    then served. `close` in any of these states frees the port."""
    building, release = asyncio.Event(), asyncio.Event()
    build = AddressSpace.use_policy

    async def held_build(space: AddressSpace, newer: policy.Policy) -> None:
        building.set()
        await release.wait()
        await build(space, newer)

    monkeypatch.setattr(AddressSpace, "use_policy", held_build)
    mirror = await start_mirror(tmp_path, pki, opcua_pki)
    server = mirror.server._server
    assert server is not None and ua.NodeId(ua.ObjectIds.Server) not in server.iserver.aspace
    assert not mirror.server.ready
    with structlog.testing.capture_logs() as logs, pytest.raises(ConnectionRefusedError):
        await connect(mirror.client(), mirror.pki)  # asyncua not initialised
    task = asyncio.create_task(mirror.server.run())
    try:
        with structlog.testing.capture_logs() as more:
            await asyncio.wait_for(building.wait(), 60)
            with pytest.raises(UaStatusCodeError) as refused:
                await connect(mirror.client(), mirror.pki)
        assert refused.value.code == ua.StatusCodes.BadServerHalted
        logs += more
        reasons = [(e["stage"], e["reason"]) for e in logs if e["event"] == "opcua_client_refused"]
        assert reasons == [("session", "starting")], logs
        assert mirror.server.sessions == 0 and not mirror.server.ready
        release.set()
        await eventually(lambda: mirror.server.ready, timeout=60)
        mirror.store.apply([record(ROOM, -18.0, 1)])
        async with await secured(mirror.client(), mirror.pki) as client:
            await eventually(node_of(client, await namespace(client), ROOM).read_value)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await mirror.server.close()
        mirror.audit.close()
    listen_again(mirror.server.endpoint)


def listen_again(endpoint: str) -> None:
    """Another server can listen on the port (as servers do: connections the closed one
    accepted may still be in TIME_WAIT)."""
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", int(endpoint.rpartition(":")[2])))
        again.listen()


async def test_close_before_run_frees_the_port(
    tmp_path: Path, pki: Pki, opcua_pki: OpcUaPki
) -> None:
    mirror = await start_mirror(tmp_path, pki, opcua_pki)
    await mirror.server.close()
    mirror.audit.close()
    listen_again(mirror.server.endpoint)


# --- hooks into asyncua 2.1.0's internals: each one named, each one tested (ADR 0025) ---

HOOKS = {  # class → the members our subclasses override or read
    UaProcessor: ("process", "open_secure_channel", "process_message", "send_response",
                  "set_policies", "_connection", "_transport", "session", "iserver", "name"),
    OPCUAProtocol: ("connection_made", "data_received", "_buffer", "processor", "policies",
                    "limits", "transport"),
    BinaryServer: ("_make_protocol", "_policies", "clients", "closing_tasks", "limits", "_server",
                   "cleanup_task", "_close_task_loop", "stop"),
    Server: ("init", "_setup_server_nodes", "iserver", "bserver", "limits", "_policies", "stop"),
    InternalServer: ("create_session", "lookup_external_session", "max_connections",
                     "max_pending_activation_seconds", "max_pending_messages_per_connection",
                     "max_session_timeout_ms", "max_subscriptions", "supported_tokens",
                     "allow_remote_admin", "aspace", "time_task", "stop"),
    AddressSpaceOfAsyncua: ("__contains__",),
    InternalSession: ("read", "browse", "translate_browsepaths_to_nodeids", "create_subscription",
                      "create_monitored_items", "modify_monitored_items", "delete_monitored_items",
                      "set_monitoring_mode", "modify_subscription", "republish",
                      "set_publishing_mode", "delete_subscriptions", "publish", "close_session",
                      "subscription_service"),
}  # fmt: skip


async def test_every_asyncua_member_the_guard_relies_on_is_still_there(mirror: Mirror) -> None:
    server = mirror.server._server
    assert server is not None and server.bserver is not None
    found = {
        InternalServer: server.iserver,
        BinaryServer: server.bserver,
        Server: server,
    }
    for cls, members in HOOKS.items():
        for member in members:
            where = found.get(cls, cls)
            assert hasattr(where, member) or member in cls.__init__.__code__.co_names, (
                f"asyncua {cls.__name__}.{member} moved: re-check opcua_guard/opcua_session"
            )
    # the upgrade-sensitive signatures our overrides mirror
    assert list(inspect.signature(UaProcessor.process_message).parameters) == [
        "self",
        "seqhdr",
        "body",
    ]
    assert list(inspect.signature(UaProcessor.open_secure_channel).parameters) == [
        "self",
        "algohdr",
        "seqhdr",
        "body",
    ]
    assert list(inspect.signature(InternalServer.create_session).parameters) == [
        "self",
        "name",
        "user",
        "external",
    ]


async def test_every_connection_and_session_goes_through_the_guard(mirror: Mirror) -> None:
    async with await secured(mirror.client(), mirror.pki):
        server = mirror.server._server
        assert server is not None and server.bserver is not None
        (protocol,) = server.bserver.clients
        assert isinstance(protocol.processor, GuardedProcessor)
        assert isinstance(protocol.processor.session, GuardedSession)
        assert server.iserver.max_connections == 64 + 8
        assert server.iserver.supported_tokens == (ua.AnonymousIdentityToken, ua.X509IdentityToken)


async def test_register_server2_needs_no_session_in_asyncua_and_is_refused_here(
    mirror: Mirror,
) -> None:
    client = Client(mirror.server.endpoint, timeout=20)  # no security, no session
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        params = ua.RegisterServer2Parameters()
        params.Server.ServerUri = "urn:attacker"
        params.Server.ServerNames = [ua.LocalizedText("rogue")]
        with structlog.testing.capture_logs() as logs, pytest.raises(BadUserAccessDenied):
            await client.uaclient.register_server2(params)
        with pytest.raises(BadUserAccessDenied):
            await client.uaclient.register_server(params.Server)
        servers = await client.find_servers()
    finally:
        client.disconnect_socket()
    assert all(s.ApplicationUri != "urn:attacker" for s in servers)
    assert [e["service"] for e in logs if e["event"] == "opcua_service_refused"] == [
        "RegisterServer2"
    ]


async def test_a_session_is_not_reactivated_from_another_clients_channel(mirror: Mirror) -> None:
    """asyncua hands a live session to any channel that names its authentication token."""
    async with await secured(mirror.client(), mirror.pki) as owner:
        thief = await secured(mirror.client(ENERGY_URI), mirror.pki)
        await thief.connect_socket()
        try:
            await thief.send_hello()
            await thief.open_secure_channel()
            thief.uaclient.protocol.authentication_token = (
                owner.uaclient.protocol.authentication_token
            )
            thief._server_nonce = owner._server_nonce
            with (
                structlog.testing.capture_logs() as logs,
                pytest.raises(UaStatusCodeError) as refused,
            ):
                await thief.activate_session()
        finally:
            thief.disconnect_socket()
        assert refused.value.code == ua.StatusCodes.BadSessionIdInvalid
        assert [e["reason"] for e in logs if e["event"] == "opcua_client_refused"] == [
            "session_of_another_client"
        ]
        assert await owner.get_namespace_index("urn:dmzbroker:coldstore-demo") > 1  # still its own


async def test_a_session_certificate_other_than_the_channels_is_refused(mirror: Mirror) -> None:
    """asyncua checks only the certificate in CreateSession, not that it is the channel's."""
    client = await secured(mirror.client(), mirror.pki)
    other = mirror.pki.clients[ENERGY_URI][0].read_bytes()
    send = client.uaclient.create_session

    async def swapped(params: ua.CreateSessionParameters) -> ua.CreateSessionResult:
        params.ClientCertificate = x509.load_pem_x509_certificate(other).public_bytes(Encoding.DER)
        return await send(params)

    client.uaclient.create_session = swapped  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs, pytest.raises(UaStatusCodeError) as refused:
        await client.connect()
    await client.disconnect()
    assert refused.value.code == ua.StatusCodes.BadCertificateInvalid
    assert [e["reason"] for e in logs if e["event"] == "opcua_client_refused"] == [
        "certificate_not_channels"
    ]
    assert mirror.server.sessions == 0


async def test_a_chunk_longer_than_a_chunk_may_be_is_not_buffered(mirror: Mirror) -> None:
    """asyncua buffers whatever length a header claims before it checks any limit."""
    host, port = mirror.server.endpoint.removeprefix("opc.tcp://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"HELF" + (1 << 30).to_bytes(4, "little") + b"\0" * 1024)
        await writer.drain()
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # closed without waiting for a GiB
    finally:
        writer.close()


async def test_revoking_a_certificate_ends_its_open_session(mirror: Mirror) -> None:
    async with await secured(mirror.client(), mirror.pki) as client:
        await eventually(lambda: mirror.server.sessions == 1)
        (session,) = mirror.server._rules.sessions  # type: ignore[union-attr]
        assert session.peer is not None
        mirror.authz.use_revoked(frozenset({session.peer.serial}))
        await eventually(lambda: mirror.server.sessions == 0)
        with pytest.raises(Exception):  # noqa: B017
            await client.get_namespace_index("urn:dmzbroker:coldstore-demo")


async def test_while_the_audit_log_fails_sessions_end_and_none_open(mirror: Mirror) -> None:
    async with await secured(mirror.client(), mirror.pki):
        await eventually(lambda: mirror.server.sessions == 1)
        mirror.audit.failing = True
        try:
            await eventually(lambda: mirror.server.sessions == 0)
            with (
                structlog.testing.capture_logs() as logs,
                pytest.raises(UaStatusCodeError) as refused,
            ):
                await connect(mirror.client(), mirror.pki)
            assert refused.value.code == ua.StatusCodes.BadServerHalted
            assert [e["reason"] for e in logs if e["event"] == "opcua_client_refused"] == [
                "not_serving"
            ]
        finally:
            mirror.audit.failing = False


async def test_a_policy_that_narrows_a_view_ends_the_sessions_watching_beyond_it(
    own_mirror: Mirror,
) -> None:
    mirror = own_mirror
    demo = policy.load(DEMO_POLICY)
    roles = [
        r
        if r.name != "energy"
        else msgspec.structs.replace(r, signals=["coldstore/outdoor/weather/*"])
        for r in demo.roles
    ]
    narrower = msgspec.structs.replace(demo, version=demo.version + 1, roles=roles)
    async with (
        await secured(mirror.client(ENERGY_URI), mirror.pki) as energy,
        await secured(mirror.client(), mirror.pki),
    ):
        ns = await namespace(energy)
        subscription = await energy.create_subscription(50, Changes())
        await subscription.subscribe_data_change(node_of(energy, ns, POWER))
        await eventually(lambda: mirror.server.sessions == 2)
        mirror.authz.use_policy(narrower)
        mirror.server.use_policy(narrower)
        await eventually(lambda: mirror.server.sessions == 1)  # the historian's stays
        (left,) = mirror.server._rules.sessions  # type: ignore[union-attr]
        assert left.peer is not None and left.peer.identity == CONSUMER_URI


async def test_requests_and_monitored_items_are_bounded_per_session(mirror: Mirror) -> None:
    async with await secured(mirror.client(), mirror.pki) as client:
        ns = await namespace(client)
        too_many = [node_of(client, ns, ROOM)] * (MAX_OPERATIONS + 1)
        with pytest.raises(UaStatusCodeError) as refused:
            await client.read_values(too_many)
        assert refused.value.code == ua.StatusCodes.BadTooManyOperations
        for _ in range(MAX_SUBSCRIPTIONS):
            await client.create_subscription(500, Changes())
        with pytest.raises(UaStatusCodeError) as refused:
            await client.create_subscription(500, Changes())
        assert refused.value.code == ua.StatusCodes.BadTooManySubscriptions


async def test_a_newer_policy_rebuilds_the_space_keeping_what_it_still_names(
    own_mirror: Mirror,
) -> None:
    mirror = own_mirror
    demo = policy.load(DEMO_POLICY)
    fewer = msgspec.structs.replace(
        demo, version=demo.version + 1, signals=[s for s in demo.signals if s.path != DOOR]
    )
    mirror.store.apply([record(ROOM, -18.5, 1)])
    async with await secured(mirror.client(), mirror.pki) as client:
        ns = await namespace(client)
        await eventually(node_of(client, ns, DOOR).read_browse_name)
        mirror.store.use_policy(fewer)
        mirror.authz.use_policy(fewer)
        mirror.server.use_policy(fewer)

        async def door_gone() -> bool:
            try:
                await node_of(client, ns, DOOR).read_browse_name()
            except BadNodeIdUnknown:
                return True
            return False

        await eventually(door_gone)
        assert await node_of(client, ns, ROOM).read_value() == -18.5
        room = await client.nodes.objects.get_child(
            [f"{ns}:coldstore", f"{ns}:storage", f"{ns}:cold-room-1"]
        )
        names = {(await c.read_browse_name()).Name for c in await room.get_children()}
        assert "door_open" not in names and "temperature" in names


async def test_run_again_after_a_failed_start_brings_up_a_new_server_never_asyncuas_twice(
    tmp_path: Path, pki: Pki, opcua_pki: OpcUaPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run_contained` runs `run` again after it failed: a server whose init or space was
    left half made is stopped and a new one bound on the same port, so asyncua's init runs
    once per server and the space is built whole."""
    initialised: list[int] = []
    init, build = GuardedServer.init, AddressSpace.use_policy
    failures = iter([RuntimeError("no namespace"), RuntimeError("half a space")])

    async def counted_init(server: GuardedServer) -> None:
        initialised.append(id(server))
        await init(server)

    async def failing_build(space: AddressSpace, newer: policy.Policy) -> None:
        await build(space, newer)
        failure = next(failures, None)
        if failure is not None:
            raise failure

    monkeypatch.setattr(GuardedServer, "init", counted_init)
    monkeypatch.setattr(AddressSpace, "use_policy", failing_build)
    mirror = await start_mirror(tmp_path, pki, opcua_pki)
    endpoint = mirror.server.endpoint
    try:
        for expected in ("no namespace", "half a space"):
            with pytest.raises(RuntimeError, match=expected):
                await mirror.server.run()
            assert not mirror.server.ready
        async with serving(mirror):
            assert mirror.server.endpoint == endpoint  # the port clients know
            mirror.store.apply([record(ROOM, -18.0, 1)])
            async with await secured(mirror.client(), mirror.pki) as client:
                await eventually(node_of(client, await namespace(client), ROOM).read_value)
    finally:
        await mirror.server.close()
        mirror.audit.close()
    assert len(initialised) == 3 and len(set(initialised)) == 3, initialised


async def test_the_store_listener_only_notes_records_whatever_state_the_server_is_in(
    tmp_path: Path, pki: Pki, opcua_pki: OpcUaPki
) -> None:
    """The listener runs in the spool reader's step (whatever it raised would end the
    reader): before `run`, after `close`, for signals the policy does not publish."""
    mirror = await start_mirror(tmp_path, pki, opcua_pki)
    seen: list[int] = []
    mirror.store.listen(lambda records: seen.extend(r.seq for r in records))
    mirror.store.apply([record(ROOM, -18.0, 1), record("nowhere/nothing", 1.0, 2)])
    await mirror.server.close()
    mirror.audit.close()
    mirror.store.apply([record(ROOM, -17.0, 3), record(ROOM, -16.0, 4)])
    mirror.store.apply([])
    assert seen == [1, 3, 4]  # the reader's other listeners still called, in order
    assert mirror.server._pending[ROOM].seq == 4  # coalesced: the latest only


async def test_values_fanning_out_to_many_items_are_written_a_budget_at_a_time(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value costs the loop one write and a notification per monitored item on it: the
    writer yields after STEP_BUDGET of those, not after a number of values (200 values of
    8 items each were 1,800 notifications in one step)."""
    budget, sessions = 12, 4  # sessions per identity: a signal both see has 8 items on it
    monkeypatch.setattr(opcua, "STEP_BUDGET", budget)
    calls = total = 0
    callback = MonitoredItemService.datachange_callback

    async def counted(
        service: MonitoredItemService, handle: int, value: Any, error: Any = None
    ) -> None:
        nonlocal calls, total
        calls, total = calls + 1, total + 1
        await callback(service, handle, value, error)

    monkeypatch.setattr(MonitoredItemService, "datachange_callback", counted)
    views = {identity: mirror.authz.view(identity) for identity in (CONSUMER_URI, ENERGY_URI)}
    per_round = sessions * sum(len(view) for view in views.values())
    async with contextlib.AsyncExitStack() as stack:
        for identity in [*views] * sessions:
            client = await stack.enter_async_context(
                await secured(mirror.client(identity), mirror.pki)
            )
            ns = await namespace(client)
            subscription = await client.create_subscription(100, Changes())
            await subscription.subscribe_data_change(
                [node_of(client, ns, p) for p in views[identity]]
            )
        steps: list[int] = []

        async def each_loop_step() -> None:
            nonlocal calls
            while True:
                await asyncio.sleep(0)
                steps.append(calls)
                calls = 0

        calls = 0  # the items' first notifications, made as they were created
        ticker = asyncio.create_task(each_loop_step())
        try:
            start, seq = total, 0
            for rounds in range(1, 4):
                for path in views[CONSUMER_URI]:
                    seq += 1
                    mirror.store.apply([record(path, float(seq), seq)])
                await eventually(lambda rounds=rounds: total - start >= rounds * per_round)  # type: ignore[misc]
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
    assert max(steps) <= budget + 2 * sessions, sorted(steps)[-5:]
