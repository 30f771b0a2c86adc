"""The BACnet/IP connector against the simulated device (broker/sim/bacnet_device.py) on
127.0.0.1: values and types, status and reliability to quality, units, identity, missing
properties, a device that stops, COV, the request budget, and a socket that answers nothing.

Every test's device counts the services it received; the fixture's teardown asserts that
none was a write or a device-management service (docs/bacnet.md)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import psutil
import pytest
from bacpypes3.apdu import WritePropertyRequest
from bacpypes3.constructeddata import Any as AnyValue
from bacpypes3.primitivedata import ObjectIdentifier, Real

from broker.deployment.sockets import listening
from broker.plant.connectors import bacnet_frames as frames
from broker.plant.connectors import bacnet_values
from broker.plant.connectors.bacnet import SERVICES_USED, BacnetConnector
from broker.plant.connectors.base import RawSample
from broker.policy import BacnetDevice, Signal
from broker.policy.schema import BacnetSource
from broker.sim.bacnet_device import SimObject, SimulatedBacnetDevice
from tests.harness import free_udp_port

INSTANCE = 4711
OBJECTS = [
    SimObject("analog-input", 1, "room-temp", -18.5, "degreesCelsius", "cold room"),
    SimObject("analog-output", 2, "valve", 42.25, "percent"),
    SimObject("analog-value", 3, "setpoint", 21.7, "degreesCelsius"),
    SimObject("binary-input", 4, "door", True),
    SimObject("binary-output", 5, "fan", False),
    SimObject("binary-value", 6, "defrost", True),
    SimObject("multi-state-input", 7, "mode", 3),
    SimObject("multi-state-output", 8, "stage", 2),
    SimObject("multi-state-value", 9, "season", 1),
]
NAMES = {o.object_type: o.name for o in OBJECTS}
READ_ONLY = SERVICES_USED | {"not-a-request"}
WRITES = ("writeProperty", "writePropertyMultiple", "writeGroup")


def signal(name: str, object_type: str, instance: int, unit: str = "", **source: Any) -> Signal:
    return Signal(
        path=f"site/room/ctl/{name}",
        device="rc",
        unit=unit,
        source=BacnetSource(object_type=object_type, instance=instance, **source),  # type: ignore[arg-type]
    )


ALL = [
    signal(o.name, o.object_type, o.instance, "degC" if o.units == "degreesCelsius" else "")
    for o in OBJECTS
]


async def started_on_a_free_port(
    device_instance: int, objects: Sequence[SimObject], *args: Any, **options: Any
) -> SimulatedBacnetDevice:
    """A simulated device started on 127.0.0.1 at a port that was free when picked. Another
    test (the other xdist worker) may bind it before the device does: on that error, and on
    no other, it starts on another free port, 3 ports at most."""
    tries = 3
    while True:
        tries -= 1
        device = SimulatedBacnetDevice(
            "127.0.0.1", free_udp_port(), device_instance, objects, *args, **options
        )
        try:
            await device.start()
            return device
        except OSError as e:
            await device.stop()
            if e.errno != errno.EADDRINUSE or tries == 0:
                raise


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedBacnetDevice]:
    device = await started_on_a_free_port(INSTANCE, OBJECTS)
    try:
        yield device
    finally:
        await device.stop()
    # whatever the test did, the connector sent reads (and subscriptions) only
    assert set(device.requests) <= READ_ONLY, device.requests
    assert all(device.requests[w] == 0 for w in WRITES)


def policy_device(port: int, **overrides: Any) -> BacnetDevice:
    settings: dict[str, Any] = {
        "name": "rc",
        "host": "127.0.0.1",
        "port": port,
        "device_instance": INSTANCE,
        "poll_interval_s": 0.1,
        "timeout_s": 0.5,
    }
    return BacnetDevice(**(settings | overrides))


class Reader:
    """The connector running in a task, and every batch it emitted."""

    def __init__(self, connector: BacnetConnector) -> None:
        self.connector = connector
        self.batches: list[list[RawSample]] = []
        self._task: asyncio.Task[None] | None = None

    async def _emit(self, samples: list[RawSample]) -> None:
        self.batches.append(samples)

    async def __aenter__(self) -> Reader:
        self._task = asyncio.create_task(self.connector.run(self._emit))
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def until(
        self, done: Callable[[dict[str, RawSample]], bool], timeout_s: float = 10.0
    ) -> dict[str, RawSample]:
        """The first batch (by signal) for which `done` holds, emitted from now on."""
        deadline = time.monotonic() + timeout_s
        seen = len(self.batches)
        while time.monotonic() < deadline:
            while seen < len(self.batches):
                batch = {s.signal: s for s in self.batches[seen]}
                seen += 1
                if done(batch):
                    return batch
            await asyncio.sleep(0.02)
        last = self.batches[-1] if self.batches else []
        raise AssertionError(f"no such batch within {timeout_s} s; last: {last}")


def reading(sim: SimulatedBacnetDevice, signals: Sequence[Signal] = ALL, **device: Any) -> Reader:
    return Reader(BacnetConnector(policy_device(sim.port, **device), signals))


def good(batch: dict[str, RawSample]) -> bool:
    return all(s.quality == "good" for s in batch.values())


def path(name: str) -> str:
    return f"site/room/ctl/{name}"


async def test_values_and_types_per_object_type(sim: SimulatedBacnetDevice) -> None:
    name = signal("name", "analog-input", 1, property="object-name")
    async with reading(sim, [*ALL, name]) as reader:
        batch = await reader.until(good)
    values = {s.signal.rsplit("/", 1)[1]: s.raw for s in batch.values()}
    assert values == {
        "room-temp": -18.5,
        "valve": 42.25,
        "setpoint": 21.7,  # a REAL at its float32 precision, not 21.700000762939453
        "door": True,
        "fan": False,
        "defrost": True,
        "mode": 3,
        "stage": 2,
        "season": 1,
        "name": "room-temp",
    }
    assert type(values["mode"]) is int and type(values["door"]) is bool
    assert sim.requests["subscribeCOV"] == 0  # `read: poll` never subscribes
    assert reader.connector.stray == reader.connector.malformed == 0


async def test_a_change_is_read_at_the_next_scan(sim: SimulatedBacnetDevice) -> None:
    async with reading(sim) as reader:
        await reader.until(good)
        sim.set("analog-input", 1, -3.25)
        sim.set("binary-input", 4, False)
        sim.set("multi-state-value", 9, 4)
        batch = await reader.until(lambda b: b[path("room-temp")].raw == -3.25)
    assert batch[path("door")].raw is False
    assert batch[path("season")].raw == 4


@pytest.mark.parametrize(
    ("status", "quality", "reason"),
    [
        ({"reliability": "openLoop"}, "bad", "BACnet reliability: open-loop"),
        ({"fault": True}, "bad", "BACnet reliability: unreliable-other"),
        (
            {"out_of_service": True},
            "uncertain",
            "BACnet: out of service, the value is not from the sensor",
        ),
        (
            {"overridden": True},
            "uncertain",
            "BACnet: overridden, the value is not from the sensor",
        ),
    ],
)
async def test_status_flags_and_reliability_become_quality_with_a_reason(
    sim: SimulatedBacnetDevice, status: dict[str, Any], quality: str, reason: str
) -> None:
    async with reading(sim) as reader:
        await reader.until(good)
        sim.set_status("analog-input", 1, **status)
        batch = await reader.until(lambda b: b[path("room-temp")].quality != "good")
        assert batch[path("room-temp")].quality == quality
        assert batch[path("room-temp")].reason == reason
        assert batch[path("room-temp")].raw == -18.5  # the value is still passed on
        assert all(s.quality == "good" for p, s in batch.items() if p != path("room-temp"))
        sim.set_status("analog-input", 1)  # back to normal
        await reader.until(good)


async def test_units_that_differ_from_the_policy_make_the_value_uncertain_once(
    sim: SimulatedBacnetDevice, events: list[dict[str, Any]]
) -> None:
    signals = [
        signal("room-temp", "analog-input", 1, "degF"),
        signal("valve", "analog-output", 2, "%"),
        signal("setpoint", "analog-value", 3, "°C"),  # another spelling of degC
    ]
    async with reading(sim, signals) as reader:
        for _ in range(3):
            batch = await reader.until(lambda b: True)
    assert batch[path("room-temp")].quality == "uncertain"
    assert batch[path("room-temp")].reason == "BACnet units: degC, the policy says degF"
    assert batch[path("valve")].quality == batch[path("setpoint")].quality == "good"
    differ = [e for e in events if e["event"] == "device_units_differ"]
    assert differ == [
        {
            "event": "device_units_differ",
            "log_level": "warning",
            "device": "rc",
            "signal": path("room-temp"),
            "device_units": "degC",
            "policy_unit": "degF",
        }
    ]


async def test_a_device_with_another_instance_is_not_read(
    sim: SimulatedBacnetDevice, events: list[dict[str, Any]]
) -> None:
    async with reading(sim, device_instance=INSTANCE + 1) as reader:
        batch = await reader.until(lambda b: True)
    assert all(s.quality == "bad" and s.raw is None for s in batch.values())
    down = next(e for e in events if e["event"] == "device_session_down")
    assert f"is not BACnet device {INSTANCE + 1} as the policy says" in down["error"]
    assert f"(it is BACnet device {INSTANCE})" in down["error"]  # named by the wildcard read
    assert sim.requests["readPropertyMultiple"] == 0  # identity first: nothing else read
    assert sim.requests["whoIs"] == 0  # ReadProperty of its own identifier says enough


async def test_a_missing_object_or_property_is_bad_alone(sim: SimulatedBacnetDevice) -> None:
    signals = [
        *ALL,
        signal("ghost", "analog-input", 99),
        signal("units-of-a-door", "binary-input", 4, property="units"),
    ]
    async with reading(sim, signals) as reader:
        batch = await reader.until(lambda b: b[path("room-temp")].quality == "good")
    ghost, units = batch[path("ghost")], batch[path("units-of-a-door")]
    assert (ghost.quality, ghost.raw) == ("bad", None)
    assert ghost.reason == "BACnet: analog-input 99 has no present-value (object: unknown-object)"
    assert units.reason == "BACnet: binary-input 4 has no units (property: unknown-property)"
    assert all(batch[s.path].quality == "good" for s in ALL)


async def test_a_device_stopped_mid_run_goes_bad_in_one_batch_then_recovers(
    sim: SimulatedBacnetDevice, events: list[dict[str, Any]]
) -> None:
    async with reading(sim) as reader:
        await reader.until(good)
        await sim.stop()
        down = await reader.until(lambda b: any(s.quality == "bad" for s in b.values()))
        assert all(s.quality == "bad" and s.raw is None for s in down.values())
        assert len(down) == len(ALL)
        await sim.start()
        await reader.until(good)
    names = [e["event"] for e in events if e["event"].startswith("device_")]
    assert names[0] == "device_session_up"
    assert "device_session_down" in names
    assert names[-1] == "device_session_up"


async def test_cov_takes_values_from_notifications_and_still_polls_status(
    sim: SimulatedBacnetDevice,
) -> None:
    signals = [signal("room-temp", "analog-input", 1, "degC"), signal("door", "binary-input", 4)]
    async with reading(sim, signals, read="cov", poll_interval_s=0.2) as reader:
        await reader.until(good)
        assert sim.requests["subscribeCOV"] == 2  # one per object
        sim.set("analog-input", 1, -12.0)
        sim.set("binary-input", 4, False)
        batch = await reader.until(
            lambda b: b[path("room-temp")].raw == -12.0 and b[path("door")].raw is False
        )
        assert batch[path("room-temp")].read_time is not None  # from a notification
        sim.set_status("binary-input", 4, reliability="shortedLoop")
        batch = await reader.until(lambda b: b[path("door")].quality == "bad")
        assert batch[path("door")].reason == "BACnet reliability: shorted-loop"


async def test_requests_are_spaced_to_the_budget(sim: SimulatedBacnetDevice) -> None:
    # a 0.01 s poll interval asks for far more than 5 requests/s: the pace holds it back
    async with reading(sim, poll_interval_s=0.01, max_requests_per_s=5) as reader:
        await reader.until(good)
        before, started = sum(sim.requests.values()), time.monotonic()

        def sent() -> int:
            return sum(sim.requests.values()) - before

        # 1.5 s at least, and it did keep reading (3 requests: a starved worker may be slow)
        await reader.until(lambda b: time.monotonic() - started >= 1.5 and sent() >= 3)
        count, elapsed = sent(), time.monotonic() - started
    assert count <= 5 * elapsed + 2, (count, elapsed)  # however long the window took
    assert reader.connector.requests == sum(sim.requests.values())


async def _datagram_to(port: int, payload: bytes) -> bytes | None:
    """Send `payload` from a fresh socket; what comes back within 0.3 s, if anything (the
    device and the connector run in this event loop: the wait must not block it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.setblocking(False)
        probe.bind(("127.0.0.1", 0))
        probe.sendto(payload, ("127.0.0.1", port))
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(probe, 2048), 0.3)
        except (TimeoutError, ConnectionRefusedError):
            return None


