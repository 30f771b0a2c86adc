"""The OPC UA connector against real asyncua servers on 127.0.0.1, certificates from our CLI."""

from __future__ import annotations

import asyncio
import struct
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
import yaml
from asyncua import ua
from cryptography import x509

from broker import config, policy
from broker.config import OpcUaConfig, OpcUaUserConfig
from broker.errors import ConfigError, DeviceError, TrustError
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.opcua import OpcUaConnector
from broker.plant.connectors.opcua_session import SessionSettings, fingerprint, open_session
from broker.plant.connectors.registry import connector_for
from broker.plant.decode import decoder_for
from broker.policy import OpcUaDevice, Signal
from tests.harness import dmzbroker, eventually, free_port
from tests.plant.connectors.opcua_server import (
    INSECURE,
    PASSWORD,
    SECURE,
    OpcUaPki,
    OpcUaTestServer,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

FLOAT32 = struct.unpack("<f", struct.pack("<f", 16.654696))[0]  # a double: 16.654695510864258
VARIABLES = {"Power": 10.5, "Running": True, "Mode": "auto", "Count": 7, "Table": [1, 2],
             "Flow": ua.Variant(FLOAT32, ua.VariantType.Float)}  # fmt: skip
READ_SIDE = {  # session, discovery and subscription services, Browse and Read: nothing else
    "GetEndpointsRequest", "FindServersRequest", "CreateSessionRequest",
    "ActivateSessionRequest", "CloseSessionRequest", "BrowseRequest", "BrowseNextRequest",
    "TranslateBrowsePathsToNodeIdsRequest", "ReadRequest", "CreateSubscriptionRequest",
    "ModifySubscriptionRequest", "DeleteSubscriptionsRequest", "CreateMonitoredItemsRequest",
    "DeleteMonitoredItemsRequest", "PublishRequest", "RepublishRequest",
}  # fmt: skip
WRITE_SIDE = {"WriteRequest", "CallRequest", "AddNodesRequest", "AddReferencesRequest",
              "DeleteNodesRequest", "DeleteReferencesRequest", "HistoryUpdateRequest"}  # fmt: skip


@asynccontextmanager
async def serving(server: OpcUaTestServer) -> AsyncIterator[OpcUaTestServer]:
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plc(pki: OpcUaPki) -> AsyncIterator[OpcUaTestServer]:
    """Every allowed policy and None, anonymous/username/certificate users."""
    async with serving(OpcUaTestServer(pki, VARIABLES)) as server:
        yield server


def device(server: OpcUaTestServer, **fields: Any) -> OpcUaDevice:
    return msgspec.convert(
        {"name": "ua-plc", "endpoint": server.endpoint, "poll_interval_s": 0.1,
         "timeout_s": 2.0, **fields},
        OpcUaDevice,
    )  # fmt: skip


def signals(server: OpcUaTestServer, *names: str, **source: Any) -> list[Signal]:
    return [
        msgspec.convert(
            {
                "path": f"site/line/plc/{name.lower()}",
                "device": "ua-plc",
                "source": {"protocol": "opcua", "node": server.node(name), **source},
            },
            Signal,
        )
        for name in names
    ]


def power_reader(server: OpcUaTestServer, pki: OpcUaPki, **fields: Any) -> OpcUaConnector:
    """A connector reading the server's Power node, its device changed by `fields`."""
    ua_plc = device(server, **fields)
    return OpcUaConnector(
        ua_plc, signals(server, "Power"), SessionSettings.build(ua_plc, plant_config(pki))
    )


def plant_config(pki: OpcUaPki, trust: list[Path] | None = None, **users: Any) -> OpcUaConfig:
    return OpcUaConfig(
        certificate=pki.client_cert,
        private_key=pki.client_key,
        trust_list=[pki.ca] if trust is None else trust,
        users={name: OpcUaUserConfig(**fields) for name, fields in users.items()},
    )


class Collector:
    def __init__(self) -> None:
        self.batches: list[list[RawSample]] = []
        self.latest: dict[str, RawSample] = {}

    async def emit(self, samples: list[RawSample]) -> None:
        self.batches.append(samples)
        self.latest.update((s.signal, s) for s in samples)

    def quality(self, path: str) -> str | None:
        return self.latest[path].quality if path in self.latest else None


@asynccontextmanager
async def running(connector: OpcUaConnector) -> AsyncIterator[Collector]:
    collector = Collector()
    task = asyncio.create_task(connector.run(collector.emit))
    try:
        yield collector
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


POWER = "site/line/plc/power"


@pytest.mark.parametrize(
    ("security_policy", "security_mode"),
    [
        ("Basic256Sha256", "SignAndEncrypt"),
        ("Basic256Sha256", "Sign"),
        ("Aes128_Sha256_RsaOaep", "SignAndEncrypt"),
        ("Aes256_Sha256_RsaPss", "SignAndEncrypt"),
    ],
)
async def test_a_session_with_each_allowed_security_policy_reads_values(
    plc: OpcUaTestServer, pki: OpcUaPki, security_policy: str, security_mode: str
) -> None:
    ua_plc = device(plc, security_policy=security_policy, security_mode=security_mode)
    connector = OpcUaConnector(
        ua_plc, signals(plc, "Power"), SessionSettings.build(ua_plc, plant_config(pki))
    )
    await plc.set("Power", 42.25)
    async with running(connector) as collector:
        await eventually(lambda: collector.quality(POWER) == "good", timeout=10)
    assert collector.latest[POWER].raw == 42.25


async def test_values_keep_their_source_timestamp_and_status_maps_to_quality(
    plc: OpcUaTestServer, pki: OpcUaPki
) -> None:
    ua_plc = device(plc)
    connector = OpcUaConnector(
        ua_plc, signals(plc, "Power"), SessionSettings.build(ua_plc, plant_config(pki))
    )
    measured = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    async with running(connector) as collector:
        await plc.set("Power", 1.0)
        await eventually(lambda: collector.quality(POWER) == "good", timeout=10)
        await plc.set("Power", 2.0, ua.StatusCodes.UncertainLastUsableValue, measured)
        await eventually(lambda: collector.quality(POWER) == "uncertain")
        assert collector.latest[POWER].source_time == measured
        assert collector.latest[POWER].raw == 2.0
        await plc.set("Power", 0.0, ua.StatusCodes.BadSensorFailure)
        await eventually(lambda: collector.quality(POWER) == "bad")
        await plc.set("Power", 3.0)
        await eventually(lambda: collector.quality(POWER) == "good")


async def test_polled_read_as_the_per_device_fallback(plc: OpcUaTestServer, pki: OpcUaPki) -> None:
    ua_plc = device(plc, read="poll", security_policy="Aes256_Sha256_RsaPss")
    names = ("Power", "Running", "Mode", "Count")
    connector = OpcUaConnector(
        ua_plc, signals(plc, *names), SessionSettings.build(ua_plc, plant_config(pki))
    )
    await plc.set("Power", 7.5)
    await plc.set("Count", 3, ua.StatusCodes.UncertainInitialValue)
    async with running(connector) as collector:
        await eventually(lambda: connector.scans >= 3, timeout=10)
    latest = collector.latest
    assert {k: (v.raw, v.quality) for k, v in latest.items()} == {
        POWER: (7.5, "good"),
        "site/line/plc/running": (True, "good"),
        "site/line/plc/mode": ("auto", "good"),
        "site/line/plc/count": (3, "uncertain"),
    }
    assert all(len(batch) == 4 for batch in collector.batches)  # one whole Read each time


async def test_a_float_is_published_as_its_shortest_float32_decimal_and_a_double_as_it_is(
    plc: OpcUaTestServer, pki: OpcUaPki
) -> None:
    """As a Modbus float32 is: 16.654696, not the 16.654695510864258 its double holds; a
    scaled Float is scaled from that decimal (docs/modbus.md, Precision)."""
    ua_plc = device(plc)
    flow, power = signals(plc, "Flow", "Power")
    scaled = msgspec.structs.replace(flow, scale=0.1)
    connector = OpcUaConnector(
        ua_plc, [flow, power], SessionSettings.build(ua_plc, plant_config(pki))
    )
    await plc.set("Power", FLOAT32)  # a Double holding the same number: all its digits count
    async with running(connector) as collector:
        await eventually(lambda: len(collector.latest) == 2 and all(
            s.quality == "good" for s in collector.latest.values()), timeout=10)  # fmt: skip
    raw = collector.latest[flow.path].raw
    assert raw == 16.654696 and repr(raw) == "16.654696"
    assert collector.latest[power.path].raw == 16.654695510864258
    assert raw is not None and decoder_for(scaled)(raw) == 1.6654696


async def test_a_frozen_value_keeps_its_source_time_and_each_read_has_its_own(
    plc: OpcUaTestServer, pki: OpcUaPki
) -> None:
    ua_plc = device(plc, read="poll")
    connector = OpcUaConnector(
        ua_plc, signals(plc, "Power"), SessionSettings.build(ua_plc, plant_config(pki))
    )
    changed = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)  # a server stamping the last change
    await plc.set("Power", 4.0, ua.StatusCodes.Good, changed)
    async with running(connector) as collector:
        await eventually(lambda: connector.scans >= 3, timeout=10)
    samples = [batch[0] for batch in collector.batches]
    assert {s.source_time for s in samples} == {changed}  # the record keeps the device's time
    reads = [s.read_time for s in samples]
    assert all(r is not None and r > changed for r in reads)
    assert reads == sorted(reads) and len(set(reads)) == len(reads)  # what checks judge by


