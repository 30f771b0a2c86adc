"""The output contract (docs/specs/output.md), over the registry: each output is built exactly
when its config section is set; one that raises is contained (logged once per outage, run
again after a backoff) while the others keep serving; spool readers keep positions of their
own; and a real enterprise half with its outputs running writes nothing into the spool.

The outputs are the real ones, served over real mutual TLS (and, for the MQTT sink, to a real
Mosquitto). Only the failing output is made up: a bug is a fault no real output offers.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import msgspec
import pytest
import structlog
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import config as broker_config
from broker import policy
from broker.audit.log import AuditLog
from broker.channel.spool import POSITION_FILE, SpoolReceiver, SpoolSender
from broker.enterprise.authz import Authorization
from broker.enterprise.outputs import (
    REGISTRY,
    Output,
    OutputContext,
    base,
    outputs_for,
    run_contained,
)
from broker.enterprise.outputs.mqtt import MqttSink
from broker.enterprise.store import Store
from broker.errors import ConfigError
from broker.metrics import EnterpriseMetrics
from broker.policy import Policy
from broker.trust import tls
from tests.enterprise.served import ROOM, record
from tests.enterprise.test_mqtt import (  # noqa: F401 - mosquitto, mqtt_pki: fixtures
    Mosquitto,
    acknowledged,
    mosquitto,
    mqtt_pki,
    sink_config,
)
from tests.harness import (
    CONSUMER_URI,
    DEMO_POLICY,
    Deployment,
    Pki,
    dmzbroker,
    eventually,
    free_port,
    running,
)

pytestmark = pytest.mark.timeout(120)

OUTPUTS = Path(__file__).resolve().parents[2] / "broker" / "enterprise" / "outputs"
NAMES = ("https", "mqtt", "postgres", "opcua")  # docs/specs/output.md: registry, logs, metrics
RECORDS = 500


def sections(pki: Pki, files: Path) -> dict[str, dict[str, Any]]:
    """An `enterprise.<name>` section for each optional output: only its presence matters
    here (nothing is started), but every file it names exists."""
    password = files / "postgres-password"
    password.write_text("not used\n")
    password.chmod(0o600)
    if not (files / "opcua-cert.pem").exists():
        dmzbroker("certs", "issue", "opcua", "--ca", str(pki.ca.parent), "--out", str(files),
                  "--uri", "urn:test:dmzbroker:mirror", "--name", "opcua")  # fmt: skip
    return {
        "mqtt": {"host": "127.0.0.1", "ca": str(pki.ca), "cert": str(pki.client_cert),
                 "key": str(pki.client_key), "identity": CONSUMER_URI},
        "postgres": {"host": "127.0.0.1", "database": "historian", "ca": str(pki.ca),
                     "identity": CONSUMER_URI, "user": "dmzbroker_sink",
                     "password_file": str(password)},
        "opcua": {"port": free_port(), "certificate": str(files / "opcua-cert.pem"),
                  "private_key": str(files / "opcua-key.pem")},
    }  # fmt: skip


def load_config(
    directory: Path, pki: Pki, enterprise: dict[str, Any]
) -> broker_config.BrokerConfig:
    path = directory / "broker.yaml"
    path.write_text(yaml.safe_dump({
        "policy": str(directory / "policy.dsse.json"),
        "trust_root": str(directory / "trust-root.yaml"),
        "spool": {"dir": str(directory / "spool"), "segment_mib": 1},
        "plant": {"state_dir": str(directory / "plant-state")},
        "enterprise": {
            "state_dir": str(directory / "enterprise-state"),
            "listen": {"host": "127.0.0.1", "port": free_port()},
            "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key),
                    "client_ca": str(pki.ca)},
            **enterprise,
        },
        "audit": {"dir": str(directory / "audit"), "key": str(directory / "audit.key")},
    }))  # fmt: skip
    return broker_config.load(path)


@pytest.fixture
def contexts(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., OutputContext]]:
    """contexts(*names): the half's OutputContext with those optional outputs configured."""
    demo = policy.load(DEMO_POLICY)
    audit = AuditLog(
        tmp_path / "audit", "enterprise", demo.deployment_id, Ed25519PrivateKey.generate()
    )
    available = sections(pki, tmp_path)

    def make(*names: str) -> OutputContext:
        config = load_config(tmp_path, pki, {name: available[name] for name in names})
        store = Store(demo, queue_limit=100)
        metrics = EnterpriseMetrics(lambda: len(store.subscriptions), lambda: audit.failing)
        return OutputContext(config, Authorization(demo), store, audit, metrics)

    try:
        yield make
    finally:
        audit.close()


def names_for(context: OutputContext) -> list[str]:
    return [output.name for output in outputs_for(context)]


async def test_each_output_is_built_exactly_when_its_config_section_is_set(
    contexts: Callable[..., OutputContext],
) -> None:
    everything = names_for(contexts("mqtt", "postgres", "opcua"))
    assert len(everything) == len(REGISTRY)  # every registry line answers to its section
    assert everything[0] == "https" and "mqtt" in everything
    assert len(set(everything)) == len(everything) and set(everything) <= set(NAMES)
    assert names_for(contexts()) == ["https"]  # the API is always served
    for name in everything[1:]:
        assert names_for(contexts(name)) == ["https", name], name


