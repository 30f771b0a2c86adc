"""The BACnet connector against a device that answers wrongly: a relay in front of the
simulated device mangles its answers (malformed BVLL, NPDU and APDU, a wrong invoke id, a
flood, requests of its own). The connector must report a clear error, never take a wrong
answer as data, never answer anything itself, and read again once the device behaves."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from bacpypes3.apdu import UnconfirmedCOVNotificationRequest
from bacpypes3.basetypes import PropertyValue
from bacpypes3.constructeddata import Any as AnyValue
from bacpypes3.primitivedata import ObjectIdentifier, Real
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.plant.connectors import bacnet_frames as frames
from broker.plant.connectors.bacnet import INBOX, SERVICES_USED, BacnetConnector
from broker.plant.connectors.bacnet_frames import FrameError
from broker.plant.connectors.base import Hysteresis
from broker.sim.bacnet_device import SimulatedBacnetDevice, service_name
from tests.harness import free_udp_port
from tests.plant.connectors.test_bacnet import (
    ALL,
    INSTANCE,
    OBJECTS,
    READ_ONLY,
    WRITES,
    Reader,
    good,
    policy_device,
    write_property,
)

# a COV notification of 45 kB (5000 values): over BACnet/IP's largest datagram, and about
# half a second of bacpypes3's decoding
BIG = frames._datagram(
    UnconfirmedCOVNotificationRequest(
        subscriberProcessIdentifier=1,
        initiatingDeviceIdentifier=ObjectIdentifier(("device", INSTANCE)),
        monitoredObjectIdentifier=ObjectIdentifier("analog-input,1"),
        timeRemaining=1,
        listOfValues=[
            PropertyValue(propertyIdentifier="present-value", value=AnyValue(Real(1.0)))
            for _ in range(5000)
        ],
    ).encode(),
    expecting_reply=False,
)

GARBAGE = [
    b"hello",  # not BACnet/IP
    b"\x81\x0a\x00\x20\x01\x00",  # a BVLL length that lies
    b"\x81\x0a\x00\x07\x01\x00\x30",  # a complex ACK cut after its type
    b"\x81\x0a\x00\x06\x02\x00",  # NPDU version 2
    b"\x81\x0a\x00\x0a\x01\x80\x00\x00\x00\x00",  # a network-layer message
    b"\x81\x0a\x00\x0b\x01\x00\x30\x07\x0e\xff\xff",  # an ACK whose tags make no sense
]


class Relay:
    """Between the connector and the device: forwards requests, mangles answers by `mode`,
    and counts what the connector sent by service (an answer from it would show)."""

    def __init__(self, device_port: int) -> None:
        self.device_port = device_port
        self.mode = "pass"
        self.sent: collections.Counter[str] = collections.Counter()
        self.invoke_ids: list[int] = []  # of the confirmed requests, in order
        self.dropped = 0  # datagrams the mode dropped
        self.scans = 0  # readPropertyMultiple requests relayed or answered here
        self.client: tuple[str, int] | None = None
        self.front: asyncio.DatagramTransport | None = None
        self.back: asyncio.DatagramTransport | None = None
        self.port = 0
        self.device: SimulatedBacnetDevice | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        relay = self

        class Front(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                relay.client = addr
                service = service_name(data[6:])
                relay.sent[service] += 1
                if data[6] >> 4 == 0:  # a confirmed request
                    relay.invoke_ids.append(data[8])
                if relay.mode == "drop-all" or (
                    relay.mode == "drop-rpm" and service == "readPropertyMultiple"
                ):
                    relay.dropped += 1  # the device never hears the scan
                    return
                if relay.mode == "drop-one-rpm" and service == "readPropertyMultiple":
                    relay.mode = "pass"  # one datagram lost, as a network loses one
                    relay.dropped += 1
                    return
                if relay.mode == "simple-ack" and data[6] >> 4 == 0:
                    # a Simple-ACK with the request's invoke id and service, whatever it was
                    relay.answer(b"\x81\x0a\x00\x09\x01\x00\x20" + data[8:10])
                    return
                relay.scans += service == "readPropertyMultiple"
                toggled = relay.mode == "reject-toggle" and relay.scans % 2 == 1
                if (relay.mode == "reject" or toggled) and service == "readPropertyMultiple":
                    # a Reject PDU (type 6) for its invoke id: unrecognized-service (9)
                    relay.answer(b"\x81\x0a\x00\x09\x01\x00\x60" + bytes([data[8], 9]))
                    return
                assert relay.back is not None
                relay.back.sendto(data)

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                relay.answer(data)

        front, _ = await loop.create_datagram_endpoint(Front, local_addr=("127.0.0.1", 0))
        back, _ = await loop.create_datagram_endpoint(
            Back, remote_addr=("127.0.0.1", self.device_port)
        )
        self.front, self.back = front, back
        self.port = self.front.get_extra_info("sockname")[1]

    def inject(self, data: bytes) -> None:
        """A datagram to the connector from the device's address (as a spoofer sends it)."""
        assert self.front is not None and self.client is not None
        self.front.sendto(data, self.client)

    def stop(self) -> None:
        for transport in (self.front, self.back):
            if transport is not None:
                transport.close()

    def answer(self, data: bytes) -> None:
        assert self.front is not None and self.client is not None
        send = self.front.sendto
        if self.mode == "drop-cov" and data[6:8] == b"\x10\x02":
            self.dropped += 1  # an unconfirmed COV notification, lost on the way
            return
        if self.mode == "duplicate":
            send(data, self.client)  # the same answer twice: the second must be dropped
        if self.mode == "big":
            for _ in range(8):  # each over BACnet/IP's largest datagram
                send(BIG, self.client)
        if self.mode == "garbage":
            for junk in GARBAGE:
                send(junk, self.client)
            return  # the real answer never comes
        if self.mode == "wrong-invoke" and len(data) > 7 and data[6] >> 4 in (3, 5):
            data = data[:7] + bytes([data[7] ^ 0x55]) + data[8:]  # complex ACK or error
        if self.mode == "flood":
            for i in range(3 * INBOX):
                send(GARBAGE[i % len(GARBAGE)], self.client)
            send(frames.who_is(), self.client)  # a request to the connector: never answered
            send(write_property(), self.client)
        send(data, self.client)


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    async with relayed() as started:
        yield started


