"""The diode's sending end (ADR 0019): the plant's spool carried over UDP through a hardware
data diode; the receiving end is broker.channel.udp_receiver.

`DiodeSender` (OT host) reads the plant's spool as a reader of its own and sends datagrams
(broker.channel.datagrams) at a bounded rate, each `copies` times, with heartbeats and a
periodic resync of the latest record of every signal. It never writes the spool, never
reads from its socket (which is never connected, so not even an ICMP error reaches it), and
never learns whether anything arrived: nothing flows back.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections import Counter, deque
from pathlib import Path

import msgspec
import structlog

from broker.channel import datagrams as dg
from broker.channel import diode_metrics, udp_socket
from broker.channel.spool import MAGIC as SPOOL_RECORDS
from broker.channel.spool import SpoolReceiver, parse_frames, segment_numbers, segment_path
from broker.config import DiodeConfig, SpoolConfig
from broker.records import Record, decode_frame_payload

READER = "diode"  # the sender's position file in diode.state_dir: spool-position-diode.json
SENDER_METRICS = "diode-send.prom"  # in diode.state_dir, for a local textfile collector
READ_RECORDS = 2000  # records read from the spool per round
POLL_S = 0.005  # an idle sender looks at the spool this often
BURST_S = 0.02  # the token bucket holds this long's worth of datagrams
COMMIT_S = 0.2  # the sender saves its spool position at most this often

log = structlog.get_logger("diode")


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
        self._family, self._target = udp_socket.address(self._cfg)
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
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, udp_socket.SOCKET_BUFFER)
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
