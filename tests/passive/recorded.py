"""Real conversations, recorded and written as a capture: a recording proxy on 127.0.0.1 sits
between a client (the broker's own connector or discovery reader) and a real device (the
yadnp3 outstation, the simulated BACnet device), timestamps every chunk of bytes it passes
in either direction, and `write_pcap` turns the recording into the pcap a tap between a
SCADA and the device would have taken (Ether/IP/TCP with a handshake and true seq/ack
numbers, or Ether/IP/UDP), at plant addresses.

    async with TcpRecorder(device_port) as proxy:     # proxy.port: where the client connects
        ...                                          # proxy.pieces: what passed, in order
    async with UdpRecorder(device_port) as proxy: ...  # one conversation per client address
    write_pcap(path, [*tcp_connections(pieces, CLIENT, SERVER), udp_frames(...)])

The proxy only passes bytes on: what the capture holds is exactly what the two ends sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw
from scapy.utils import PcapWriter

MSS = 1460  # a chunk longer than this is several segments, as on an Ethernet
Address = tuple[str, int]
Frame = tuple[float, Packet]


@dataclass(frozen=True)
class Piece:
    """Bytes one end sent, as the proxy read them in one go."""

    time: float  # when the proxy read them, s since the epoch
    conversation: int  # the proxy's connection (TCP) or client address (UDP), from 0
    from_client: bool
    data: bytes


@dataclass
class _Recorder:
    target: int  # the device's port on 127.0.0.1
    port: int = 0  # where the client sends, once entered
    pieces: list[Piece] = field(default_factory=list)

    def record(self, conversation: int, from_client: bool, data: bytes) -> None:
        self.pieces.append(Piece(time.time(), conversation, from_client, data))

    def conversation(self, number: int) -> list[Piece]:
        return [p for p in self.pieces if p.conversation == number]


class TcpRecorder(_Recorder):
    """A TCP proxy that records each chunk it passes, per connection."""

    def __init__(self, target: int) -> None:
        super().__init__(target)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._connections = 0

    async def __aenter__(self) -> TcpRecorder:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number, self._connections = self._connections, self._connections + 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [writer, up_writer]
        for pipe in (
            self._pipe(number, True, reader, up_writer),
            self._pipe(number, False, up_reader, writer),
        ):
            task = asyncio.create_task(pipe)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        number: int,
        from_client: bool,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        try:
            while data := await reader.read(4096):
                self.record(number, from_client, data)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


class _Upstream(asyncio.DatagramProtocol):
    """The proxy's socket towards the device for one client: answers go back to it."""

    def __init__(self, proxy: UdpRecorder, number: int, client: Address) -> None:
        self._proxy, self._number, self._client = proxy, number, client

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self._proxy.record(self._number, False, data)
        self._proxy.answer(data, self._client)


class UdpRecorder(_Recorder, asyncio.DatagramProtocol):
    """A UDP proxy that records each datagram it passes; one conversation per client address
    (each gets its own socket towards the device, as a NAT would)."""

    def __init__(self, target: int) -> None:
        super().__init__(target)
        self._transport: asyncio.DatagramTransport | None = None
        self._upstream: dict[Address, tuple[int, asyncio.DatagramTransport | None]] = {}
        self._opening: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> UdpRecorder:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        self.port = self._transport.get_extra_info("sockname")[1]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in list(self._opening):
            task.cancel()
        await asyncio.gather(*self._opening, return_exceptions=True)
        for _, upstream in self._upstream.values():
            if upstream is not None:
                upstream.close()
        if self._transport is not None:
            self._transport.close()

    def answer(self, data: bytes, client: Address) -> None:
        if self._transport is not None:
            self._transport.sendto(data, client)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if addr not in self._upstream:
            self._upstream[addr] = (len(self._upstream), None)
        number, upstream = self._upstream[addr]
        self.record(number, True, data)
        if upstream is not None:
            upstream.sendto(data)
            return
        task = asyncio.create_task(self._open(addr, number, data))  # its first datagram
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open(self, client: Address, number: int, first: bytes) -> None:
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Upstream(self, number, client), remote_addr=("127.0.0.1", self.target)
        )
        _, pending = self._upstream[client]
        if pending is not None:  # a second datagram opened one first: keep that one
            transport.close()
            pending.sendto(first)
            return
        self._upstream[client] = (number, transport)
        transport.sendto(first)