@contextlib.asynccontextmanager
async def relayed() -> AsyncIterator[Relay]:
    """The simulated device behind a relay; on exit, both stopped and their counts checked."""
    device = SimulatedBacnetDevice("127.0.0.1", free_udp_port(), INSTANCE, OBJECTS)
    await device.start()
    relay = Relay(device.port)
    relay.device = device
    await relay.start()
    try:
        yield relay
    finally:
        relay.stop()
        await device.stop()
    assert set(device.requests) <= READ_ONLY, device.requests
    assert all(device.requests[w] == 0 for w in WRITES)
    # the connector sent requests only: an answer to the relay's requests would show here
    assert set(relay.sent) <= SERVICES_USED, relay.sent


def reading(relay: Relay) -> Reader:
    device = policy_device(relay.port, timeout_s=0.3)
    return Reader(BacnetConnector(device, ALL))


async def test_malformed_answers_are_a_clear_error_then_it_recovers(
    relay: Relay, events: list[dict[str, Any]]
) -> None:
    async with reading(relay) as reader:
        await reader.until(good)
        relay.mode = "garbage"
        down = await reader.until(lambda b: not good(b))
        assert all(s.quality == "bad" and s.raw is None for s in down.values())
        relay.mode = "pass"
        await reader.until(good)
    error = next(e for e in events if e["event"] == "device_session_down")["error"]
    assert "no answer to readPropertyMultiple within 0.3 s, 2 times; dropped: the last " in error
    # dropped, each: undecoded when its headers answer no outstanding request (stray)
    assert reader.connector.malformed + reader.connector.stray >= len(GARBAGE)
    assert reader.connector.malformed >= len(GARBAGE) - 1


