"""`/v1/stream` resumed with `Last-Event-ID`: what was missed is replayed from the spool, only
what the identity is granted, in order, then live; a range retention removed is announced.

In-process tests serve the real app over mutual TLS with a real spool (written by a real
SpoolSender, read into the store by a real SpoolReceiver); the 30-s disconnect runs a whole
`dmzbroker enterprise` process on a spool written under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import policy
from broker.audit.log import AuditLog
from broker.channel.spool import SpoolReceiver, SpoolSender, segment_numbers
from broker.channel.spool_replay import first_seq
from broker.config import ListenConfig
from broker.enterprise.api import REPLAYS, create_app
from broker.enterprise.authz import Authorization, Peer
from broker.enterprise.listener import listen
from broker.enterprise.resume import MAX_REPLAYS, ReplaySlots, resume
from broker.enterprise.store import Store, Subscription
from broker.metrics import EnterpriseMetrics
from broker.records import Context, Record
from broker.trust import tls
from tests.enterprise.test_run import enterprise_listening, exhaust, lowest_free_fd
from tests.harness import (
    CONSUMER_URI,
    DEMO_POLICY,
    ENERGY_URI,
    BrokerProcess,
    Owners,
    Pki,
    demo_policy,
    eventually,
    free_port,
    sign_policy,
    write_config,
)

DEMO = policy.load(DEMO_POLICY)
SIGNALS = sorted(s.path for s in DEMO.signals if s.lifecycle == "approved")
HISTORIAN_VIEW = Authorization(DEMO).view(CONSUMER_URI)  # every signal
ENERGY_VIEW = Authorization(DEMO).view(ENERGY_URI)  # 4 of them
UNLIMITED = 1 << 30


def records(count: int, value: float = 1.0) -> list[Record]:
    """`count` records, cycling through every signal of the demo policy."""
    now = datetime.now(UTC)
    context = Context(asset_state="running")
    return [
        Record(signal=SIGNALS[i % len(SIGNALS)], value=value, unit="", quality="good",
               source_time=now, broker_time=now, policy_version=DEMO.version, context=context)
        for i in range(count)
    ]  # fmt: skip


@dataclass
class Event:
    name: str  # "message" for a record
    id: int | None
    data: dict[str, Any]


@dataclass
class Reader:
    """The events of one stream, parsed as an EventSource does, read in a task."""

    response: aiohttp.ClientResponse
    events: list[Event] = field(default_factory=list)

    async def run(self) -> None:
        name, event_id, data = "message", None, b""
        async for raw in self.response.content:
            line = raw.rstrip(b"\n")
            if not line:
                if data:
                    self.events.append(Event(name, event_id, msgspec.json.decode(data)))
                name, event_id, data = "message", None, b""
            elif line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"id: "):
                event_id = int(line[4:])
            elif line.startswith(b"data: "):
                data = line[6:]

    def seqs(self) -> list[int]:
        return [e.data["seq"] for e in self.events if e.name == "message"]

    def others(self) -> list[Event]:
        return [e for e in self.events if e.name != "message"]


@contextlib.asynccontextmanager
async def stream(
    base: str, context: ssl.SSLContext, last_event_id: str | None = None
) -> AsyncIterator[Reader]:
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(base + "/v1/stream", ssl=context, headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        reader = Reader(response)
        task = asyncio.create_task(reader.run())
        try:
            yield reader
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def has(reader: Reader, count: int) -> bool:
    return len(reader.seqs()) >= count


def ends_with(reader: Reader, seq: int) -> bool:
    return reader.seqs()[-1:] == [seq]


async def read_until(reader: Reader, done: Callable[[Reader], bool], what: str) -> None:
    try:
        await eventually(partial(done, reader), timeout=120, interval=0.1)
    except AssertionError:
        pytest.fail(f"{what}: {len(reader.seqs())} records, last {reader.seqs()[-1:]}")


@dataclass
class Half:
    """The API app over mutual TLS, its store fed from a real spool as the half feeds it."""

    base: str
    pki: Pki
    store: Store
    sender: SpoolSender
    slots: ReplaySlots
    spool: Path

    def historian(self) -> ssl.SSLContext:
        return tls.client_context(self.pki.ca, self.pki.client_cert, self.pki.client_key)

    def energy(self) -> ssl.SSLContext:
        return tls.client_context(self.pki.ca, self.pki.energy_cert, self.pki.energy_key)

    async def send(self, batch: list[Record], **extra: Any) -> int:
        """Write to the spool and wait until the store has applied it; the last seq."""
        await asyncio.to_thread(self.sender.send, batch, **extra)  # its fsync off the loop
        last = self.sender.next_seq - 1
        await eventually(lambda: self.store.last_seq >= last)
        return last


async def feed(receiver: SpoolReceiver, store: Store) -> None:
    while True:
        resync: list[Record] = []
        got = receiver.receive(resync=resync)
        if got:
            store.apply(got)
        if resync:
            store.apply_resync(resync)
        await asyncio.sleep(0 if got else 0.005)


@pytest.fixture
async def half(pki: Pki, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Half]:
    retention = getattr(request, "param", UNLIMITED)
    store = Store(DEMO, queue_limit=20_000)
    audit = AuditLog(
        tmp_path / "audit", "enterprise", DEMO.deployment_id, Ed25519PrivateKey.generate()
    )
    metrics = EnterpriseMetrics(lambda: len(store.subscriptions), lambda: audit.failing)
    spool = tmp_path / "spool"
    sender = SpoolSender(spool, 64 * 1024, retention)
    app = create_app(store, Authorization(DEMO), audit, metrics, spool)
    runner = web.AppRunner(app)
    await runner.setup()
    context = tls.server_context(pki.server_cert, pki.server_key, pki.ca)
    # A hundred streams from one test, their handshakes in this loaded process: the header
    # deadline is not what these tests are about.
    limits = ListenConfig(max_connections_per_address=256, header_timeout_s=120)
    for tries in range(3, 0, -1):  # free_port() released it: another test may bind it first
        port = free_port()
        try:
            listener = await listen(runner, "127.0.0.1", port, context, limits=limits)
            break
        except OSError as e:
            if e.errno != errno.EADDRINUSE or tries == 1:
                raise
    receiver = SpoolReceiver(spool, tmp_path / "state")
    feeding = asyncio.create_task(feed(receiver, store))
    try:
        yield Half(f"https://localhost:{port}", pki, store, sender, app[REPLAYS], spool)
    finally:
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
        listener.close()
        store.close()
        await runner.cleanup()
        receiver.close()
        sender.close()
        audit.close()


async def test_a_resumed_stream_gets_what_it_missed_then_live_without_a_gap_or_a_repeat(
    half: Half,
) -> None:
    newest = await half.send(records(300))
    with structlog.testing.capture_logs() as logs:
        async with stream(half.base, half.historian(), "100") as reader:
            await eventually(lambda: len(reader.seqs()) == newest - 100)
            last = await half.send(records(50, value=2.0))
            await eventually(lambda: len(reader.seqs()) == last - 100)
    assert reader.seqs() == list(range(101, last + 1))
    assert [e.id for e in reader.events] == reader.seqs()  # the id: is the seq, as live
    assert reader.others() == []
    resumed = [e for e in logs if e["event"] == "stream_resumed"]
    assert len(resumed) == 1
    assert resumed[0]["identity"] == CONSUMER_URI
    assert (resumed[0]["after_seq"], resumed[0]["up_to_seq"]) == (100, newest)
    assert (resumed[0]["replayed"], resumed[0]["complete"]) == (newest - 100, True)


async def test_another_identitys_records_are_never_replayed(half: Half) -> None:
    await half.send(records(400))
    expected = [i + 1 for i in range(400) if SIGNALS[i % len(SIGNALS)] in ENERGY_VIEW]
    live = [401 + i for i, signal in enumerate(SIGNALS) if signal in ENERGY_VIEW]
    async with stream(half.base, half.energy(), "0") as reader:
        await eventually(lambda: len(reader.seqs()) == len(expected))
        await half.send(records(len(SIGNALS)))  # a live round marks the replay's end
        await eventually(lambda: len(reader.seqs()) == len(expected) + len(live))
    assert {e.data["signal"] for e in reader.events} == ENERGY_VIEW
    assert reader.seqs() == expected + live


async def test_checkpoint_and_resync_frames_are_never_replayed(half: Half) -> None:
    await half.send(records(20), checkpoints=[b'{"event":"audit_checkpoint"}'])
    resent = records(1, value=99.0)[0]
    resent.seq = 3
    half.sender.forward([], resync=[resent])  # as the diode receiver writes them
    newest = await half.send(records(20), checkpoints=[b"{}"])
    async with stream(half.base, half.historian(), "0") as reader:
        await eventually(lambda: len(reader.seqs()) == newest)
    assert reader.seqs() == list(range(1, newest + 1))
    assert 99.0 not in [e.data["value"] for e in reader.events]


@pytest.mark.parametrize("half", [200_000], indirect=True)
async def test_records_gone_to_retention_are_announced_before_the_first_one_held(
    half: Half,
) -> None:
    for _ in range(20):
        newest = await half.send(records(500))
    first_held = first_seq(half.spool, segment_numbers(half.spool)[0])
    assert first_held is not None and first_held > 51
    with structlog.testing.capture_logs() as logs:
        async with stream(half.base, half.historian(), "50") as reader:
            await eventually(lambda: reader.seqs()[-1:] == [newest])
    first = reader.events[0]
    assert (first.name, first.id) == ("records-gone", None)
    assert first.data == {"from_seq": 51, "to_seq": first_held - 1}
    assert reader.seqs() == list(range(first_held, newest + 1))
    assert len(reader.others()) == 1
    gone = [e for e in logs if e["event"] == "stream_records_gone"]
    assert [(e["identity"], e["from_seq"], e["to_seq"]) for e in gone] == [
        (CONSUMER_URI, 51, first_held - 1)
    ]


async def test_a_seq_above_the_newest_is_refused_with_the_newest_then_live(half: Half) -> None:
    newest = await half.send(records(10))
    async with stream(half.base, half.historian(), "5000") as reader:
        await eventually(lambda: reader.events)
        last = await half.send(records(5))
        await eventually(lambda: len(reader.seqs()) == 5)
    assert reader.events[0].name == "resume-refused"
    assert reader.events[0].data == {"newest_seq": newest}
    assert reader.seqs() == list(range(newest + 1, last + 1))


async def test_resuming_at_the_newest_seq_replays_nothing(half: Half) -> None:
    newest = await half.send(records(10))
    async with stream(half.base, half.historian(), str(newest)) as reader:
        await eventually(lambda: half.store.subscriptions)
        last = await half.send(records(3))
        await eventually(lambda: len(reader.seqs()) == 3)
    assert reader.seqs() == list(range(newest + 1, last + 1)) and reader.others() == []


@pytest.mark.parametrize(
    "value", ["abc", "-1", "+5", "1.5", "0x10", " ", "١٢", "9" * 20, "9223372036854775808"]
)
async def test_a_malformed_last_event_id_is_400_with_a_json_error(half: Half, value: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            half.base + "/v1/stream", ssl=half.historian(), headers={"Last-Event-ID": value}
        ) as response,
    ):
        assert response.status == 400
        body = await response.json()
    assert "Last-Event-ID" in body["error"]
    assert not half.store.subscriptions  # refused before a stream was opened


async def test_two_last_event_id_headers_are_400(half: Half) -> None:
    headers = [("Last-Event-ID", "1"), ("Last-Event-ID", "2")]
    async with (
        aiohttp.ClientSession() as session,
        session.get(half.base + "/v1/stream", ssl=half.historian(), headers=headers) as response,
    ):
        assert response.status == 400
        assert "Last-Event-ID" in (await response.json())["error"]


@dataclass
class Drain:
    """Reads one stream as fast as this process lets it, noting the records' seqs."""

    response: aiohttp.ClientResponse
    seqs: list[int] = field(default_factory=list)
    ended: bool = False  # the server ended the stream, or the connection broke

    async def run(self) -> None:
        try:
            async for line in self.response.content:
                if line.startswith(b"id: "):
                    self.seqs.append(int(line[4:]))
        except (aiohttp.ClientError, OSError):
            pass
        self.ended = True


