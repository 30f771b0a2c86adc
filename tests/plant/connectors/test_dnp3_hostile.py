"""The DNP3 connector against a hostile outstation: an asyncio server in the test whose
frames are built with the broker's codec (`dnp3_frames.encode_frame`), misbehaving on
purpose. Each misbehaviour must end in one clear `device_session_down`, the device's signals
`bad`, and a recovery once the outstation behaves; meanwhile a second, good device (the
opendnp3 outstation behind the counting proxy) keeps its scan rate."""

from __future__ import annotations

import asyncio
import collections
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from broker.plant.connectors.dnp3 import Dnp3Connector
from broker.plant.connectors.dnp3_frames import PRI_REQUEST_LINK_STATUS, PRM, encode_frame
from broker.plant.connectors.dnp3_objects import FUNCTIONS_SENT
from broker.policy import Dnp3Device, Dnp3Source, Signal
from tests.harness import eventually, running
from tests.plant.connectors.dnp3_outstation import FUNCTIONS, CountingProxy, link_frames

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


UNSOLICITED = bytes((0xF0, 130, 0, 0))  # FIR FIN CON UNS, seq 0, no objects


class HostileOutstation:
    """Answers each READ the way `behaviour` says; "healthy" answers it correctly."""

    def __init__(self) -> None:
        self.behaviour = "healthy"
        self.port = 0
        self.functions: collections.Counter[str] = collections.Counter()
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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            buffer = b""
            while chunk := await reader.read(4096):
                found, buffer = link_frames(buffer + chunk)
                for _, data in found:
                    if len(data) < 3:
                        continue
                    self.functions[FUNCTIONS.get(data[2], str(data[2]))] += 1
                    if data[2] != 1:
                        continue
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
    # The good device kept at least half its rate (10 scans/s) through the whole episode.
    expected = (ended - started) / 0.1
    assert good_device.scans_between(started, ended) >= expected / 2
