"""broker.passive.streams: TCP reassembly puts each direction's bytes in order whatever the
capture did to the segments (reordered, retransmitted, overlapping, wrapped sequence
numbers, lost), within its memory bounds, and says where bytes are missing."""

from __future__ import annotations

import itertools
import struct
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import PcapWriter

from broker.passive.capture import Packet, packets
from broker.passive.modbus import ModbusReader
from broker.passive.observations import Peer, Request, Warnings
from broker.passive.streams import MISSING, SEGMENT_OVERHEAD, Chunk, Streams

CLIENT, SERVER = Peer("10.0.0.5", 40001), Peer("10.0.0.7", 502)
SYN, FIN, RST, ACK, PSH = 0x02, 0x01, 0x04, 0x10, 0x08
ISN = 5000


def _segment(
    seq: int,
    data: bytes = b"",
    flags: int = PSH | ACK,
    *,
    src: Peer = CLIENT,
    dst: Peer = SERVER,
    n: int = 0,
    ack: int = 0,
) -> Packet:
    return Packet(n, float(n), "tcp", src, dst, data, seq % (1 << 32), flags, ack % (1 << 32))


def _ack(
    ack: int, n: int = 0, *, src: Peer = SERVER, dst: Peer = CLIENT, data: bytes = b""
) -> Packet:
    """The other side acknowledging `ack` (with data of its own if given)."""
    return _segment(900, data, ACK | PSH if data else ACK, src=src, dst=dst, n=n, ack=ack)


def _back(seq: int, data: bytes = b"", flags: int = PSH, n: int = 0) -> Packet:
    """A segment of the server's side (no ACK unless asked)."""
    return _segment(seq, data, flags, src=SERVER, dst=CLIENT, n=n)


def _syn(isn: int = ISN, src: Peer = CLIENT, dst: Peer = SERVER) -> Packet:
    return _segment(isn, flags=SYN, src=src, dst=dst)


def _feed(streams: Streams, segments: list[Packet]) -> list[Chunk]:
    out: list[Chunk] = []
    for segment in segments:
        out += streams.add(segment)
    return out


def _data(chunks: list[Chunk]) -> bytes:
    return b"".join(c.data for c in chunks)


def test_in_order_segments_pass_through_one_chunk_each() -> None:
    streams = Streams(Warnings())
    chunks = _feed(
        streams, [_syn(), _segment(ISN + 1, b"abc", n=2), _segment(ISN + 4, b"def", n=3)]
    )
    assert chunks == [
        Chunk(2.0, CLIENT, SERVER, b"abc", False),
        Chunk(3.0, CLIENT, SERVER, b"def", False),
    ]
    assert streams.flush() == []


def test_retransmissions_and_overlaps_are_dropped_or_trimmed() -> None:
    streams = Streams(Warnings())
    chunks = _feed(
        streams,
        [
            _syn(),
            _segment(ISN + 1, b"abcd"),
            _segment(ISN + 1, b"abcd"),  # retransmitted whole
            _segment(ISN + 3, b"cdefg"),  # overlaps the end of what came
            _segment(ISN + 1, b"abcdefgh"),  # repacketized retransmission with one new byte
            _syn(),  # a retransmitted SYN changes nothing
        ],
    )
    assert [c.data for c in chunks] == [b"abcd", b"efg", b"h"]
    assert not any(c.gap for c in chunks)


def test_out_of_order_segments_are_held_until_the_hole_fills() -> None:
    streams = Streams(Warnings())
    assert (
        _feed(streams, [_syn(), _segment(ISN + 4, b"def", n=2), _segment(ISN + 7, b"gh", n=3)])
        == []
    )
    chunks = streams.add(_segment(ISN + 1, b"abc", n=4))
    assert [(c.data, c.time) for c in chunks] == [(b"abc", 4.0), (b"def", 2.0), (b"gh", 3.0)]


def test_directions_are_separate_streams() -> None:
    streams = Streams(Warnings())
    chunks = _feed(
        streams,
        [
            _syn(),
            _segment(900, flags=SYN | ACK, src=SERVER, dst=CLIENT),
            _segment(ISN + 1, b"ask"),
            _segment(901, b"answer", src=SERVER, dst=CLIENT),
        ],
    )
    assert [(c.src, c.dst, c.data) for c in chunks] == [
        (CLIENT, SERVER, b"ask"),
        (SERVER, CLIENT, b"answer"),
    ]


