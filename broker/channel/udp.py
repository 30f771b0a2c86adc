"""The diode channel (ADR 0019): the spool carried over UDP through a hardware data diode.

`DiodeSender` (OT host) reads the plant's spool as a reader of its own and sends datagrams
(broker.channel.datagrams) at a bounded rate, each `copies` times, with heartbeats and a
periodic resync of the latest record of every signal. It never writes the spool, never
reads from its socket (which is never connected, so not even an ICMP error reaches it), and
never learns whether anything arrived: nothing flows back.

`DiodeReceiver` (IT host) binds the receiver's address and never sends a packet. It checks
every datagram, drops duplicates, puts reordered ones back in order (broker.channel.sequence),
reports every lost datagram range once (audit `diode_gap_detected`, `diode.prom`), and writes
what crossed into its own spool with the plant's seq (`SpoolSender.forward`), resync records
as b"DR" frames, audit checkpoints as b"DA" frames: the enterprise half reads it as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import structlog

from broker.channel import datagrams as dg
from broker.channel import diode_metrics
from broker.channel.sequence import Lost, Reorder
from broker.channel.spool import MAGIC as SPOOL_RECORDS
from broker.channel.spool import (
    SpoolReceiver,
    SpoolSender,
    parse_frames,
    segment_numbers,
    segment_path,
)
from broker.config import DiodeConfig, SpoolConfig
from broker.errors import ChannelError, ConfigError
from broker.metrics import DIODE_FILE
from broker.records import Record, decode_frame_payload
from broker.safe_files import replace_durably

READER = "diode"  # the sender's position file in diode.state_dir: spool-position-diode.json
SENDER_METRICS = "diode-send.prom"  # in diode.state_dir, for a local textfile collector
RECEIVER_METRICS = DIODE_FILE  # in the IT host's spool dir: part of the enterprise /metrics
RECEIVER_STATE = "diode-receiver.json"  # the session and the next datagram seq expected
READ_RECORDS = 2000  # records read from the spool per round
POLL_S = 0.005  # an idle sender looks at the spool this often
BURST_S = 0.02  # the token bucket holds this long's worth of datagrams
COMMIT_S = 0.2  # the sender saves its spool position at most this often
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
SOCKET_BUFFER = 8 * 1024 * 1024  # bytes, the receiver's: bursts at the full rate
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python does not name it

log = structlog.get_logger("diode")


def _address(diode: DiodeConfig) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    try:
        infos = socket.getaddrinfo(diode.host, diode.port, type=socket.SOCK_DGRAM)
    except OSError as e:
        raise ConfigError(f"diode.host: cannot resolve {diode.host!r}: {e}") from e
    family, _, _, _, address = infos[0]
    return family, address


def enlarge_receive_buffer(sock: socket.socket) -> None:
    """SOCKET_BUFFER to absorb bursts: past net.core.rmem_max only with CAP_NET_ADMIN
    (SO_RCVBUFFORCE); otherwise as much as rmem_max allows (docs/deployment.md)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


def latest_in_spool(directory: Path, upto_seq: int) -> dict[str, Record]:
    """The latest record of every signal in the spool's retained segments, up to a seq:
    what a restarted sender resyncs besides what it reads from then on. Reads files only,
    in a worker thread; a segment expired meanwhile is skipped."""
    latest: dict[str, Record] = {}
    for number in segment_numbers(directory):
        try:
            data = segment_path(directory, number).read_bytes()
        except FileNotFoundError:
            continue
        frames, _, _ = parse_frames(data)
        for kind, payload in frames:
            if kind != SPOOL_RECORDS:
                continue
            with contextlib.suppress(msgspec.DecodeError):
                for record in decode_frame_payload(payload):
                    if record.seq > upto_seq:
                        return latest
                    latest[record.signal] = record
    return latest