async def forever() -> bool:
    return True


async def test_a_hundred_replays_from_zero_run_one_at_a_time_and_never_stall_a_live_consumer(
    half: Half,
) -> None:
    """An attacker with a granted certificate asks for everything, 100 times at once. Its
    replays run one at a time (one per identity), and another consumer's live records keep
    coming while they wait and while they run. Every replay its consumer read to the end is
    complete and in order; one whose consumer stopped reading (the clients share this
    loaded process) is logged as the consumer's doing, never as a spool failure. The worst
    event-loop stall is printed (it includes the clients' work)."""
    newest = await half.send(records(5000))
    stalls: list[float] = []

    async def ticker() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            stalls.append(time.perf_counter() - before - 0.001)

    async def live_round(round_: int) -> None:
        await half.send(records(len(SIGNALS)))
        await read_until(live, partial(has, count=round_ * len(ENERGY_VIEW)), "live")

    # As if a replay of the same identity were running: none of the 100 can start yet.
    assert await half.slots.acquire(CONSUMER_URI, 10, forever)
    ticking = asyncio.create_task(ticker())
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    opening = asyncio.Semaphore(10)  # handshakes ten at a time, not a hundred in one step

    with structlog.testing.capture_logs() as logs:

        def resumed() -> list[Any]:
            return [e for e in logs if e["event"] == "stream_resumed"]

        async with (
            aiohttp.ClientSession(timeout=timeout) as attacker,
            stream(half.base, half.energy()) as live,
        ):

            async def ask() -> aiohttp.ClientResponse:
                async with opening:
                    return await attacker.get(
                        half.base + "/v1/stream",
                        ssl=half.historian(),
                        headers={"Last-Event-ID": "0"},
                    )

            responses = await asyncio.gather(*(ask() for _ in range(100)))
            drains = [Drain(r) for r in responses]
            draining = [asyncio.create_task(d.run()) for d in drains]
            try:
                assert all(r.status == 200 for r in responses)
                for round_ in range(1, 4):  # while all 100 wait
                    await live_round(round_)
                assert resumed() == [] and half.slots.busy == 1
                stalls.clear()  # from here on: replays, not handshakes
                await half.slots.release(CONSUMER_URI)
                for round_ in range(4, 7):  # while they run
                    await live_round(round_)
                    assert half.slots.busy <= 1
                await eventually(lambda: len(resumed()) == 100, timeout=300, interval=0.2)
                # Each consumer has read its replay to the end, or its stream has ended.
                await eventually(
                    lambda: all(newest in d.seqs or d.ended for d in drains), timeout=120
                )
                worst = max(stalls)
            finally:
                for response in responses:
                    response.close()
                await asyncio.gather(*draining, return_exceptions=True)
                ticking.cancel()
    assert half.slots.most_busy == 1 < MAX_REPLAYS  # one identity: one replay at a time
    read_through = [d.seqs for d in drains if newest in d.seqs]
    for seqs in read_through:
        assert seqs[:newest] == list(range(1, newest + 1))  # everything, in order
        assert seqs == sorted(set(seqs))  # then live, nothing twice
    done = [e for e in resumed() if e["complete"]]
    assert len(done) >= len(read_through) >= 1
    assert all(e["replayed"] == newest for e in done)
    short = {e["reason"] for e in resumed() if not e["complete"]}
    assert short <= {"consumer_left", "not_reading", "cancelled"}  # never the spool's
    assert not [e for e in logs if e["event"] == "stream_replay_failed"]
    assert live.seqs() == sorted(live.seqs()) and len(live.seqs()) == 6 * len(ENERGY_VIEW)
    assert live.seqs()[0] > newest  # live only: it asked for no replay
    print(
        f"100 replays of {newest} records, {len(read_through)} read to the end: "
        f"worst loop stall {worst * 1e3:.1f} ms"
    )


