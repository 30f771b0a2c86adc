"""Latest values, staleness at serving time, and bounded fan-out to stream consumers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
import structlog

from broker import policy
from broker.enterprise.store import Store
from broker.policy.device_schema import STALE_AFTER_INTERVALS
from broker.records import Context, Quality, Record
from tests.harness import DEMO_POLICY

ROOM = "coldstore/storage/cold-room-1/temperature"
DEMO = policy.load(DEMO_POLICY)
POLL_S = DEMO.devices[0].poll_interval_s
EVERYTHING = frozenset(s.path for s in DEMO.signals)
POWER = "coldstore/machine-room/compressor-1/motor_power"


def record(
    seq: int,
    quality: Quality = "good",
    age_s: float = 0.0,
    signal: str = ROOM,
    changed_s: float = 0.0,
) -> Record:
    """A record read `age_s` ago, of a value whose source time is `changed_s` older still."""
    read = datetime.now(UTC) - timedelta(seconds=age_s)
    return Record(
        signal=signal, value=-18.0, unit="degC", quality=quality,
        source_time=read - timedelta(seconds=changed_s), broker_time=read, policy_version=1,
        context=Context(), seq=seq,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("quality", "age_intervals", "served_as"),
    [
        ("good", STALE_AFTER_INTERVALS - 0.5, "good"),
        ("good", STALE_AFTER_INTERVALS + 0.5, "stale"),
        ("uncertain", STALE_AFTER_INTERVALS + 0.5, "stale"),
        ("bad", STALE_AFTER_INTERVALS + 0.5, "bad"),
    ],
)
def test_a_value_older_than_three_poll_intervals_is_served_stale(
    quality: Quality, age_intervals: float, served_as: str
) -> None:
    store = Store(DEMO, queue_limit=16)
    store.apply([record(1, quality, age_s=age_intervals * POLL_S)])
    now = datetime.now(UTC)
    latest = store.latest(ROOM, now)
    assert latest is not None and latest.quality == served_as
    assert [r.quality for r in store.snapshot(now, EVERYTHING)] == [served_as]
    says_why = [i.check for i in latest.context.quality_issues] == ["stale"]
    assert says_why == (served_as == "stale")


def test_a_value_read_just_now_is_fresh_however_old_its_source_time() -> None:
    """An OPC UA server may stamp a value with its last change; a device clock may be
    behind. Freshness is when the broker read it."""
    store = Store(DEMO, queue_limit=16)
    store.apply([record(1, changed_s=3600)])
    latest = store.latest(ROOM, datetime.now(UTC))
    assert latest is not None and latest.quality == "good"


def test_only_the_latest_record_of_a_signal_is_kept() -> None:
    store = Store(DEMO, queue_limit=16)
    store.apply([record(1), record(2)])
    store.apply([record(3)])
    assert [r.seq for r in store.snapshot(datetime.now(UTC), EVERYTHING)] == [3]


def test_a_resync_record_replaces_only_an_older_latest_value() -> None:
    """Behind a diode, a resync record's seq is below the spool position: it is applied only
    where it is newer than what the store holds (ADR 0019)."""
    store = Store(DEMO, queue_limit=16)
    store.apply([record(5), record(3, signal=POWER)])
    store.apply_resync([record(4), record(7, signal=POWER)])
    latest = {r.signal: r.seq for r in store.snapshot(datetime.now(UTC), EVERYTHING)}
    assert latest == {ROOM: 5, POWER: 7}
    store.apply_resync([record(2, signal="coldstore/machine-room/compressor-1/energy")])
    assert len(store.snapshot(datetime.now(UTC), EVERYTHING)) == 3  # none held yet: applied


async def test_subscribers_get_records_in_order_in_batches() -> None:
    store = Store(DEMO, queue_limit=16)
    subscription = store.subscribe("spiffe://t/c", EVERYTHING)
    store.apply([record(1), record(2)])
    store.apply([record(3)])
    batch = await asyncio.wait_for(subscription.next_batch(), 1)
    assert batch is not None and [e.record.seq for e in batch] == [1, 2, 3]


async def test_a_consumer_too_slow_for_its_queue_is_cut_off_after_what_was_queued() -> None:
    store = Store(DEMO, queue_limit=16)
    subscription = store.subscribe("spiffe://t/c", EVERYTHING)
    store.apply([record(seq) for seq in range(1, 21)])  # 20 records for a queue of 16
    assert subscription.overflowed and not store.subscriptions
    received = []
    for _ in range(5):  # bounded: the stream must end well before this
        batch = await asyncio.wait_for(subscription.next_batch(), 1)
        if batch is None:
            break
        received.extend(e.record.seq for e in batch)
    assert received == list(range(1, 17))  # no silent gap: a prefix, then the end


async def test_closing_the_store_ends_every_stream() -> None:
    store = Store(DEMO, queue_limit=16)
    subscription = store.subscribe("spiffe://t/c", EVERYTHING)
    store.close()
    assert await asyncio.wait_for(subscription.next_batch(), 1) is None


async def test_a_stream_carries_only_its_view_and_follows_a_new_view() -> None:
    store = Store(DEMO, queue_limit=16)
    subscription = store.subscribe("spiffe://t/c", frozenset({POWER}))
    store.apply([record(1), record(2, signal=POWER)])
    subscription.view = frozenset({ROOM})  # what a policy reload does
    store.apply([record(3), record(4, signal=POWER)])
    batch = await asyncio.wait_for(subscription.next_batch(), 1)
    assert batch is not None and [e.record.seq for e in batch] == [2, 3]


def test_the_snapshot_holds_only_the_view() -> None:
    store = Store(DEMO, queue_limit=16)
    store.apply([record(1), record(2, signal=POWER)])
    assert [r.signal for r in store.snapshot(datetime.now(UTC), frozenset({POWER}))] == [POWER]


def test_a_new_policy_forgets_signals_it_no_longer_names() -> None:
    store = Store(DEMO, queue_limit=16)
    store.apply([record(1), record(2, signal=POWER)])
    narrower = msgspec.structs.replace(DEMO, signals=[s for s in DEMO.signals if s.path != ROOM])
    store.use_policy(narrower)
    store.apply([record(3)])  # written under the old policy, read after the change
    assert [r.signal for r in store.snapshot(datetime.now(UTC), EVERYTHING)] == [POWER]


async def test_a_resync_record_goes_to_streams_without_an_id() -> None:
    """Its seq is below what the stream sent already: an `id:` would move the consumer's
    Last-Event-ID back, and its next resume would replay what it has."""
    store = Store(DEMO, queue_limit=16)
    subscription = store.subscribe("spiffe://t/c", EVERYTHING)
    store.apply([record(5), record(3, signal=POWER)])
    store.apply_resync([record(4, signal=POWER)])
    batch = await asyncio.wait_for(subscription.next_batch(), 1)
    assert batch is not None
    assert [(e.record.seq, e.resync) for e in batch] == [(5, False), (3, False), (4, True)]
    assert batch[0].frame.startswith(b"id: 5\ndata: {")
    assert batch[2].frame.startswith(b"data: {") and b"id:" not in batch[2].frame
    assert msgspec.json.decode(batch[2].frame[6:])["seq"] == 4  # the record still says it


class Mirror:
    """An output whose store listener has a bug."""

    name = "mirror"

    def __init__(self) -> None:
        self.calls = 0

    def received(self, records: list[Record]) -> None:
        self.calls += 1
        raise ValueError("mirror bug")


async def test_a_listener_that_raises_is_logged_once_and_the_others_still_get_every_record() -> (
    None
):
    store = Store(DEMO, queue_limit=16)
    mirror, others = Mirror(), Mirror()
    others.name = "other"
    got: list[int] = []
    store.listen(mirror.received)  # first: its failure must not keep the records from the rest
    store.listen(lambda records: got.extend(r.seq for r in records))
    store.listen(others.received)
    subscription = store.subscribe("spiffe://t/c", EVERYTHING)
    with structlog.testing.capture_logs() as logs:
        for seq in range(1, 4):
            store.apply([record(seq)])
    assert mirror.calls == 3 and others.calls == 3  # called again each time
    assert got == [1, 2, 3] and store.last_seq == 3
    assert [r.seq for r in store.snapshot(datetime.now(UTC), EVERYTHING)] == [3]
    batch = await asyncio.wait_for(subscription.next_batch(), 1)
    assert batch is not None and [e.record.seq for e in batch] == [1, 2, 3]
    failed = [(e["output"], e["stage"], e["error"]) for e in logs if e["event"] == "output_failed"]
    assert failed == [
        ("mirror", "store_listener", "ValueError: mirror bug"),
        ("other", "store_listener", "ValueError: mirror bug"),
    ]
