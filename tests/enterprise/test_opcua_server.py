"""The read-only OPC UA mirror against real asyncua clients over SignAndEncrypt, with
certificates made by our CLI: the address space's shape, units and ranges; values and
qualities equal to the API's; subscriptions; each identity sees only its granted nodes; and
one test for every hook into asyncua's internals (docs/opcua-server.md), so an upgrade that
moves one fails here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from asyncua import Client, ua
from asyncua.crypto import security_policies as sp
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.uaerrors import BadNodeIdUnknown, BadUserAccessDenied, UaStatusCodeError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import policy
from broker.audit.log import AuditLog
from broker.config import BrokerConfig
from broker.enterprise.authz import Authorization
from broker.enterprise.outputs import REGISTRY, opcua
from broker.enterprise.outputs.base import OutputContext
from broker.enterprise.outputs.opcua import OpcUaServer
from broker.enterprise.outputs.opcua_space import STATUS, UNECE, unit_id
from broker.enterprise.store import Store
from broker.errors import ConfigError
from broker.metrics import EnterpriseMetrics
from broker.records import Alert, Assessment, Context, Record
from tests.harness import CONSUMER_URI, DEMO_POLICY, ENERGY_URI, STRANGER_URI, Pki, dmzbroker
from tests.harness import eventually, free_port

pytestmark = pytest.mark.timeout(120)

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


async def connect(client: Client, pki: OpcUaPki) -> Client:
    policy, cert, key = client._opcua_security  # type: ignore[attr-defined]
    await client.set_security(policy, str(cert), str(key), server_certificate=str(pki.server_cert))
    await client.connect()
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
    tmp_path: Path, pki: Pki, opcua_pki: OpcUaPki, **opcua_changes: Any
) -> Mirror:
    demo = policy.load(DEMO_POLICY)
    store = Store(demo, queue_limit=100)
    audit = AuditLog(
        tmp_path / "audit", "enterprise", demo.deployment_id, Ed25519PrivateKey.generate()
    )
    authz = Authorization(demo)
    metrics = EnterpriseMetrics(lambda: 0, lambda: audit.failing)
    config = broker_config(tmp_path, pki, opcua_pki, free_port(), **opcua_changes)
    output = opcua.configured(OutputContext(config, authz, store, audit, metrics))
    assert isinstance(output, OpcUaServer)
    await output.start()
    return Mirror(output, store, authz, audit, opcua_pki)


@pytest.fixture
async def mirror(tmp_path: Path, pki: Pki, opcua_pki: OpcUaPki) -> AsyncIterator[Mirror]:
    served = await start_mirror(tmp_path, pki, opcua_pki)
    task = asyncio.create_task(served.server.run())
    try:
        yield served
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await served.server.close()
        served.audit.close()


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
    assert opcua.configured in REGISTRY
    demo = policy.load(DEMO_POLICY)
    config = broker_config(tmp_path, pki, opcua_pki, free_port())
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
    async with await connect(mirror.client(), mirror.pki) as client:
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