class DiodeSender:
    def __init__(self, spool: SpoolConfig, diode: DiodeConfig) -> None:
        self._cfg = diode
        self._family, self._target = _address(self._cfg)
        self.session = secrets.randbits(63) + 1  # never 0
        self._framer = dg.Framer(self.session, self._cfg.datagram_bytes)
        self._spool_dir = spool.dir
        self._spool = SpoolReceiver(spool.dir, diode.state_dir, reader=READER)
        self._latest: dict[str, Record] = {}  # every signal's latest record seen
        # Pieces are numbered as they are sent, so the wire order is the seq order.
        self._live: deque[dg.Piece] = deque()
        self._resync: deque[Record] = deque()
        self._beat = False  # a heartbeat is due: it goes first
        self._tokens = 0.0
        self._capacity = max(float(self._cfg.copies), self._cfg.max_datagrams_s * BURST_S)
        self.sent = 0  # datagrams, copies included
        self.send_errors: Counter[str] = Counter()
        self.records_sent = 0
        self.resync_records = 0
        self.resync_deferred = 0  # rounds not started: the previous one was still queued
        self.last_record_seq = self._spool.last_seq  # of the last record sent

    async def run(self) -> None:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        # What was read before this start (a restart) is resynced too (ADR 0019).
        seed = asyncio.ensure_future(
            asyncio.to_thread(latest_in_spool, self._spool_dir, self.last_record_seq)
        )
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # it never reads
            log.info(
                "diode_session_started",
                session=f"{self.session:016x}",
                target=f"{self._cfg.host}:{self._cfg.port}",
                copies=self._cfg.copies,
                max_datagrams_s=self._cfg.max_datagrams_s,
                resume_after_seq=self.last_record_seq,
            )
            await self._loop(sock, seed)
        finally:
            seed.cancel()
            sock.close()
            self._spool.close()

    async def _loop(self, sock: socket.socket, seed: asyncio.Future[dict[str, Record]]) -> None:
        now = time.monotonic()
        last_refill = last_commit = now
        next_heartbeat = now
        next_resync = now + self._cfg.resync_s
        uncommitted = False
        seeding = True
        while True:
            now = time.monotonic()
            self._tokens = min(
                self._capacity,
                self._tokens + (now - last_refill) * self._cfg.max_datagrams_s,
            )
            last_refill = now
            if seeding and seed.done():
                seeding = False
                self._seed(seed.result())
            if now >= next_heartbeat:
                next_heartbeat = now + self._cfg.heartbeat_s
                self._beat = True
                self._write_metrics()
            if now >= next_resync:
                next_resync = now + self._cfg.resync_s
                self._start_resync()
            if not self._live:
                uncommitted |= self._read()
            if uncommitted and not self._live and now - last_commit >= COMMIT_S:
                self._spool.commit()  # all it read has been sent
                uncommitted, last_commit = False, now
            self._send(sock)
            if self._tokens < self._cfg.copies:
                await asyncio.sleep((self._cfg.copies - self._tokens) / self._cfg.max_datagrams_s)
            elif not self._live and not self._resync:
                await asyncio.sleep(POLL_S)
            else:
                await asyncio.sleep(0)

    def _seed(self, latest: dict[str, Record]) -> None:
        for signal, record in latest.items():  # what was read since the start is newer
            self._latest.setdefault(signal, record)

    def _start_resync(self) -> None:
        if self._resync:  # never two rounds queued: the queue stays one record per signal
            self.resync_deferred += 1
        else:
            self._resync.extend(self._latest.values())

    def _read(self) -> bool:
        checkpoints: list[bytes] = []
        records = self._spool.receive(READ_RECORDS, checkpoints=checkpoints)
        if records:
            self._live.extend(self._framer.pieces(records))
            for record in records:
                self._latest[record.signal] = record
            self.records_sent += len(records)
        for entry in checkpoints:
            self._live.extend(self._framer.checkpoint_pieces(entry))
        return bool(records or checkpoints)

    def _send(self, sock: socket.socket) -> None:
        """Number and send what the tokens allow, each datagram `copies` times: the copies
        of a burst go after the whole burst, so that one burst of loss does not take all of
        them. A heartbeat goes first; a message's fragments are never split across bursts."""
        copies = self._cfg.copies
        room = int(self._tokens // copies)
        if room <= 0:
            return
        burst: list[bytes] = []
        if self._beat:
            self._beat = False
            burst.append(self._framer.heartbeat(self.last_record_seq, self.sent))
        # Resync takes at most half the room while live data waits, all of it otherwise.
        resync_room = (room - len(burst)) // 2 if self._live else room
        live_room = room - min(resync_room, len(self._resync))
        while self._live:
            piece = self._live[0]
            if len(burst) >= live_room and piece.part == 0:
                break
            self._live.popleft()
            burst.append(self._framer.number(piece))
            if piece.last_record_seq and piece.part == max(0, piece.parts - 1):
                self.last_record_seq = piece.last_record_seq
        if self._resync and len(burst) < room:
            take = [self._resync.popleft() for _ in range(min(len(self._resync), 64))]
            burst += [self._framer.number(p) for p in self._framer.pieces(take, dg.RESYNC)]
            self.resync_records += len(take)
        for _ in range(copies):
            for datagram in burst:
                self._tokens -= 1
                try:
                    sock.sendto(datagram, self._target)
                    self.sent += 1
                except OSError as e:  # a full buffer, an unreachable route: the datagram is lost
                    reason = type(e).__name__ if e.errno is None else str(e.errno)
                    if not self.send_errors[reason]:
                        log.warning("diode_send_failed", error=str(e))
                    self.send_errors[reason] += 1

    def _write_metrics(self) -> None:
        diode_metrics.write(self._cfg.state_dir / SENDER_METRICS, diode_metrics.SenderStats(self))


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
        family, address = _address(self._cfg)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            enlarge_receive_buffer(sock)
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