def test_a_capture_starting_mid_connection_starts_at_the_first_segment_seen() -> None:
    streams = Streams(Warnings())
    chunks = _feed(streams, [_segment(123_456, b"xyz"), _segment(123_459, b"!")])
    assert _data(chunks) == b"xyz!"
    assert not any(c.gap for c in chunks)


def test_sequence_numbers_wrap_around() -> None:
    isn = (1 << 32) - 3
    streams = Streams(Warnings())
    segments = [
        _syn(isn),
        _segment(isn + 3, b"cd"),
        _segment(isn + 1, b"ab"),
        _segment(isn + 5, b"ef"),
    ]
    assert _data(_feed(streams, segments)) == b"abcdef"


def test_a_hole_is_given_up_beyond_the_pending_bound_and_marked() -> None:
    warnings = Warnings()
    streams = Streams(warnings, max_pending_bytes=2 * SEGMENT_OVERHEAD + 10)
    chunks = _feed(
        streams,
        [
            _syn(),
            _segment(ISN + 1, b"abc"),
            _segment(ISN + 6, b"fghij", n=5),  # "de" never captured
            _segment(ISN + 11, b"klmnop", n=6),  # 11 bytes held: the hole is given up
            _segment(ISN + 17, b"q"),
            _segment(ISN + 4, b"de"),  # too late: dropped
        ],
    )
    assert [(c.data, c.gap) for c in chunks] == [
        (b"abc", False),
        (b"fghij", True),
        (b"klmnop", False),
        (b"q", False),
    ]
    assert warnings.items() == [
        (
            "TCP segment missing (never captured, or too late)",
            1,
            f"{CLIENT} → {SERVER} before packet 6",
        )
    ]


def test_a_held_segment_costs_no_more_than_it_is_counted() -> None:
    """The bounds count each held segment as its data and SEGMENT_OVERHEAD: what Python
    allocates for it (sys.getsizeof of its heap entry and of each part, the heap's pointer)
    must not be more, even deep into a long stream (a position past 2^30 is a bigger int)."""
    streams = Streams(Warnings())
    _feed(streams, [_syn(), _segment(ISN + 1, b"a")])
    flow = next(iter(streams._flows.values()))
    flow.position, flow.pushed = 1 << 40, 1 << 20  # deep into the stream: the biggest ints
    _feed(streams, [_segment(ISN + 3, b"c", n=7)])  # "b" lost: "c" is held
    [entry] = flow.held
    data = entry[-1]
    weight = sys.getsizeof(entry) + sum(map(sys.getsizeof, entry)) + struct.calcsize("P")
    assert weight - len(data) <= SEGMENT_OVERHEAD
    assert flow.held_bytes == len(data) + SEGMENT_OVERHEAD


def test_bare_acks_ahead_of_a_hole_hold_nothing() -> None:
    streams = Streams(Warnings(), max_pending_bytes=10 * SEGMENT_OVERHEAD)
    _feed(streams, [_syn(), _segment(ISN + 1, b"a"), _segment(ISN + 3, b"c")])  # "b" lost
    assert _feed(streams, [_segment(ISN + 4, flags=ACK) for _ in range(1000)]) == []
    assert [f.held for f in streams._flows.values()] == [[(2, 1, 0.0, b"c")]]  # at stream offset 2


def test_flush_hands_on_what_is_held_with_its_gaps() -> None:
    streams = Streams(Warnings())
    _feed(
        streams,
        [_syn(), _segment(ISN + 1, b"a"), _segment(ISN + 5, b"ef"), _segment(ISN + 3, b"c")],
    )
    assert [(c.data, c.gap) for c in streams.flush()] == [(b"c", True), (b"ef", True)]
    assert streams.flush() == []