async def test_an_answer_with_the_wrong_invoke_id_is_never_data(relay: Relay) -> None:
    async with reading(relay) as reader:
        await reader.until(good)
        relay.mode = "wrong-invoke"
        await reader.until(lambda b: not good(b))
        hostile_from = len(reader.batches)
        await reader.until(lambda b: True)  # a retry during the hostile phase
        hostile = reader.batches[hostile_from:]
        relay.mode = "pass"
        await reader.until(good)
    assert all(s.quality == "bad" for batch in hostile for s in batch)
    assert reader.connector.stray >= 1


async def test_a_flood_and_requests_from_the_device_change_nothing(relay: Relay) -> None:
    async with reading(relay) as reader:
        await reader.until(good)
        relay.mode = "flood"
        for _ in range(3):  # it keeps its session or drops it; either way, no crash
            batch = await reader.until(lambda b: True)
            assert all(s.quality in ("good", "bad") for s in batch.values())
        relay.mode = "pass"
        await reader.until(good)
    connector = reader.connector
    assert connector.malformed + connector.stray > 0


async def test_one_lost_datagram_is_sent_again_and_costs_no_value(
    relay: Relay, events: list[dict[str, Any]]
) -> None:
    async with reading(relay) as reader:
        await reader.until(good)
        seen = len(reader.batches)
        relay.mode = "drop-one-rpm"
        await reader.until(lambda batch: relay.dropped == 1 and good(batch))
        for _ in range(3):
            await reader.until(good)
        after = reader.batches[seen:]
    assert relay.dropped == 1
    assert all(s.quality == "good" for batch in after for s in batch)
    names = [e["event"] for e in events if e["event"].startswith("device_")]
    assert names == ["device_session_up"]  # no session lost, nothing refused
    ids = relay.invoke_ids  # random and never the previous one, but for a retransmission
    assert any(a == b for a, b in itertools.pairwise(ids))


async def test_a_refused_read_makes_its_signals_bad_and_keeps_the_session(
    relay: Relay, events: list[dict[str, Any]]
) -> None:
    async with reading(relay) as reader:
        await reader.until(good)
        relay.mode = "reject"
        for _ in range(3):
            batch = await reader.until(lambda b: not good(b))
            assert all(s.quality == "bad" and s.raw is None for s in batch.values())
        reason = batch[ALL[0].path].reason
        assert reason == "BACnet: the device refused the read (reject unrecognized-service)"
        relay.mode = "pass"
        for _ in range(Hysteresis.HOLD):  # the recovery is told once it has held
            await reader.until(good)
    names = [e["event"] for e in events if e["event"].startswith("device_")]
    assert names == ["device_session_up", "device_read_refused", "device_read_recovered"]
    refused = next(e for e in events if e["event"] == "device_read_refused")
    assert refused["reason"] == "reject unrecognized-service"
    assert refused["signals"] == [s.path for s in ALL]


async def test_a_read_refused_every_other_scan_is_told_once_until_it_really_recovers(
    relay: Relay, events: list[dict[str, Any]]
) -> None:
    async with reading(relay) as reader:
        await reader.until(good)
        relay.mode = "reject-toggle"
        flapping_from = len(reader.batches)
        scans = relay.scans
        await reader.until(lambda b: relay.scans >= scans + 30)  # 3 s at a poll of 0.1 s
        flapping = [e["event"] for e in events if e["event"].startswith("device_read_")]
        flapped = reader.batches[flapping_from:]
        relay.mode = "pass"
        await reader.until(lambda b: any(e["event"] == "device_read_recovered" for e in events))
    assert flapping == ["device_read_refused"]  # was a refusal and a recovery per two scans
    told = [e["event"] for e in events if e["event"].startswith("device_read_")]
    assert told == ["device_read_refused", "device_read_recovered"]
    # Quality is not delayed: each answer's values are judged as it comes.
    assert {s.quality for batch in flapped for s in batch} == {"good", "bad"}