# ---- the capture ------------------------------------------------------------------------


def _mac(host: str) -> str:
    return "02:00:" + ":".join(f"{int(b):02x}" for b in host.split("."))


def _ether(src: str, dst: str) -> Ether:
    return Ether(src=_mac(src), dst=_mac(dst))


def tcp_frames(
    pieces: Sequence[Piece], client: Address, server: Address, isn: tuple[int, int] = (7, 9)
) -> list[Frame]:
    """One TCP connection carrying `pieces` (in time order): a handshake just before the
    first, a segment (or several, of at most MSS bytes) per piece acknowledging everything
    the other end sent before, FINs just after the last."""
    sent = {True: 0, False: 0}  # bytes each end sent so far (client: True)
    first = {True: isn[0], False: isn[1]}  # initial sequence numbers
    ends = {True: (client, server), False: (server, client)}

    def segment(t: float, from_client: bool, flags: str, data: bytes = b"") -> Frame:
        (src, sport), (dst, dport) = ends[from_client]
        seq = (first[from_client] + 1 + sent[from_client]) % 2**32
        ack = (first[not from_client] + 1 + sent[not from_client]) % 2**32 if "A" in flags else 0
        tcp = TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=64_240)
        packet = IP(src=src, dst=dst) / tcp / Raw(data) if data else IP(src=src, dst=dst) / tcp
        sent[from_client] += len(data)
        return t, _ether(src, dst) / packet

    start, end = pieces[0].time - 0.002, pieces[-1].time + 0.002
    frames = [_syn(start, client, server, first[True])]
    frames.append(_syn(start + 0.0005, server, client, first[False], ack=first[True] + 1))
    frames.append(segment(start + 0.001, True, "A"))
    for piece in pieces:
        for at in range(0, len(piece.data), MSS):
            frames.append(segment(piece.time, piece.from_client, "PA", piece.data[at : at + MSS]))
    frames.append(segment(end, True, "FA"))
    sent[True] += 1  # a FIN takes a sequence number
    frames.append(segment(end + 0.0005, False, "FA"))
    sent[False] += 1
    frames.append(segment(end + 0.001, True, "A"))
    return frames


def tcp_connections(
    pieces: Sequence[Piece], client: Address, server: Address, isn: tuple[int, int] = (7, 9)
) -> list[list[Frame]]:
    """`tcp_frames` for each connection the proxy passed (a client that reconnected made
    several), each from a client port of its own: `client`'s port plus its number."""
    numbers = sorted({p.conversation for p in pieces})
    return [
        tcp_frames(
            [p for p in pieces if p.conversation == n], (client[0], client[1] + n), server, isn
        )
        for n in numbers
    ]


def _syn(t: float, src: Address, dst: Address, seq: int, ack: int | None = None) -> Frame:
    flags = "S" if ack is None else "SA"
    tcp = TCP(sport=src[1], dport=dst[1], seq=seq, ack=ack or 0, flags=flags, window=64_240)
    return t, _ether(src[0], dst[0]) / IP(src=src[0], dst=dst[0]) / tcp


def udp_frames(pieces: Sequence[Piece], client: Address, server: Address) -> list[Frame]:
    """One datagram per piece between `client` and `server`."""
    frames: list[Frame] = []
    for piece in pieces:
        (src, sport), (dst, dport) = (client, server) if piece.from_client else (server, client)
        udp = IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(piece.data)
        frames.append((piece.time, _ether(src, dst) / udp))
    return frames


def write_pcap(path: Path, conversations: Iterable[Sequence[Frame]]) -> Path:
    """The frames of every conversation, interleaved by time, as one pcap file."""
    writer = PcapWriter(str(path), linktype=1, sync=False)
    try:
        for t, packet in sorted((f for c in conversations for f in c), key=lambda f: f[0]):
            packet.time = t
            writer.write(packet)
    finally:
        writer.close()
    return path
