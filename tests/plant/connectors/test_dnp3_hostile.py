"""The DNP3 connector against a hostile outstation: an asyncio server in the test whose
frames are built with the broker's codec (`dnp3_frames.encode_frame`), misbehaving on
purpose. Each misbehaviour must end in one clear `device_session_down`, the device's signals
`bad`, and a recovery once the outstation behaves; meanwhile a second, good device (the
opendnp3 outstation behind the counting proxy) keeps its scan rate."""

from __future__ import annotations

import asyncio
import collections
import itertools
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from broker.plant.connectors.base import Hysteresis
from broker.plant.connectors.dnp3 import Dnp3Connector
from broker.plant.connectors.dnp3_frames import PRI_REQUEST_LINK_STATUS, PRM, encode_frame
from broker.plant.connectors.dnp3_objects import FUNCTIONS_SENT
from broker.policy import Dnp3Device, Dnp3Source, Signal
from tests.harness import eventually, running
from tests.plant.connectors.dnp3_outstation import (
    ALLOWED_LINKS,
    FUNCTIONS,
    CountingProxy,
    link_frames,
)

pytestmark = pytest.mark.timeout(60)

OUTSTATION, MASTER = 1024, 1
DATA = PRM | 4  # UNCONFIRMED_USER_DATA from the outstation (DIR clear)
HEALTHY = 1234  # the value of every healthy answer; no hostile answer carries it


def frames_of(apdu: bytes, source: int = OUTSTATION) -> bytes:
    """An APDU as the transport segments and link frames of an outstation."""
    out, seq = b"", 0
    chunks = [apdu[i : i + 249] for i in range(0, len(apdu), 249)]
    for n, chunk in enumerate(chunks):
        header = (0x40 if n == 0 else 0) | (0x80 if n == len(chunks) - 1 else 0) | seq
        out += encode_frame(DATA, MASTER, source, bytes((header,)) + chunk)
        seq = (seq + 1) & 0x3F
    return out


def response(
    seq: int, *, first: bool = True, final: bool = True, con: bool = False, value: int = HEALTHY
) -> bytes:
    """A RESPONSE (or one fragment of it) with analog input 0 as g30v1, ONLINE."""
    control = (0x80 if first else 0) | (0x40 if final else 0) | (0x20 if con else 0) | seq
    objects = bytes((30, 1, 0x00, 0, 0, 0x01)) + struct.pack("<i", value)
    return bytes((control, 129, 0, 0)) + objects


def event(value: int) -> bytes:
    """Analog input 0's event (g32v1, 2-octet index prefix), ONLINE."""
    return struct.pack("<H", 0) + bytes((0x01,)) + struct.pack("<i", value)


UNSOLICITED = bytes((0xF0, 130, 0, 0))  # FIR FIN CON UNS, seq 0, no objects
# FIR FIN CON UNS, seq 1, an event of analog input 0: confirming it would delete the event.
UNSOLICITED_EVENT = bytes((0xF1, 130, 0, 0, 32, 1, 0x28, 1, 0)) + event(1)
OBJECT_UNKNOWN = 0x0200  # IIN2.1 (IIN1 | IIN2 << 8)