async def test_replay_slots_allow_one_per_identity_and_a_total() -> None:
    slots = ReplaySlots(total=2)
    asked: list[str] = []

    async def keep_waiting() -> bool:
        asked.append("wait")
        return len(asked) < 3  # the stream ends after three keepalives

    async def forever() -> bool:
        return True

    assert await slots.acquire("a", 10, forever)
    assert not await slots.acquire("a", 0.01, keep_waiting)  # its own replay runs
    assert len(asked) == 3
    assert await slots.acquire("b", 10, forever)  # another identity is not held up by "a"
    third = asyncio.create_task(slots.acquire("c", 10, forever))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not third.done()  # two at once
    await slots.release("a")
    assert await third
    assert slots.busy == 2 and slots.most_busy == 2


async def resume_into(
    chunks: list[bytes], spool: Path, subscription: Subscription, close_at_first: bool = False
) -> bool:
    async def write(chunk: bytes) -> None:
        chunks.append(chunk)
        if close_at_first:
            subscription.close()  # as the half does when the audit log fails or it stops

    peer = Peer(CONSUMER_URI, serial="1f", remote="127.0.0.1")
    return await resume(
        write, spool, ReplaySlots(), subscription, peer, after_seq=0, newest_seq=2000,
        keepalive_s=15,
    )  # fmt: skip


