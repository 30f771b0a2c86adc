"""The MQTT sink's rounds against a real Mosquitto: a round stops publishing as soon as the
sink is held or its consumer loses a grant; its messages keep to the broker's size limit; a
message the broker refuses fails the round; a long round whose acknowledgements keep coming
is not cut by the publish timeout."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import msgspec
import pytest
import structlog

from broker import policy
from broker.audit.log import AuditLog
from broker.channel.spool import SpoolSender
from broker.enterprise.authz import Authorization
from broker.enterprise.outputs import mqtt_acks, mqtt_messages
from broker.enterprise.outputs.mqtt import MqttSink
from broker.records import Record
from tests.enterprise import test_mqtt
from tests.enterprise.served import record
from tests.enterprise.test_mqtt import (
    Mosquitto,
    Subscriber,
    Windows,
    acknowledged,
    in_order_per_topic,
    listening,
    sink_config,
)
from tests.harness import CONSUMER_URI, DEMO_POLICY, eventually, running

# test_mqtt's fixtures, used here too.
mqtt_pki, mosquitto, windows = test_mqtt.mqtt_pki, test_mqtt.mosquitto, test_mqtt.windows
pytestmark = pytest.mark.timeout(180)
SMALL_WINDOW = "max_inflight_messages 3\n"  # Mosquitto's Receive Maximum: a wait every message


def backlog(spool: Path, signals: list[str], scans: int) -> int:
    """`scans` scans of `signals` written to the spool; the last seq."""
    sender = SpoolSender(spool, 1 << 20, 64 << 20)
    try:
        for scan in range(scans):
            sender.send([record(signal, float(scan), 0) for signal in signals])
        return sender.next_seq - 1
    finally:
        sender.close()


class FailingAudit:
    """An audit log whose writes fail from its `after`-th look on (a failing fdatasync,
    which no real part produces on demand), until `repaired`."""

    def __init__(self, after: int) -> None:
        self.looks, self.after, self.repaired = 0, after, False

    @property
    def failing(self) -> bool:
        self.looks += 1
        return self.looks >= self.after and not self.repaired


class Revoking(Authorization):
    """A consumer's view that loses `revoked` from its `after`-th reading on, as a reload of a
    policy granting less does between two of them."""

    def __init__(self, after: int, revoked: frozenset[str]) -> None:
        super().__init__(policy.load(DEMO_POLICY))
        self.readings, self.after, self.revoked = 0, after, revoked

    def view(self, identity: str) -> frozenset[str]:
        self.readings += 1
        granted = super().view(identity)
        return granted - self.revoked if self.readings >= self.after else granted


@pytest.mark.parametrize("mosquitto", [SMALL_WINDOW], indirect=True)
async def test_a_round_stops_publishing_once_the_audit_log_fails(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round of ~190 messages through a window of 3: the audit log fails at its second wait
    for room. Nothing more is published and the position stays while it fails; repaired, the
    whole backlog goes out (what the stopped round had published, again)."""
    monkeypatch.setattr(mqtt_messages, "RECORDS_PER_MESSAGE", 10)
    spool, state = tmp_path / "spool", tmp_path / "state"
    authz = Authorization(policy.load(DEMO_POLICY))
    last = backlog(spool, sorted(authz.view(CONSUMER_URI)), scans=100)
    audit = FailingAudit(after=3)  # looked at before the round, then before each wait
    sink = MqttSink(
        sink_config(mosquitto, "localhost"), spool, state, authz, audit=cast(AuditLog, audit)
    )
    subscriber = Subscriber(mosquitto.port, mosquitto.pki)
    async with listening(subscriber), running(sink.run()):
        await eventually(lambda: audit.looks > 40, timeout=30)  # held for 2 s at least
        published = len(subscriber.messages)
        assert acknowledged(state) == 0
        audit.repaired = True
        await eventually(lambda: acknowledged(state) == last, timeout=60)
        await eventually(lambda: subscriber.seqs == set(range(1, last + 1)), timeout=30)
    # 3 in the window, up to 3 more once the first wait made room, then none.
    assert published <= 6
    assert in_order_per_topic(subscriber.received)


