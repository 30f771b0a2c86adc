"""The DNP3 connector against opendnp3's outstation on 127.0.0.1, behind a proxy that counts
every request: each test ends by asserting the master sent only READ and CONFIRM (the
`dnp3_proxy` fixture), so none can forget it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from broker.plant.connectors.base import RawSample
from broker.plant.connectors.dnp3 import Dnp3Connector
from broker.plant.connectors.registry import connector_for
from broker.policy import Dnp3Device, Dnp3Source, Signal
from tests.harness import eventually
from tests.plant.connectors.dnp3_outstation import (
    COMM_LOST,
    LOCAL_FORCED,
    ONLINE,
    CountingProxy,
    Dnp3Outstation,
    ReadHeader,
)

pytestmark = pytest.mark.timeout(60)


def device(port: int, **changes: Any) -> Dnp3Device:
    settings: dict[str, Any] = {"poll_interval_s": 0.1, "timeout_s": 2.0, **changes}
    return Dnp3Device(name="rtu", host="127.0.0.1", port=port, outstation_address=1024, **settings)


def signal(name: str, group: int, index: int, variation: int = 0) -> Signal:
    return Signal(
        path=f"site/water/rtu/{name}",
        device="rtu",
        source=Dnp3Source(group=group, index=index, variation=variation),
    )


SIGNALS = [
    signal("pump_running", 1, 0),  # binary input
    signal("valve", 3, 1),  # double-bit input
    signal("breaker_closed", 10, 0),  # binary output status
    signal("flow_total", 20, 2),  # counter
    signal("level", 30, 0, 5),  # analog input, float32
    signal("pressure", 30, 1, 5),
    signal("turbidity", 30, 3, 6),  # float64, after a gap at index 2
    signal("setpoint", 40, 1, 3),  # analog output status, float32
    signal("raw_level", 30, 0),  # the outstation's default variation (g30v1: int32)
]


class Collector:
    def __init__(self) -> None:
        self.batches: list[list[RawSample]] = []

    async def emit(self, samples: list[RawSample]) -> None:
        self.batches.append(samples)

    def last(self) -> dict[str, RawSample]:
        return {s.signal.rsplit("/", 1)[1]: s for s in self.batches[-1]} if self.batches else {}


@asynccontextmanager
async def running(connector: Dnp3Connector, collector: Collector) -> AsyncIterator[None]:
    task = asyncio.create_task(connector.run(collector.emit))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


@pytest.fixture(scope="module", autouse=True)
def values(dnp3_outstation: Dnp3Outstation) -> None:
    station = dnp3_outstation
    station.set("binary", 0, True)
    station.set("double_bit", 1, "on")
    station.set("binary_output", 0, True)
    station.set("counter", 2, 123456)
    station.set("analog", 0, 21.5)
    station.set("analog", 1, 16.654696)
    station.set("analog", 3, 0.1)
    station.set("analog_output", 1, -3.25)


async def test_a_static_scan_reads_each_group_with_its_type_and_only_the_named_points(
    dnp3_proxy: CountingProxy,
) -> None:
    collector = Collector()
    async with running(Dnp3Connector(device(dnp3_proxy.port), SIGNALS), collector):
        await eventually(lambda: collector.batches and collector.last()["level"].raw is not None)
    samples = collector.last()
    assert {name: s.raw for name, s in samples.items()} == {
        "pump_running": True,
        "valve": "on",
        "breaker_closed": True,
        "flow_total": 123456,
        "level": 21.5,
        "pressure": 16.654696,  # the float32's shortest decimal, not 16.654695510864258
        "turbidity": 0.1,  # a float64 as it is
        "setpoint": -3.25,
        "raw_level": 21,  # g30v1: opendnp3 truncates to its int32
    }
    assert all(s.quality == "good" and s.reason is None for s in samples.values())
    assert all(s.read_time is not None for s in samples.values())
    # Every READ asks for exactly the named indexes: 0..1 and 3 of g30v5 and g30v6, never 2.
    # A point named in two variations (level, raw_level) is read in a second READ.
    assert dnp3_proxy.reads[:2] == [
        [
            ReadHeader(1, 0, 0x00, 0, 0),
            ReadHeader(3, 0, 0x00, 1, 1),
            ReadHeader(10, 0, 0x00, 0, 0),
            ReadHeader(20, 0, 0x00, 2, 2),
            ReadHeader(30, 0, 0x00, 0, 0),
            ReadHeader(30, 5, 0x00, 1, 1),
            ReadHeader(30, 6, 0x00, 3, 3),
            ReadHeader(40, 3, 0x00, 1, 1),
        ],
        [ReadHeader(30, 5, 0x00, 0, 0)],
    ]
    assert all(read == dnp3_proxy.reads[i % 2] for i, read in enumerate(dnp3_proxy.reads))
    assert dnp3_proxy.functions["CONFIRM"] == 0  # static data asks for no confirmation


async def test_point_flags_become_quality_with_the_flags_as_reason(
    dnp3_outstation: Dnp3Outstation, dnp3_proxy: CountingProxy
) -> None:
    flagged = [signal("forced", 30, 4, 5), signal("offline", 30, 5, 5), signal("lost", 30, 6, 5)]
    dnp3_outstation.set("analog", 4, 1.5, flags=ONLINE | LOCAL_FORCED)
    dnp3_outstation.set("analog", 5, 2.5, flags=0)
    dnp3_outstation.set("analog", 6, 3.5, flags=ONLINE | COMM_LOST)
    collector = Collector()
    async with running(Dnp3Connector(device(dnp3_proxy.port), flagged), collector):
        await eventually(lambda: collector.batches and collector.last()["forced"].raw == 1.5)
    samples = collector.last()
    assert (samples["forced"].quality, samples["forced"].reason) == (
        "uncertain",
        "DNP3 flags: LOCAL_FORCED",
    )
    assert samples["offline"].quality == "bad"
    assert "not ONLINE" in (samples["offline"].reason or "")
    assert samples["lost"].quality == "bad"
    assert "COMM_LOST" in (samples["lost"].reason or "")


async def test_events_mode_sees_a_change_between_polls_and_keeps_unchanged_points_fresh(
    dnp3_outstation: Dnp3Outstation, dnp3_proxy: CountingProxy
) -> None:
    watched = [signal("level", 30, 7), signal("pump_running", 1, 7)]
    dnp3_outstation.set("analog", 7, 10)
    dnp3_outstation.set("binary", 7, True)
    collector = Collector()
    connector = Dnp3Connector(device(dnp3_proxy.port, read="events"), watched)
    async with running(connector, collector):
        await eventually(lambda: collector.batches and collector.last()["level"].raw == 10)
        first = collector.last()["pump_running"]
        dnp3_outstation.set("analog", 7, 11)
        await eventually(lambda: collector.last()["level"].raw == 11)
    pump = collector.last()["pump_running"]
    assert (pump.raw, pump.quality) == (True, "good")
    assert pump.read_time is not None and first.read_time is not None
    assert pump.read_time > first.read_time  # unchanged, and not stale
    # An integrity poll (classes 1-3 and 0) first, then event polls of classes 1-3 only.
    classes = [{(h.group, h.variation) for h in read} for read in dnp3_proxy.reads]
    assert classes[0] == {(60, 1), (60, 2), (60, 3), (60, 4)}
    assert classes[1:] and all(c == {(60, 2), (60, 3), (60, 4)} for c in classes[1:])
    assert dnp3_proxy.functions["CONFIRM"] >= 1  # events are confirmed, as required


async def test_the_restart_indication_is_reported_once_and_never_cleared(
    dnp3_outstation: Dnp3Outstation, dnp3_proxy: CountingProxy, events: list[dict[str, Any]]
) -> None:
    collector = Collector()
    async with running(Dnp3Connector(device(dnp3_proxy.port), SIGNALS[:1]), collector):
        await eventually(lambda: len(collector.batches) >= 5)
        try:
            dnp3_outstation.indications(need_time=True)
            await eventually(lambda: len(named(events, "device_status_reported")) >= 2)
        finally:  # the outstation serves the module's later tests: never leave NEED_TIME on
            dnp3_outstation.indications(need_time=False)
        await eventually(lambda: len(named(events, "device_status_reported")) >= 3)
        scans = len(collector.batches)
        await eventually(lambda: len(collector.batches) >= scans + 5)
    reported = [e["indications"] for e in named(events, "device_status_reported")]
    assert reported == [["DEVICE_RESTART"], ["DEVICE_RESTART", "NEED_TIME"], ["DEVICE_RESTART"]]
    assert all(e["device"] == "rtu" for e in named(events, "device_status_reported"))
    assert not [name for name in dnp3_proxy.functions if name.startswith("WRITE")]


async def test_an_outage_makes_every_signal_bad_in_one_batch_then_it_recovers(
    dnp3_proxy: CountingProxy, events: list[dict[str, Any]]
) -> None:
    collector = Collector()
    async with running(Dnp3Connector(device(dnp3_proxy.port), SIGNALS), collector):
        await eventually(lambda: collector.batches and collector.last()["level"].raw == 21.5)
        dnp3_proxy.cut()
        await eventually(lambda: named(events, "device_session_down"))
        down = collector.last()
        assert len(down) == len(SIGNALS)
        assert all(s.quality == "bad" and s.raw is None for s in down.values())
        dnp3_proxy.restore()
        await eventually(lambda: collector.last()["level"].quality == "good")
    assert len(named(events, "device_session_down")) == 1
    assert len(named(events, "device_session_up")) == 2


async def test_connector_for_builds_the_dnp3_connector(dnp3_proxy: CountingProxy) -> None:
    assert isinstance(connector_for(device(dnp3_proxy.port), SIGNALS, None), Dnp3Connector)


@pytest.fixture(scope="module")
def unsolicited_outstation() -> Iterator[Dnp3Outstation]:
    """Unsolicited reporting allowed: it sends a null unsolicited response on each connection
    and holds its answers until that is confirmed or its unsolicited confirm timeout is over.
    30 s (opendnp3's default is 5 s), far beyond the default timeout_s of 2 s and beyond the
    tests' 20 s wait for a value: a master that did not confirm reads nothing in time, however
    slow a loaded machine makes the start."""
    with Dnp3Outstation(unsolicited=True, unsolicited_confirm_timeout_s=30.0) as station:
        station.set("analog", 0, 5.5)
        yield station


@pytest.fixture
async def unsolicited_proxy(
    unsolicited_outstation: Dnp3Outstation,
) -> AsyncIterator[CountingProxy]:
    async with CountingProxy(unsolicited_outstation.port) as proxy:
        yield proxy
    proxy.assert_read_only()


@pytest.mark.parametrize("read", ["static", "events"])
async def test_a_null_unsolicited_response_is_confirmed_so_reads_go_on_with_unsolicited_off(
    read: str, unsolicited_proxy: CountingProxy, events: list[dict[str, Any]]
) -> None:
    collector = Collector()
    connector = Dnp3Connector(
        device(unsolicited_proxy.port, read=read), [signal("level", 30, 0)]
    )  # unsolicited: false and timeout_s 2, as by default
    async with running(connector, collector):
        await eventually(
            lambda: collector.batches and collector.last()["level"].raw == 5, timeout=20
        )  # before the outstation's 30 s: only a confirmed null response lets reads through
        scans = len(collector.batches)
        await eventually(lambda: len(collector.batches) >= scans + 5)
    assert all(s.quality == "good" for batch in collector.batches for s in batch)
    assert not named(events, "device_session_down")
    assert unsolicited_proxy.unsolicited >= 1
    assert unsolicited_proxy.unsolicited_confirms >= 1  # the null one: it carries nothing
    assert unsolicited_proxy.unsolicited_with_objects == unsolicited_proxy.data_confirms == 0
    assert not named(events, "device_unsolicited_ignored")  # a null one is not "ignored"


async def test_unsolicited_responses_are_confirmed_when_the_policy_takes_them(
    unsolicited_proxy: CountingProxy, events: list[dict[str, Any]]
) -> None:
    collector = Collector()
    connector = Dnp3Connector(
        device(unsolicited_proxy.port, read="events", unsolicited=True), [signal("level", 30, 0)]
    )
    async with running(connector, collector):
        await eventually(lambda: unsolicited_proxy.unsolicited_confirms >= 1)
        await eventually(lambda: collector.batches and collector.last()["level"].raw == 5)
    assert not named(events, "device_unsolicited_ignored")


async def test_a_variation_0_signal_reads_beside_one_naming_the_default_variation(
    dnp3_proxy: CountingProxy,
) -> None:
    """opendnp3's default for analog inputs is g30v1: both READs are answered in g30v1, each
    kept under the variation it asked for."""
    both = [signal("level_int", 30, 0, 1), signal("level_default", 30, 0)]
    collector = Collector()
    async with running(Dnp3Connector(device(dnp3_proxy.port), both), collector):
        await eventually(lambda: len(collector.batches) >= 3)
    samples = collector.last()
    assert {name: (s.raw, s.quality) for name, s in samples.items()} == {
        "level_int": (21, "good"),
        "level_default": (21, "good"),
    }
    assert [{(h.group, h.variation) for h in read} for read in dnp3_proxy.reads[:2]] == [
        {(30, 0)},
        {(30, 1)},
    ]


async def test_an_event_buffer_overflow_brings_the_integrity_poll_forward(
    dnp3_outstation: Dnp3Outstation, dnp3_proxy: CountingProxy, events: list[dict[str, Any]]
) -> None:
    def integrity_polls() -> int:
        return sum((60, 1) in {(h.group, h.variation) for h in r} for r in dnp3_proxy.reads)

    collector = Collector()
    connector = Dnp3Connector(device(dnp3_proxy.port, read="events"), [signal("level", 30, 7)])
    async with running(connector, collector):
        await eventually(lambda: len(collector.batches) >= 3)
        assert integrity_polls() == 1  # at the start; the next one is due in an hour
        try:
            dnp3_outstation.indications(event_buffer_overflow=True)
            await eventually(lambda: integrity_polls() == 2)
            scans = len(dnp3_proxy.reads)
            await eventually(lambda: len(dnp3_proxy.reads) >= scans + 5)
        finally:
            dnp3_outstation.indications(event_buffer_overflow=False)
    assert integrity_polls() == 2  # once when it turned on, not at every poll while it stays
    reported = [e["indications"] for e in named(events, "device_status_reported")]
    assert ["DEVICE_RESTART", "EVENT_BUFFER_OVERFLOW"] in reported


async def test_events_mode_after_a_reconnect_starts_again_from_an_integrity_poll(
    dnp3_outstation: Dnp3Outstation, dnp3_proxy: CountingProxy, events: list[dict[str, Any]]
) -> None:
    dnp3_outstation.set("counter", 5, 10)
    collector = Collector()
    connector = Dnp3Connector(device(dnp3_proxy.port, read="events"), [signal("starts", 20, 5)])
    async with running(connector, collector):
        await eventually(lambda: collector.batches and collector.last()["starts"].raw == 10)
        dnp3_proxy.cut()
        await eventually(lambda: named(events, "device_session_down"))
        reads_before, down_at = len(dnp3_proxy.reads), len(collector.batches)
        dnp3_outstation.set("counter", 5, 20)  # changed while the broker was away
        dnp3_proxy.restore()
        await eventually(lambda: collector.last()["starts"].raw == 20)
    first_read = {(h.group, h.variation) for h in dnp3_proxy.reads[reads_before]}
    assert (60, 1) in first_read  # class 0 first: nothing kept from the last session
    after = [batch[0] for batch in collector.batches[down_at - 1 :]]
    assert all(s.raw in (None, 20) for s in after)  # never the old value as if fresh


async def test_a_point_the_outstation_lacks_is_bad_with_its_refusal_and_the_rest_reads(
    dnp3_proxy: CountingProxy, events: list[dict[str, Any]]
) -> None:
    absent = [signal("level", 30, 0, 5), signal("missing", 30, 20, 5)]  # 8 points: 0..7
    collector = Collector()
    async with running(Dnp3Connector(device(dnp3_proxy.port), absent), collector):
        await eventually(lambda: len(collector.batches) >= 5)
    samples = collector.last()
    assert (samples["level"].raw, samples["level"].quality) == (21.5, "good")
    assert samples["missing"].quality == "bad"
    assert "refused the read" in (samples["missing"].reason or "")
    refused = named(events, "device_read_refused")
    assert len(refused) == 1  # once, not per poll
    assert refused[0]["read"] == ["g30v5 0..0", "g30v5 20..20"]
