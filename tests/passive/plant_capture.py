"""Captures of a known plant: the refrigeration simulator's Modbus server polled by the
scripted SCADA (broker/sim/scada_poller.py) over a real connection, every request and answer
recorded, then written as a pcap by scapy (Ether/IP/TCP, handshake, seq/ack numbers), plain
or with the impairments real captures hold.

The simulation's clock is driven by the recording (`RefrigerationPlant.advance`), and the
capture's timestamps are the scripted ones (request i at T0 + its tick), so 200 s of plant
traffic record in about a second of real time.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet, Raw
from scapy.utils import RawPcapNgWriter, RawPcapWriter

from broker.sim.refrigeration import RefrigerationPlant
from broker.sim.scada_poller import POLLS, STEP_S, Exchange, Poll, Scada, Write, writes
from tests.harness import free_port

T0 = 1_783_000_000.0  # the capture's first tick, s since the epoch
SECONDS = 200.0  # of plant traffic per recording
SCADA_HOST, PLC_HOST = "10.0.0.5", "10.0.0.7"
SCADA_PORT, PLC_PORT = 49_152, 502
_MAC = {True: "02:00:0a:00:00:05", False: "02:00:0a:00:00:07"}  # by from_client
_ISN = {True: 1_000_000, False: 4_294_960_000}  # the server's wraps around 2**32 early on


@dataclass(frozen=True)
class Recording:
    exchanges: tuple[Exchange, ...]
    polls: tuple[Poll, ...]  # the ranges the SCADA read, each at its interval
    writes: tuple[Write, ...]  # the setpoints it wrote
    seconds: float


@dataclass(frozen=True)
class Impairments:
    vlan: bool = False  # an 802.1Q tag on every frame
    pipelined: bool = False  # a tick's requests in one segment, their answers in another
    split: bool = False  # every third message in two segments, cut anywhere (header too)
    reorder: bool = False  # of a split message, the second part captured first
    retransmit: bool = False  # every seventh segment again after the next packet
    lose: bool = False  # late on: one answer segment never captured, one cut by the snaplen
    other_traffic: bool = False  # ARP, DNS and HTTP between the Modbus packets


ALL = Impairments(*(True,) * 7)


async def record(seconds: float = SECONDS) -> Recording:
    """Poll the simulator for `seconds` of simulated time; the plant takes the setpoints."""
    port = free_port()
    plant = RefrigerationPlant(port=port)
    # A plant that has run for weeks: both 32-bit counters cross a 16-bit word boundary in
    # the recording, as they do in any long capture.
    plant.state.energy_kwh = (4 * 65536 - 10) / 100
    plant.state.run_seconds = 6 * 65536 - 30
    await plant.start()
    exchanges: list[Exchange] = []
    try:
        await plant.freeze()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        scada = Scada(reader, writer)
        try:
            for tick in range(round(seconds / STEP_S) + 1):
                t = tick * STEP_S
                if tick:
                    await plant.advance(t)
                got, done = await scada.at(t, seconds, T0 + t)
                exchanges += got
                for write in done:  # the PLC's program takes the operator's setpoint
                    plant.state.setpoint_c = _signed(write.words[0]) / 10
        finally:
            writer.close()
            await writer.wait_closed()
    finally:
        await plant.stop()
    return Recording(tuple(exchanges), POLLS, writes(seconds), seconds)


def _signed(word: int) -> int:
    return word - 0x10000 if word & 0x8000 else word


@dataclass
class _Segment:
    time: float
    from_client: bool
    data: bytes
    seq: int = 0  # offset in its direction's stream
    ack: int = 0  # bytes of the other direction acknowledged
    flags: str = "PA"
    cut: int | None = None  # bytes captured, when the snaplen cut the frame


Frame = tuple[float, Packet | bytes, int | None]  # capture time, frame, bytes captured if cut


def write_capture(
    path: Path,
    recording: Recording,
    impairments: Impairments = Impairments(),
    *,
    pcapng: bool = False,
) -> Path:
    """Write the recording's traffic as a capture file, impaired as asked."""
    messages = _messages(recording.exchanges, impairments.pipelined)
    frames = [_frame(s, impairments.vlan) for s in _segments(messages, impairments)]
    if impairments.other_traffic:
        frames = _with_other_traffic(frames, impairments.vlan)
    return _write(path, frames, pcapng)


def write_conversation(
    path: Path, messages: Sequence[tuple[float, bool, bytes]], others: Sequence[Frame] = ()
) -> Path:
    """A capture of one SCADA-PLC connection carrying `messages` (time, from the client, the
    bytes: anything, hostile or not), one segment each, and `others` frames among them."""
    segments = _segments([_Segment(t, c, data) for t, c, data in messages], Impairments())
    frames = sorted([*(_frame(s, vlan=False) for s in segments), *others], key=lambda f: f[0])
    return _write(path, frames, pcapng=False)


def _write(path: Path, frames: Sequence[Frame], pcapng: bool) -> Path:
    writer = RawPcapNgWriter(str(path)) if pcapng else RawPcapWriter(str(path), linktype=1)
    writer.linktype = 1
    writer.write_header(None)
    for time, packet, cut in frames:
        data = bytes(packet)
        # pcap takes whole seconds and microseconds; scapy's pcapng writer float seconds only
        sec, usec = divmod(round(time * 1e6), 1_000_000)
        when: tuple[float, int | None] = (time, None) if pcapng else (sec, usec)
        if cut is None:
            writer.write_packet(data, *when)
        else:
            writer.write_packet(data[:cut], *when, caplen=cut, wirelen=len(data))
    writer.close()
    return path


