"""The MQTT sink against a real Mosquitto over mutual TLS: its broker's certificate checked by
`server_name`, outages noticed at once and left soon after the broker is back, nothing lost
across a broker restart (Mosquitto persisting what it acknowledged, a persistent subscriber
session), and a process log that says what the sink does without aiomqtt's noise.

Delivery is at least once: every seq the plant wrote reaches the subscriber, some possibly
twice, and on each topic the first arrival of each seq is in spool order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast

import aiomqtt
import pytest
import structlog
import yaml
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import policy
from broker.channel.spool import SpoolReceiver, SpoolSender
from broker.config import MqttConfig
from broker.enterprise.authz import Authorization
from broker.enterprise.outputs import mqtt, mqtt_acks
from broker.enterprise.outputs.mqtt import MqttSink
from broker.sim.refrigeration import RefrigerationPlant
from broker.trust import tls
from tests.enterprise.served import POWER, ROOM, record
from tests.harness import (
    CONSUMER_URI,
    DEMO_POLICY,
    BrokerProcess,
    Daemon,
    Deployment,
    dmzbroker,
    eventually,
    free_port,
    running,
)

pytestmark = pytest.mark.timeout(180)

# Persistence on, as a broker that must not lose what it acknowledged runs: Mosquitto saves
# its queues (the offline subscriber's too) when stopped and loads them when started.
MOSQUITTO_CONF = """
listener {port} 127.0.0.1
cafile {pki}/ca.crt
certfile {pki}/broker.crt
keyfile {pki}/broker.key
require_certificate true
use_identity_as_username true
tls_version tlsv1.3
allow_anonymous false
persistence true
persistence_location {directory}/
max_queued_messages 100000
user root
log_dest file {directory}/mosquitto.log
"""
# The sink may not publish to one asset's topic (its certificate's name is its user name).
DENIED = "dmzbroker/coldstore/storage/cold-room-2"
MOSQUITTO_ACL = f"""
user sink
topic deny {DENIED}
topic write dmzbroker/#
user subscriber
topic read dmzbroker/#
"""
PENDING_CALLS = "pending publish calls"  # aiomqtt's warning past its threshold
SINK_AUDITED = ("mqtt_connected", "mqtt_unreachable")  # in broker/audit/catalogue.py


@dataclass
class Mosquitto(Daemon):
    directory: Path = Path()  # its configuration, persistence file and log
    port: int = 0
    pki: Path = Path()

    def start(self) -> None:
        """Started and listening. Mosquitto refuses connections for a few ms after it is
        started (longer on a loaded machine): a sink started meanwhile would log
        `mqtt_unreachable` (Connection refused) before anything a test does to the broker."""
        super().start()
        assert self.process is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
                return
            except OSError:
                time.sleep(0.01)
        raise AssertionError(f"mosquitto is not listening on {self.port} (see its log)")

    def connections(self, client_id: str) -> int:
        """How many connections of `client_id` it has accepted so far, from its log."""
        log = self.directory / "mosquitto.log"
        text = log.read_text() if log.exists() else ""
        return sum(" as " + client_id + " " in line for line in text.splitlines()
                   if "New client connected" in line)  # fmt: skip


@pytest.fixture(scope="module")
def mqtt_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MQTT side's CA; the broker's certificate names `localhost` only, not 127.0.0.1."""
    pki = tmp_path_factory.mktemp("mqtt-pki")
    dmzbroker("certs", "init-ca", "--out", str(pki), "--name", "MQTT CA")
    dmzbroker("certs", "issue", "server", "--ca", str(pki), "--out", str(pki), "--name", "broker",
              "--dns", "localhost")  # fmt: skip
    for name in ("sink", "subscriber"):
        dmzbroker("certs", "issue", "client", "--ca", str(pki), "--out", str(pki),
                  "--name", name, "--uri", f"spiffe://demo/mqtt/{name}")  # fmt: skip
    return pki