def write_property() -> bytes:
    """A WriteProperty of analog-value 3's present-value (the connector cannot build one)."""
    request = WritePropertyRequest(
        objectIdentifier=ObjectIdentifier("analog-value,3"),
        propertyIdentifier="present-value",
        propertyValue=AnyValue(Real(99.0)),
    )
    return frames._confirmed(request, 1)


async def test_the_connectors_socket_answers_nothing_and_takes_only_the_device(
    sim: SimulatedBacnetDevice,
) -> None:
    async with reading(sim) as reader:
        await reader.until(good)
        connector = reader.connector
        assert connector.local_address is not None
        port = connector.local_address[1]
        # not a listening socket to the posture check: it is connected to the device
        assert all(s.port != port for s in listening(psutil.Process()))
        oid = ObjectIdentifier(("device", frames.WILDCARD_INSTANCE))
        requests = [
            frames.who_is(),
            frames.read_property(1, oid, "object-identifier"),
            write_property(),
        ]
        assert [await _datagram_to(port, r) for r in requests] == [None, None, None]
        assert await _datagram_to(sim.port, frames.who_is()) is not None  # the probe does work
        # an "answer" from another port, with a plausible invoke id, is never data: the
        # kernel drops it (connected socket), so the connector does not even count it
        forged = frames.read_property(0, oid, "object-identifier")
        for invoke in range(256):
            _datagram_to_nowait(port, forged[:6] + bytes([invoke]) + forged[7:])
        await reader.until(good)
        assert connector.stray == connector.malformed == 0
    assert sim.requests["writeProperty"] == 0


