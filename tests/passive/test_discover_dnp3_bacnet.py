"""`dmzbroker discover pcap` on real DNP3 and BACnet/IP conversations (the Modbus proof is
test_discover_plant.py).

Each capture is recorded, not built: the broker's own DNP3 connector polls opendnp3's
outstation (the yadnp3 wheel, as tests/plant/connectors/test_dnp3.py starts it), and
`dmzbroker discover bacnet` then the BACnet connector read the simulated BACnet device,
each through a recording proxy on 127.0.0.1 (tests/passive/recorded.py) whose chunks,
with the times it read them, are written as a pcap at plant addresses. The real CLI then
drafts from the file, and the draft must hold: the device with its addressing (DNP3: the
outstation's link address and a master address the SCADA does not use; BACnet: the instance
its I-Am gave), a signal for every point the device answered with its group/index or object
and the type its values had (BACnet: the names and units the device gave), a poll interval
never below the recorded one, no write mark on write-free traffic, and `policy compile`
accepts it as printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from itertools import pairwise
from pathlib import Path
from statistics import median
from typing import Any, Literal

import pytest
import yaml
from bacpypes3.apdu import ConfirmedServiceChoice, IAmRequest

from broker.cli import main
from broker.passive.infer import Guess
from broker.passive.observations import Peer
from broker.passive.polls import Polled
from broker.plant.connectors import bacnet_frames
from broker.plant.connectors.bacnet import BacnetConnector
from broker.plant.connectors.bacnet_units import our_unit
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.dnp3 import Dnp3Connector
from broker.policy import BacnetDevice, Dnp3Device, Dnp3Source, Signal
from broker.policy.schema import BacnetSource
from broker.sim.bacnet_device import SimObject
from tests.harness import dmzbroker, eventually
from tests.passive.conftest import discover
from tests.passive.recorded import (
    Piece,
    TcpRecorder,
    UdpRecorder,
    tcp_connections,
    udp_frames,
    write_pcap,
)
from tests.passive.test_discover_cli import drafted, guess, polled
from tests.plant.connectors.dnp3_outstation import FUNCTIONS, Dnp3Outstation, link_frames
from tests.plant.connectors.test_bacnet import started_on_a_free_port

pytestmark = pytest.mark.timeout(120)

SCADA, ENGINEERING = "10.0.0.5", "10.0.0.8"  # the poller; a laptop that browsed the device once
RTU, ROOM = "10.0.0.7", "10.0.0.20"  # the outstation; the BACnet room controller
POLL_S = 0.1  # the recorded pollers' interval (the wall clock's: the tests wait this long)
SCANS = 12  # polls recorded per conversation


def assert_compiles(found: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """`policy compile` (in this process: it changes no global state) accepts the draft."""
    draft = tmp_path / "draft.yaml"
    draft.write_text(found["draft"])
    assert main(["policy", "compile", str(draft), "--out", str(tmp_path / "draft.json")]) == 0
    loaded: dict[str, Any] = yaml.safe_load(found["draft"])
    return loaded


def assert_no_write_marks(found: dict[str, Any]) -> None:
    """Write-free traffic: nothing the draft says was written, no write among the requests."""
    assert not [p for p in found["polled"] if p["write"]]
    assert not [s for s in found["signals"] if s["written"]]
    assert "written by the SCADA" not in found["draft"]


def medians(times: dict[Any, list[float]]) -> dict[Any, float]:
    """Per request kind, the median gap between its recorded requests (asked twice or more)."""
    return {key: median(b - a for a, b in pairwise(ts)) for key, ts in times.items() if len(ts) > 1}


def scanned(connector: Any, task: asyncio.Task[None], scans: int) -> bool:
    return bool(connector.scans >= scans or task.done())


async def poll(connector: Any, scans: int, between: Callable[[int], None]) -> None:
    """Run `connector` for `scans` scans, calling `between(scan)` after each."""

    async def emit(_: list[RawSample]) -> None:
        pass

    task = asyncio.create_task(connector.run(emit))
    try:
        for scan in range(1, scans + 1):
            await eventually(partial(scanned, connector, task, scan), timeout=30)
            assert not task.done(), "the connector stopped"
            between(scan)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# ---- DNP3: the DNP3 connector polling opendnp3's outstation ------------------------------

OUTSTATION, MASTER = 1024, 3  # link addresses; the SCADA's master address is not the default 1
SIZE = 8  # points of each kind the outstation serves (0..7)
GROUPS = (1, 3, 10, 20, 21, 30, 40)  # its static groups, frozen counters (21) too
# (group, index, variation) the static poll reads; the variation 0 ones come in the
# outstation's default (opendnp3: g20v1, g30v1, both 32-bit integers)
STATIC = ((1, 0, 0), (3, 1, 0), (10, 0, 0), (20, 2, 0), (30, 0, 5), (30, 1, 5), (30, 3, 0),
          (40, 1, 3))  # fmt: skip
COUNTING = (20, 2)  # the counter that counts during the recordings


def dnp3_type(group: int, index: int, variation: int) -> str:
    """The type the point's answers had: what the outstation sent in that variation."""
    if group in (1, 10):
        return "bool"
    if group == 3:
        return "string"  # a double-bit state, "on"
    if (group, variation) in ((30, 5), (40, 3)):
        return "float32"
    return "uint32" if (group, index) == COUNTING else "int32"  # a counter that counted


