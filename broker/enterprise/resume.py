"""Resuming a `/v1/stream` from `Last-Event-ID`: the records a consumer missed, from the spool.

The stream subscribes to live records first and notes the store's last applied seq; this
replays what the consumer's view holds in (Last-Event-ID, that seq], read from the spool by a
reader that moves no position, then the live records follow. A range the spool no longer
holds is announced (`event: records-gone`) before the first record after it, never skipped
in silence.

A replay costs the half reading and decoding the spool, and any granted consumer can ask for
one from seq 0 on as many streams as it may open: replays run at most `MAX_REPLAYS` at once
and one per identity (the others wait, with keepalives), in steps of at most `STEP_RECORDS`
records with the event loop yielded between steps, so neither the spool reader nor other
consumers wait behind them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import hdrs, web

from broker.channel.spool_replay import Gone, SpoolReplay
from broker.enterprise.authz import Peer
from broker.enterprise.store import Subscription, sse_event
from broker.errors import ChannelError
from broker.records import to_json

MAX_REPLAYS = 4  # spool replays at once in the half, one per identity
STEP_RECORDS = 256  # records read and decoded between two yields of the event loop (a frame)
MAX_SEQ = 2**63 - 1  # a seq is a signed 64-bit integer wherever it is stored

log = structlog.get_logger("api")

Write = Callable[[bytes], Awaitable[None]]
Waiting = Callable[[], Awaitable[bool]]


def last_event_id(request: web.Request) -> int | None:
    """The seq in the request's `Last-Event-ID`, None without one; 400 if it is malformed."""
    values = request.headers.getall(hdrs.LAST_EVENT_ID, [])
    if not values:
        return None
    value = values[0]
    if len(values) > 1 or not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise web.HTTPBadRequest(
            reason="Last-Event-ID must be one record seq (decimal digits, as the id: of an "
            "event of this stream); send none to start from now"
        )
    seq = int(value)
    if seq > MAX_SEQ:
        raise web.HTTPBadRequest(reason=f"Last-Event-ID {seq} is above any seq ({MAX_SEQ})")
    return seq


def records_gone(gone: Gone) -> bytes:
    return b"event: records-gone\ndata: %s\n\n" % to_json(
        {"from_seq": gone.from_seq, "to_seq": gone.to_seq}
    )


def resume_refused(newest_seq: int) -> bytes:
    return b"event: resume-refused\ndata: %s\n\n" % to_json({"newest_seq": newest_seq})


class ReplaySlots:
    """At most `total` replays at once, and one per identity: a consumer that opens many
    resuming streams waits behind its own, not ahead of other consumers."""

    def __init__(self, total: int = MAX_REPLAYS) -> None:
        self.total = total
        self._busy: set[str] = set()
        self._changed = asyncio.Condition()
        self.most_busy = 0  # the most replays seen running at once

    @property
    def busy(self) -> int:
        return len(self._busy)

    async def acquire(self, identity: str, wait_s: float, waiting: Waiting) -> bool:
        """Take a slot for `identity`; `waiting()` is called every `wait_s` meanwhile, and
        when it answers False the wait ends without a slot (False)."""
        while True:
            try:
                async with asyncio.timeout(wait_s), self._changed:
                    await self._changed.wait_for(
                        lambda: len(self._busy) < self.total and identity not in self._busy
                    )
                    self._busy.add(identity)
                    self.most_busy = max(self.most_busy, len(self._busy))
                    return True
            except TimeoutError:
                if not await waiting():
                    return False

    async def release(self, identity: str) -> None:
        async with self._changed:
            self._busy.discard(identity)
            self._changed.notify_all()


def ended(subscription: Subscription) -> bool:
    """The half ended the stream (revoked, audit failure, shutdown); a stream cut off for
    falling behind live records still gets its replay, then what was queued."""
    return subscription.closed and not subscription.overflowed


async def resume(
    write: Write,
    spool_dir: Path,
    slots: ReplaySlots,
    subscription: Subscription,
    peer: Peer,
    *,
    after_seq: int,
    newest_seq: int,
    keepalive_s: float,
) -> bool:
    """Send what a stream that asked to resume after `after_seq` gets before its live records
    (those above `newest_seq`, the store's last applied seq when it subscribed). False when
    the replay did not finish: the stream must end there, since live records after it would
    hide a gap. What `write` raises (the consumer went away or stopped reading) and a
    cancellation go on to the caller, once the replay is logged as stopped short for it."""
    if after_seq > newest_seq:  # from another spool, or a consumer's mistake: say so
        await write(resume_refused(newest_seq))
        return True
    assert peer.identity is not None
    replay = _Replay(SpoolReplay(spool_dir, after_seq, newest_seq), subscription, peer)

    async def waiting() -> bool:
        if ended(subscription):
            return False
        await write(b": keepalive\n\n")
        return True

    try:
        if replay.spool.done:  # at the newest seq already: nothing to read
            pass
        elif not await slots.acquire(peer.identity, keepalive_s, waiting):
            replay.stopped = "stream_ended"
        else:
            try:
                await replay.run(write)
            finally:
                await slots.release(peer.identity)
    # The consumer's doing, never the spool's: not `stream_replay_failed`.
    except asyncio.CancelledError:  # the consumer went away, or the half stops
        replay.stopped = "cancelled"
        raise
    except ConnectionError:
        replay.stopped = "consumer_left"
        raise
    except TimeoutError:  # a write that waited too long: the stream is cut off
        replay.stopped = "not_reading"
        raise
    finally:
        replay.spool.close()
        replay.log()
    return replay.spool.done


class _Replay:
    """One stream's replay: the records of `subscription.view` from `spool`, each gone range
    announced before the record after it; how many were sent, and why it stopped short."""

    def __init__(self, spool: SpoolReplay, subscription: Subscription, peer: Peer) -> None:
        self.spool = spool
        self._subscription = subscription
        self._peer = peer
        self.sent = 0
        self.stopped: str | None = None  # why it did not finish, when it did not

    async def run(self, write: Write) -> None:
        """Until the replay is done, the half ends the stream, or the spool cannot be read."""
        spool, subscription, peer = self.spool, self._subscription, self._peer
        while not spool.done:
            if ended(subscription):
                self.stopped = "stream_ended"
                return
            view = subscription.view  # a policy reload narrows it at once
            try:
                steps = spool.read(STEP_RECORDS)
            except (ChannelError, OSError) as e:  # out of descriptors, an I/O error: retry later
                log.error("stream_replay_failed", identity=peer.identity, error=str(e))
                self.stopped = "spool_unreadable"
                return
            chunk, records = [], 0
            for step in steps:
                if isinstance(step, Gone):
                    log.warning(
                        "stream_records_gone",
                        **peer.described(),
                        after_seq=spool.after_seq,
                        from_seq=step.from_seq,
                        to_seq=step.to_seq,
                    )
                    chunk.append(records_gone(step))
                elif step.signal in view:
                    chunk.append(sse_event(step))
                    records += 1
            if chunk:
                await write(b"".join(chunk))
                self.sent += records
            await asyncio.sleep(0)  # a write into free buffer space does not yield

    def log(self) -> None:
        spool, complete = self.spool, self.spool.done
        log.info(
            "stream_resumed",
            **self._peer.described(),
            after_seq=spool.after_seq,
            up_to_seq=spool.up_to_seq,
            replayed=self.sent,
            complete=complete,
            **({} if complete else {"reason": self.stopped or "failed"}),
        )
