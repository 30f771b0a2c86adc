"""`/v1/stream` resumed with `Last-Event-ID`: what was missed is replayed from the spool, only
what the identity is granted, in order, then live; a range retention removed is announced.

In-process tests serve the real app over mutual TLS with a real spool (written by a real
SpoolSender, read into the store by a real SpoolReceiver); the 30-s disconnect runs a whole
`dmzbroker enterprise` process on a spool written under load.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from tests.enterprise.test_run import exhaust, lowest_free_fd
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
    port = free_port()
    context = tls.server_context(pki.server_cert, pki.server_key, pki.ca)
    limits = ListenConfig(max_connections_per_address=256)  # a hundred streams from one test
    listener = await listen(runner, "127.0.0.1", port, context, limits=limits)
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


async def test_a_hundred_replays_from_zero_run_one_at_a_time_and_never_stall_a_live_consumer(
    half: Half,
) -> None:
    """An attacker with a granted certificate asks for everything, 100 times at once. Its
    replays run one at a time (one per identity), each complete, and another consumer's live
    records keep coming meanwhile. The worst event-loop stall is printed (the clients share
    this process, so it includes their work)."""
    newest = await half.send(records(5000))
    stalls: list[float] = []

    async def ticker() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            stalls.append(time.perf_counter() - before - 0.001)

    async def drain(response: aiohttp.ClientResponse) -> None:
        while await response.content.readany():
            pass

    ticking = asyncio.create_task(ticker())
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    with structlog.testing.capture_logs() as logs:

        def resumed() -> list[Any]:
            return [e for e in logs if e["event"] == "stream_resumed"]

        async with (
            aiohttp.ClientSession(timeout=timeout) as attacker,
            stream(half.base, half.energy()) as live,
        ):
            asked = [
                attacker.get(
                    half.base + "/v1/stream", ssl=half.historian(), headers={"Last-Event-ID": "0"}
                )
                for _ in range(100)
            ]
            responses = await asyncio.gather(*asked)
            stalls.clear()  # from here on: replays, not 100 TLS handshakes
            draining = [asyncio.create_task(drain(r)) for r in responses]
            try:
                assert all(r.status == 200 for r in responses)
                for round_ in range(1, 4):  # live records, while the replays run
                    await half.send(records(len(SIGNALS)))
                    await read_until(live, partial(has, count=round_ * len(ENERGY_VIEW)), "live")
                    assert half.slots.busy <= 1
                replayed_meanwhile = len(resumed())
                await eventually(lambda: len(resumed()) == 100, timeout=300, interval=0.2)
                worst = max(stalls)
            finally:
                for response in responses:
                    response.close()
                await asyncio.gather(*draining, return_exceptions=True)
                ticking.cancel()
    assert half.slots.most_busy == 1 < MAX_REPLAYS  # one identity: one replay at a time
    assert replayed_meanwhile < 100  # the live records came before the attack was served
    assert all((e["replayed"], e["complete"]) == (newest, True) for e in resumed())
    assert live.seqs() == sorted(live.seqs()) and len(live.seqs()) == 3 * len(ENERGY_VIEW)
    assert live.seqs()[0] > newest  # live only: it asked for no replay
    print(f"100 replays of {newest} records: worst loop stall {worst * 1e3:.1f} ms")


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
    port = free_port()
    config = write_config(tmp_path, envelope, pki, port, owners)
    base = f"https://localhost:{port}"
    plant = Plant(tmp_path / "spool", per_s=2000)
    plant.start()
    try:
        half = start_broker("enterprise", config)

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