# What a connection the connector dropped can leave (it reconnects when an answer is late, as
# on a loaded machine): its last frame or fragment cut short.
CUT_SHORT = {
    "DNP3 bytes that are no frame",
    "DNP3 frame header CRC or length wrong",
    "DNP3 frame data CRC wrong",
    "DNP3 response malformed",
}


@dataclass(frozen=True)
class Dnp3Capture:
    path: Path
    pieces: list[Piece]
    master: int  # the recorded master's link address

    @property
    def connections(self) -> int:
        """How many TCP connections the master made: more than one if it reconnected."""
        return len({p.conversation for p in self.pieces})


def dnp3_requests(pieces: Sequence[Piece]) -> tuple[dict[str, int], dict[bytes, list[float]]]:
    """What the recorded master sent, by an independent frame splitter: its application
    functions counted, and the times of each READ by its object headers."""
    functions: dict[str, int] = defaultdict(int)
    reads: dict[bytes, list[float]] = defaultdict(list)
    buffer = b""
    for piece in pieces:
        if not piece.from_client:
            continue
        frames, buffer = link_frames(buffer + piece.data)
        for _, data in frames:
            if len(data) >= 3 and data[0] & 0x40:  # user data, a first segment
                functions[FUNCTIONS.get(data[2], str(data[2]))] += 1
                if data[2] == 1:
                    reads[data[3:]].append(piece.time)
    return dict(functions), reads


@contextlib.contextmanager
def outstation() -> Iterator[Dnp3Outstation]:
    """An outstation of its own for each recording: events one recording made are not in
    the next one's event buffer."""
    with Dnp3Outstation(size=SIZE, outstation=OUTSTATION, master=MASTER) as station:
        station.set("binary", 0, True)
        station.set("double_bit", 1, "on")
        station.set("binary_output", 0, True)
        station.set("analog", 1, 16.5)
        station.set("analog", 3, -7)
        station.set("analog_output", 1, -3.25)
        yield station


def record_dnp3(read: Literal["static", "events"], signals: Sequence[Signal]) -> list[Piece]:
    """The connector polling an outstation through the recording proxy, SCANS scans; the
    level and the counter move between scans (events, in `read: events`)."""

    async def recorded(station: Dnp3Outstation) -> list[Piece]:
        def between(scan: int) -> None:
            station.set("analog", 0, 21.5 + 0.25 * scan if read == "static" else 20 + scan % 3)
            station.set("counter", 2, 1000 + scan)

        async with TcpRecorder(station.port) as proxy:
            device = Dnp3Device(
                name="rtu", host="127.0.0.1", port=proxy.port, outstation_address=OUTSTATION,
                master_address=MASTER, poll_interval_s=POLL_S, read=read,
            )  # fmt: skip
            await poll(Dnp3Connector(device, signals), SCANS, between)
        return proxy.pieces

    with outstation() as station:
        return asyncio.run(recorded(station))


def dnp3_signal(group: int, index: int, variation: int) -> Signal:
    return Signal(
        path=f"site/water/rtu/g{group}-{index}-v{variation}",
        device="rtu",
        source=Dnp3Source(group=group, index=index, variation=variation),
    )