def _segments(messages: list[_Segment], impairments: Impairments) -> list[_Segment]:
    sent = {True: 0, False: 0}
    for m in messages:  # each message acknowledges everything the other side sent before it
        m.seq, m.ack = sent[m.from_client], sent[not m.from_client]
        sent[m.from_client] += len(m.data)
    segments: list[_Segment] = []
    for i, m in enumerate(messages):
        segments += (
            _split(m, i % 4 == 0 and impairments.reorder)
            if (impairments.split and i % 3 == 0 and len(m.data) > 1)
            else [m]
        )
    if impairments.lose:  # before the retransmissions: a lost segment is never seen again
        _lose(segments)
    if impairments.retransmit:
        segments = _retransmitted(segments)
    first, last = T0 - 0.01, segments[-1].time + 0.01
    opening = [
        _Segment(first, True, b"", -1, 0, "S"),
        _Segment(first + 1e-4, False, b"", -1, 0, "SA"),
        _Segment(first + 2e-4, True, b"", 0, 0, "A"),
    ]
    closing = [
        _Segment(last, True, b"", sent[True], sent[False], "FA"),
        _Segment(last + 1e-4, False, b"", sent[False], sent[True] + 1, "FA"),
        _Segment(last + 2e-4, True, b"", sent[True] + 1, sent[False] + 1, "A"),
    ]
    return opening + segments + closing


def _messages(exchanges: tuple[Exchange, ...], pipelined: bool) -> list[_Segment]:
    if not pipelined:
        return [
            m
            for e in exchanges
            for m in (
                _Segment(e.sent_at, True, e.request),
                _Segment(e.answered_at, False, e.response),
            )
        ]
    messages = []
    for _, group in itertools.groupby(exchanges, key=lambda e: round(e.sent_at / STEP_S)):
        burst = list(group)
        messages.append(_Segment(burst[0].sent_at, True, b"".join(e.request for e in burst)))
        messages.append(_Segment(burst[-1].answered_at, False, b"".join(e.response for e in burst)))
    return messages


def _split(m: _Segment, reordered: bool) -> list[_Segment]:
    at = 1 + (m.seq * 7 + len(m.data)) % (len(m.data) - 1)  # anywhere, the MBAP header too
    first = _Segment(m.time, m.from_client, m.data[:at], m.seq, m.ack)
    second = _Segment(m.time + 1e-4, m.from_client, m.data[at:], m.seq + at, m.ack)
    if reordered:  # captured out of order: the later bytes first, both at their capture times
        first.time, second.time = second.time, first.time
        return [second, first]
    return [first, second]


def _retransmitted(segments: list[_Segment]) -> list[_Segment]:
    out: list[_Segment] = []
    again: _Segment | None = None
    for i, s in enumerate(segments):
        out.append(s)
        if again is not None:
            out.append(_Segment(s.time + 1e-5, again.from_client, again.data, again.seq, again.ack))
            again = None
        if i % 7 == 3:
            again = s
    return out


def _lose(segments: list[_Segment]) -> None:
    """Late in the capture, one answer segment never captured and one request cut short."""
    answers = [i for i, s in enumerate(segments) if not s.from_client]
    requests = [i for i, s in enumerate(segments) if s.from_client and len(s.data) > 4]
    segments[requests[len(requests) * 97 // 100]].cut = 14 + 20 + 20 + 4  # 4 payload bytes
    del segments[answers[len(answers) * 95 // 100]]


def _frame(s: _Segment, vlan: bool) -> Frame:
    client, server = (SCADA_HOST, SCADA_PORT), (PLC_HOST, PLC_PORT)
    (src, sport), (dst, dport) = (client, server) if s.from_client else (server, client)
    seq = (_ISN[s.from_client] + 1 + s.seq) % 2**32
    ack = (_ISN[not s.from_client] + 1 + s.ack) % 2**32 if "A" in s.flags else 0
    tcp = TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=s.flags, window=8192)
    packet = IP(src=src, dst=dst) / tcp / Raw(s.data) if s.data else IP(src=src, dst=dst) / tcp
    return s.time, _link(_MAC[s.from_client], _MAC[not s.from_client], vlan) / packet, s.cut


def _link(src: str, dst: str, vlan: bool) -> Packet:
    ether = Ether(src=src, dst=dst)
    return ether / Dot1Q(vlan=100) if vlan else ether


def _with_other_traffic(frames: list[Frame], vlan: bool) -> list[Frame]:
    """A plant network's neighbours: ARP, a DNS query, an HTTP request, every 25 packets."""
    host, mac = "10.0.0.9", "02:00:0a:00:00:09"
    others = [
        Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=host, pdst=PLC_HOST),
        _link(mac, _MAC[True], vlan)
        / IP(src=host, dst="10.0.0.1")
        / UDP(sport=53_000, dport=53)
        / DNS(qd=DNSQR(qname="historian.plant.example")),
        _link(mac, _MAC[True], vlan)
        / IP(src=host, dst=PLC_HOST)
        / TCP(sport=50_000, dport=80, flags="PA")
        / Raw(b"GET / HTTP/1.1\r\nHost: 10.0.0.7\r\n\r\n"),
    ]
    out: list[Frame] = []
    for i, frame in enumerate(frames):
        out.append(frame)
        if i % 25 == 0:
            out.append((frame[0] + 1e-5, others[(i // 25) % len(others)], None))
    return out
