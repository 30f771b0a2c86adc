"""`read: cov` against the simulated device behind a relay that can lose or forge datagrams:
present values stay right when a notification is lost (they are read every scan), a
notification is taken only from our subscription, and the device's subscription list does
not grow across sessions and is emptied when the connector stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from bacpypes3.apdu import UnconfirmedCOVNotificationRequest
from bacpypes3.basetypes import PropertyValue, StatusFlags
from bacpypes3.constructeddata import Any as AnyValue
from bacpypes3.primitivedata import ObjectIdentifier, Real

from broker.plant.connectors import bacnet
from broker.plant.connectors import bacnet_frames as frames
from broker.plant.connectors.bacnet import BacnetConnector
from broker.sim.bacnet_device import SimulatedBacnetDevice
from tests.plant.connectors.test_bacnet import INSTANCE, Reader, good, path, policy_device, signal
from tests.plant.connectors.test_bacnet_hostile import Relay, relayed

TEMP = signal("room-temp", "analog-input", 1)  # no unit: no units read at session start


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    async with relayed() as started:
        yield started


def cov_reader(relay: Relay, **device: Any) -> Reader:
    settings: dict[str, Any] = {"read": "cov", "timeout_s": 0.3, "poll_interval_s": 0.2}
    return Reader(BacnetConnector(policy_device(relay.port, **(settings | device)), [TEMP]))


def sim_of(relay: Relay) -> SimulatedBacnetDevice:
    assert relay.device is not None
    return relay.device


def notification(process_id: int, device: int, obj: str, value: float) -> bytes:
    note = UnconfirmedCOVNotificationRequest(
        subscriberProcessIdentifier=process_id,
        initiatingDeviceIdentifier=ObjectIdentifier(("device", device)),
        monitoredObjectIdentifier=ObjectIdentifier(obj),
        timeRemaining=100,
        listOfValues=[
            PropertyValue(propertyIdentifier="present-value", value=AnyValue(Real(value))),
            PropertyValue(
                propertyIdentifier="status-flags", value=AnyValue(StatusFlags([0, 0, 0, 0]))
            ),
        ],
    )
    return frames._datagram(note.encode(), expecting_reply=False)


async def test_a_lost_notification_is_corrected_by_the_next_scan(relay: Relay) -> None:
    async with cov_reader(relay) as reader:
        await reader.until(good)
        relay.mode = "drop-cov"
        sim_of(relay).set("analog-input", 1, 30.0)  # the notification is lost on the way
        batch = await reader.until(lambda b: b[path("room-temp")].raw == 30.0)
    assert relay.dropped >= 1
    assert batch[path("room-temp")].quality == "good"


async def test_a_notification_is_taken_only_from_our_subscription(relay: Relay) -> None:
    async with cov_reader(relay, poll_interval_s=1.0) as reader:
        await reader.until(good)
        ours = reader.connector._process_id
        forged = [
            notification(ours + 1, INSTANCE, "analog-input,1", 61.0),  # another subscriber
            notification(ours, INSTANCE + 1, "analog-input,1", 62.0),  # another device
            notification(ours, INSTANCE, "analog-input,7", 63.0),  # an object not subscribed
        ]
        stray = reader.connector.stray
        for datagram in forged:
            relay.inject(datagram)
        await reader.until(lambda b: reader.connector.stray >= stray + 3)
        relay.inject(notification(ours, INSTANCE, "analog-input,1", 64.0))  # the control
        # 64.0 is only in the notification (the device holds -18.5): no scan can bring it,
        # however late the notification is handled on a loaded machine
        early = await reader.until(lambda b: b[path("room-temp")].raw == 64.0)
        assert list(early) == [path("room-temp")]
        assert early[path("room-temp")].read_time is not None
        # the next scan reads the device again and wins
        await reader.until(lambda b: b[path("room-temp")].raw == -18.5)
    seen = {s.raw for batch in reader.batches for s in batch}
    assert seen.isdisjoint({61.0, 62.0, 63.0})


async def test_a_change_arrives_with_its_notification_before_the_next_scan(relay: Relay) -> None:
    # the next scan is 30 s away, beyond until's 10 s: the value can only come by notification
    async with cov_reader(relay, poll_interval_s=30.0) as reader:
        await reader.until(good)
        scans = reader.connector.scans
        sim_of(relay).set("analog-input", 1, -4.5)
        await reader.until(lambda b: b[path("room-temp")].raw == -4.5)
        assert reader.connector.scans == scans  # no scan read it: the notification did


async def test_subscriptions_do_not_pile_up_across_sessions_and_end_with_the_connector(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bacnet, "FIRST_RETRY_S", 0.05)  # sessions in quick succession
    monkeypatch.setattr(bacnet, "MAX_RETRY_S", 0.1)
    sim = sim_of(relay)
    relay.mode = "drop-rpm"  # it subscribes, then every scan times out: a new session
    most = 0
    ports = set()
    async with cov_reader(relay) as reader:
        deadline = time.monotonic() + 10.0
        while relay.sent["subscribeCOV"] < 8 and time.monotonic() < deadline:
            most = max(most, len(sim.subscriptions()))
            ports.add(reader.connector.local_address)
            await asyncio.sleep(0.02)
        # 8 sessions, each subscribing: a failed session's subscription is not cancelled
        # (its values go bad at once); the next one's, same port and process id, replaces it
        assert relay.sent["subscribeCOV"] >= 8
        relay.mode = "pass"
        await reader.until(good)
        assert len(sim.subscriptions()) == 1
        ports.add(reader.connector.local_address)
    assert len(ports - {None}) == 1, ports  # one local port for every session
    assert most <= 1
    assert sim.subscriptions() == []  # cancelled when the connector stopped


async def test_a_stop_while_the_device_is_silent_waits_at_most_timeout_s(relay: Relay) -> None:
    reader = cov_reader(relay, timeout_s=0.5)
    async with reader:
        await reader.until(good)
        relay.mode = "drop-all"
        started = time.monotonic()
    # the cancellation's wait is bounded by timeout_s (0.5 s); 5 s leaves room for a loaded
    # CI and still tells it from a wait for the device (silent for ever) or the 300 s lifetime
    assert time.monotonic() - started < 5.0


def test_a_subscription_lifetime_is_bounded() -> None:
    obj = ObjectIdentifier("analog-input,1")
    for lifetime in (0, -1, frames.MAX_COV_LIFETIME_S + 1):  # 0 would be "for ever"
        with pytest.raises(ValueError, match="COV lifetime"):
            frames.subscribe_cov(1, process_id=1, obj=obj, lifetime_s=lifetime)
    frames.subscribe_cov(1, process_id=1, obj=obj, lifetime_s=bacnet.COV_LIFETIME_S)
