"""TCP reassembly for passive discovery: the segments of a capture → each direction's bytes
in order, as a protocol reader needs them.

A flow is one direction of one TCP connection (src → dst). Its bytes are placed by sequence
number relative to the first one seen (the SYN's, or the first segment's when the capture
starts mid-connection), modulo 2^32, so wrap-around is invisible. Retransmitted and
overlapping bytes are dropped; a segment ahead of the next expected byte is held until the
hole fills, or until the other direction's ACK passes the hole: the peer acknowledged bytes
the capture never saw (Wireshark's "ACKed unseen segment"), so waiting is pointless and what
follows goes on at once, the next chunk saying `gap=True` (with a warning). Only holes before
bytes already held are given up that way, so a stray ACK far ahead cannot make a flow skip
what is still to come. A capture that reorders across directions (two taps merged) can show
an ACK before the bytes it acknowledges: those bytes come too late and are dropped.

Memory is bounded by a constant whatever the capture: at most `max_pending_bytes` held per
flow, counting each segment's bookkeeping too (SEGMENT_OVERHEAD, measured), so that many tiny
segments cost what they weigh (beyond, the first hole is given up, with a warning); at most `max_held_bytes` held by all
flows together (beyond, the flow that has waited longest since it last moved on gives up its
first hole, with a warning); at most `max_flows` flows (beyond, the least recently used is
dropped, with a warning). FIN (once its bytes are in) and RST free a flow; a bounded memory
of closed flows keeps their late retransmissions from starting a new one, and makes a new
connection on the same ports start with `gap=True`, so that a reader never joins its first
bytes to the old connection's leftovers. At the end of the file, `flush` hands on what is
still held in capture-time order across flows, so that a reader sees an answer after the
request it answers.

Frames are not this module's business: a Chunk is just bytes, and a reader resyncs on a gap.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

from broker.passive.capture import Packet
from broker.passive.observations import Peer, Warnings

SYN, FIN, RST, ACK = 0x02, 0x01, 0x04, 0x10
MISSING = "TCP segment missing (never captured, or too late)"  # a warning kind
# Bytes a held segment costs besides its data, measured with sys.getsizeof (test_streams):
# its heap entry (a 4-tuple, 72), the bytes object's header (33), two ints and a float
# (28-32 each) and the heap list's pointer (8): 197 with a position past 2^30.
SEGMENT_OVERHEAD = 200
_MOD = 1 << 32
_Key = tuple[str, int, str, int]  # a flow's src host, port, dst host, port (cheap to hash)
_HALF = 1 << 31


class Chunk(NamedTuple):
    """In-order bytes of one direction of one TCP connection (a NamedTuple: cheap to build)."""

    time: float
    src: Peer
    dst: Peer
    data: bytes
    gap: bool  # bytes are missing before `data` (lost, or given up on): the parser resyncs


def _ahead(seq: int, base: int) -> int:
    """How far `seq` is after `base` in sequence space (negative: before), mod 2^32."""
    return (seq - base + _HALF) % _MOD - _HALF


@dataclass(slots=True)
class _Flow:
    """One direction. Positions are offsets in its byte stream (unbounded ints, so the heap
    orders across a wrap); `seq` is the sequence number of `position`, the next byte due."""

    src: Peer
    dst: Peer
    origin: int  # sequence number of position 0
    seq: int
    position: int = 0
    held: list[tuple[int, int, float, bytes]] = field(default_factory=list)  # heap
    held_bytes: int = 0
    fin_at: int | None = None  # position just after the last byte, once FIN seen
    gap: bool = False  # the next chunk follows missing bytes
    pushed: int = 0  # heap tie-breaker: equal starts pop in arrival order

    def at(self, seq: int) -> int:
        return self.position + _ahead(seq, self.seq)

    def segment(self, seq: int, time: float, data: bytes, out: list[Chunk]) -> None:
        start = self.at(seq)
        if not data or start + len(data) <= self.position:
            return  # a bare ACK, or all of it handed on already (a retransmission)
        if start > self.position:
            self.pushed += 1
            heapq.heappush(self.held, (start, self.pushed, time, data))
            self.held_bytes += len(data) + SEGMENT_OVERHEAD
            return
        self.deliver(start, time, data, out)
        self.drain(out)

    def deliver(self, start: int, time: float, data: bytes, out: list[Chunk]) -> None:
        """Hand on the part of `data` (at `start` ≤ position) not handed on yet."""
        fresh = data[self.position - start :]
        if not fresh:
            return
        out.append(Chunk(time, self.src, self.dst, fresh, self.gap))
        self.gap = False
        self.seq = (self.seq + len(fresh)) % _MOD
        self.position += len(fresh)

    def drain(self, out: list[Chunk]) -> None:
        """Hand on the held segments the position has reached."""
        while self.held and self.held[0][0] <= self.position:
            start, _, time, data = heapq.heappop(self.held)
            self.held_bytes -= len(data) + SEGMENT_OVERHEAD
            self.deliver(start, time, data, out)

    def give_up(self, out: list[Chunk]) -> None:
        """Skip the first hole and hand on what follows it, marked gap."""
        self.skip(self.held[0][0])
        self.drain(out)

    def acknowledged(self, ack: int, out: list[Chunk]) -> bool:
        """Give up the holes before sequence number `ack`, which the peer acknowledged (so
        they were sent, and the capture missed them); whether there was one. Never beyond
        the bytes held: a stray ACK far ahead cannot make the flow skip what is to come."""
        end, gave_up = self.at(ack), False
        while self.held and self.position < end:
            self.skip(min(end, self.held[0][0]))
            self.drain(out)
            gave_up = True
        return gave_up

    def skip(self, start: int) -> None:
        """Move on to `start`, the bytes before it missing."""
        if start > self.position:  # always from give_up, as drain() leaves nothing reachable
            self.seq = (self.seq + start - self.position) % _MOD
            self.position = start
            self.gap = True


class Streams:
    """TCP reassembly, bounded; see the module docstring."""

    def __init__(
        self,
        warnings: Warnings,
        *,
        max_flows: int = 10_000,
        max_pending_bytes: int = 256 * 1024,
        max_held_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._warnings = warnings
        self._max_flows = max_flows
        self._max_pending = max_pending_bytes
        self._max_held = max_held_bytes
        self._flows: OrderedDict[_Key, _Flow] = OrderedDict()  # least recently used first
        self._closed: OrderedDict[_Key, int] = OrderedDict()  # closed flow → its next seq
        # flows holding bytes behind a hole, the one waiting longest since it moved on first
        self._waiting: OrderedDict[_Key, _Flow] = OrderedDict()
        self._held = 0  # bytes held by all flows (their held_bytes summed)

    def add(self, packet: Packet) -> list[Chunk]:
        """The chunks this TCP segment puts in order (possibly none)."""
        out: list[Chunk] = []
        if packet.transport != "tcp":
            return out
        src, dst = packet.src, packet.dst
        key = (src.host, src.port, dst.host, dst.port)
        reverse = (dst.host, dst.port, src.host, src.port)
        if packet.flags & ACK:  # first: what it acknowledges was sent before this segment
            self._acknowledged(reverse, packet, out)
        if packet.flags & RST:
            self._close(key, out)
            self._close(reverse, out)
            return out
        seq = packet.seq
        flow = self._flows.get(key)
        if packet.flags & SYN:
            seq = (seq + 1) % _MOD  # the SYN takes one sequence number
            if flow is None or flow.origin != seq:  # else a retransmitted SYN
                self._close(key, out)  # a new connection on the same ports
                if not packet.flags & ACK:  # the opening SYN: the old one is over both ways
                    self._close(reverse, out)
                flow = self._open(key, seq, packet, out)
        elif flow is None:
            last = self._closed.get(key)
            if not packet.payload or (
                last is not None and _ahead(seq + len(packet.payload), last) <= 0
            ):
                return out  # nothing to carry, or a late retransmission after the close
            flow = self._open(key, seq, packet, out)
        else:
            self._flows.move_to_end(key)
        held, position = flow.held_bytes, flow.position
        flow.segment(seq, packet.time, packet.payload, out)
        while flow.held_bytes > self._max_pending:
            flow.give_up(out)
            self._warnings.add(MISSING, f"{src} → {dst} before packet {packet.number}")
        if packet.flags & FIN and flow.fin_at is None:
            flow.fin_at = flow.at(seq) + len(packet.payload)
        self._moved(key, flow, held, position, out)
        while self._held > self._max_held:
            self._give_up_oldest(packet, out)
        return out

    def flush(self) -> list[Chunk]:
        """At the end of the file: what is still held, in capture-time order across flows
        (each flow's own chunks in stream order), gaps marked."""
        held: list[list[Chunk]] = []
        for flow in self._waiting.values():
            held.append([])
            while flow.held:
                flow.give_up(held[-1])
        self._flows.clear()
        self._closed.clear()
        self._waiting.clear()
        self._held = 0
        # answers held behind a client's hole must not reach a reader before their requests
        return list(heapq.merge(*held, key=_time))

    def _acknowledged(self, key: _Key, packet: Packet, out: list[Chunk]) -> None:
        """The peer has the bytes of flow `key` up to `packet.ack`: a hole before that was
        never captured ("ACKed unseen segment"), so what follows it goes on at once."""
        flow = self._flows.get(key)
        if flow is None or not flow.held:
            return
        held, position = flow.held_bytes, flow.position
        if flow.acknowledged(packet.ack, out):
            self._warnings.add(
                MISSING, f"{packet.dst} → {packet.src} before packet {packet.number}"
            )
            self._moved(key, flow, held, position, out)

    def _give_up_oldest(self, packet: Packet, out: list[Chunk]) -> None:
        """Over max_held_bytes: the flow waiting longest gives up its first hole."""
        key, flow = next(iter(self._waiting.items()))
        held, position = flow.held_bytes, flow.position
        flow.give_up(out)
        self._warnings.add(
            f"TCP hole given up (more than {self._max_held:,} bytes held in all)",
            f"{flow.src} → {flow.dst} at packet {packet.number}",
        )
        self._moved(key, flow, held, position, out)

    def _moved(self, key: _Key, flow: _Flow, held: int, position: int, out: list[Chunk]) -> None:
        """Account for what `flow` holds now (it held `held` bytes at `position` before)."""
        self._held += flow.held_bytes - held
        if not flow.held:
            self._waiting.pop(key, None)
        elif key not in self._waiting or flow.position != position:
            self._waiting[key] = flow
            self._waiting.move_to_end(key)
        if flow.fin_at is not None and flow.position >= flow.fin_at:
            self._close(key, out)

    def _open(self, key: _Key, seq: int, packet: Packet, out: list[Chunk]) -> _Flow:
        if len(self._flows) >= self._max_flows:
            self._close(next(iter(self._flows)), out)
            self._warnings.add(
                f"TCP connection state dropped (more than {self._max_flows:,} flows open)",
                f"packet {packet.number}",
            )
        # the same ports again: a reader must not join its first bytes to the last one's
        again = self._closed.pop(key, None) is not None
        flow = self._flows[key] = _Flow(packet.src, packet.dst, seq, seq, gap=again)
        return flow

    def _close(self, key: _Key, out: list[Chunk]) -> None:
        """Free a flow, handing on what it held (after its holes, marked gap)."""
        flow = self._flows.pop(key, None)
        if flow is None:
            return
        self._held -= flow.held_bytes
        self._waiting.pop(key, None)
        while flow.held:
            flow.give_up(out)
        self._closed[key] = flow.seq
        if len(self._closed) > self._max_flows:
            self._closed.popitem(last=False)


def _time(chunk: Chunk) -> float:
    return chunk.time