@pytest.fixture
def mosquitto(
    tmp_path: Path, mqtt_pki: Path, request: pytest.FixtureRequest
) -> Iterator[Mosquitto]:
    """Mosquitto on a free port, persisting to a folder of this test's; a test's indirect
    parameter is appended to its configuration."""
    assert shutil.which("mosquitto"), "mosquitto is not installed: `make test` installs it"
    directory = tmp_path / "mosquitto"
    directory.mkdir()
    (directory / "acl").write_text(MOSQUITTO_ACL)  # used where a test's parameter names it
    conf = directory / "mosquitto.conf"
    found = Mosquitto(
        ["mosquitto", "-c", str(conf)], directory=directory, port=free_port(), pki=mqtt_pki
    )
    extra = getattr(request, "param", "")
    conf.write_text(
        (MOSQUITTO_CONF + extra).format(port=found.port, pki=mqtt_pki, directory=directory)
    )
    found.start()
    try:
        yield found
    finally:
        found.stop()


def sink_config(mosquitto: Mosquitto, server_name: str) -> MqttConfig:
    pki = mosquitto.pki
    return MqttConfig(
        host="127.0.0.1", port=mosquitto.port, server_name=server_name, ca=pki / "ca.crt",
        cert=pki / "sink.crt", key=pki / "sink.key", identity=CONSUMER_URI,
    )  # fmt: skip


