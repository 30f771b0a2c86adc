"""The diode's receiving end (ADR 0019), and the state it keeps across restarts; the sending
end is broker.channel.udp.

`DiodeReceiver` (IT host) binds the receiver's address and never sends a packet, not even
an answer to a malformed one. It checks every datagram, drops duplicates,
puts reordered ones back in order (broker.channel.sequence), reports every lost datagram
range once (audit `diode_gap_detected`, `diode.prom`), and writes what crossed into its own
spool with the plant's seq (`SpoolSender.forward`), resync records as b"DR" frames, audit
checkpoints as b"DA" frames: the enterprise half reads it as usual. Its state file holds
the session and the next datagram seq, so that a restart reports what it missed and never
what it had received.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgspec
import structlog

from broker.channel import datagrams as dg
from broker.channel import diode_metrics, udp_socket
from broker.channel.sequence import Lost, Reorder
from broker.channel.spool import SpoolSender
from broker.config import DiodeConfig, SpoolConfig
from broker.errors import ChannelError, ConfigError
from broker.metrics import DIODE_FILE
from broker.records import Record
from broker.safe_files import replace_durably

RECEIVER_METRICS = DIODE_FILE  # in the IT host's spool dir: part of the enterprise /metrics
RECEIVER_STATE = "diode-receiver.json"  # the session and the next datagram seq expected
FLUSH_S = 0.01  # the receiver writes its spool at least this often while datagrams come
TAKEOVER_INTERVALS = 2  # a new session is adopted after the current one is silent this long
CANDIDATE_BYTES = 64 * 1024 * 1024  # a new session's datagrams held meanwhile (3 s at 20,000/s)
JUMP_MARGIN = 65_536  # datagrams a seq may lead by, beyond the rate's bound (kernel buffers)
RECORD_JUMP = 1 << 32  # record seqs a datagram may skip past the IT spool's (retention loss)
AHEAD_BEATS = 10  # heartbeats in a row below the IT spool's seq before it is realigned
STATE_SAVE_S = 0.2  # the receiver saves a state only heartbeats moved at most this often
REFUSED_LOG_S = 10.0  # refused datagrams are logged (and audited) at most this often
RECENT_GAPS = 8  # gap ranges shown in diode.prom
GAPS_PER_EVENT = 64  # ranges per diode_gap_detected entry (all are reported)

log = structlog.get_logger("diode")


class _ReceiverState(msgspec.Struct):
    session: int
    next: int  # the datagram seq expected next
    saved_at: float = 0.0  # wall clock: bounds the seq a restarted receiver accepts
    offset: int = 0  # IT spool seq = plant seq + offset (diode_seq_realigned)


class _Held(NamedTuple):
    header: dg.Header
    data: bytes


class DiodeReceiver(asyncio.DatagramProtocol):
    def __init__(self, spool: SpoolConfig, diode: DiodeConfig) -> None:
        self._cfg = diode
        self._spool_dir = spool.dir
        self._state_file = diode.state_dir / RECEIVER_STATE
        self._spool = SpoolSender(
            spool.dir, spool.segment_mib * 1024 * 1024, spool.retention_mib * 1024 * 1024
        )
        now = time.monotonic()
        self._session: int | None = None
        self.seq_offset = 0  # added to the plant's record seqs (diode_seq_realigned)
        # Datagrams held as bytes (bounded in bytes, ADR 0019), parsed when released.
        self._order: Reorder[bytes] = Reorder()
        # When the session's highest seq last rose (bounds how far ahead a seq may be);
        # -inf: no bound (a first start).
        self._advanced_at = float("-inf")
        try:
            self._restore(now)
        except ChannelError:
            self._spool.close()
            raise
        self._saved: tuple[int | None, int, int] = (
            self._session,
            self._order.next,
            self.seq_offset,
        )
        self._saved_at = now
        self._last_heard = now
        self.listening = False  # bound to its address
        self._link_up = False
        self._alarmed = False
        # Other sessions' datagrams, held while the current one may have ended: since when.
        self._candidates: dict[int, tuple[float, list[_Held]]] = {}
        self._candidate_bytes = 0
        self._assembling: list[dg.Fragment] = []
        self._written: dict[str, int] = {}  # signal -> seq of the latest record written
        self._records: list[Record] = []
        self._resync: list[Record] = []
        self._checkpoints: list[bytes] = []
        self.received = 0  # valid datagrams, duplicates included
        self.refused: Counter[str] = Counter()
        self._refused_logged: Counter[str] = Counter()
        self.lost = 0
        self.gaps = 0
        self.recent: deque[Lost] = deque(maxlen=RECENT_GAPS)
        self.sessions = 0
        self.resync_written = 0
        self.records_lost = 0  # record seqs never written (lost datagrams, a session's tail)
        self.records_repeated = 0  # records at or below the IT spool's last seq, left out
        self._repeated_logged = 0
        self._records_reported = 0  # record seqs up to this one are written or reported
        self.last_record_seq = 0  # announced by the last heartbeat
        self._ahead_beats = 0  # heartbeats in a row announcing less than the IT spool holds
        self._gaps_to_report: list[Lost] = []
        self._record_gaps: list[Lost] = []
        self._tail: tuple[int, int] | None = None  # at which pending record a session ended

    def _restore(self, now: float) -> None:
        """The state saved by a previous run, if any."""
        try:
            self._cfg.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            saved = msgspec.json.decode(self._state_file.read_bytes(), type=_ReceiverState)
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError) as e:
            raise ChannelError(f"{self._state_file}: unreadable diode state: {e}") from e
        self._session, self._order = saved.session, Reorder(saved.next)
        self.seq_offset = saved.offset
        self._advanced_at = now - max(0.0, time.time() - saved.saved_at)

    # asyncio.DatagramProtocol: called for each datagram; never answers.
    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.monotonic()
        if len(data) > self._cfg.datagram_bytes:  # the sender never makes one this large
            self.refused["oversized"] += 1
            return
        try:
            header = dg.check(data)
        except dg.DatagramError as e:
            self.refused[e.reason] += 1
            return
        if header.session != self._session:
            self._take_over(_Held(header, data), now)
            return
        self._last_heard = now
        self._accept(_Held(header, data), now)

    def _accept(self, held: _Held, now: float) -> None:
        """A datagram of the current session into the order, unless its seq is further
        ahead than the sender can have counted since the highest seq rose: one forged
        datagram must not declare billions lost and turn what follows into duplicates."""
        seq = held.header.seq
        elapsed = now - self._advanced_at
        if seq > self._order.highest + JUMP_MARGIN + elapsed * self._cfg.max_datagrams_s:
            self.refused["seq_jump"] += 1
            return
        if held.header.kind == dg.HEARTBEAT:
            try:
                beat = dg.decode_body(dg.HEARTBEAT, held.data[dg.HEADER.size :])
            except dg.DatagramError as e:
                self.refused[e.reason] += 1
                return
            assert isinstance(beat, dg.Heartbeat)
            self._heard_beat(beat.last_record_seq)
        self.received += 1
        if seq > self._order.highest:
            self._advanced_at = now
        self._order.offer(seq, held.data, now, len(held.data))

    def _heard_beat(self, announced: int) -> None:
        """The plant's last record seq, as the sender announces it. Announced below what
        the IT spool holds, heartbeat after heartbeat, the IT spool is ahead of the plant:
        the plant's spool was reset, or a record was forged. The plant's seqs are then
        written with an offset (audited): the IT spool's seq never goes back (its readers
        rely on it), and what comes is written, not left out forever."""
        self.last_record_seq = announced
        if announced + self.seq_offset + 1 >= self._spool.next_seq:
            self._ahead_beats = 0
            return
        self._ahead_beats += 1
        if self._ahead_beats >= AHEAD_BEATS:
            self._ahead_beats = 0
            previous, self.seq_offset = self.seq_offset, self._spool.next_seq - 1 - announced
            log.error(
                "diode_seq_realigned",
                session=f"{self._session or 0:016x}",
                it_last_seq=self._spool.next_seq - 1,
                announced_seq=announced,
                offset=self.seq_offset,
                previous_offset=previous,
                cause="the plant's spool was reset, or a forged record crossed",
            )

    def _take_over(self, held: _Held, now: float) -> None:
        """A datagram of another session: adopted at once when there is no session, else
        held until the current one has been silent for TAKEOVER_INTERVALS heartbeats (a
        restarted sender), and refused if it is not (another sender, or a forgery)."""
        silent = now - self._last_heard
        session = held.header.session
        if self._session is not None and silent < TAKEOVER_INTERVALS * self._cfg.heartbeat_s:
            if self._candidate_bytes + len(held.data) > CANDIDATE_BYTES:
                self.refused["session"] += 1
            else:
                self._candidate_bytes += len(held.data)
                self._candidates.setdefault(session, (now, []))[1].append(held)
            return
        for item in self._order.end():
            self._deliver(item)
        # The old session's last word, and where its records end in what is pending.
        self._tail = (len(self._records), self.last_record_seq + self.seq_offset)
        previous = self._session
        self._session = session
        self.sessions += 1
        self._ahead_beats = 0
        _, backlog = self._candidates.pop(session, (now, []))
        self._candidate_bytes -= sum(len(h.data) for h in backlog)
        self._refuse_candidates(now, every=True)
        log.warning(
            "diode_session_adopted",
            session=f"{session:016x}",
            previous=None if previous is None else f"{previous:016x}",
            first_seq=min(h.header.seq for h in [*backlog, held]),
            silent_s=round(silent, 3),
        )
        # What the session sent before is lost, and reported; it started counting after
        # the previous session was last heard (or at any time, if there was none).
        self._order = Reorder()
        self._advanced_at = self._last_heard if previous is not None else float("-inf")
        self._last_heard = now
        for h in [*backlog, held]:
            self._accept(h, now)

    def _refuse_candidates(self, now: float, *, every: bool = False) -> None:
        """Other sessions' datagrams held longer than a takeover while the current session
        kept talking: not a restarted sender; refused."""
        window = TAKEOVER_INTERVALS * self._cfg.heartbeat_s
        for session, (since, held) in list(self._candidates.items()):
            if every or (now - since >= window and now - self._last_heard < window):
                self.refused["session"] += len(held)
                self._candidate_bytes -= sum(len(h.data) for h in held)
                del self._candidates[session]

    def _deliver(self, item: bytes | Lost) -> None:
        """One released item, in seq order, into what the next flush writes."""
        if isinstance(item, Lost):
            self.lost += item.datagrams
            self.gaps += 1
            self.recent.append(item)
            self._gaps_to_report.append(item)
            self._assembling.clear()  # a message missing a fragment never completes
            return
        kind = item[3]  # checked on arrival (dg.check)
        if kind == dg.HEARTBEAT:
            return  # read on arrival
        try:
            body = dg.decode_body(kind, item[dg.HEADER.size :])
        except dg.DatagramError as e:
            self.refused[e.reason] += 1
            return
        if isinstance(body, dg.Fragment):
            assembled = self._assemble(body)
            if assembled is None:
                return
            kind, body = assembled
        if kind == dg.RECORDS:
            assert isinstance(body, list)
            bound = max(self._spool.next_seq, self._records_reported) + RECORD_JUMP
            for record in body:
                record.seq += self.seq_offset
                if record.seq > bound:  # forged, or damaged past the CRC: never written
                    self.refused["record_seq"] += 1
                    continue
                self._records.append(record)
                self._written[record.signal] = record.seq
        elif kind == dg.RESYNC:
            assert isinstance(body, list)
            for record in body:  # only what is newer than what was written fills a loss
                record.seq += self.seq_offset
                if record.seq > self._written.get(record.signal, 0):
                    self._written[record.signal] = record.seq
                    self._resync.append(record)
        elif kind == dg.CHECKPOINT:
            assert isinstance(body, bytes)
            self._checkpoints.append(body)

    def _assemble(self, fragment: dg.Fragment) -> tuple[int, dg.Body] | None:
        if fragment.part == 0:
            self._assembling = [fragment]
        elif (
            self._assembling
            and self._assembling[0].message == fragment.message
            and len(self._assembling) == fragment.part
        ):
            self._assembling.append(fragment)
        else:
            self._assembling.clear()
            return None
        if len(self._assembling) < fragment.parts:
            return None
        payload = b"".join(f.chunk for f in self._assembling)
        self._assembling.clear()
        try:
            return fragment.kind, dg.decode_body(fragment.kind, payload)
        except dg.DatagramError as e:
            self.refused[e.reason] += 1
            return None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        family, address = udp_socket.address(self._cfg)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            udp_socket.enlarge_receive_buffer(sock)
            sock.bind(address)
        except OSError as e:
            sock.close()
            self._spool.close()
            raise ConfigError(
                f"diode: cannot bind {self._cfg.host}:{self._cfg.port}: {e.strerror}"
            ) from e
        transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
        self.listening = True
        log.info("diode_receiving", address=f"{self._cfg.host}:{self._cfg.port}")
        next_refused_log = next_metrics = time.monotonic()
        try:
            while True:
                await asyncio.sleep(FLUSH_S)
                now = time.monotonic()
                await self.step(now)
                self._check_link(now)
                self._refuse_candidates(now)
                if now >= next_metrics:
                    next_metrics = now + min(1.0, self._cfg.heartbeat_s)
                    self._write_metrics()
                if now >= next_refused_log:
                    next_refused_log = now + REFUSED_LOG_S
                    self._log_refused()
        finally:
            transport.close()
            with contextlib.suppress(ChannelError, OSError):
                await self.step(time.monotonic(), final=True)
            self._spool.close()

    async def step(self, now: float, *, final: bool = False) -> None:
        """Release what the order lets go, write it, report, and save the state (`final`:
        at once, the receiver stops)."""
        for item in self._order.release(now):
            self._deliver(item)
        wrote = await self._flush()
        await self._save(now, force=wrote or final)

    async def _flush(self) -> bool:
        """Write what was delivered and report gaps; True if anything was written."""
        records, resync, checkpoints = self._records, self._resync, self._checkpoints
        wrote = bool(records or resync or checkpoints)
        self._find_record_gaps(records)
        if wrote:
            self._records, self._resync, self._checkpoints = [], [], []
            repeated = await asyncio.to_thread(self._spool.forward, records, resync, checkpoints)
            self.records_repeated += repeated
            self.resync_written += len(resync)
        gaps, self._gaps_to_report = self._gaps_to_report, []
        for fields in self._ranges(gaps):
            log.error("diode_gap_detected", **fields)
        record_gaps, self._record_gaps = self._record_gaps, []
        for fields in self._ranges(record_gaps):
            log.error("diode_records_lost", **fields)
        return wrote

    def _find_record_gaps(self, records: list[Record]) -> None:
        """Record seqs that will never be written: skipped over by what is written now, or
        announced by a session that ended without them arriving (its tail lost). Each
        reported once; an empty IT spool starts wherever the first record is."""
        expected = max(self._spool.next_seq, self._records_reported + 1)
        tail_at, tail = self._tail if self._tail is not None else (-1, 0)
        self._tail = None
        for i, record in enumerate([*records, None]):
            if i == tail_at and tail >= expected > 1:
                self._record_gaps.append(Lost(expected, tail))
                expected = tail + 1
            if record is None or record.seq < expected:
                continue
            if record.seq > expected > 1:
                self._record_gaps.append(Lost(expected, record.seq - 1))
            expected = record.seq + 1
        self._records_reported = expected - 1
        self.records_lost += sum(g.datagrams for g in self._record_gaps)

    def _ranges(self, ranges: list[Lost]) -> Iterator[dict[str, Any]]:
        """The fields of one report per GAPS_PER_EVENT ranges (all are reported)."""
        for start in range(0, len(ranges), GAPS_PER_EVENT):
            part = ranges[start : start + GAPS_PER_EVENT]
            yield {
                "session": f"{self._session or 0:016x}",
                "first": part[0].first,
                "last": part[-1].last,
                "count": sum(g.datagrams for g in part),
                "ranges": [[g.first, g.last] for g in part],
            }

    async def _save(self, now: float, *, force: bool = False) -> None:
        """The session and the next seq, after every write and, when only heartbeats or
        a gap moved it, at most every STATE_SAVE_S: a restart reports what it missed,
        never what it had received."""
        state = (self._session, self._order.next, self.seq_offset)
        if self._session is None or state == self._saved:
            return
        if not force and now - self._saved_at < STATE_SAVE_S:
            return
        data = msgspec.json.encode(
            _ReceiverState(self._session, self._order.next, time.time(), self.seq_offset)
        )
        await asyncio.to_thread(replace_durably, self._state_file, data)
        self._saved, self._saved_at = state, now

    def _check_link(self, now: float) -> None:
        silent = now - self._last_heard
        limit = self._cfg.heartbeat_alarm_after * self._cfg.heartbeat_s
        if silent >= limit and not self._alarmed:
            self._alarmed, self._link_up = True, False
            log.error(
                "diode_heartbeat_missed",
                silent_s=round(silent, 3),
                intervals=self._cfg.heartbeat_alarm_after,
                session=None if self._session is None else f"{self._session:016x}",
            )
        elif silent < self._cfg.heartbeat_s * 1.5 and not self._link_up and self.received:
            self._link_up = True
            if self._alarmed:
                self._alarmed = False
                log.warning("diode_link_restored", session=f"{self._session or 0:016x}")

    def _log_refused(self) -> None:
        new = self.refused - self._refused_logged
        if new:
            self._refused_logged = self.refused.copy()
            log.warning("diode_datagrams_refused", **{f"by_{k}": v for k, v in sorted(new.items())})
        if self.records_repeated > self._repeated_logged:
            log.warning(
                "diode_records_repeated",
                count=self.records_repeated - self._repeated_logged,
                it_last_seq=self._spool.next_seq - 1,
            )
            self._repeated_logged = self.records_repeated

    def _write_metrics(self) -> None:
        diode_metrics.write(self._spool_dir / RECEIVER_METRICS, diode_metrics.ReceiverStats(self))

    @property
    def link_up(self) -> bool:
        return self._link_up

    @property
    def duplicates(self) -> int:
        return self._order.duplicates