async def test_an_unknown_node_or_a_value_the_model_cannot_take_is_bad_and_logged_once(
    plc: OpcUaTestServer, pki: OpcUaPki, events: list[dict[str, Any]]
) -> None:
    ua_plc = device(plc)
    connector = OpcUaConnector(
        ua_plc,
        signals(plc, "Power", "NoSuchNode", "Table"),
        SessionSettings.build(ua_plc, plant_config(pki)),
    )
    async with running(connector) as collector:
        await eventually(lambda: len(collector.latest) == 3, timeout=10)
        await plc.set("Table", [3, 4])
        await eventually(lambda: connector.scans >= 2)
    assert collector.quality(POWER) == "good"
    assert collector.quality("site/line/plc/nosuchnode") == "bad"
    assert collector.quality("site/line/plc/table") == "bad"
    refused = [e for e in events if e["event"] == "device_read_refused"]
    assert sorted((e["signal"], e["reason"]) for e in refused) == [
        ("site/line/plc/nosuchnode", "item_refused"),
        ("site/line/plc/table", "value_unsupported"),
    ]


async def test_absolute_deadband_filters_small_changes_at_the_server(
    plc: OpcUaTestServer, pki: OpcUaPki
) -> None:
    ua_plc = device(plc)
    watched = signals(plc, "Power", deadband={"kind": "absolute", "value": 5.0}, queue_size=10)
    connector = OpcUaConnector(ua_plc, watched, SessionSettings.build(ua_plc, plant_config(pki)))
    await plc.set("Power", 100.0)
    async with running(connector) as collector:
        await eventually(lambda: collector.quality(POWER) == "good", timeout=10)
        for value in (101.0, 102.0, 103.0, 110.0):  # only 110 moves more than 5 from 100
            await plc.set("Power", value)
        await eventually(lambda: collector.latest[POWER].raw == 110.0)
    notified = {(s.source_time, s.raw) for batch in collector.batches for s in batch}
    assert [raw for _, raw in sorted(notified)] == [100.0, 110.0]  # the rest: still current