@pytest.fixture(scope="module")
def dnp3_static(tmp_path_factory: pytest.TempPathFactory) -> Dnp3Capture:
    """`read: static`: a range READ of the signals' points each scan."""
    pieces = record_dnp3("static", [dnp3_signal(*p) for p in STATIC])
    path = tmp_path_factory.mktemp("dnp3") / "static.pcap"
    write_pcap(path, tcp_connections(pieces, (SCADA, 49_152), (RTU, 20_000)))
    return Dnp3Capture(path, pieces, MASTER)


@pytest.fixture(scope="module")
def dnp3_events(tmp_path_factory: pytest.TempPathFactory) -> Dnp3Capture:
    """`read: events`: an integrity poll (class 0 and 1-3) at the start, event polls after."""
    signals = [dnp3_signal(30, 0, 0), dnp3_signal(20, 2, 0)]
    pieces = record_dnp3("events", signals)
    path = tmp_path_factory.mktemp("dnp3") / "events.pcap"
    write_pcap(path, tcp_connections(pieces, (SCADA, 49_153), (RTU, 20_000), (4_294_967_000, 5)))
    return Dnp3Capture(path, pieces, MASTER)


def check_dnp3(found: dict[str, Any], capture: Dnp3Capture, tmp_path: Path) -> dict[Any, Any]:
    """What every DNP3 draft must hold; its signals by (group, index)."""
    draft = assert_compiles(found, tmp_path)
    kinds = {w["kind"] for w in found["warnings"]}
    assert kinds <= (CUT_SHORT if capture.connections > 1 else set()), found["warnings"]
    [device] = draft["devices"]
    assert (device["protocol"], device["host"], device["port"]) == ("dnp3", RTU, 20_000)
    assert device["outstation_address"] == OUTSTATION
    # the broker must not share the SCADA's link address (nor the outstation's)
    assert device["master_address"] not in (capture.master, OUTSTATION)
    assert f"the SCADA's is {capture.master}" in found["draft"]

    functions, reads = dnp3_requests(capture.pieces)
    assert set(functions) <= {"READ", "CONFIRM"}  # the recording is write-free ...
    assert_no_write_marks(found)  # ... and the draft says so
    recorded = medians(reads)
    assert recorded, "the master polled"
    assert device["poll_interval_s"] >= max(recorded.values())  # never faster than recorded
    for p in found["polled"]:
        if p["interval_s"] is not None:  # each read's interval is the recorded one
            assert any(abs(p["interval_s"] - r) < 1e-3 for r in recorded.values()), p
            assert device["poll_interval_s"] >= p["interval_s"]

    signals = {(s["source"]["group"], s["source"]["index"]): s for s in draft["signals"]}
    assert len(signals) == len(draft["signals"])
    assert {s["lifecycle"] for s in draft["signals"]} == {"proposed"}
    return signals


def test_a_static_dnp3_poll_drafts_each_point_read_with_its_type_and_variation(
    dnp3_static: Dnp3Capture, tmp_path: Path
) -> None:
    found = discover(dnp3_static.path)
    signals = check_dnp3(found, dnp3_static, tmp_path)
    assert set(signals) == {(g, i) for g, i, _ in STATIC}  # what was read, and only that
    types = {(s["table"], s["address"]): s["type"] for s in found["signals"]}
    assert types == {(str(g), i): dnp3_type(g, i, v) for g, i, v in STATIC}
    # the variation the SCADA read: a float stays a float (variation 0 would be g30v1)
    assert {k: s["source"]["variation"] for k, s in signals.items()} == {
        (g, i): v for g, i, v in STATIC
    }


def test_a_dnp3_integrity_and_event_poll_drafts_every_point_the_outstation_answered(
    dnp3_events: Dnp3Capture, tmp_path: Path
) -> None:
    functions, _ = dnp3_requests(dnp3_events.pieces)
    assert functions["CONFIRM"] >= 1  # the events came, and were confirmed as required
    found = discover(dnp3_events.path)
    signals = check_dnp3(found, dnp3_events, tmp_path)
    every = {(g, i) for g in GROUPS for i in range(SIZE)}
    assert set(signals) == every  # the integrity poll's answer: every point of the outstation
    types = {(int(s["table"]), s["address"]): s["type"] for s in found["signals"]}
    assert types == {(g, i): dnp3_type(g, i, 0) for g, i in every}
    kinds = {(int(s["table"]), s["address"]): s["kind"] for s in found["signals"]}
    assert kinds[COUNTING] == "counter" and kinds[(30, 0)] != "constant"
    polled = {p["function"]: p for p in found["polled"]}
    assert polled[f"READ class 0 1 2 3 (master {MASTER})"]["requests"] == 1  # the integrity poll
    assert polled[f"READ class 1 2 3 (master {MASTER})"]["requests"] >= SCANS - 1