async def test_a_replay_the_half_ends_is_not_followed_by_anything(half: Half) -> None:
    await half.send(records(2000))
    subscription = half.store.subscribe(CONSUMER_URI, HISTORIAN_VIEW)
    chunks: list[bytes] = []
    with structlog.testing.capture_logs() as logs:
        assert not await resume_into(chunks, half.spool, subscription, close_at_first=True)
    assert len(chunks) == 1 and chunks[0].count(b"id: ") < 2000
    resumed = [e for e in logs if e["event"] == "stream_resumed"]
    assert [(e["complete"], e["replayed"]) for e in resumed] == [(False, chunks[0].count(b"id: "))]


async def test_a_spool_that_cannot_be_read_ends_the_replay_with_an_error_not_a_gap(
    half: Half,
) -> None:
    """Out of file descriptors (the open-file limit lowered for a moment, as in test_run):
    the replay stops with one error line, and the stream must end there."""
    await half.send(records(2000))
    chunks: list[bytes] = []
    subscription = half.store.subscribe(CONSUMER_URI, HISTORIAN_VIEW)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    with structlog.testing.capture_logs() as logs:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd(), hard))
            exhaust(held)
            stopped_short = not await resume_into(chunks, half.spool, subscription)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for fd in held:
                os.close(fd)
    assert stopped_short and chunks == []
    failed = [e for e in logs if e["event"] == "stream_replay_failed"]
    assert len(failed) == 1 and "Too many open files" in failed[0]["error"]
    assert [e["complete"] for e in logs if e["event"] == "stream_resumed"] == [False]