def _bvll(payload: bytes) -> bytes:
    return b"\x81\x0a" + (4 + len(payload)).to_bytes(2, "big") + payload


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=80),
        st.binary(max_size=80).map(lambda b: _bvll(b"\x01\x00" + b)),
        st.sampled_from([0x30, 0x50, 0x10, 0x20, 0x60, 0x70]).flatmap(
            lambda kind: st.binary(max_size=60).map(
                lambda b: _bvll(b"\x01\x00" + bytes([kind]) + b)
            )
        ),
    )
)
def test_any_datagram_parses_or_raises_frame_error_only(datagram: bytes) -> None:
    for read in (frames.peek, frames.parse):
        try:
            read(datagram)
        except FrameError as e:
            assert str(e)


def reading_with(relay: Relay, **device: Any) -> Reader:
    settings: dict[str, Any] = {"timeout_s": 0.3} | device
    return Reader(BacnetConnector(policy_device(relay.port, **settings), ALL))


async def test_over_long_datagrams_are_dropped_undecoded_and_never_stall_the_loop(
    relay: Relay,
) -> None:
    loop = asyncio.get_running_loop()
    lags: list[float] = []

    async def heartbeat() -> None:
        while True:
            started = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - started - 0.01)

    beating = asyncio.create_task(heartbeat())
    try:
        async with reading_with(relay) as reader:
            await reader.until(good)
            relay.mode = "big"
            for _ in range(10):  # 8 datagrams of 45 kB per answer, every answer
                batch = await reader.until(lambda b: True)
            assert good(batch)  # dropped on arrival: the session carries on
            assert reader.connector.malformed >= 8
    finally:
        beating.cancel()
    # decoding one took about 0.5 s before: the heartbeat would have seen it
    assert max(lags) < 0.25, max(lags)


async def test_invoke_ids_are_random_not_a_sequence(relay: Relay) -> None:
    async with reading_with(relay) as reader:
        await reader.until(lambda b: len(relay.invoke_ids) >= 25)
    ids = relay.invoke_ids
    steps = [(b - a) % 256 for a, b in itertools.pairwise(ids)]
    assert steps.count(1) < len(steps) / 4, ids  # a counter would step by 1 every time
    assert 0 not in steps  # never the previous id: a late answer is never taken for ours
    assert len(set(ids)) > len(ids) / 2


async def test_a_second_answer_to_a_request_is_dropped_and_logged_once(
    relay: Relay, events: list[dict[str, Any]]
) -> None:
    async with reading_with(relay) as reader:
        await reader.until(good)
        relay.mode = "duplicate"
        for _ in range(3):
            assert good(await reader.until(lambda b: True))
    assert reader.connector.link.duplicates >= 3
    logged = [e for e in events if e["event"] == "device_answer_duplicated"]
    assert len(logged) == 1, logged
    assert "spoofing" in logged[0]["detail"]


async def test_a_simple_ack_to_a_read_is_a_session_error_not_a_crash(
    relay: Relay, events: list[dict[str, Any]]
) -> None:
    async with reading_with(relay) as reader:
        await reader.until(good)
        relay.mode = "simple-ack"
        down = await reader.until(lambda b: not good(b))
        assert all(s.quality == "bad" for s in down.values())
        relay.mode = "pass"
        await reader.until(good)
    error = next(e for e in events if e["event"] == "device_session_down")["error"]
    assert "dropped: the last a Simple-ACK to a request" in error
    assert not any(e["event"] == "device_connector_failed" for e in events)