class Failing:
    """An output with a bug: each run works for `healthy_s`, then raises `error`."""

    name = "failing"

    def __init__(self) -> None:
        self.error = "disk on fire"
        self.healthy_s = 0.0
        self.runs = 0

    async def start(self) -> None:
        pass

    async def run(self) -> NoReturn:
        self.runs += 1
        await asyncio.sleep(self.healthy_s)
        raise RuntimeError(self.error)

    def use_policy(self, policy: Policy) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_contained's backoff, shortened so that a test sees several retries."""
    monkeypatch.setattr(base, "FIRST_RETRY_S", 0.05)
    monkeypatch.setattr(base, "MAX_RETRY_S", 0.2)
    monkeypatch.setattr(base, "STABLE_S", 1.0)


async def status(url: str, pki: Pki) -> int:
    context = tls.client_context(pki.ca, pki.client_cert, pki.client_key)
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as response:
        return response.status


async def api_started(contexts: Callable[..., OutputContext]) -> tuple[OutputContext, Output]:
    """The HTTPS output started on a free port. free_port() released the port it found, so
    another test (the other xdist worker) may bind it first: on that error, and on no
    other, it is built again on another free port, 3 tries at most."""
    for tries in range(3, 0, -1):
        context = contexts()
        (api,) = outputs_for(context)
        try:
            await api.start()
            return context, api
        except ConfigError as e:
            await api.close()
            if "Address already in use" not in str(e) or tries == 1:
                raise
    raise AssertionError("unreachable")


@pytest.mark.usefixtures("quick_backoff")
async def test_an_output_that_raises_is_logged_once_per_outage_and_run_again_while_the_api_serves(
    contexts: Callable[..., OutputContext], pki: Pki
) -> None:
    failing = Failing()
    with structlog.testing.capture_logs() as logs:
        context, api = await api_started(contexts)
        url = f"https://localhost:{context.config.enterprise.listen.port}/v1/signals"
        try:
            async with running(run_contained(api), run_contained(failing)):

                def failures() -> list[str]:
                    return [e["error"] for e in logs if e["event"] == "output_failed"]

                await eventually(lambda: failing.runs >= 5)
                assert await status(url, pki) == 200  # the API never noticed
                assert failures() == ["RuntimeError: disk on fire"]  # retried, logged once
                failing.error = "disk full"  # another failure within the outage: said once
                runs = failing.runs
                await eventually(lambda: failing.runs >= runs + 3)
                assert failures() == ["RuntimeError: disk on fire", "RuntimeError: disk full"]
                # It works for longer than STABLE_S, then fails as before: a new outage.
                failing.healthy_s = base.STABLE_S + 0.1
                await eventually(lambda: len(failures()) == 3, timeout=30)
                assert failures()[2] == "RuntimeError: disk full"
                assert await status(url, pki) == 200
        finally:
            await api.close()
    failed = [e for e in logs if e["event"] == "output_failed"]
    assert {e["output"] for e in failed} == {"failing"}
    assert all(e["retry_in_s"] > 0 for e in failed)


@pytest.mark.usefixtures("quick_backoff")
async def test_an_output_whose_run_returns_is_a_failure_not_a_busy_loop() -> None:
    class Returning(Failing):
        name = "returning"

        async def run(self) -> NoReturn:  # type: ignore[misc] - the bug under test
            self.runs += 1

    returning = Returning()
    with structlog.testing.capture_logs() as logs:
        async with running(run_contained(returning)):
            await eventually(lambda: returning.runs >= 3)
    failed = [e for e in logs if e["event"] == "output_failed"]
    assert [e["error"] for e in failed] == ["RuntimeError: run() returned"]


def spool_receivers() -> Iterator[tuple[str, ast.Call]]:
    for module in sorted(OUTPUTS.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text(), str(module))):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("SpoolReceiver"):
                yield module.name, node


def test_every_output_that_reads_the_spool_reads_it_under_its_own_name() -> None:
    """Names are distinct (the registry test), so each reader's position file is its own."""
    found = list(spool_receivers())
    assert any(module == "mqtt.py" for module, _ in found)
    for module, call in found:
        reader = {k.arg: ast.unparse(k.value) for k in call.keywords}.get("reader")
        assert reader == "self.name", f"{module}:{call.lineno}: SpoolReceiver(reader=self.name)"


def test_each_reader_name_keeps_a_position_file_of_its_own(tmp_path: Path) -> None:
    spool, state = tmp_path / "spool", tmp_path / "state"
    sender = SpoolSender(spool, 1 << 20, 16 << 20)
    try:
        for i in range(len(NAMES) + 1):  # a frame each: a receiver returns whole frames
            sender.send([record(ROOM, float(i), 0)])
    finally:
        sender.close()
    for count, reader in enumerate(("", *NAMES), start=1):  # "": the half's own reader
        receiver = SpoolReceiver(spool, state, reader=reader)
        try:
            assert [r.seq for r in receiver.receive(max_records=count)] == list(range(1, count + 1))
            receiver.commit()
        finally:
            receiver.close()
    files = {POSITION_FILE, *(f"spool-position-{name}.json" for name in NAMES)}
    assert {p.name for p in state.iterdir()} == files
    saved = {json.loads((state / f).read_bytes())["seq"] for f in files}
    assert saved == set(range(1, len(NAMES) + 2))  # each where its own reader got to