def test_flush_hands_on_held_chunks_in_capture_time_order_across_flows() -> None:
    # Both directions lost a byte and hold what follows. The answers' direction started
    # holding first: flow by flow, an answer would reach a reader before its request.
    streams = Streams(Warnings())  # no ACKs: only the end of the file gives holes up
    _feed(
        streams,
        [
            _syn(),
            _syn(700, src=SERVER, dst=CLIENT),
            _back(701, b"A", n=3),
            _back(703, b"ans1", n=4),
            _segment(ISN + 1, b"Q", n=5, flags=PSH),
            _segment(ISN + 3, b"req2", n=6, flags=PSH),
            _back(707, b"ans2", n=7),
        ],
    )
    assert [(c.src, c.data, c.gap, c.time) for c in streams.flush()] == [
        (SERVER, b"ans1", True, 4.0),
        (CLIENT, b"req2", True, 6.0),
        (SERVER, b"ans2", False, 7.0),
    ]


def test_a_hole_the_peer_acknowledged_is_given_up_at_once() -> None:
    warnings = Warnings()
    streams = Streams(warnings)
    _feed(streams, [_syn(), _syn(899, src=SERVER, dst=CLIENT), _segment(ISN + 1, b"abc", n=3)])
    # "de" never captured; the server's ACK of "abc" alone does not pass the hole
    assert _feed(streams, [_segment(ISN + 6, b"fgh", n=4), _ack(ISN + 4, n=5)]) == []
    # its answer acknowledges everything: the held bytes first (they were sent before it)
    chunks = streams.add(_ack(ISN + 9, n=6, data=b"answer"))
    assert [(c.src, c.data, c.gap) for c in chunks] == [
        (CLIENT, b"fgh", True),
        (SERVER, b"answer", False),
    ]
    assert [(c.data, c.gap) for c in streams.add(_segment(ISN + 9, b"ijk", n=7))] == [
        (b"ijk", False)
    ]
    assert warnings.items() == [(MISSING, 1, f"{CLIENT} → {SERVER} before packet 6")]


def test_an_ack_inside_a_hole_gives_up_only_the_bytes_it_acknowledged() -> None:
    streams = Streams(Warnings())
    _feed(streams, [_syn(), _segment(ISN + 1, b"abc"), _segment(ISN + 6, b"fgh")])  # "de" lost
    assert streams.add(_ack(ISN + 5)) == []  # the peer has "d", not yet "e"
    chunks = streams.add(_segment(ISN + 4, b"de"))  # "e" retransmitted: still to come
    assert [(c.data, c.gap) for c in chunks] == [(b"e", True), (b"fgh", False)]


def test_a_stray_ack_far_ahead_skips_nothing_still_to_come() -> None:
    streams = Streams(Warnings())
    _feed(streams, [_syn(), _segment(ISN + 1, b"abc")])
    assert streams.add(_ack(ISN + 1_000_000)) == []  # nothing held: nothing to give up
    chunks = _feed(streams, [_segment(ISN + 4, b"de"), _segment(ISN + 8, b"hi")])  # "fg" lost
    assert [(c.data, c.gap) for c in chunks] == [(b"de", False)]
    chunks = _feed(streams, [_ack(ISN + 1_000_000), _segment(ISN + 10, b"jk")])
    assert [(c.data, c.gap) for c in chunks] == [(b"hi", True), (b"jk", False)]


def test_a_scapy_written_capture_gives_up_a_hole_its_peer_acknowledged(tmp_path: Path) -> None:
    def frame(src: Peer, dst: Peer, seq: int, ack: int, flags: str, data: bytes = b"") -> Ether:
        return (
            Ether()
            / IP(src=src.host, dst=dst.host)
            / TCP(sport=src.port, dport=dst.port, seq=seq, ack=ack, flags=flags)
            / data
        )

    path = tmp_path / "c.pcap"
    with PcapWriter(str(path)) as writer:
        for i, f in enumerate(
            [
                frame(CLIENT, SERVER, ISN, 0, "S"),
                frame(SERVER, CLIENT, 899, ISN + 1, "SA"),
                frame(CLIENT, SERVER, ISN + 1, 900, "A"),
                # "hello" at ISN + 1 never captured
                frame(CLIENT, SERVER, ISN + 6, 900, "PA", b"world"),
                frame(SERVER, CLIENT, 900, ISN + 11, "PA", b"ok"),
            ]
        ):
            f.time = 100.0 + i
            writer.write(f)
    warnings = Warnings()
    streams = Streams(warnings)
    chunks = [c for p in packets(path, warnings) for c in streams.add(p)]
    assert [(c.data, c.gap) for c in chunks] == [(b"world", True), (b"ok", False)]
    assert [kind for kind, _, _ in warnings.items()] == [MISSING]