def resumed_as(logs: list[Any]) -> list[tuple[bool, str | None, int]]:
    return [
        (e["complete"], e.get("reason"), e["replayed"])
        for e in logs
        if e["event"] == "stream_resumed"
    ]


HISTORIAN = Peer(CONSUMER_URI, serial="1f", remote="127.0.0.1")


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (ConnectionResetError("Cannot write to closing transport"), "consumer_left"),
        (BrokenPipeError(32, "Broken pipe"), "consumer_left"),
        (TimeoutError(), "not_reading"),  # the API's write timeout
    ],
)
async def test_a_consumer_that_goes_away_mid_replay_is_not_a_spool_failure(
    half: Half, fault: OSError, reason: str
) -> None:
    """What the write raises goes on to the stream (which ends quietly, or cuts the consumer
    off for not reading), and the replay is logged as stopped short by the consumer."""
    await half.send(records(2000))
    subscription = half.store.subscribe(CONSUMER_URI, HISTORIAN_VIEW)
    slots = ReplaySlots()
    chunks: list[bytes] = []

    async def write(chunk: bytes) -> None:
        if len(chunks) == 2:
            raise fault
        chunks.append(chunk)

    with structlog.testing.capture_logs() as logs, pytest.raises(type(fault)):
        await resume(write, half.spool, slots, subscription, HISTORIAN, after_seq=0,
                     newest_seq=2000, keepalive_s=15)  # fmt: skip
    sent = b"".join(chunks).count(b"id: ")
    assert resumed_as(logs) == [(False, reason, sent)] and 0 < sent < 2000
    assert not [e for e in logs if e["event"] == "stream_replay_failed"]
    assert slots.busy == 0  # its slot is free for the next


