"""broker.passive.streams: TCP reassembly puts each direction's bytes in order whatever the
capture did to the segments (reordered, retransmitted, overlapping, wrapped sequence
numbers, lost), within its memory bounds, and says where bytes are missing."""

from __future__ import annotations

import itertools
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import PcapWriter

from broker.passive.capture import Packet, packets
from broker.passive.observations import Peer, Warnings
from broker.passive.streams import SEGMENT_OVERHEAD, Chunk, Streams

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
) -> Packet:
    return Packet(n, float(n), "tcp", src, dst, data, seq % (1 << 32), flags)


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
    assert streams.flush() == []  # nothing held: the flow was freed
    # the same ports again, a new connection: a new stream from its SYN
    chunks = _feed(streams, [_syn(77), _segment(78, b"new")])
    assert [(c.data, c.gap) for c in chunks] == [(b"new", False)]


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