def test_all_flows_together_hold_at_most_max_held_bytes() -> None:
    warnings = Warnings()
    bound = 3 * (SEGMENT_OVERHEAD + 10) - 1
    streams = Streams(warnings, max_held_bytes=bound)
    a, b = Peer("10.0.1.1", 40000), Peer("10.0.1.2", 40000)
    ten = bytes(10)
    held = [
        _segment(10, b"x", src=a),
        _segment(12, ten, src=a),  # a waits for byte 11
        _segment(10, b"y", src=b),
        _segment(12, ten, src=b),  # b waits for byte 11 too, since later
    ]
    assert _feed(streams, held) == [
        Chunk(0.0, a, SERVER, b"x", False),
        Chunk(0.0, b, SERVER, b"y", False),
    ]
    chunks = streams.add(_segment(22, ten, src=b, n=5))  # a third held: one too many bytes
    assert chunks == [Chunk(0.0, a, SERVER, ten, True)]  # a has waited longest: it gives up
    assert warnings.items() == [
        (
            f"TCP hole given up (more than {bound:,} bytes held in all)",
            1,
            f"{a} → {SERVER} at packet 5",
        )
    ]
    assert [(c.src, c.gap) for c in streams.add(_segment(22, ten, src=a))] == [(a, False)]
    assert [(c.src, c.data, c.gap) for c in streams.add(_segment(11, b"z", src=b))] == [
        (b, b"z", False),
        (b, ten, False),
        (b, ten, False),
    ]


@st.composite
def _connections(draw: st.DrawFn) -> tuple[list[tuple[Peer, bytes]], list[Packet]]:
    """Up to four connections' impaired streams, some segments never captured, the server's
    ACKs of bytes anywhere in them (before or after the capture shows those), interleaved."""
    streams, syns, rest = [], [], []
    for i in range(draw(st.integers(1, 4))):
        client = Peer("10.0.0.5", 40001 + i)
        stream, isn, segments = draw(_impaired(_UNIQUE))
        lost = draw(st.sets(st.integers(0, len(segments) - 1), max_size=3))
        acked = draw(st.lists(st.integers(0, len(stream)), max_size=5))
        streams.append((client, stream))
        syns.append(_syn(isn, src=client))
        rest += [s._replace(src=client) for j, s in enumerate(segments) if j not in lost]
        rest += [_ack(isn + 1 + k, dst=client) for k in acked]
    return streams, syns + draw(st.permutations(rest))


@settings(max_examples=150, deadline=None)
@given(
    _connections(),
    st.integers(1, 8 * SEGMENT_OVERHEAD),
    st.integers(1, 16 * SEGMENT_OVERHEAD),
)
def test_many_flows_with_losses_and_acks_stay_in_order_within_both_bounds(
    case: tuple[list[tuple[Peer, bytes]], list[Packet]], per_flow: int, in_all: int
) -> None:
    expected, segments = case
    streams = Streams(Warnings(), max_pending_bytes=per_flow, max_held_bytes=in_all)
    chunks: list[Chunk] = []
    for segment in segments:
        chunks += streams.add(segment)
        flows = streams._flows.values()
        assert all(f.held_bytes <= per_flow for f in flows)
        assert streams._held == sum(f.held_bytes for f in flows) <= in_all
    chunks += streams.flush()
    for client, stream in expected:
        # each chunk is the stream's next bytes, or after a gap its bytes from further on
        position = 0
        for chunk in (c for c in chunks if c.src == client):
            found = stream.find(chunk.data)
            assert found > position if chunk.gap else found == position
            position = found + len(chunk.data)