class HostileOutstation:
    """Answers each READ the way `behaviour` says; "healthy" answers it correctly."""

    def __init__(self) -> None:
        self.behaviour = "healthy"
        self.port = 0
        self.functions: collections.Counter[str] = collections.Counter()
        self.links: collections.Counter[str] = collections.Counter()
        self.unsolicited_confirms: collections.Counter[int] = collections.Counter()  # by seq
        self.integrity_polls = 0  # READs naming class 0 (g60v1)
        self.reads = 0  # READs received
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> HostileOutstation:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        assert set(self.functions) <= set(FUNCTIONS_SENT), dict(self.functions)
        assert set(self.links) <= ALLOWED_LINKS, dict(self.links)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            buffer = b""
            while chunk := await reader.read(4096):
                found, buffer = link_frames(buffer + chunk)
                for control, data in found:
                    primary = "primary" if control & PRM else "secondary"
                    self.links[f"{primary} {control & 0x0F}"] += 1
                    if len(data) < 3:
                        continue
                    self.functions[FUNCTIONS.get(data[2], str(data[2]))] += 1
                    if data[2] == 0 and data[1] & 0x10:
                        self.unsolicited_confirms[data[1] & 0x0F] += 1
                    if data[2] != 1:
                        continue
                    self.integrity_polls += bytes((60, 1, 0x06)) in data[3:]
                    self.reads += 1
                    behaviour = self.behaviour  # as it is when the READ comes
                    if behaviour.endswith("_flood"):
                        await self._flood(writer, behaviour)
                        return
                    await self._answer(writer, behaviour, data[1] & 0x0F)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _flood(self, writer: asyncio.StreamWriter, behaviour: str) -> None:
        if behaviour == "link_status_flood":
            one = encode_frame(PRM | PRI_REQUEST_LINK_STATUS, MASTER, OUTSTATION)
        else:
            one = frames_of(UNSOLICITED)
        burst = one * (8192 // len(one))
        for _ in range(100_000):  # ends when the connector drops the connection
            writer.write(burst)
            await writer.drain()
            await asyncio.sleep(0)

    async def _answer(self, writer: asyncio.StreamWriter, behaviour: str, seq: int) -> None:
        good = frames_of(response(seq))
        match behaviour:
            case "healthy":
                writer.write(good)
            case "bad_crc":
                writer.write(good[:-3] + bytes((good[-3] ^ 0x01,)) + good[-2:])
            case "wrong_source":
                writer.write(frames_of(response(seq, value=1), source=OUTSTATION + 1))
            case "wrong_seq":
                writer.write(frames_of(response((seq + 1) & 0x0F, value=1)))
            case "oversized":  # one fragment of 9 segments of 249 bytes: 2,241 > 2,048
                apdu = response(seq, value=1) + bytes(2241 - 10)
                writer.write(frames_of(apdu))
            case "never_final":  # fragment after fragment, none with FIN
                for n in range(100):
                    fragment = response(
                        (seq + n) & 0x0F, first=n == 0, final=False, con=True, value=1
                    )
                    writer.write(frames_of(fragment))
                    await writer.drain()
            case "unsolicited_trickle":  # no answer, an unsolicited response every 0.3 s
                for _ in range(100):
                    writer.write(frames_of(UNSOLICITED))
                    await writer.drain()
                    await asyncio.sleep(0.3)
            case "restarted":  # the healthy answer, with DEVICE_RESTART (IIN1.7) now set
                writer.write(frames_of(bytes((0xC0 | seq, 129, 0x80, 0)) + response(seq)[4:]))
            case "refused":  # events mode: the poll refused, no objects
                writer.write(frames_of(bytes((0xC0 | seq, 129, 0, 0x02))))
            case "iin_toggle":  # the healthy answer, with DEVICE_RESTART and NEED_TIME in turn
                iin1 = 0x80 if self.reads % 2 else 0x10
                writer.write(frames_of(bytes((0xC0 | seq, 129, iin1, 0)) + response(seq)[4:]))
            case "refuse_toggle":  # every other READ refused (OBJECT_UNKNOWN), no objects
                if self.reads % 2:
                    writer.write(frames_of(bytes((0xC0 | seq, 129, 0, 0x02))))
                else:
                    writer.write(good)
            case "duplicates":  # two events of one point in one 0x28 header: the later wins
                apdu = bytes((0xC0 | seq, 129, 0, 0, 32, 1, 0x28, 2, 0)) + event(7) + event(8)
                writer.write(frames_of(apdu))
            case "unsolicited_first":  # a null one, one with an event, then the answer
                writer.write(frames_of(UNSOLICITED) + frames_of(UNSOLICITED_EVENT) + good)
            case "slow_loris":  # the healthy answer, a byte every quarter second
                for byte in good:
                    writer.write(bytes((byte,)))
                    await writer.drain()
                    await asyncio.sleep(0.25)
        await writer.drain()


CASES = {  # behaviour → words the session_down error must contain
    "bad_crc": "CRC",
    "wrong_source": "not from outstation 1024",
    "wrong_seq": "sequence",
    "oversized": "2048",
    "never_final": "did not finish",
    "link_status_flood": "bytes while waiting",
    "unsolicited_flood": "bytes while waiting",
    "slow_loris": "no answer within",
    "unsolicited_trickle": "no answer within",
}


def signals(device: str, count: int = 1) -> list[Signal]:
    return [
        Signal(
            path=f"site/water/{device}/level_{i}",
            device=device,
            source=Dnp3Source(group=30, index=i),
        )
        for i in range(count)
    ]


def device(name: str, port: int, **changes: Any) -> Dnp3Device:
    settings: dict[str, Any] = {"poll_interval_s": 0.1, "timeout_s": 1.5, **changes}
    return Dnp3Device(
        name=name, host="127.0.0.1", port=port, outstation_address=OUTSTATION, **settings
    )


class Collector:
    def __init__(self) -> None:
        self.batches: list[tuple[float, list[Any]]] = []

    async def emit(self, samples: list[Any]) -> None:
        self.batches.append((time.monotonic(), samples))

    def last(self) -> Any:
        return self.batches[-1][1][0] if self.batches else None

    def scans_between(self, start: float, end: float) -> int:
        return sum(1 for at, _ in self.batches if start <= at <= end)

    def longest_gap(self, start: float, end: float) -> float:
        times = [start, *(at for at, _ in self.batches if start <= at <= end), end]
        return max(b - a for a, b in itertools.pairwise(times))


@asynccontextmanager
async def hostile() -> AsyncIterator[HostileOutstation]:
    async with HostileOutstation() as station:
        yield station


@pytest.mark.parametrize("behaviour", list(CASES))
async def test_a_hostile_outstation_costs_only_its_own_signals_and_the_connector_recovers(
    behaviour: str, dnp3_proxy: CountingProxy, events: list[dict[str, Any]]
) -> None:
    bad_device, good_device = Collector(), Collector()
    async with hostile() as station:
        evil = Dnp3Connector(device("evil", station.port), signals("evil"))
        good = Dnp3Connector(device("good", dnp3_proxy.port), signals("good", 3))
        async with running(evil.run(bad_device.emit), good.run(good_device.emit)):
            await eventually(lambda: bad_device.last() and bad_device.last().raw == HEALTHY)
            station.behaviour = behaviour
            started = time.monotonic()
            await eventually(lambda: any(e["event"] == "device_session_down" for e in events))
            assert bad_device.last().quality == "bad"
            assert bad_device.last().raw is None
            station.behaviour = "healthy"
            await eventually(lambda: bad_device.last().quality == "good", timeout=20)
            ended = time.monotonic()
    down = [e for e in events if e["event"] == "device_session_down"]
    assert [e["device"] for e in down] == ["evil"]
    assert CASES[behaviour] in down[0]["error"]
    assert all(e.get("device") != "good" or e["event"] != "device_session_down" for e in events)
    assert bad_device.last().raw == HEALTHY
    # Nothing from a hostile answer was taken as data.
    assert {s.raw for _, batch in bad_device.batches for s in batch} == {HEALTHY, None}
    # The good device kept scanning through the whole episode: a generous floor of its rate
    # (10 scans/s; a loaded machine may halve it) and never a silence of a hostile timeout
    # (1.5 s), which is what a flood that held the event loop would cost it.
    expected = (ended - started) / 0.1
    assert good_device.scans_between(started, ended) >= expected / 4
    assert good_device.longest_gap(started, ended) < 1.5


async def test_a_refused_event_poll_makes_the_kept_values_uncertain_not_fresh(
    events: list[dict[str, Any]],
) -> None:
    collector = Collector()
    async with hostile() as station:
        connector = Dnp3Connector(device("evil", station.port, read="events"), signals("evil"))
        async with running(connector.run(collector.emit)):
            await eventually(lambda: collector.last() and collector.last().quality == "good")
            station.behaviour = "refused"
            await eventually(lambda: collector.last().quality != "good")
            refused = collector.last()
            station.behaviour = "healthy"
            await eventually(lambda: collector.last().quality == "good")
    assert (refused.raw, refused.quality) == (HEALTHY, "uncertain")
    assert refused.reason == "the event poll was refused (OBJECT_UNKNOWN): changes not known"
    assert [e["indications"] for e in events if e["event"] == "device_read_refused"] == [
        ["OBJECT_UNKNOWN"]
    ]
    assert not [e for e in events if e["event"] == "device_session_down"]


async def test_duplicate_indexes_in_one_0x28_header_keep_the_later_event() -> None:
    collector = Collector()
    async with hostile() as station:
        connector = Dnp3Connector(device("evil", station.port, read="events"), signals("evil"))
        async with running(connector.run(collector.emit)):
            await eventually(lambda: collector.last() and collector.last().raw == HEALTHY)
            station.behaviour = "duplicates"
            await eventually(lambda: collector.last().raw != HEALTHY)
    assert (collector.last().raw, collector.last().quality) == (8, "good")
    assert {s.raw for _, batch in collector.batches for s in batch} <= {HEALTHY, 8}


async def test_a_null_unsolicited_response_is_confirmed_one_with_objects_never(
    events: list[dict[str, Any]],
) -> None:
    """`unsolicited: false`: the null one (seq 0) is confirmed, since the outstation holds its
    answers until then; the one carrying an event (seq 1) is not, nor is its value taken."""
    collector = Collector()
    async with hostile() as station:
        connector = Dnp3Connector(device("evil", station.port, read="events"), signals("evil"))
        async with running(connector.run(collector.emit)):
            await eventually(lambda: collector.last() and collector.last().raw == HEALTHY)
            station.behaviour = "unsolicited_first"
            await eventually(lambda: station.unsolicited_confirms[0] >= 1)
            scans = len(collector.batches)
            await eventually(lambda: len(collector.batches) >= scans + 3)
    assert station.unsolicited_confirms[1] == 0
    assert {s.raw for _, batch in collector.batches for s in batch} == {HEALTHY}
    ignored = [e for e in events if e["event"] == "device_unsolicited_ignored"]
    assert [e["seq"] for e in ignored] == [1]  # once per session, and not for the null one


async def test_a_restart_within_a_session_brings_the_integrity_poll_forward(
    events: list[dict[str, Any]],
) -> None:
    """DEVICE_RESTART turning on without a reconnect: the outstation's event buffer is gone."""
    collector = Collector()
    async with hostile() as station:
        connector = Dnp3Connector(device("evil", station.port, read="events"), signals("evil"))
        async with running(connector.run(collector.emit)):
            await eventually(lambda: len(collector.batches) >= 3)
            assert station.integrity_polls == 1  # at the start; the next one is due in an hour
            station.behaviour = "restarted"
            await eventually(lambda: station.integrity_polls == 2, timeout=5)
            scans = len(collector.batches)
            await eventually(lambda: len(collector.batches) >= scans + 5)
    assert station.integrity_polls == 2  # on the edge, not at every poll while it stays set
    reported = [e["indications"] for e in events if e["event"] == "device_status_reported"]
    assert reported == [["DEVICE_RESTART"]]


FLAPS = 30  # answers of a flapping outstation: 3 s at its poll of 0.1 s


async def test_indications_toggled_at_every_answer_are_not_reported_at_the_poll_rate(
    events: list[dict[str, Any]],
) -> None:
    """Hysteresis: a set of indications is reported once it has held for HOLD answers. One
    toggled at every answer is never reported; a lasting change still is, once."""
    collector = Collector()
    async with hostile() as station:
        connector = Dnp3Connector(device("evil", station.port), signals("evil"))
        async with running(connector.run(collector.emit)):
            await eventually(lambda: collector.last() and collector.last().raw == HEALTHY)
            station.behaviour = "iin_toggle"
            reads = station.reads
            await eventually(lambda: station.reads >= reads + FLAPS, timeout=30)
            flapping = [e for e in events if e["event"] == "device_status_reported"]
            station.behaviour = "restarted"
            await eventually(lambda: any(e["event"] == "device_status_reported" for e in events))
            reads = station.reads
            await eventually(lambda: station.reads >= reads + 2 * Hysteresis.HOLD)
    assert flapping == []  # was one per answer: 30 here, 10 a second for ever
    reported = [e["indications"] for e in events if e["event"] == "device_status_reported"]
    assert reported == [["DEVICE_RESTART"]]
    # The values were judged at each answer all along: an indication is no value's quality.
    assert {s.quality for _, batch in collector.batches for s in batch} == {"good"}


async def test_a_read_refused_every_other_poll_is_told_once_and_its_recovery_once(
    events: list[dict[str, Any]],
) -> None:
    collector = Collector()
    async with hostile() as station:
        connector = Dnp3Connector(device("evil", station.port), signals("evil"))
        async with running(connector.run(collector.emit)):
            await eventually(lambda: collector.last() and collector.last().raw == HEALTHY)
            station.behaviour = "refuse_toggle"
            flapping_from = len(collector.batches)
            reads = station.reads
            await eventually(lambda: station.reads >= reads + FLAPS, timeout=30)
            flapping = [e["event"] for e in events if e["event"].startswith("device_read_")]
            flapped = collector.batches[flapping_from:]
            station.behaviour = "healthy"
            await eventually(lambda: any(e["event"] == "device_read_recovered" for e in events))
    assert flapping == ["device_read_refused"]  # was a refusal and a recovery per two polls
    told = [e["event"] for e in events if e["event"].startswith("device_read_")]
    assert told == ["device_read_refused", "device_read_recovered"]
    # Quality is not delayed: each answer's values are judged as it comes.
    assert {s.quality for _, batch in flapped for s in batch} == {"good", "bad"}
    assert connector.errors == 1  # one refusal told; the session never dropped