async def test_a_consumer_that_goes_away_while_its_replay_waits_is_logged_as_such(
    half: Half,
) -> None:
    await half.send(records(100))
    subscription = half.store.subscribe(CONSUMER_URI, HISTORIAN_VIEW)
    slots = ReplaySlots()
    assert await slots.acquire(CONSUMER_URI, 10, forever)  # its identity's replay runs

    async def write(chunk: bytes) -> None:
        raise ConnectionResetError("Cannot write to closing transport")  # at the keepalive

    with structlog.testing.capture_logs() as logs, pytest.raises(ConnectionResetError):
        await resume(write, half.spool, slots, subscription, HISTORIAN, after_seq=0,
                     newest_seq=100, keepalive_s=0.01)  # fmt: skip
    assert resumed_as(logs) == [(False, "consumer_left", 0)]
    assert slots.busy == 1  # the other replay's slot, untouched


async def test_a_replay_whose_stream_is_cancelled_is_logged_as_cancelled_and_frees_its_slot(
    half: Half,
) -> None:
    """A cancelled handler (the half stopping, or aiohttp ending a request whose consumer
    went away) mid-replay: logged as such, never as a spool failure."""
    await half.send(records(2000))
    subscription = half.store.subscribe(CONSUMER_URI, HISTORIAN_VIEW)
    slots = ReplaySlots()
    chunks: list[bytes] = []
    never = asyncio.Event()

    async def write(chunk: bytes) -> None:
        chunks.append(chunk)
        await never.wait()  # a consumer that takes nothing more

    with structlog.testing.capture_logs() as logs:
        resuming = resume(write, half.spool, slots, subscription, HISTORIAN, after_seq=0,
                          newest_seq=2000, keepalive_s=15)  # fmt: skip
        replaying = asyncio.create_task(resuming)
        await eventually(lambda: chunks)
        replaying.cancel()
        await asyncio.gather(replaying, return_exceptions=True)
    assert replaying.cancelled()
    assert resumed_as(logs) == [(False, "cancelled", 0)]  # the chunk it was writing: not sent
    assert not [e for e in logs if e["event"] == "stream_replay_failed"]
    assert slots.busy == 0


def record_of(signal: str, seq: int, value: float = 1.0) -> Record:
    record = records(1, value)[0]
    record.signal, record.seq = signal, seq
    return record


async def test_resync_values_go_out_live_without_an_id_also_just_after_a_replay(
    half: Half,
) -> None:
    """Behind a diode, latest values lost on the way are sent again (resync, ADR 0019) with
    their own, lower seq. On a resumed stream one comes after the replay and before the first
    live record above it: it is not dropped as a repeat, and carries no `id:` (which would
    move the consumer's Last-Event-ID back, and its next resume would replay again)."""
    rare, others = SIGNALS[0], SIGNALS[1:]
    newest = await half.send(records(len(SIGNALS)))  # every signal once
    lost = range(newest + 1, newest + 41)  # on the diode, rare's last value among them
    after = [record_of(signal, lost[-1] + 1 + i) for i, signal in enumerate(others)]
    half.sender.forward(after)
    replay_end = after[-1].seq
    await eventually(lambda: half.store.last_seq == replay_end)
    async with stream(half.base, half.historian(), str(newest)) as reader:
        await eventually(lambda: reader.seqs()[-1:] == [replay_end])
        resent = record_of(rare, lost[20], value=99.0)
        half.sender.forward([], resync=[resent])  # as the diode receiver writes them
        await eventually(lambda: half.store.latest(rare, datetime.now(UTC)) == resent)
        last = await half.send(records(len(SIGNALS)))
        await eventually(lambda: reader.seqs()[-1:] == [last])
    gone, *replayed = reader.events[: 1 + len(after)]
    assert (gone.name, gone.data) == ("records-gone", {"from_seq": lost[0], "to_seq": lost[-1]})
    assert [e.id for e in replayed] == [r.seq for r in after]
    resync, *live = reader.events[1 + len(after) :]
    assert (resync.name, resync.id, resync.data["seq"], resync.data["value"]) == (
        "message", None, lost[20], 99.0
    )  # fmt: skip
    assert [e.id for e in live] == list(range(replay_end + 1, last + 1))