def test_a_new_connection_on_the_same_ports_starts_after_a_gap() -> None:
    streams = Streams(Warnings())
    _feed(streams, [_syn(), _segment(ISN + 1, b"old"), _segment(ISN + 4, flags=RST)])
    assert [(c.data, c.gap) for c in _feed(streams, [_syn(77), _segment(78, b"new")])] == [
        (b"new", True)
    ]
    # a SYN with a new ISN while the old connection still looks open
    assert [(c.data, c.gap) for c in _feed(streams, [_syn(5), _segment(6, b"newer")])] == [
        (b"newer", True)
    ]
    # the server's side of the old connection is over too, what it held handed on at the SYN
    old = _feed(streams, [_back(901, b"A"), _back(903, b"held")])
    assert [(c.data, c.gap) for c in old] == [(b"A", False)]
    assert [(c.data, c.gap) for c in streams.add(_syn(9))] == [(b"held", True)]
    chunks = _feed(streams, [_back(300, flags=SYN | ACK), _back(301, b"B")])
    assert [(c.data, c.gap) for c in chunks] == [(b"B", True)]
    # other ports: a first connection, nothing missing
    other = Peer("10.0.0.5", 40002)
    assert [
        (c.data, c.gap)
        for c in _feed(streams, [_syn(src=other), _segment(ISN + 1, b"x", src=other)])
    ] == [(b"x", False)]


def test_a_reader_does_not_join_a_new_connection_to_the_old_ones_unfinished_frame() -> None:
    # The old connection ends one byte short of a read; the new one's first byte (its
    # transaction id's high byte, 3) would complete it as a read of 3 registers at 32.
    unfinished = struct.pack(">HHHBBHH", 9, 0, 6, 1, 3, 32, 0)[:-1]
    read = struct.pack(">HHHBBHH", 0x0300, 0, 6, 1, 3, 0, 2)  # FC 3, holding registers 0-1
    warnings = Warnings()
    streams, reader = Streams(warnings), ModbusReader(warnings)
    chunks = _feed(
        streams,
        [_syn(), _segment(ISN + 1, unfinished, flags=FIN | ACK), _syn(77), _segment(78, read, n=4)],
    )
    requests = [o for c in chunks for o in reader.feed(c, from_client=True)]
    assert [(r.time, r.start, r.count) for r in requests if isinstance(r, Request)] == [(4.0, 0, 2)]


def test_fin_closes_a_flow_once_its_bytes_are_in_and_late_retransmissions_stay_out() -> None:
    streams = Streams(Warnings())
    chunks = _feed(
        streams,
        [
            _syn(),
            _segment(ISN + 4, b"def", flags=FIN | ACK),  # FIN before the bytes ahead of it
            _segment(ISN + 1, b"abc"),
            _segment(ISN + 1, b"abcdef"),  # retransmitted after the close
        ],
    )
    assert _data(chunks) == b"abcdef"
    assert not streams._flows  # the flow was freed
    # the same ports again, a new connection: a new stream from its SYN, not joined to the
    # old one's bytes (a reader drops a frame the old connection left unfinished)
    chunks = _feed(streams, [_syn(77), _segment(78, b"new")])
    assert [(c.data, c.gap) for c in chunks] == [(b"new", True)]
    assert streams.flush() == []


def test_rst_frees_both_directions_handing_on_what_they_held() -> None:
    streams = Streams(Warnings())
    _feed(
        streams, [_syn(), _segment(ISN + 3, b"held"), _segment(700, b"x", src=SERVER, dst=CLIENT)]
    )
    chunks = streams.add(_segment(701, flags=RST, src=SERVER, dst=CLIENT))
    assert [(c.data, c.gap) for c in chunks] == [(b"held", True)]
    assert streams.flush() == []


def test_flows_beyond_the_bound_evict_the_least_recently_used() -> None:
    warnings = Warnings()
    streams = Streams(warnings, max_flows=2)
    peers = [Peer(f"10.0.1.{i}", 40000) for i in range(4)]
    _feed(streams, [_segment(10, b"a", src=peers[0]), _segment(10, b"b", src=peers[1])])
    _feed(streams, [_segment(12, b"c", src=peers[0])])  # a hole: "c" is held; peers[0] is recent
    chunks = _feed(streams, [_segment(10, b"d", src=peers[2])])  # evicts peers[1]
    assert [(c.src, c.data, c.gap) for c in chunks] == [(peers[2], b"d", False)]
    chunks = _feed(streams, [_segment(10, b"e", src=peers[3])])  # evicts peers[0]
    assert [(c.src, c.data, c.gap) for c in chunks] == [
        (peers[0], b"c", True),  # what it held, after its hole
        (peers[3], b"e", False),
    ]
    assert [(kind, n) for kind, n, _ in warnings.items()] == [
        ("TCP connection state dropped (more than 2 flows open)", 2)
    ]