# ---- BACnet/IP: discover bacnet, then the BACnet connector, reading the simulated device --

INSTANCE = 1001
OBJECTS = (
    SimObject("analog-input", 1, "room-temp", -18.5, "degreesCelsius", "cold room air"),
    SimObject("analog-output", 2, "valve", 40.0, "percent"),
    SimObject("analog-value", 3, "setpoint", -20.0, "degreesCelsius", "room setpoint"),
    SimObject("binary-input", 4, "door", False),
    SimObject("multi-state-value", 5, "fan-mode", 2, description="1 off, 2 low, 3 high"),
)
BACNET_TYPES = {"analog": {"float32"}, "binary": {"bool"}, "multi": {"int32", "uint32"}}
READS = {"whoIs", "readProperty", "readPropertyMultiple"}
# the proxy's clients, in the order they came: discover bacnet's Who-Is, its reads, the SCADA
BACNET_CLIENTS = ((ENGINEERING, 50_123), (ENGINEERING, 50_124), (SCADA, 47_808))


@dataclass(frozen=True)
class BacnetCapture:
    path: Path
    pieces: list[Piece]
    requests: dict[str, int]  # the services the device received


def record_bacnet() -> tuple[list[Piece], dict[str, int]]:
    """`dmzbroker discover bacnet` (Who-Is, object list, names and units) from an engineering
    laptop, then the connector polling from the SCADA, both through the recording proxy."""

    async def recorded() -> tuple[list[Piece], dict[str, int]]:
        device = await started_on_a_free_port(INSTANCE, OBJECTS, "room-ctl")
        try:
            async with UdpRecorder(device.port) as proxy:
                address = f"127.0.0.1:{proxy.port}"
                assert await asyncio.to_thread(_discover_bacnet, address) == 0
                policy = BacnetDevice(name="room", host="127.0.0.1", port=proxy.port,
                                      device_instance=INSTANCE, poll_interval_s=POLL_S)  # fmt: skip
                signals = [
                    Signal(path=f"site/room/ctl/{o.name}", device="room",
                           source=BacnetSource(object_type=o.object_type, instance=o.instance))  # type: ignore[arg-type]
                    for o in OBJECTS
                ]  # fmt: skip

                def temperature(scan: int) -> None:  # the room warms and cools while polled
                    device.set("analog-input", 1, -18.5 + scan % 4)

                await poll(BacnetConnector(policy, signals), SCANS, temperature)
        finally:
            await device.stop()
        return proxy.pieces, dict(device.requests)

    return asyncio.run(recorded())