def _datagram_to_nowait(port: int, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.sendto(payload, ("127.0.0.1", port))


async def test_cov_subscriptions_are_bounded_and_renewed_before_they_lapse(
    sim: SimulatedBacnetDevice,
) -> None:
    signals = [signal("room-temp", "analog-input", 1, "degC")]
    reader = reading(sim, signals, read="cov", poll_interval_s=0.2)
    reader.connector.cov_lifetime_s = 3  # renewed after 2 s
    async with reader:
        await reader.until(good)
        assert sim.requests["subscribeCOV"] == 1
        await reader.until(lambda b: sim.requests["subscribeCOV"] == 2, timeout_s=6.0)
        sim.set("analog-input", 1, -7.5)  # still notified after the renewal
        batch = await reader.until(lambda b: b[path("room-temp")].raw == -7.5)
    assert batch[path("room-temp")].read_time is not None


async def test_long_text_properties_are_batched_to_fit_and_halved_when_refused(
    events: list[dict[str, Any]],
) -> None:
    """Twenty object-names of 60 characters on a device that takes 480 octets and aborts a
    longer answer (segmentation-not-supported): every name is read, good, every scan."""
    long = [
        SimObject("analog-value", i, f"AHU-{i:02d}-supply-air-temperature-sensor-long-name-{i}", i)
        for i in range(20)
    ]
    names = [
        signal(f"n{o.instance}", o.object_type, o.instance, property="object-name") for o in long
    ]
    device = await started_on_a_free_port(INSTANCE, long, max_apdu=480)
    try:
        async with reading(device, names) as reader:
            batch = await reader.until(good, timeout_s=5.0)
            connector = reader.connector
            # the estimate counts a text at 265 octets: no more than one name per request
            assert connector._max_objects == len(long)  # nothing was refused
            assert {s.raw for s in batch.values()} == {o.name for o in long}
    finally:
        await device.stop()
    assert not [e for e in events if e["event"] == "device_read_refused"]


async def test_a_batch_the_device_says_is_too_big_is_halved_and_the_size_kept(
    events: list[dict[str, Any]],
) -> None:
    """A device that claims 1476 octets but aborts answers over 200 (some gateways do): the
    connector halves the batch until it fits, and keeps the smaller size for the session."""
    many = [SimObject("analog-value", i, f"v{i}", float(i)) for i in range(40)]
    values = [signal(f"v{o.instance}", o.object_type, o.instance) for o in many]
    device = await started_on_a_free_port(INSTANCE, many, max_apdu=1476, abort_over=200)
    try:
        reader = reading(device, values)
        async with reader:
            batch = await reader.until(good, timeout_s=5.0)
            split = reader.connector._max_objects
            assert 1 <= split < 10  # halved from 34 objects a batch
            aborted = device.requests["readPropertyMultiple"]
            await reader.until(good)
            await reader.until(good)
            # kept: later scans send no batch that is aborted again
            assert device.requests["readPropertyMultiple"] - aborted <= 2 * (40 // split + 1)
            assert reader.connector._max_objects == split  # kept: not probed again each scan
    finally:
        await device.stop()
    assert {s.raw for s in batch.values()} == {float(o.instance) for o in many}
    assert not [e for e in events if e["event"] == "device_read_refused"]


def test_an_object_s_properties_are_never_cut_across_batches() -> None:
    reads = [bacnet_values.read_of(s) for s in ALL]
    reads += [bacnet_values.read_of(signal("n", "analog-input", 1, property="object-name"))]
    objects = bacnet_values.scan_objects(reads)
    for max_apdu in (50, 100, 300, 480, 1476):
        for max_objects in (1, 2, 5, 50):
            cut = bacnet_values.batches(objects, max_apdu, max_objects)
            for props in objects:
                holding = [b for b in cut if props[0] in b]
                assert len(holding) == 1 and all(p in holding[0] for p in props)
            assert all(len({o for o, _ in b}) <= max_objects for b in cut)


def test_a_value_whose_status_flags_were_not_read_is_never_good() -> None:
    quality, reason = bacnet_values.quality_of(None, None, "abort segmentation-not-supported")
    assert quality == "uncertain"
    assert reason == (
        "BACnet: status unknown, status-flags not read (abort segmentation-not-supported)"
    )


async def test_the_simulator_refuses_a_port_in_use_at_once() -> None:
    first = await started_on_a_free_port(INSTANCE, OBJECTS[:1])
    try:
        second = SimulatedBacnetDevice("127.0.0.1", first.port, INSTANCE, OBJECTS[:1])
        started = time.monotonic()
        with pytest.raises(OSError):
            await second.start()
        # no bacpypes3 retry loop (it would retry for ever, or seconds at the least); 5 s
        # leaves room for a starved worker
        assert time.monotonic() - started < 5.0
        await second.stop()
    finally:
        await first.stop()


async def test_the_simulator_counts_bvll_and_network_layer_messages(
    sim: SimulatedBacnetDevice,
) -> None:
    write_bdt = b"\x81\x01\x00\x0e" + bytes([127, 0, 0, 1, 0xBA, 0xC0, 255, 255, 255, 255])
    init_routing = b"\x81\x0a\x00\x08\x01\x80\x06\x00"  # Initialize-Routing-Table, empty
    for datagram in (write_bdt, init_routing):
        _datagram_to_nowait(sim.port, datagram)
    for _ in range(150):  # within 3 s
        if len(sim.requests) >= 2:
            break
        await asyncio.sleep(0.02)
    assert sim.requests["bvll:write-bdt"] == 1
    assert sim.requests["network:initialize-routing-table"] == 1
    sim.requests.clear()  # the fixture's read-only check is about the connector