def test_udp_packets_are_not_streams() -> None:
    udp = Packet(1, 0.0, "udp", CLIENT, SERVER, b"bacnet")
    assert Streams(Warnings()).add(udp) == []


_ANY = st.binary(min_size=1, max_size=400)
# every byte different: where a piece came from in the stream is never ambiguous
_UNIQUE = st.integers(1, 256).map(lambda n: bytes(range(n)))


@st.composite
def _impaired(
    draw: st.DrawFn, streams: st.SearchStrategy[bytes] = _ANY
) -> tuple[bytes, int, list[Packet]]:
    """A byte stream cut into segments, then reordered and partly duplicated (also as
    repacketized overlaps), with an ISN anywhere (wrap-around included)."""
    stream = draw(streams)
    isn = draw(st.integers(0, (1 << 32) - 1))
    cuts = (
        sorted(draw(st.sets(st.integers(1, len(stream) - 1), max_size=30)))
        if len(stream) > 1
        else []
    )
    bounds = [0, *cuts, len(stream)]
    segments = [_segment(isn + 1 + a, stream[a:b]) for a, b in itertools.pairwise(bounds)]
    extra = draw(
        st.lists(st.tuples(st.integers(0, len(stream) - 1), st.integers(1, 50)), max_size=10)
    )
    segments += [_segment(isn + 1 + a, stream[a : a + n]) for a, n in extra]
    return stream, isn, draw(st.permutations(segments))


@settings(max_examples=150, deadline=None)
@given(_impaired())
def test_any_reordering_and_duplication_yields_the_stream_in_order(
    case: tuple[bytes, int, list[Packet]],
) -> None:
    stream, isn, segments = case
    streams = Streams(Warnings())
    chunks = _feed(streams, [_syn(isn), *segments])
    assert _data(chunks) == stream
    assert not any(c.gap for c in chunks)
    assert streams.flush() == []


@settings(max_examples=150, deadline=None)
@given(_impaired(_UNIQUE), st.integers(1, 8 * SEGMENT_OVERHEAD), st.data())
def test_bounded_reassembly_hands_on_pieces_in_order_never_holding_more_than_its_bound(
    case: tuple[bytes, int, list[Packet]], bound: int, data: st.DataObject
) -> None:
    stream, isn, segments = case
    lost = data.draw(st.sets(st.integers(0, len(segments) - 1), max_size=3))  # never captured
    streams = Streams(Warnings(), max_pending_bytes=bound)
    chunks = streams.add(_syn(isn))
    for i, segment in enumerate(segments):
        if i not in lost:
            chunks += streams.add(segment)
            assert all(f.held_bytes <= bound for f in streams._flows.values())
    chunks += streams.flush()
    # each chunk is the stream's next bytes, or after a gap its bytes from further on
    position = 0
    for chunk in chunks:
        found = stream.find(chunk.data)
        assert found > position if chunk.gap else found == position
        position = found + len(chunk.data)


def test_a_scapy_written_capture_with_reordering_and_retransmission(tmp_path: Path) -> None:
    def frame(seq: int, data: bytes, flags: str = "PA") -> Ether:
        return (
            Ether(src="02:00:00:00:00:05", dst="02:00:00:00:00:07")
            / IP(src=CLIENT.host, dst=SERVER.host)
            / TCP(sport=CLIENT.port, dport=SERVER.port, seq=seq, flags=flags)
            / data
        )

    path = tmp_path / "c.pcap"
    with PcapWriter(str(path)) as writer:
        for i, f in enumerate(
            [
                frame(ISN, b"", "S"),
                frame(ISN + 6, b"world"),
                frame(ISN + 1, b"hello"),
                frame(ISN + 1, b"hello"),
                frame(ISN + 11, b"!", "FA"),
            ]
        ):
            f.time = 100.0 + i
            writer.write(f)
    warnings = Warnings()
    streams = Streams(warnings)
    chunks = [c for p in packets(path, warnings) for c in streams.add(p)] + streams.flush()
    assert _data(chunks) == b"helloworld!"
    assert len(warnings) == 0
