"""The MQTT sink against a real Mosquitto over mutual TLS, across a 10 s broker outage.

Delivery is at least once: every seq the plant wrote after the subscriber first heard from
the sink reaches the subscriber, some possibly twice.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest
import yaml
from paho.mqtt.enums import MQTTProtocolVersion

from broker.channel.spool import SpoolReceiver
from broker.sim.refrigeration import RefrigerationPlant
from broker.trust import tls
from tests.harness import (
    CONSUMER_URI,
    BrokerProcess,
    Daemon,
    Deployment,
    dmzbroker,
    eventually,
    free_port,
)

pytestmark = pytest.mark.timeout(180)

MOSQUITTO_CONF = """
listener {port} 127.0.0.1
cafile {pki}/ca.crt
certfile {pki}/broker.crt
keyfile {pki}/broker.key
require_certificate true
use_identity_as_username true
tls_version tlsv1.3
allow_anonymous false
persistence false
user root
log_dest stderr
"""


@dataclass
class Mosquitto(Daemon):
    directory: Path = Path()
    port: int = 0


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    assert shutil.which("mosquitto"), "mosquitto is not installed: `make test` installs it"
    pki = tmp_path / "mqtt-pki"
    dmzbroker("certs", "init-ca", "--out", str(pki), "--name", "MQTT CA")
    dmzbroker("certs", "issue", "server", "--ca", str(pki), "--out", str(pki), "--name", "broker",
              "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
    for name in ("sink", "subscriber"):
        dmzbroker("certs", "issue", "client", "--ca", str(pki), "--out", str(pki),
                  "--name", name, "--uri", f"spiffe://demo/mqtt/{name}")  # fmt: skip
    found = Mosquitto(
        ["mosquitto", "-c", str(tmp_path / "mosquitto.conf")], directory=tmp_path, port=free_port()
    )
    (tmp_path / "mosquitto.conf").write_text(MOSQUITTO_CONF.format(port=found.port, pki=pki))
    found.start()
    try:
        yield found
    finally:
        found.stop()


@dataclass
class Subscriber:
    """Subscribes to everything the sink publishes, reconnecting until told to stop."""

    port: int
    pki: Path
    seqs: list[int] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        context = tls.client_context(
            self.pki / "ca.crt", self.pki / "subscriber.crt", self.pki / "subscriber.key"
        )
        while not self.stop.is_set():
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier="test-subscriber", tls_context=context,
                    protocol=aiomqtt.ProtocolVersion(MQTTProtocolVersion.MQTTv5), timeout=5,
                ) as client:  # fmt: skip
                    await client.subscribe("dmzbroker/#", qos=1)
                    async for message in client.messages:
                        if not message.retain:  # retained copies are old news, re-sent on subscribe
                            self.seqs.extend(r["seq"] for r in json.loads(message.payload))
                        if self.stop.is_set():
                            return
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)


def spool_last_seq(deployment: Deployment) -> int:
    reader = SpoolReceiver(deployment.spool, deployment.directory / "count-state")
    last = 0
    for _ in range(10_000):
        batch = reader.receive()
        if not batch:
            return last
        last = batch[-1].seq
    return last


async def test_every_record_reaches_a_subscriber_across_a_ten_second_outage(
    deployment: Deployment, plant_sim: RefrigerationPlant, mosquitto: Mosquitto, start_broker
) -> None:
    pki = mosquitto.directory / "mqtt-pki"
    document = yaml.safe_load(deployment.config.read_text())
    document["enterprise"]["mqtt"] = {
        "host": "127.0.0.1", "port": mosquitto.port, "server_name": "localhost",
        "ca": str(pki / "ca.crt"), "cert": str(pki / "sink.crt"), "key": str(pki / "sink.key"),
        "identity": CONSUMER_URI,
    }  # fmt: skip
    deployment.config.write_text(yaml.safe_dump(document))
    subscriber = Subscriber(mosquitto.port, pki)
    listening = asyncio.create_task(subscriber.run())
    broker: BrokerProcess = start_broker("run", deployment.config)
    try:
        await eventually(lambda: len(subscriber.seqs) > 30, timeout=30)
        first = min(subscriber.seqs)
        mosquitto.stop()
        await asyncio.sleep(10)  # the outage: the plant keeps writing, the sink must keep it
        mosquitto.start()
        target = spool_last_seq(deployment)  # written before and during the outage
        await eventually(lambda: set(range(first, target + 1)) <= set(subscriber.seqs), timeout=60)
    finally:
        subscriber.stop.set()
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
    assert broker.stop() == 0