def fingerprint(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `directory`: size, modification time and SHA-256."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root, name)
            data = path.read_bytes()
            found[str(path.relative_to(directory))] = (
                len(data), path.stat().st_mtime_ns, hashlib.sha256(data).hexdigest()
            )  # fmt: skip
    return found


async def metrics_text(deployment: Deployment, pki: Pki) -> str:
    context = tls.client_context(pki.ca, pki.monitoring_cert, pki.monitoring_key)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(deployment.base_url + "/metrics", ssl=context) as response,
        ):
            return await response.text() if response.status == 200 else ""
    except aiohttp.ClientConnectionError:
        return ""  # not listening yet


@pytest.fixture
def with_mqtt(deployment: Deployment, mosquitto: Mosquitto) -> Deployment:  # noqa: F811
    """The deployment's enterprise half configured with the MQTT sink as well."""
    document = yaml.safe_load(deployment.config.read_text())
    pki = mosquitto.pki
    document["enterprise"]["mqtt"] = {
        "host": "127.0.0.1", "port": mosquitto.port, "server_name": "localhost",
        "ca": str(pki / "ca.crt"), "cert": str(pki / "sink.crt"), "key": str(pki / "sink.key"),
        "identity": CONSUMER_URI,
    }  # fmt: skip
    deployment.config.write_text(yaml.safe_dump(document))
    return deployment


async def test_the_halfs_outputs_deliver_and_write_nothing_into_the_spool(
    with_mqtt: Deployment, pki: Pki, start_broker: Any
) -> None:
    """The real `dmzbroker enterprise`, its API and its MQTT sink over one spool: the sink's
    position and count show in /metrics, its position file is in the state dir, and the spool
    is byte for byte as the plant left it."""
    deployment = with_mqtt
    sender = SpoolSender(deployment.spool, 1 << 20, 16 << 20)
    try:
        sender.send([record(ROOM, float(i), 0) for i in range(RECORDS)])
    finally:
        sender.close()
    before = fingerprint(deployment.spool)
    broker = start_broker("enterprise", deployment.config)
    delivered = (
        f'dmzbroker_output_position_seq{{output="mqtt"}} {float(RECORDS)}',
        f'dmzbroker_output_records_total{{output="mqtt"}} {float(RECORDS)}',
    )

    async def all_delivered() -> bool:
        text = await metrics_text(deployment, pki)
        return all(line in text for line in delivered)

    await eventually(all_delivered, timeout=60, interval=0.2)
    assert await status(deployment.base_url + "/v1/snapshot", pki) == 200
    assert broker.stop() == 0
    assert fingerprint(deployment.spool) == before
    position = deployment.directory / "enterprise-state" / "spool-position-mqtt.json"
    assert json.loads(position.read_bytes())["seq"] == RECORDS


async def test_the_mqtt_sink_holds_what_it_has_not_published_while_the_policy_is_expired(
    tmp_path: Path,
    mosquitto: Mosquitto,  # noqa: F811
) -> None:
    """Fail closed like the API (503): under an expired policy the sink publishes nothing
    and its position stays; a newer policy lets everything through, nothing lost."""
    demo = policy.load(DEMO_POLICY)
    expired = msgspec.structs.replace(demo, expires=datetime.now(UTC) - timedelta(seconds=1))
    authz = Authorization(expired)
    spool, state = tmp_path / "spool", tmp_path / "state"
    sender = SpoolSender(spool, 1 << 20, 16 << 20)
    try:
        sender.send([record(ROOM, float(i), 0) for i in range(RECORDS)])
    finally:
        sender.close()
    metrics = EnterpriseMetrics(lambda: 0, lambda: False)
    sink = MqttSink(sink_config(mosquitto, "localhost"), spool, state, authz, metrics=metrics)

    def position() -> float:
        return float(metrics.output_seq.labels("mqtt")._value.get())

    # Absence is shown by the sink's own decisions: it looks whether it must hold before
    # each batch it would read, and one that was not held would have published by then.
    held, decisions = sink._held, []

    def deciding() -> bool:
        decisions.append(held())
        return decisions[-1]

    sink._held = deciding  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        async with running(sink.run()):
            await eventually(lambda: any(e["event"] == "mqtt_connected" for e in logs))
            await eventually(lambda: len(decisions) >= 3)
            assert all(decisions) and acknowledged(state) == 0 and position() == 0
            authz.use_policy(demo)
            await eventually(lambda: acknowledged(state) == RECORDS, timeout=30)
    assert position() == RECORDS
    assert metrics.output_records.labels("mqtt")._value.get() == RECORDS