@pytest.mark.parametrize("mosquitto", [SMALL_WINDOW], indirect=True)
async def test_a_round_stops_publishing_what_a_reload_revoked(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer loses an asset's signals while a round's first asset is going out: the
    round stops there and the records are read again with the new view, so the revoked
    asset, last in the round, is never published."""
    monkeypatch.setattr(mqtt_messages, "RECORDS_PER_MESSAGE", 10)
    spool, state = tmp_path / "spool", tmp_path / "state"
    signals = sorted(Authorization(policy.load(DEMO_POLICY)).view(CONSUMER_URI))
    last_asset = signals[-1].rpartition("/")[0]  # the round's last group
    revoked = frozenset(s for s in signals if s.startswith(last_asset + "/"))
    authz = Revoking(after=3, revoked=revoked)  # read for the round, then at each wait
    last = backlog(spool, signals, scans=100)
    sink = MqttSink(sink_config(mosquitto, "localhost"), spool, state, authz)
    subscriber = Subscriber(mosquitto.port, mosquitto.pki)
    async with listening(subscriber), running(sink.run()):
        await eventually(lambda: acknowledged(state) == last, timeout=60)
        granted = {seq for seq in range(1, last + 1) if signals[(seq - 1) % len(signals)]
                   not in revoked}  # fmt: skip
        await eventually(lambda: granted <= subscriber.seqs, timeout=30)
    assert f"dmzbroker/{last_asset}" not in {topic for topic, _ in subscriber.messages}
    assert subscriber.seqs == granted
    assert in_order_per_topic(subscriber.received)


@pytest.mark.parametrize(
    ("mosquitto", "announced"),
    [("max_packet_size 12000\n", True), ("message_size_limit 12000\n", False)],
    indirect=["mosquitto"],
)
async def test_catch_up_messages_keep_to_the_brokers_size_limit(
    tmp_path: Path,
    mosquitto: Mosquitto,
    windows: Windows,
    monkeypatch: pytest.MonkeyPatch,
    announced: bool,
) -> None:
    """Catch-up messages of 100 records are ~40 KB here. A broker that announces a Maximum
    Packet Size of 12,000 bytes, or has that limit on payloads unannounced (the sink's own
    cap then, set to 12,000 here), gets every record in messages under it, newest last."""
    if not announced:
        monkeypatch.setattr(mqtt_acks, "MAX_MESSAGE_BYTES", 12_000)
    spool, state = tmp_path / "spool", tmp_path / "state"
    authz = Authorization(policy.load(DEMO_POLICY))
    last = backlog(spool, sorted(authz.view(CONSUMER_URI)), scans=60)
    sink = MqttSink(sink_config(mosquitto, "localhost"), spool, state, authz)
    subscriber = Subscriber(mosquitto.port, mosquitto.pki)
    with structlog.testing.capture_logs() as logs:
        async with listening(subscriber), running(sink.run()):
            await eventually(lambda: acknowledged(state) == last, timeout=60)
            await eventually(lambda: len(subscriber.received) >= last, timeout=30)
    assert [acks.most_bytes for acks in windows.made] == [12_000]
    assert not [e for e in logs if e["event"] == "mqtt_unreachable"]
    assert sorted(seq for _, seq in subscriber.received) == list(range(1, last + 1))
    assert in_order_per_topic(subscriber.received)
    sizes = [len(seqs) for _, seqs in subscriber.messages]
    assert 10 < max(sizes) < 100  # cut by bytes, not by count


def test_a_record_larger_than_a_message_may_be_is_refused_and_logged() -> None:
    """Never sent (the broker would refuse it at every try): logged, and left out of the
    count; the records around it go out."""
    records = [record("a/b/big", 1.0, seq) for seq in (1, 2, 3)]
    records[1] = msgspec.structs.replace(records[1], unit="x" * 20_000)
    refused: list[Record] = []
    with structlog.testing.capture_logs() as logs:
        out = list(mqtt_messages.messages("p", {"a/b": records}, 12_000, refused))
    assert [len(payload) < 12_000 for _, payload in out] == [True, True]
    assert refused == [records[1]]
    (event,) = [e for e in logs if e["event"] == "mqtt_record_too_large"]
    assert event["seq"] == 2 and event["signal"] == "a/b/big" and event["bytes"] > 20_000


@pytest.mark.parametrize("mosquitto", ["acl_file {directory}/acl\n"], indirect=True)
async def test_a_message_the_broker_refuses_fails_the_round(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Mosquitto's ACL denies one asset's topic (DENIED): its PUBACK says 0x87. The
    round fails with that code, the position stays, and the sink does not loop fast."""
    spool, state = tmp_path / "spool", tmp_path / "state"
    authz = Authorization(policy.load(DEMO_POLICY))
    backlog(spool, sorted(authz.view(CONSUMER_URI)), scans=3)
    sink = MqttSink(sink_config(mosquitto, "localhost"), spool, state, authz)
    with structlog.testing.capture_logs() as logs:
        async with running(sink.run()):
            await eventually(
                lambda: any(e["event"] == "mqtt_unreachable" for e in logs), timeout=30
            )
            await eventually(lambda: mosquitto.connections("dmzbroker") >= 2, timeout=30)
    lost = next(e for e in logs if e["event"] == "mqtt_unreachable")
    assert lost["error"] == "the MQTT broker refused a message: PUBACK Not authorized (0x87)"
    assert acknowledged(state) == 0


@contextlib.asynccontextmanager
async def slow_acknowledgements(port: int, delay_s: float) -> AsyncIterator[int]:
    """A TCP proxy to `port` on a port of its own, holding each read from the broker back
    `delay_s` (so each PUBACK too), in order; the client's bytes pass at once."""

    async def pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
    ) -> None:
        try:
            while data := await reader.read(65_536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    tasks: set[asyncio.Task[None]] = set()

    async def connected(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        broker_r, broker_w = await asyncio.open_connection("127.0.0.1", port)
        for task in (pipe(client_r, broker_w, 0), pipe(broker_r, client_w, delay_s)):
            tasks.add(asyncio.create_task(task))

    server = await asyncio.start_server(connected, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@pytest.mark.parametrize("mosquitto", [SMALL_WINDOW], indirect=True)
async def test_a_round_longer_than_the_publish_timeout_goes_on_while_acknowledgements_come(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 messages through a window of 3, each read from the broker held back 0.25 s (its
    PUBACKs come ~0.2 s apart): the round takes ~5 s, over twice the publish timeout, and
    is not cut, since the timeout counts from the last acknowledgement (one counted from the
    round's start cuts it at every try: the position never moves)."""
    monkeypatch.setattr(mqtt_acks, "PUBLISH_TIMEOUT_S", 2.0)
    monkeypatch.setattr(mqtt_messages, "RECORDS_PER_MESSAGE", 1)
    spool, state = tmp_path / "spool", tmp_path / "state"
    authz = Authorization(policy.load(DEMO_POLICY))
    last = backlog(spool, sorted(authz.view(CONSUMER_URI))[:5], scans=6)  # 30 records
    async with slow_acknowledgements(mosquitto.port, delay_s=0.25) as port:
        config = msgspec.structs.replace(sink_config(mosquitto, "localhost"), port=port)
        sink = MqttSink(config, spool, state, authz)
        with structlog.testing.capture_logs() as logs:
            started = time.monotonic()
            async with running(sink.run()):
                await eventually(lambda: acknowledged(state) == last, timeout=90)
    assert not [e for e in logs if e["event"] == "mqtt_unreachable"]
    connected = [e for e in logs if e["event"] == "mqtt_connected"]
    assert len(connected) == 1
    # At least 10 windows, each waiting 0.25 s at least for its PUBACKs: longer than 2 s.
    assert time.monotonic() - started > 2.5