# --- a whole enterprise half, 30 s without its consumer, under load -------------------------


class Plant(threading.Thread):
    """Writes records to the spool at a steady rate, as the plant half does, until stopped."""

    def __init__(self, spool: Path, per_s: int) -> None:
        super().__init__(daemon=True)
        self.sender = SpoolSender(spool, 1 << 20, UNLIMITED)
        # Whole rounds of the signals, so record seq N is of SIGNALS[(N - 1) % len(SIGNALS)].
        self.per_batch = len(SIGNALS) * max(1, per_s // 20 // len(SIGNALS))
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.wait(0.05):
                self.sender.send(records(self.per_batch))
        except BaseException as e:  # reported by the test
            self.error = e

    def stop(self) -> int:
        """The seq of the last record written (stops once; then only answers)."""
        if not self.stopping.is_set():
            self.stopping.set()
            self.join(timeout=30)
            self.sender.close()
        if self.error is not None:
            raise self.error
        return self.sender.next_seq - 1


async def test_a_consumer_away_for_30_s_under_load_resumes_with_nothing_missing_or_out_of_order(
    tmp_path: Path, pki: Pki, owners: Owners, start_broker: Callable[..., BrokerProcess]
) -> None:
    envelope = sign_policy(tmp_path, demo_policy(free_port()), [owners.ot_key, owners.it_key])
    config = write_config(tmp_path, envelope, pki, free_port(), owners)
    plant = Plant(tmp_path / "spool", per_s=2000)
    plant.start()
    try:
        half, port = await enterprise_listening(start_broker, config)
        base = f"https://localhost:{port}"

        async def serving() -> bool:
            try:
                async with stream(
                    base, tls.client_context(pki.ca, pki.client_cert, pki.client_key)
                ):
                    return True
            except (OSError, ssl.SSLError, aiohttp.ClientError, AssertionError):
                return False

        await eventually(serving, timeout=60, interval=0.2)
        consumers = {
            CONSUMER_URI: tls.client_context(pki.ca, pki.client_cert, pki.client_key),
            ENERGY_URI: tls.client_context(pki.ca, pki.energy_cert, pki.energy_key),
        }
        before: dict[str, Reader] = {}
        async with contextlib.AsyncExitStack() as first:
            for identity, context in consumers.items():
                before[identity] = await first.enter_async_context(stream(base, context))
            for identity, reader in before.items():
                await read_until(reader, partial(has, count=200), identity)
        away_from, written_before = time.monotonic(), plant.sender.next_seq
        await asyncio.sleep(30)  # the disconnect itself: the plant keeps writing meanwhile
        assert time.monotonic() - away_from >= 30
        written_away = range(written_before, plant.sender.next_seq)
        after: dict[str, Reader] = {}
        async with contextlib.AsyncExitStack() as second:
            for identity, context in consumers.items():
                last_id = str(before[identity].events[-1].id)
                after[identity] = await second.enter_async_context(stream(base, context, last_id))
            await asyncio.sleep(2)  # and live for a while
            last = plant.stop()
            granted = {CONSUMER_URI: HISTORIAN_VIEW, ENERGY_URI: ENERGY_VIEW}
            for identity, reader in after.items():
                last_granted = max(
                    i + 1 for i in range(last) if SIGNALS[i % len(SIGNALS)] in granted[identity]
                )
                await read_until(reader, partial(ends_with, seq=last_granted), identity)
    finally:
        plant.stop()
    for identity, view in granted.items():
        seen = before[identity].seqs() + after[identity].seqs()
        first_seen = seen[0]
        expected = [i + 1 for i in range(first_seen - 1, last) if SIGNALS[i % len(SIGNALS)] in view]
        assert seen == expected, identity  # nothing missing, nothing twice, in order
        assert not after[identity].others()
        signals = {e.data["signal"] for e in before[identity].events + after[identity].events}
        assert signals <= view
    assert len(written_away) > 15_000  # under load: at least 500 records/s while it was away
    assert set(written_away) <= set(after[CONSUMER_URI].seqs())  # replayed, all of them
    log = "\n".join(half.events())
    assert log.count('"stream_resumed"') >= 2 and "Traceback" not in log