@dataclass
class Subscriber:
    """Subscribes to everything the sink publishes, QoS 1, in a persistent session (a fixed
    client id, no clean start, a session that outlives a disconnect): what is published
    while it is away, or while Mosquitto restarts, waits for it."""

    port: int
    pki: Path
    received: list[tuple[str, int]] = field(default_factory=list)  # (topic, seq) as they came
    messages: list[tuple[str, list[int]]] = field(default_factory=list)  # (topic, its seqs)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def seqs(self) -> set[int]:
        return {seq for _, seq in self.received}

    async def run(self) -> None:
        """Until cancelled, reconnecting while the broker is away."""
        context = tls.client_context(
            self.pki / "ca.crt", self.pki / "subscriber.crt", self.pki / "subscriber.key"
        )
        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = 3600
        for _ in range(10_000):  # bounded; the test's timeout ends it long before
            try:
                async with aiomqtt.Client(
                    "localhost", self.port, identifier="test-subscriber", tls_context=context,
                    clean_start=False, properties=session, timeout=5,
                    protocol=aiomqtt.ProtocolVersion(MQTTProtocolVersion.MQTTv5),
                ) as client:  # fmt: skip
                    await client.subscribe("dmzbroker/#", qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        if not message.retain:  # retained copies are old news, re-sent on subscribe
                            topic = str(message.topic)
                            seqs = [r["seq"] for r in json.loads(message.payload)]
                            self.messages.append((topic, seqs))
                            self.received.extend((topic, seq) for seq in seqs)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def listening(subscriber: Subscriber) -> AsyncIterator[None]:
    """The subscriber connected and subscribed; away again (its session kept) afterwards."""
    subscriber.subscribed.clear()
    task = asyncio.create_task(subscriber.run())
    try:
        await asyncio.wait_for(subscriber.subscribed.wait(), timeout=15)
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def in_order_per_topic(received: list[tuple[str, int]]) -> bool:
    """The first arrival of each seq follows spool order on its topic (repeats are allowed:
    a batch interrupted by an outage is published again)."""
    seen: set[int] = set()
    last: dict[str, int] = {}
    for topic, seq in received:
        if seq in seen:
            continue
        seen.add(seq)
        if seq < last.get(topic, 0):
            return False
        last[topic] = seq
    return True


def acknowledged(state: Path) -> int:
    """The last seq the sink's broker acknowledged: the sink's saved spool position."""
    position = state / "spool-position-mqtt.json"
    return int(json.loads(position.read_bytes())["seq"]) if position.exists() else 0


async def plant(sender: SpoolSender) -> None:
    """Ten records every 20 ms, on two assets (two topics), for as long as it runs."""
    for value in range(1_000_000):
        sender.send([record(ROOM if i % 2 else POWER, float(value), 0) for i in range(10)])
        await asyncio.sleep(0.02)


async def test_a_broker_reached_by_its_ip_address_is_verified_by_server_name(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    authz = Authorization(policy.load(DEMO_POLICY))
    sender = SpoolSender(tmp_path / "spool", 1 << 20, 16 << 20)
    sender.send([record(ROOM, 1.0, 0) for _ in range(5)])

    async def refused(server_name: str) -> str:
        state = tmp_path / f"state-{server_name or 'none'}"
        sink = MqttSink(sink_config(mosquitto, server_name), tmp_path / "spool", state, authz)
        with structlog.testing.capture_logs() as logs:
            async with running(sink.run()):
                await eventually(lambda: any(e["event"] == "mqtt_unreachable" for e in logs))
        assert acknowledged(state) == 0  # nothing was published
        assert not any(e["event"] == "mqtt_connected" for e in logs)
        return str(next(e for e in logs if e["event"] == "mqtt_unreachable")["error"])

    try:
        # The certificate names localhost; the sink connects to 127.0.0.1.
        error = await refused("")
        assert "IP address mismatch" in error
        assert "'127.0.0.1'" in error and "enterprise.mqtt.server_name" in error
        # server_name is checked, never a way around the check.
        error = await refused("mqtt.example.org")
        assert "Hostname mismatch" in error and "'mqtt.example.org'" in error
        assert "enterprise.mqtt.server_name" in error

        state = tmp_path / "state-localhost"
        sink = MqttSink(sink_config(mosquitto, "localhost"), tmp_path / "spool", state, authz)
        with structlog.testing.capture_logs() as logs:
            async with running(sink.run()):
                await eventually(lambda: acknowledged(state) == 5, timeout=15)
        assert [e["event"] for e in logs if e["event"].startswith("mqtt_")] == ["mqtt_connected"]
        # Mosquitto's default max_inflight_messages, announced in its CONNACK.
        assert next(e for e in logs if e["event"] == "mqtt_connected")["receive_maximum"] == 20
    finally:
        sender.close()


async def test_a_broker_restart_loses_nothing_and_the_sink_is_back_within_seconds(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Mosquitto is stopped mid-stream while acknowledged messages wait in it for an offline
    subscriber, and started again: they and everything written meanwhile arrive, in order."""
    spool, state = tmp_path / "spool", tmp_path / "state"
    sender = SpoolSender(spool, 1 << 20, 64 << 20)
    sink = MqttSink(
        sink_config(mosquitto, "localhost"), spool, state, Authorization(policy.load(DEMO_POLICY))
    )
    subscriber = Subscriber(mosquitto.port, mosquitto.pki)
    caplog.set_level(logging.WARNING, logger="mqtt")
    async with listening(subscriber):
        pass  # its session and subscription are kept from now on: it misses nothing
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink.run(), plant(sender)):
                async with listening(subscriber):
                    await eventually(lambda: len(subscriber.seqs) > 200, timeout=20)
                # The subscriber is away (its session kept): what Mosquitto acknowledges from
                # now on waits in Mosquitto, lost unless it is persisted across the restart.
                waiting = acknowledged(state)
                await eventually(lambda: acknowledged(state) > waiting + 500, timeout=20)
                mosquitto.stop()
                stopped = time.monotonic()
                await eventually(lambda: any(e["event"] == "mqtt_unreachable" for e in logs))
                noticed_s = time.monotonic() - stopped
                before = acknowledged(state)
                await asyncio.sleep(3)  # the outage: the plant writes on, records pile up
                mosquitto.start()
                started = time.monotonic()
                await eventually(lambda: acknowledged(state) > before, timeout=20)
                back_s = time.monotonic() - started
                target = sender.next_seq - 1  # everything written by now
                async with listening(subscriber):
                    await eventually(
                        lambda: set(range(1, target + 1)) <= subscriber.seqs, timeout=30
                    )
    finally:
        sender.close()
    print(f"outage noticed after {noticed_s:.2f} s; sink back {back_s:.2f} s after the start")
    assert waiting < before  # messages were waiting in Mosquitto for the subscriber when it stopped
    assert in_order_per_topic(subscriber.received)
    assert noticed_s < 3  # at once: the closed connection, not a 10 s publish timeout
    assert back_s < 8  # retries every 2 s at most, plus Mosquitto's own start
    connected = [e for e in logs if e["event"] == "mqtt_connected"]
    assert len(connected) == 2 and connected[1]["down_s"] > 3
    # Logged as it changes, not at every retry: the connection lost, then refused.
    errors = [e["error"] for e in logs if e["event"] == "mqtt_unreachable"]
    assert errors[0].startswith("connection lost") and "refused" in errors[1]
    assert all(a != b for a, b in itertools.pairwise(errors))
    assert not [r for r in caplog.records if PENDING_CALLS in r.getMessage()]  # the catch-up


def test_the_test_broker_takes_connections_once_started(mosquitto: Mosquitto) -> None:
    """What the tests below rely on: a sink started after `start()` is never refused (a
    refused first try was once the first `mqtt_unreachable` a test read, at load ~20)."""
    mosquitto.stop()
    mosquitto.start()
    socket.create_connection(("127.0.0.1", mosquitto.port), timeout=5).close()


async def test_a_connection_lost_while_publishes_wait_is_noticed_at_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Mosquitto hangs (SIGSTOP) with the sink's publishes unacknowledged, then dies: the
    sink notices when the connection closes, not when its 10 s publish timeout expires."""
    spool, state = tmp_path / "spool", tmp_path / "state"
    sender = SpoolSender(spool, 1 << 20, 64 << 20)
    sink = MqttSink(
        sink_config(mosquitto, "localhost"), spool, state, Authorization(policy.load(DEMO_POLICY))
    )
    assert mosquitto.process is not None
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink.run(), plant(sender)):
                await eventually(lambda: acknowledged(state) > 100, timeout=20)
                mosquitto.process.send_signal(signal.SIGSTOP)
                await eventually(lambda: sender.next_seq - 1 > acknowledged(state) + 100)
                mosquitto.process.kill()  # the kernel closes its connections
                killed = time.monotonic()
                await eventually(lambda: any(e["event"] == "mqtt_unreachable" for e in logs))
                noticed_s = time.monotonic() - killed
    finally:
        sender.close()
        mosquitto.process.wait(timeout=10)
    print(f"a lost connection with publishes waiting noticed after {noticed_s:.2f} s")
    assert noticed_s < 3
    lost = next(e for e in logs if e["event"] == "mqtt_unreachable")
    assert lost["error"].startswith("connection lost")


def most_tries(seconds: float) -> int:
    """The most connections one sink can make in `seconds` if its backoff never restarts: the
    first at once, then after each of its delays at their shortest (jitter 0.8)."""
    tries, spent, delay = 1, 0.0, mqtt.RETRY_FIRST_S
    while spent + delay * 0.8 <= seconds:
        tries, spent, delay = tries + 1, spent + delay * 0.8, min(mqtt.RETRY_MAX_S, delay * 2)
    return tries


async def test_a_broker_that_keeps_dropping_the_sink_is_neither_stormed_nor_logged_each_time(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Two sinks with one client id: Mosquitto closes one's connection when the other connects
    (MQTT session takeover), as a broker that accepts and then drops the sink does. Each
    connection is lost within a second, so it is one outage: the backoff does not start
    afresh at each connection, and each sink logs (and audits) it once, not at every flap."""
    spool = tmp_path / "spool"
    sender = SpoolSender(spool, 1 << 20, 16 << 20)
    sender.send([record(ROOM, 1.0, 0) for _ in range(5)])
    authz = Authorization(policy.load(DEMO_POLICY))
    sinks = [
        MqttSink(sink_config(mosquitto, "localhost"), spool, tmp_path / f"state-{i}", authz)
        for i in (1, 2)
    ]
    client_id = sink_config(mosquitto, "localhost").client_id
    try:
        with structlog.testing.capture_logs() as logs:
            started = time.monotonic()
            async with running(*(sink.run() for sink in sinks)):
                # They take turns, each connection closing the other's.
                await eventually(lambda: mosquitto.connections(client_id) >= 4, timeout=15)
                await asyncio.sleep(6)  # how long they flap: the window counted below
                connections = mosquitto.connections(client_id)
                flapped_s = time.monotonic() - started
    finally:
        sender.close()
    audited = [e["event"] for e in logs if e["event"] in SINK_AUDITED]
    print(f"{connections} connections and {len(audited)} audited events in {flapped_s:.1f} s")
    # Retrying at the first delay after each of these short connections, as a backoff that
    # restarts on every connection does, would take each sink ~1 connection a second.
    assert connections <= 2 * most_tries(flapped_s)
    # Each sink: connected, lost, connected again; then the same outage. (A connection lost
    # at another point of its start can give one more distinct error per sink.)
    assert audited.count("mqtt_connected") <= 4
    assert audited.count("mqtt_unreachable") <= 4
    assert "mqtt_unreachable" in audited  # they did flap


async def test_a_fault_in_forwarding_is_raised_even_when_the_connection_ends_with_it(
    tmp_path: Path, mqtt_pki: Path
) -> None:
    """The forwarding fails with a bug in the same step as the connection is found lost (a
    coincidence no real part produces on demand, so a client already disconnected and a
    forwarding that fails at once): the bug is raised, not taken for the lost connection."""

    class Closed:
        """A client whose connection is gone: its message iterator raises at once."""

        @property
        def messages(self) -> AsyncIterator[Any]:
            return self._gone()

        async def _gone(self) -> AsyncIterator[Any]:
            raise aiomqtt.MqttError("closed")
            yield  # an async generator

    class Faulty(MqttSink):
        async def _forward(self, client: mqtt_acks.Client) -> NoReturn:
            raise RuntimeError("a bug in the forwarding")

    config = MqttConfig(
        host="127.0.0.1", port=1, ca=mqtt_pki / "ca.crt", cert=mqtt_pki / "sink.crt",
        key=mqtt_pki / "sink.key", identity=CONSUMER_URI,
    )  # fmt: skip
    sink = Faulty(config, tmp_path, tmp_path, Authorization(policy.load(DEMO_POLICY)))
    for _ in range(20):  # which of two tasks done together comes first is a matter of chance
        with pytest.raises(RuntimeError, match="a bug in the forwarding"):
            await sink._session(cast(mqtt_acks.Client, Closed()))


async def test_every_record_reaches_a_subscriber_across_an_outage_and_the_log_says_so(
    deployment: Deployment, plant_sim: RefrigerationPlant, mosquitto: Mosquitto, start_broker
) -> None:
    """`dmzbroker run` with the sink configured: the process log shows the sink connect
    (at INFO) and none of aiomqtt's pending-call warnings during the catch-up."""
    pki = mosquitto.pki
    document = yaml.safe_load(deployment.config.read_text())
    document["enterprise"]["mqtt"] = {
        "host": "127.0.0.1", "port": mosquitto.port, "server_name": "localhost",
        "ca": str(pki / "ca.crt"), "cert": str(pki / "sink.crt"), "key": str(pki / "sink.key"),
        "identity": CONSUMER_URI,
    }  # fmt: skip
    deployment.config.write_text(yaml.safe_dump(document))
    subscriber = Subscriber(mosquitto.port, pki)
    async with listening(subscriber):
        broker: BrokerProcess = start_broker("run", deployment.config)
        await eventually(lambda: len(subscriber.seqs) > 30, timeout=30)
        first = min(subscriber.seqs)
        mosquitto.stop()
        await asyncio.sleep(5)  # the outage: the plant keeps writing, the sink must keep it
        mosquitto.start()
        target = spool_last_seq(deployment)  # written before and during the outage
        await eventually(lambda: set(range(first, target + 1)) <= subscriber.seqs, timeout=60)
    assert broker.stop() == 0
    assert target - first > 300  # a catch-up of hundreds of records
    lines = [json.loads(line) for line in broker.events() if line.startswith("{")]
    connected = [e for e in lines if e.get("event") == "mqtt_connected"]
    assert len(connected) >= 2 and connected[0]["logger"] == "mqtt_sink"
    assert not [e for e in lines if PENDING_CALLS in str(e.get("event"))]
    assert in_order_per_topic(subscriber.received)


def spool_last_seq(deployment: Deployment) -> int:
    reader = SpoolReceiver(deployment.spool, deployment.directory / "count-state")
    last = 0
    for _ in range(10_000):
        batch = reader.receive()
        if not batch:
            return last
        last = batch[-1].seq
    return last


async def retained(mosquitto: Mosquitto, topics: int) -> dict[str, list[int]]:
    """The seqs of each topic's retained message, as a new subscriber is sent them."""
    pki = mosquitto.pki
    context = tls.client_context(pki / "ca.crt", pki / "subscriber.crt", pki / "subscriber.key")
    found: dict[str, list[int]] = {}
    async with aiomqtt.Client(
        "localhost", mosquitto.port, identifier="test-retained", tls_context=context, timeout=5,
        protocol=aiomqtt.ProtocolVersion(MQTTProtocolVersion.MQTTv5),
    ) as client:  # fmt: skip
        await client.subscribe("dmzbroker/#", qos=1)
        async with asyncio.timeout(30):
            async for message in client.messages:
                assert message.retain  # nothing new is published meanwhile
                found[str(message.topic)] = [r["seq"] for r in json.loads(message.payload)]
                if len(found) == topics:
                    return found
    raise AssertionError("unreachable: the iterator ends only by raising")


async def test_a_sink_behind_puts_several_scans_in_a_message_and_once_caught_up_sends_each_scan(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """120 scans wait in the spool when the sink starts: each asset's records go out in
    messages of 100 (many scans each), in spool order. Then, caught up, a new scan goes out
    at once as one message per asset; the retained message is each asset's newest."""
    spool, state = tmp_path / "spool", tmp_path / "state"
    authz = Authorization(policy.load(DEMO_POLICY))
    signals = sorted(authz.view(CONSUMER_URI))
    assets = {signal.rpartition("/")[0] for signal in signals}
    sender = SpoolSender(spool, 1 << 20, 64 << 20)
    for scan in range(120):
        sender.send([record(signal, float(scan), 0) for signal in signals])
    backlog = sender.next_seq - 1
    sink = MqttSink(sink_config(mosquitto, "localhost"), spool, state, authz)
    subscriber = Subscriber(mosquitto.port, mosquitto.pki)
    try:
        async with listening(subscriber), running(sink.run()):
            await eventually(lambda: set(range(1, backlog + 1)) <= subscriber.seqs, timeout=30)
            caught_up = len(subscriber.messages)
            sender.send([record(signal, 120.0, 0) for signal in signals])
            scan = set(range(backlog + 1, sender.next_seq))
            await eventually(lambda: scan <= subscriber.seqs, timeout=30)
            await eventually(lambda: acknowledged(state) == sender.next_seq - 1, timeout=30)
        newest = await retained(mosquitto, len(assets))
    finally:
        sender.close()
    assert in_order_per_topic(subscriber.received)
    first = subscriber.messages[:caught_up]
    assert {topic for topic, _ in first} == {f"dmzbroker/{asset}" for asset in assets}
    for topic in {topic for topic, _ in first}:
        sizes = [len(seqs) for t, seqs in first if t == topic]
        per_scan = sum(
            signal.startswith(topic.removeprefix("dmzbroker/") + "/") for signal in signals
        )
        assert sum(sizes) == 120 * per_scan  # each record once: no outage, nothing repeated
        # Full messages of many scans, cut from the newest end: the first holds the remainder.
        assert sizes[1:] == [100] * (len(sizes) - 1)
    # The message each asset's catch-up ended with, which the broker retained until the new
    # scan came, holds that asset's whole newest scan (the last one, seq backlog - 18 on).
    newest_scan = set(range(backlog - len(signals) + 1, backlog + 1))
    for topic in {topic for topic, _ in first}:
        ended = [seqs for t, seqs in first if t == topic][-1]
        asset = topic.removeprefix("dmzbroker/")
        per_scan = sum(signal.startswith(asset + "/") for signal in signals)
        assert len(newest_scan & set(ended)) == per_scan
    # Caught up, the new scan: one message per asset, holding just that asset's records.
    last = subscriber.messages[caught_up:]
    assert sorted(seq for _, seqs in last for seq in seqs) == sorted(scan)
    assert len(last) == len(assets) == len({topic for topic, _ in last})
    assert newest == dict(last)


async def test_a_broker_that_stops_acknowledging_ends_the_session_after_the_publish_timeout(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mosquitto hangs (SIGSTOP) with the connection open: the timeout counts from the last
    acknowledgement, so it still ends the session when none comes; resumed, it gets all."""
    monkeypatch.setattr(mqtt_acks, "PUBLISH_TIMEOUT_S", 2.0)
    spool, state = tmp_path / "spool", tmp_path / "state"
    sender = SpoolSender(spool, 1 << 20, 64 << 20)
    sink = MqttSink(
        sink_config(mosquitto, "localhost"), spool, state, Authorization(policy.load(DEMO_POLICY))
    )
    assert mosquitto.process is not None
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink.run(), plant(sender)):
                await eventually(lambda: acknowledged(state) > 100, timeout=20)
                mosquitto.process.send_signal(signal.SIGSTOP)
                try:
                    await eventually(
                        lambda: any(e["event"] == "mqtt_unreachable" for e in logs), timeout=30
                    )
                finally:
                    mosquitto.process.send_signal(signal.SIGCONT)
                target = sender.next_seq - 1
                await eventually(lambda: acknowledged(state) >= target, timeout=60)
    finally:
        sender.close()
    lost = next(e for e in logs if e["event"] == "mqtt_unreachable")
    assert lost["error"] == "Operation timed out"  # not the connection: it stayed open
    assert [e["event"] for e in logs].count("mqtt_connected") == 2


@dataclass
class Windows:
    """Every Acknowledgements the sinks made, kept to read their high-water marks."""

    made: list[mqtt_acks.Acknowledgements] = field(default_factory=list)

    def most_unacknowledged(self) -> int:
        return max(acks.most_unacknowledged for acks in self.made)


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> Windows:
    found = Windows()

    class Kept(mqtt_acks.Acknowledgements):
        def __init__(self, client: mqtt_acks.Client) -> None:
            super().__init__(client)
            found.made.append(self)

    monkeypatch.setattr(mqtt, "Acknowledgements", Kept)  # where the sink finds it
    return found


@pytest.mark.parametrize("mosquitto", ["max_inflight_messages 3\n"], indirect=True)
async def test_a_batch_of_many_messages_keeps_to_the_brokers_receive_maximum(
    tmp_path: Path, mosquitto: Mosquitto, windows: Windows
) -> None:
    """Mosquitto announces a Receive Maximum of 3 (it does not enforce it for QoS 1, so the
    sink's own count is what is checked): a batch of ~100 messages goes out with never more
    than 3 unacknowledged, every record arrives once and in order, and the log says 3."""
    spool, state = tmp_path / "spool", tmp_path / "state"
    authz = Authorization(policy.load(DEMO_POLICY))
    signals = sorted(authz.view(CONSUMER_URI))
    sender = SpoolSender(spool, 1 << 20, 64 << 20)
    for scan in range(500):  # 9,500 records, one batch: ~20 messages on each of 5 assets
        sender.send([record(signal, float(scan), 0) for signal in signals])
    backlog = sender.next_seq - 1
    sink = MqttSink(sink_config(mosquitto, "localhost"), spool, state, authz)
    subscriber = Subscriber(mosquitto.port, mosquitto.pki)
    try:
        with structlog.testing.capture_logs() as logs:
            async with listening(subscriber), running(sink.run()):
                await eventually(lambda: acknowledged(state) == backlog, timeout=60)
                await eventually(lambda: len(subscriber.received) >= backlog, timeout=30)
    finally:
        sender.close()
    assert sorted(seq for _, seq in subscriber.received) == list(range(1, backlog + 1))
    assert in_order_per_topic(subscriber.received)
    assert len(subscriber.messages) > 90
    assert windows.most_unacknowledged() == 3  # filled, never exceeded
    connected = [e for e in logs if e["event"] == "mqtt_connected"]
    assert [e["receive_maximum"] for e in connected] == [3]


@pytest.mark.parametrize("mosquitto", ["max_inflight_messages 0\n"], indirect=True)
async def test_a_broker_that_announces_no_receive_maximum_allows_65535_in_flight(
    tmp_path: Path, mosquitto: Mosquitto, windows: Windows
) -> None:
    """Mosquitto without a limit sends no Receive Maximum: MQTT 5's default, 65,535."""
    spool, state = tmp_path / "spool", tmp_path / "state"
    sender = SpoolSender(spool, 1 << 20, 16 << 20)
    sender.send([record(ROOM, 1.0, 0) for _ in range(5)])
    sink = MqttSink(
        sink_config(mosquitto, "localhost"), spool, state, Authorization(policy.load(DEMO_POLICY))
    )
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink.run()):
                await eventually(lambda: acknowledged(state) == 5, timeout=15)
    finally:
        sender.close()
    assert [acks._window for acks in windows.made] == [65_535]
    connected = [e for e in logs if e["event"] == "mqtt_connected"]
    assert [e["receive_maximum"] for e in connected] == [65_535]