def _discover_bacnet(address: str) -> int:
    """The real `discover bacnet` command (it runs its own event loop: in a thread)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return main(["discover", "bacnet", address, "--device-name", "room"])


@pytest.fixture(scope="module")
def bacnet(tmp_path_factory: pytest.TempPathFactory) -> BacnetCapture:
    pieces, requests = record_bacnet()
    assert {p.conversation for p in pieces} == set(range(len(BACNET_CLIENTS)))
    conversations = [
        udp_frames([p for p in pieces if p.conversation == n], client, (ROOM, 47_808))
        for n, client in enumerate(BACNET_CLIENTS)
    ]
    path = write_pcap(tmp_path_factory.mktemp("bacnet") / "room.pcap", conversations)
    return BacnetCapture(path, pieces, requests)


@pytest.fixture(scope="module")
def bacnet_found(bacnet: BacnetCapture) -> dict[str, Any]:
    return discover(bacnet.path)


def test_a_bacnet_poll_drafts_the_device_its_i_am_named_with_each_object_as_it_named_it(
    bacnet: BacnetCapture, bacnet_found: dict[str, Any], tmp_path: Path
) -> None:
    answers = [bacnet_frames.parse(p.data) for p in bacnet.pieces if not p.from_client]
    i_ams = [a for a in answers if isinstance(a, IAmRequest)]
    assert [int(a.iAmDeviceIdentifier[1]) for a in i_ams] == [INSTANCE]  # the capture has one

    found = bacnet_found
    draft = assert_compiles(found, tmp_path)
    assert found["warnings"] == []
    [device] = draft["devices"]
    assert (device["protocol"], device["host"], device["port"]) == ("bacnet", ROOM, 47_808)
    assert device["device_instance"] == INSTANCE

    signals = {(s["source"]["object_type"], s["source"]["instance"]): s for s in draft["signals"]}
    assert set(signals) == {(o.object_type, o.instance) for o in OBJECTS}
    seen = {(s["table"], s["address"]): s for s in found["signals"]}
    for o in OBJECTS:
        signal, point = signals[o.object_type, o.instance], seen[o.object_type, o.instance]
        units = our_unit(o.units) if o.units else ""
        assert (point["name"], point["units"] or "") == (o.name, units)  # as the device said
        assert signal["unit"] == units
        assert signal["description"] == (f"{o.name}: {o.description}" if o.description else o.name)
        assert point["type"] in BACNET_TYPES[o.object_type.split("-")[0]], point
        assert signal["lifecycle"] == "proposed"
    assert seen["analog-input", 1]["kind"] == "measurement"  # it moved while polled
    assert {s["polled_by"][0] for s in found["signals"]} == {SCADA}  # not the laptop's one read

    # never faster than the SCADA's recorded polls (its ReadPropertyMultiples)
    scada = BACNET_CLIENTS.index((SCADA, 47_808))
    polls = [
        p.time
        for p in bacnet.pieces
        if p.conversation == scada and p.from_client and _read_multiple(p.data)
    ]
    recorded = medians({"rpm": polls})["rpm"]
    assert device["poll_interval_s"] >= recorded
    intervals = [p["interval_s"] for p in found["polled"] if p["client"] == SCADA]
    assert intervals == [pytest.approx(recorded, abs=1e-3)] * len(OBJECTS)

    assert set(bacnet.requests) <= READS  # the recording is write-free ...
    assert_no_write_marks(found)  # ... and the draft says so


def test_the_plain_command_prints_the_same_bacnet_draft(
    bacnet: BacnetCapture, bacnet_found: dict[str, Any]
) -> None:
    done = dmzbroker("discover", "pcap", str(bacnet.path), check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == bacnet_found["draft"]
    assert "bacnet-10-0-0-20-device-1001" in done.stderr  # the summary table


def _read_multiple(datagram: bytes) -> bool:
    """Whether a datagram is a ReadPropertyMultiple request (the proxy saw bytes only)."""
    request = bacnet_frames.parse(datagram)
    service = getattr(request, "apduService", None)
    return bool(service == ConfirmedServiceChoice.readPropertyMultiple)


def test_a_dnp3_point_is_drafted_in_the_one_variation_the_scada_read_it_in() -> None:
    """Else variation 0: read in two variations, by class poll only, or by an event group's
    range (g32v5 names no variation of group 30)."""
    rtu = Peer(RTU, 20_000)

    def point(index: int) -> Guess:
        return guess("30", index, "float32", protocol="dnp3", server=rtu, unit=OUTSTATION)

    def read(index: int, function: str) -> Polled:
        return polled("30", index, 1, function=f"{function} (master {MASTER})",
                      protocol="dnp3", server=rtu, unit=OUTSTATION)  # fmt: skip

    ranges = [read(0, "READ g30v5"), read(0, "READ g30v5"), read(1, "READ g30v5"),
              read(1, "READ g30v1"), read(2, "READ g32v5"), read(3, "READ g30v9"),
              replace(read(0, "READ class 1 2 3"), table="", count=0)]  # fmt: skip
    made, _ = drafted([point(i) for i in range(5)], ranges)
    assert made.text is not None
    variations = {s["source"]["index"]: s["source"]["variation"]
                  for s in yaml.safe_load(made.text)["signals"]}  # fmt: skip
    assert variations == {0: 5, 1: 0, 2: 0, 3: 0, 4: 0}  # 3: g30v9 is no variation of group 30
