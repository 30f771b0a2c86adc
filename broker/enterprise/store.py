"""Latest value of every signal, and fan-out of new records to stream subscribers and to
the outputs that listen (`listen`).

Staleness is decided here, when a record is served: a good or uncertain value older than
three poll intervals of its device is served as `stale`, so a stopped plant half or a
silent device can never leave a value looking fresh. A listener that raises is contained
here: it never ends the spool reader's step, nor keeps the records from anyone else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import NamedTuple

import msgspec
import structlog

from broker.enterprise.output_failures import OutputFailures
from broker.policy import Policy
from broker.policy.device_schema import STALE_AFTER_INTERVALS
from broker.records import QualityIssue, Record, to_json

LISTENER_QUIET_S = 60.0  # a listener's same failure is logged again after this long without one

log = structlog.get_logger("store")

Listener = Callable[[list[Record]], None]


class Event(NamedTuple):
    """A record and its Server-Sent Events frame."""

    record: Record
    frame: bytes
    resync: bool = False  # a diode's resync value: its seq is below the stream's, out of order


def sse_event(record: Record) -> bytes:
    """The record as one Server-Sent Event: `id` is its seq, `data` its JSON."""
    return b"id: %d\ndata: %s\n\n" % (record.seq, to_json(record))


def resync_event(record: Record) -> bytes:
    """A resync value as a Server-Sent Event without `id`: its seq is below records already
    sent, and an `id` would move the consumer's Last-Event-ID back (a resume would replay)."""
    return b"data: %s\n\n" % to_json(record)


class Subscription:
    """A bounded queue of records for one stream consumer.

    A consumer too slow to keep up is cut off (the stream ends after what was queued),
    never silently skipped over: it sees the end, reconnects, and can fill the gap from
    `/v1/snapshot`; every record's `seq` shows where the gap was.
    """

    def __init__(self, limit: int, identity: str, view: frozenset[str]) -> None:
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(limit)
        self.identity = identity
        self.view = view  # the signals this consumer may see; replaced when the policy changes
        self.overflowed = False
        self._closed = False

    def offer(self, events: Iterable[Event]) -> None:
        if self._closed:
            return
        view = self.view
        for event in events:
            if event.record.signal not in view:
                continue
            try:
                self._queue.put_nowait(event)
            except asyncio.QueueFull:
                self.overflowed = True
                self.close()
                return

    @property
    def closed(self) -> bool:
        """Ended: cut off (`overflowed`), or closed by the half (shutdown, audit failure)."""
        return self._closed

    def close(self) -> None:
        """End the stream after what is queued."""
        if not self._closed:
            self._closed = True
            # A full queue has a reader that will see `_closed` once it drains.
            if not self._queue.full():
                self._queue.put_nowait(None)

    async def next_batch(self, most: int = 512) -> list[Event] | None:
        """The next events (waits for at least one); None when the stream has ended."""
        if self._closed and self._queue.empty():
            return None
        first = await self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < most and not self._queue.empty():
            event = self._queue.get_nowait()
            if event is None:
                break
            batch.append(event)
        return batch


class Store:
    def __init__(self, policy: Policy, queue_limit: int, max_streams: int = 256) -> None:
        self._latest: dict[str, Record] = {}
        self._subscribers: set[Subscription] = set()
        self._listeners: list[tuple[Listener, OutputFailures]] = []
        self.last_seq = 0  # of the last record applied in spool order (resync records aside)
        self._queue_limit = queue_limit
        self.max_streams = max_streams
        self.use_policy(policy)

    def use_policy(self, policy: Policy) -> None:
        """Serve under `policy` from now on: signals it no longer names are forgotten."""
        interval = {d.name: d.poll_interval_s for d in policy.devices}
        slowest = max(interval.values())  # a derived signal follows its slowest input at most
        self._stale_after = {
            s.path: STALE_AFTER_INTERVALS * (interval[s.device] if s.device else slowest)
            for s in policy.signals
        }
        for signal in self._latest.keys() - self._stale_after.keys():
            del self._latest[signal]

    def apply(self, records: list[Record], *, resync: bool = False) -> None:
        # Records of signals the current policy does not name (written under an older one)
        # are not served.
        if records and not resync:
            self.last_seq = max(self.last_seq, records[-1].seq)
        records = [r for r in records if r.signal in self._stale_after]
        for record in records:
            self._latest[record.signal] = record
        for listener, failures in self._listeners:
            try:
                listener(records)
            except Exception as e:  # the listener's bug: the reader and the others go on
                failures.failed("store_listener", e)
        if not self._subscribers:
            return
        encode = resync_event if resync else sse_event
        events = [Event(r, encode(r), resync) for r in records]  # once, whatever the audience
        for subscription in list(self._subscribers):
            subscription.offer(events)
            if subscription.overflowed:
                self._subscribers.discard(subscription)
                log.warning(
                    "consumer_cut_off",
                    identity=subscription.identity,
                    reason="stream_queue_full",
                    limit=self._queue_limit,
                )

    def apply_resync(self, records: list[Record]) -> None:
        """Latest values sent again across a diode after loss (ADR 0019): each one is applied
        only if it is newer, by seq, than the signal's latest here; the spool's seq order
        does not hold for them."""
        newer = []
        for record in records:
            held = self._latest.get(record.signal)
            if held is None or record.seq > held.seq:
                newer.append(record)
        self.apply(newer, resync=True)

    def latest(self, signal: str, now: datetime) -> Record | None:
        record = self._latest.get(signal)
        return None if record is None else self._aged(record, now)

    def snapshot(self, now: datetime, view: frozenset[str]) -> list[Record]:
        return [self._aged(r, now) for r in self._latest.values() if r.signal in view]

    def listen(self, listener: Listener, name: str | None = None) -> None:
        """Call `listener` with the records of each `apply`, once they are the latest values
        (an output that mirrors latest values: it must not block, and coalesce on its own).
        What it raises is logged as `output_failed` (once per outage) under `name`, by
        default the `name` of the output whose method it is, and it is called again next
        time."""
        if name is None:
            owner = getattr(listener, "__self__", None)
            name = str(getattr(owner, "name", getattr(listener, "__qualname__", listener)))
        self._listeners.append((listener, OutputFailures(name, LISTENER_QUIET_S)))

    @property
    def subscriptions(self) -> frozenset[Subscription]:
        return frozenset(self._subscribers)

    def subscribe(self, identity: str, view: frozenset[str]) -> Subscription:
        subscription = Subscription(self._queue_limit, identity, view)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def close(self) -> None:
        """End every stream (shutdown)."""
        for subscription in self._subscribers:
            subscription.close()
        self._subscribers.clear()

    def _aged(self, record: Record, now: datetime) -> Record:
        if record.quality in ("good", "uncertain"):
            limit = self._stale_after[record.signal]
            # By broker_time, the appliance's own clock at the read: a device's source time
            # may be the value's last change (OPC UA) or come from a clock that is behind.
            age = (now - record.broker_time).total_seconds()
            if age > limit:
                why = QualityIssue(
                    check="stale", detail=f"no newer value for {age:.0f} s (limit {limit:g} s)"
                )
                context = msgspec.structs.replace(
                    record.context, quality_issues=[*record.context.quality_issues, why]
                )
                return msgspec.structs.replace(record, quality="stale", context=context)
        return record