async def test_an_unchanging_subscribed_value_is_still_current_at_every_interval(
    plc: OpcUaTestServer, pki: OpcUaPki
) -> None:
    ua_plc = device(plc)  # subscribe, 0.1 s
    connector = OpcUaConnector(
        ua_plc, signals(plc, "Power"), SessionSettings.build(ua_plc, plant_config(pki))
    )
    changed = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    await plc.set("Power", 4.0, ua.StatusCodes.Good, changed)
    async with running(connector) as collector:
        await eventually(lambda: len(collector.batches) >= 5, timeout=10)
    samples = [s for batch in collector.batches for s in batch]
    assert {(s.source_time, s.raw, s.quality) for s in samples} == {(changed, 4.0, "good")}
    reads = [s.read_time for s in samples]
    assert all(r is not None for r in reads)
    assert reads == sorted(reads) and len(set(reads)) == len(reads)  # one per keep-alive


async def test_username_and_certificate_user_identities(
    plc: OpcUaTestServer, pki: OpcUaPki, tmp_path: Path
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    by_password = device(plc, user_identity="username")
    by_certificate = device(plc, user_identity="certificate")
    for ua_plc, credentials in (
        (by_password, {"username": "historian", "password_file": password_file}),
        (by_certificate, {"certificate": pki.user_cert, "private_key": pki.user_key}),
    ):
        settings = SessionSettings.build(ua_plc, plant_config(pki, **{"ua-plc": credentials}))
        plc.users.seen.clear()
        async with open_session(settings):
            pass
        assert plc.users.seen == [ua_plc.user_identity]


async def test_a_wrong_password_is_refused(
    plc: OpcUaTestServer, pki: OpcUaPki, tmp_path: Path
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("guess\n")
    ua_plc = device(plc, user_identity="username")
    credentials = {"username": "historian", "password_file": password_file}
    settings = SessionSettings.build(ua_plc, plant_config(pki, **{"ua-plc": credentials}))
    with pytest.raises(DeviceError, match=r"BadUserAccessDenied|BadIdentityTokenRejected"):
        async with open_session(settings):
            pass


async def test_missing_plant_config_for_a_device_is_a_clear_error(pki: OpcUaPki) -> None:
    secured = msgspec.convert(
        {"name": "ua-plc", "endpoint": "opc.tcp://127.0.0.1:4840"}, OpcUaDevice
    )
    with pytest.raises(ConfigError, match=r"plant.opcua.certificate"):
        connector_for(secured, [], None)
    with pytest.raises(ConfigError, match=r"server_certificate_sha256.*trust_list"):
        SessionSettings.build(secured, plant_config(pki, trust=[]))
    by_password = msgspec.structs.replace(secured, user_identity="username")
    with pytest.raises(ConfigError, match=r"plant.opcua.users.ua-plc"):
        SessionSettings.build(by_password, plant_config(pki))


@pytest.mark.parametrize("deprecated", ["Basic256", "Basic128Rsa15"])
async def test_deprecated_security_policies_are_refused_when_the_policy_loads(
    tmp_path: Path, deprecated: str
) -> None:
    document = tmp_path / "policy.yaml"
    document.write_text(
        f"""deployment_id: site
version: 1
expires: 2036-01-01T00:00:00Z
devices:
  - {{name: ua-plc, protocol: opcua, endpoint: "opc.tcp://127.0.0.1:4840",
      security_policy: {deprecated}}}
signals:
  - {{path: site/plc/power, device: ua-plc, source: {{protocol: opcua, node: "ns=2;s=Power"}}}}
"""
    )
    with pytest.raises(ConfigError, match=f"{deprecated}.*deprecated.*refused"):
        policy.load(document)


async def test_a_server_that_offers_only_security_none_is_refused(
    pki: OpcUaPki, events: list[dict[str, Any]]
) -> None:
    async with serving(OpcUaTestServer(pki, VARIABLES, policies=INSECURE)) as insecure:
        ua_plc = device(insecure)
        settings = SessionSettings.build(ua_plc, plant_config(pki))
        with pytest.raises(DeviceError, match=r"offers no Basic256Sha256/SignAndEncrypt.*None"):
            async with open_session(settings):
                pass
        assert insecure.services["CreateSessionRequest"] == 0  # refused before any session
        ua_plc = device(insecure, security_policy="None", security_mode="None")
        async with open_session(SessionSettings.build(ua_plc, None)):
            pass
    assert [e["event"] for e in events if e["event"].startswith("opcua_")] == [
        "opcua_endpoint_refused",
        "opcua_security_none",  # audited each session
    ]


async def test_an_untrusted_server_certificate_is_refused_and_a_pinned_one_accepted(
    pki: OpcUaPki, events: list[dict[str, Any]]
) -> None:
    async with serving(OpcUaTestServer(pki, VARIABLES, policies=SECURE, rogue=True)) as rogue:
        ua_plc = device(rogue)
        with pytest.raises(TrustError, match="neither pinned by the policy nor in"):
            async with open_session(SessionSettings.build(ua_plc, plant_config(pki))):
                pass
        assert rogue.services["CreateSessionRequest"] == 0
        wrong_pin = device(rogue, server_certificate_sha256="0" * 64)
        with pytest.raises(TrustError, match="does not match the policy"):
            async with open_session(SessionSettings.build(wrong_pin, plant_config(pki))):
                pass
        pin = fingerprint(x509.load_pem_x509_certificate(pki.rogue_cert.read_bytes()))
        pinned = device(rogue, server_certificate_sha256=pin)
        async with open_session(SessionSettings.build(pinned, plant_config(pki, trust=[]))):
            pass
    refused = [e for e in events if e["event"] == "opcua_server_certificate_refused"]
    assert len(refused) == 2 and refused[0]["sha256"] == pin


async def test_session_drop_marks_every_signal_bad_at_once_then_values_resume(
    plc: OpcUaTestServer, pki: OpcUaPki, events: list[dict[str, Any]]
) -> None:
    ua_plc = device(plc)
    names = ("Power", "Running", "Mode")
    connector = OpcUaConnector(
        ua_plc, signals(plc, *names), SessionSettings.build(ua_plc, plant_config(pki))
    )
    async with running(connector) as collector:
        await eventually(
            lambda: all(q == "good" for q in map(collector.quality, collector.latest)) and
            len(collector.latest) == 3, timeout=10,
        )  # fmt: skip
        await plc.stop()
        try:
            await eventually(lambda: collector.quality(POWER) == "bad")
            drop = next(b for b in collector.batches if b[0].quality == "bad")
            assert {s.signal for s in drop} == {s.path for s in signals(plc, *names)}
            assert all(s.quality == "bad" and s.raw is None for s in drop)  # one batch, all bad
        finally:
            await plc.restart()
        await plc.set("Power", 99.0)
        await eventually(lambda: collector.quality(POWER) == "good", timeout=20)
        await eventually(lambda: collector.latest[POWER].raw == 99.0)
    kinds = [e["event"] for e in events if e["event"].startswith("device_session")]
    assert kinds[:2] == ["device_session_up", "device_session_down"]
    assert kinds[-1] == "device_session_up"


async def test_only_read_side_services_ever_reach_the_server(pki: OpcUaPki, tmp_path: Path) -> None:
    """Counted at the server: everything the connector sends, subscribing and polling."""
    async with serving(OpcUaTestServer(pki, VARIABLES)) as server:
        for read in ("subscribe", "poll"):
            ua_plc = device(server, read=read)
            connector = OpcUaConnector(
                ua_plc,
                signals(server, *VARIABLES, "Missing"),
                SessionSettings.build(ua_plc, plant_config(pki)),
            )
            async with running(connector):
                await eventually(lambda c=connector: c.scans >= 1, timeout=10)
                await server.set("Power", 5.0)  # a change to notify, or a Read to make
                await eventually(lambda c=connector: c.scans >= 2)
        services = server.services
    assert services["ReadRequest"] > 0 and services["CreateMonitoredItemsRequest"] > 0
    assert set(services) <= READ_SIDE, set(services) - READ_SIDE
    assert sum(services[name] for name in WRITE_SIDE) == 0


async def discover(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process; a thread keeps this loop (and its server) serving."""
    return await asyncio.to_thread(dmzbroker, "discover", "opcua", *args, check=False)


async def test_discover_prints_a_starter_signal_list_that_a_policy_accepts(
    plc: OpcUaTestServer, pki: OpcUaPki, tmp_path: Path
) -> None:
    done = await discover(
        plc.endpoint, "--certificate", str(pki.client_cert), "--key", str(pki.client_key),
        "--trust", str(pki.ca), "--device-name", "press-4",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    starter = yaml.safe_load(done.stdout)
    power = next(s for s in starter["signals"] if s["source"]["node"] == plc.node("Power"))
    assert power == {
        "path": "press-4/plant/power",
        "device": "press-4",
        "source": {"node": plc.node("Power")},  # no protocol: the device says it
        "unit": "kW",
        "description": "Plant/Power (Double)",
    }
    assert {s["source"]["node"] for s in starter["signals"]} == {plc.node(n) for n in VARIABLES}
    document = tmp_path / "policy.yaml"  # the list as printed, in a policy's top keys
    document.write_text(
        "deployment_id: d\nversion: 1\nexpires: 2099-01-01T00:00:00Z\n" + done.stdout
    )
    accepted = policy.load(document)
    assert len(accepted.signals) == len(starter["signals"])
    (device,) = accepted.devices
    assert isinstance(device, OpcUaDevice) and device.endpoint == plc.endpoint


async def test_discover_errors_are_one_line(plc: OpcUaTestServer, pki: OpcUaPki) -> None:
    own = ("--certificate", str(pki.client_cert), "--key", str(pki.client_key))
    untrusted = await discover(plc.endpoint, *own, "--trust", str(pki.rogue_cert))
    unreachable = await discover(f"opc.tcp://127.0.0.1:{free_port()}", *own, "--pin", "0" * 64)
    no_certificate = await discover(plc.endpoint)
    for done, code, message in (
        (untrusted, 2, "is not trusted by --pin or --trust"),
        (unreachable, 1, "cannot open a session with opc.tcp://127.0.0.1"),
        (no_certificate, 2, "needs --certificate and --key"),
    ):
        assert (done.returncode, done.stdout) == (code, ""), done.stderr
        assert done.stderr.startswith("dmzbroker: error: ") and message in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback


async def test_discover_without_security_only_when_asked(plc: OpcUaTestServer) -> None:
    done = await discover(plc.endpoint, "--security", "None")
    assert done.returncode == 0, done.stderr
    device = yaml.safe_load(done.stdout)["devices"][0]
    assert (device["security_policy"], device["security_mode"]) == ("None", "None")


APPLIANCE = """\
policy: policy.dsse.json
trust_root: trust-root.yaml
spool: {dir: spool}
audit: {dir: audit, key: audit.key}
enterprise:
  state_dir: state
  tls: {cert: server.crt, key: server.key, client_ca: ca.crt}
plant:
  state_dir: plant-state
  opcua:
"""


@pytest.mark.parametrize(
    ("opcua", "expected"),
    [
        ("    {certificate: c.pem, private_key: k.pem, trustlist: [t]}",
         r"plant\.opcua: unknown key 'trustlist' — did you mean 'trust_list'\?"),
        ("    {certificate: c.pem, private_key: k.pem, users: {p: {username: u}}}",
         r"plant\.opcua\.users\.p: username and password_file go together"),
        ("    {certificate: c.pem, private_key: k.pem,\n"
         "     users: {p: {username: u, password_file: f, certificate: c, private_key: k}}}",
         r"give username and password_file, or certificate and private_key"),
    ],
)  # fmt: skip
async def test_plant_opcua_config_refuses_unknown_keys_and_half_credentials(
    tmp_path: Path, opcua: str, expected: str
) -> None:
    path = tmp_path / "broker.yaml"
    path.write_text(APPLIANCE + opcua + "\n")
    with pytest.raises(ConfigError, match=expected):
        config.load(path)


async def test_plant_opcua_config_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "broker.yaml"
    path.write_text(APPLIANCE + "    {certificate: c.pem, private_key: k.pem, trust_list: [t]}\n")
    opcua = config.load(path).plant.opcua
    assert opcua is not None
    assert (opcua.certificate, opcua.trust_list) == (tmp_path / "c.pem", [tmp_path / "t"])
