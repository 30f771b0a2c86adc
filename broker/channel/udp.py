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
from typing import Any

import msgspec
import structlog

from broker.channel import datagrams as dg
from broker.channel import diode_metrics
from broker.channel.sequence import Lost, Reorder
from broker.channel.spool import SpoolReceiver, SpoolSender
from broker.config import DiodeConfig, SpoolConfig
from broker.errors import ChannelError, ConfigError
from broker.metrics import DIODE_FILE
from broker.records import Record
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
CANDIDATE_DATAGRAMS = 4096  # a new session's datagrams held meanwhile
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


class DiodeSender:
    def __init__(self, spool: SpoolConfig, diode: DiodeConfig) -> None:
        self._cfg = diode
        self._family, self._target = _address(self._cfg)
        self.session = secrets.randbits(63) + 1  # never 0
        self._framer = dg.Framer(self.session, self._cfg.datagram_bytes)
        self._spool = SpoolReceiver(spool.dir, diode.state_dir, reader=READER)
        self._latest: dict[str, Record] = {}  # every signal's latest record seen
        self._live: deque[bytes] = deque()
        self._resync: deque[Record] = deque()
        self._tokens = 0.0
        self._capacity = max(float(self._cfg.copies), self._cfg.max_datagrams_s * BURST_S)
        self.sent = 0  # datagrams, copies included
        self.send_errors: Counter[str] = Counter()
        self.records_sent = 0
        self.resync_records = 0
        self.last_record_seq = self._spool.last_seq

    async def run(self) -> None:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
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
            await self._loop(sock)
        finally:
            sock.close()
            self._spool.close()

    async def _loop(self, sock: socket.socket) -> None:
        now = time.monotonic()
        last_refill = last_commit = now
        next_heartbeat = now
        next_resync = now + self._cfg.resync_s
        uncommitted = False
        while True:
            now = time.monotonic()
            self._tokens = min(
                self._capacity,
                self._tokens + (now - last_refill) * self._cfg.max_datagrams_s,
            )
            last_refill = now
            if now >= next_heartbeat:
                next_heartbeat = now + self._cfg.heartbeat_s
                beat = self._framer.heartbeat(self.last_record_seq, self.sent)
                self._live.appendleft(beat)  # ahead of data: the link's pulse
                self._write_metrics()
            if now >= next_resync:
                next_resync = now + self._cfg.resync_s
                self._resync.extend(self._latest.values())
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

    def _read(self) -> bool:
        checkpoints: list[bytes] = []
        records = self._spool.receive(READ_RECORDS, checkpoints=checkpoints)
        if records:
            self._live.extend(self._framer.records(records))
            for record in records:
                self._latest[record.signal] = record
            self.records_sent += len(records)
            self.last_record_seq = records[-1].seq
        for entry in checkpoints:
            self._live.extend(self._framer.checkpoint(entry))
        return bool(records or checkpoints)

    def _send(self, sock: socket.socket) -> None:
        """Send what the tokens allow, each datagram `copies` times: the copies of a burst
        go after the whole burst, so that one burst of loss does not take all of them."""
        copies = self._cfg.copies
        room = int(self._tokens // copies)
        if room <= 0:
            return
        # Resync takes at most half the room while live data waits, all of it otherwise.
        resync_room = room // 2 if self._live else room
        burst: list[bytes] = []
        while self._live and len(burst) < room - min(resync_room, len(self._resync)):
            burst.append(self._live.popleft())
        if self._resync and len(burst) < room:
            take = [self._resync.popleft() for _ in range(min(len(self._resync), 64))]
            made = self._framer.records(take, dg.RESYNC)
            self.resync_records += len(take)
            burst += made
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


class DiodeReceiver(asyncio.DatagramProtocol):
    def __init__(self, spool: SpoolConfig, diode: DiodeConfig) -> None:
        self._cfg = diode
        self._spool_dir = spool.dir
        self._state_file = diode.state_dir / RECEIVER_STATE
        self._spool = SpoolSender(
            spool.dir, spool.segment_mib * 1024 * 1024, spool.retention_mib * 1024 * 1024
        )
        self._session: int | None = None
        self._order: Reorder[dg.Datagram] = Reorder()
        try:
            self._cfg.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            saved = msgspec.json.decode(self._state_file.read_bytes(), type=_ReceiverState)
            self._session, self._order = saved.session, Reorder(saved.next)
        except FileNotFoundError:
            pass
        except (OSError, msgspec.DecodeError) as e:
            self._spool.close()
            raise ChannelError(f"{self._state_file}: unreadable diode state: {e}") from e
        self._last_heard = time.monotonic()
        self.listening = False  # bound to its address
        self._link_up = False
        self._alarmed = False
        # Other sessions' datagrams, held while the current one may have ended: since when.
        self._candidates: dict[int, tuple[float, list[dg.Datagram]]] = {}
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
        self.last_record_seq = 0  # announced by the last heartbeat
        self._gaps_to_report: list[Lost] = []

    # asyncio.DatagramProtocol: called for each datagram; never answers.
    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.monotonic()
        if len(data) > self._cfg.datagram_bytes:  # the sender never makes one this large
            self.refused["oversized"] += 1
            return
        try:
            datagram = dg.decode(data)
        except dg.DatagramError as e:
            self.refused[e.reason] += 1
            return
        if datagram.session != self._session:
            if not self._take_over(datagram, now):
                return
        else:
            self._last_heard = now
        self.received += 1
        if datagram.kind == dg.HEARTBEAT:
            assert isinstance(datagram.body, dg.Heartbeat)
            self.last_record_seq = datagram.body.last_record_seq
        self._order.offer(datagram.seq, datagram, now)

    def _take_over(self, datagram: dg.Datagram, now: float) -> bool:
        """A datagram of another session: adopted at once when there is no session, else
        held until the current one has been silent for TAKEOVER_INTERVALS heartbeats (a
        restarted sender), and refused if it is not (another sender, or a forgery)."""
        silent = now - self._last_heard
        if self._session is not None and silent < TAKEOVER_INTERVALS * self._cfg.heartbeat_s:
            if sum(len(h) for _, h in self._candidates.values()) >= CANDIDATE_DATAGRAMS:
                self.refused["session"] += 1
            else:
                self._candidates.setdefault(datagram.session, (now, []))[1].append(datagram)
            return False
        for item in self._order.end():
            self._deliver(item)
        previous = self._session
        self._session = datagram.session
        self.sessions += 1
        _, backlog = self._candidates.pop(datagram.session, (now, []))
        self._refuse_candidates(now, every=True)
        first = min(d.seq for d in [*backlog, datagram])
        self._order = Reorder()  # what the session sent before is lost, and reported
        log.warning(
            "diode_session_adopted",
            session=f"{datagram.session:016x}",
            previous=None if previous is None else f"{previous:016x}",
            first_seq=first,
            silent_s=round(silent, 3),
        )
        self._last_heard = now
        for held_datagram in backlog:
            self.received += 1
            self._order.offer(held_datagram.seq, held_datagram, now)
        return True

    def _refuse_candidates(self, now: float, *, every: bool = False) -> None:
        """Other sessions' datagrams held longer than a takeover while the current session
        kept talking: not a restarted sender; refused."""
        window = TAKEOVER_INTERVALS * self._cfg.heartbeat_s
        for session, (since, held) in list(self._candidates.items()):
            if every or (now - since >= window and now - self._last_heard < window):
                self.refused["session"] += len(held)
                del self._candidates[session]

    def _deliver(self, item: dg.Datagram | Lost) -> None:
        """One released item, in seq order, into what the next flush writes."""
        if isinstance(item, Lost):
            self.lost += item.datagrams
            self.gaps += 1
            self.recent.append(item)
            self._gaps_to_report.append(item)
            self._assembling.clear()  # a message missing a fragment never completes
            return
        kind, body = item.kind, item.body
        if isinstance(body, dg.Fragment):
            assembled = self._assemble(body)
            if assembled is None:
                return
            kind, body = assembled
        if kind == dg.RECORDS:
            assert isinstance(body, list)
            self._records += body
            for record in body:
                self._written[record.signal] = record.seq
        elif kind == dg.RESYNC:
            assert isinstance(body, list)
            for record in body:  # only what is newer than what was written fills a loss
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
                for item in self._order.release(now):
                    self._deliver(item)
                await self._flush()
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
            with contextlib.suppress(ChannelError):
                await self._flush()
            self._spool.close()

    async def _flush(self) -> None:
        records, resync, checkpoints = self._records, self._resync, self._checkpoints
        if records or resync or checkpoints:
            self._records, self._resync, self._checkpoints = [], [], []
            await asyncio.to_thread(self._spool.forward, records, resync, checkpoints)
            self.resync_written += len(resync)
            if self._session is not None:
                state = _ReceiverState(self._session, self._order.next)
                await asyncio.to_thread(
                    replace_durably, self._state_file, msgspec.json.encode(state)
                )
        gaps, self._gaps_to_report = self._gaps_to_report, []
        for start in range(0, len(gaps), GAPS_PER_EVENT):
            part = gaps[start : start + GAPS_PER_EVENT]
            log.error(
                "diode_gap_detected",
                session=f"{self._session or 0:016x}",
                first=part[0].first,
                last=part[-1].last,
                count=sum(g.datagrams for g in part),
                ranges=[[g.first, g.last] for g in part],
            )

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

    def _write_metrics(self) -> None:
        diode_metrics.write(self._spool_dir / RECEIVER_METRICS, diode_metrics.ReceiverStats(self))

    @property
    def link_up(self) -> bool:
        return self._link_up

    @property
    def duplicates(self) -> int:
        return self._order.duplicates
