"""The DNP3 reader of passive discovery (broker/passive/dnp3.py): a master's requests and an
outstation's answers, as a capture's TCP chunks bring them, become Requests and Values;
controls and other functions that change an outstation are writes; hostile and broken
frames are warnings, never an exception. Requests are built with the connector's own
encoders (dnp3_frames, dnp3_objects); answers by struct, framed with their CRCs."""

from __future__ import annotations

import itertools
import struct
import sys
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.passive import dnp3
from broker.passive.dnp3 import Dnp3Reader
from broker.passive.observations import Observation, Peer, Request, Values, Warnings
from broker.passive.streams import Chunk
from broker.plant.connectors.dnp3_frames import (
    PRI_UNCONFIRMED_USER_DATA,
    PRM,
    Channel,
    encode_frame,
    segment,
)
from broker.plant.connectors.dnp3_objects import class_header, range_header, read_request

MASTER, OUTSTATION = 1, 10
SCADA = Peer("10.0.0.5", 49152)
RTU = Peer("10.0.0.9", 20000)
ONLINE = 0x01


def from_master(*apdus: bytes, master: int = MASTER, outstation: int = OUTSTATION) -> bytes:
    channel = Channel(master, outstation)
    return b"".join(channel.request(apdu) for apdu in apdus)


def from_outstation(apdu: bytes, outstation: int = OUTSTATION) -> bytes:
    control = PRM | PRI_UNCONFIRMED_USER_DATA  # DIR clear: an outstation's frame
    return b"".join(encode_frame(control, MASTER, outstation, s) for s in segment(apdu, 0))


def response(*objects: bytes, control: int = 0xC0, function: int = 129) -> bytes:
    return bytes((control, function, 0, 0)) + b"".join(objects)


def floats(start: int, values: list[float]) -> bytes:
    """g30v5 (float with flags) points start.. with a 2-octet start/stop range."""
    header = bytes((30, 5, 0x01)) + struct.pack("<HH", start, start + len(values) - 1)
    return header + b"".join(struct.pack("<Bf", ONLINE, v) for v in values)


def to_rtu(data: bytes, time: float = 1.0, gap: bool = False) -> Chunk:
    return Chunk(time=time, src=SCADA, dst=RTU, data=data, gap=gap)


def to_scada(data: bytes, time: float = 1.1, gap: bool = False) -> Chunk:
    return Chunk(time=time, src=RTU, dst=SCADA, data=data, gap=gap)


def request(table: str, start: int, count: int, function: str, write: bool = False) -> Request:
    return Request("dnp3", 1.0, SCADA.host, RTU, OUTSTATION, table, start, count, function, write)


def feed(reader: Dnp3Reader, *chunks: Chunk) -> list[Observation]:
    return [o for c in chunks for o in reader.feed(c, from_client=c.src == SCADA)]


def test_an_integrity_poll_and_its_answer_give_a_request_and_values_per_run() -> None:
    warnings = Warnings()
    reader = Dnp3Reader(warnings)
    poll = from_master(read_request(0, [class_header(0)]))
    answer = response(
        floats(0, [21.5, -3.25, 1000.0]),
        bytes((1, 2, 0x00, 0, 1, ONLINE | 0x80, ONLINE)),  # binary inputs 0..1 with flags
        bytes((3, 2, 0x00, 4, 4, ONLINE | 0x80)),  # double-bit input 4: "on"
        bytes((20, 1, 0x00, 7, 8)) + struct.pack("<BIBI", ONLINE, 41, ONLINE, 42),  # counters
    )
    assert feed(reader, to_rtu(poll)) == [request("", 0, 0, "READ class 0 (master 1)")]
    assert feed(reader, to_scada(from_outstation(answer))) == [
        Values("dnp3", 1.1, RTU, OUTSTATION, "30", 0, (21.5, -3.25, 1000.0)),
        Values("dnp3", 1.1, RTU, OUTSTATION, "1", 0, (True, False)),
        Values("dnp3", 1.1, RTU, OUTSTATION, "3", 4, ("on",)),
        Values("dnp3", 1.1, RTU, OUTSTATION, "20", 7, (41, 42)),
    ]
    assert len(warnings) == 0


def test_range_reads_give_a_request_per_range_and_class_polls_one_together() -> None:
    reader = Dnp3Reader(Warnings())
    headers = [range_header(30, 5, 0, 9), range_header(1, 0, 256, 300)]
    headers += [class_header(c) for c in (1, 2, 3)]
    every_analog = bytes((0xC1, 1, 30, 0, 0x06))  # g30v0, all points
    some_counters = bytes((0xC2, 1, 20, 0, 0x17, 3, 4, 5, 9))  # an index list: 4, 5, 9
    time_only = bytes((0xC3, 1, 50, 1, 0x07, 1))  # time and date: no point
    everything = bytes((0xC4, 1, 40, 0, 0x02)) + struct.pack("<II", 0, 0xFFFFFFFF)  # 2^32 points
    reads = from_master(
        read_request(0, headers), every_analog, some_counters, time_only, everything
    )
    assert feed(reader, to_rtu(reads)) == [
        request("", 0, 0, "READ class 1 2 3 (master 1)"),
        request("30", 0, 10, "READ g30v5 (master 1)"),
        request("1", 256, 45, "READ g1v0 (master 1)"),
        request("30", 0, 0, "READ g30v0 (master 1)"),
        request("20", 4, 2, "READ g20v0 (master 1)"),
        request("20", 9, 1, "READ g20v0 (master 1)"),
        request("40", 0, 2**32, "READ g40v0 (master 1)"),
    ]


def test_events_are_values_of_their_static_table_one_per_run_of_indexes() -> None:
    reader = Dnp3Reader(Warnings())
    events = bytes((32, 7, 0x28)) + struct.pack("<H", 3)  # analog events, float with time
    for index, value in ((4, 1.5), (5, 2.5), (9, 3.5)):
        events += struct.pack("<HBf", index, ONLINE, value) + (1_700_000_000_000).to_bytes(
            6, "little"
        )
    unsolicited = response(events, control=0xF0, function=130)
    assert feed(reader, to_scada(from_outstation(unsolicited))) == [
        Values("dnp3", 1.1, RTU, OUTSTATION, "30", 4, (1.5, 2.5)),
        Values("dnp3", 1.1, RTU, OUTSTATION, "30", 9, (3.5,)),
    ]


# A response of 120 floats: 605 bytes, three transport segments, each a frame of 16-byte blocks
BIG = from_outstation(response(floats(0, [float(i) for i in range(120)])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(0, len(BIG) * 2), max_size=12))
def test_frames_split_and_coalesced_anyhow_read_the_same(cuts: list[int]) -> None:
    stream = BIG + BIG  # two answers back to back
    points = sorted({0, len(stream), *(c for c in cuts if c <= len(stream))})
    warnings = Warnings()
    reader = Dnp3Reader(warnings)
    chunks = [to_scada(stream[a:b]) for a, b in itertools.pairwise(points)]
    expected = Values("dnp3", 1.1, RTU, OUTSTATION, "30", 0, tuple(float(i) for i in range(120)))
    assert feed(reader, *chunks) == [expected, expected]
    assert len(warnings) == 0


def test_controls_and_changes_are_writes_with_the_values_an_operate_sets() -> None:
    warnings = Warnings()
    reader = Dnp3Reader(warnings)
    setpoint = bytes((41, 3, 0x28)) + struct.pack("<HHfB", 1, 5, 21.5, 0)  # index 5 ← 21.5
    latch_on = bytes((12, 1, 0x17, 1, 2)) + struct.pack("<BBIIB", 0x03, 1, 0, 0, 0)  # index 2
    pulse = bytes((12, 1, 0x17, 1, 3)) + struct.pack("<BBIIB", 0x01, 1, 100, 100, 0)
    requests = [
        bytes((0xC0, 5)) + setpoint,  # DIRECT_OPERATE
        bytes((0xC1, 3)) + latch_on,  # SELECT: arms, sets nothing
        bytes((0xC2, 4)) + latch_on,  # OPERATE
        bytes((0xC3, 4)) + pulse,  # a pulse leaves no state to read back
        bytes((0xC4, 2, 80, 1, 0x00, 7, 7, 0)),  # WRITE: clear the restart indication
        bytes((0xC5, 21, 60, 2, 0x06, 60, 3, 0x06, 60, 4, 0x06)),  # DISABLE_UNSOLICITED
        bytes((0xC6, 13)),  # COLD_RESTART
        bytes((0xC7, 23)),  # DELAY_MEASURE: changes nothing, asks for no point
        bytes((0xC8, 0)),  # CONFIRM
    ]
    assert feed(reader, to_rtu(from_master(*requests))) == [
        request("40", 5, 1, "DIRECT_OPERATE (master 1)", write=True),
        Values("dnp3", 1.0, RTU, OUTSTATION, "40", 5, (21.5,), written=True),
        request("10", 2, 1, "SELECT (master 1)", write=True),
        request("10", 2, 1, "OPERATE (master 1)", write=True),
        Values("dnp3", 1.0, RTU, OUTSTATION, "10", 2, (True,), written=True),
        request("10", 3, 1, "OPERATE (master 1)", write=True),
        request("", 0, 0, "WRITE (master 1)", write=True),
        request("", 0, 0, "DISABLE_UNSOLICITED (master 1)", write=True),
        request("", 0, 0, "COLD_RESTART (master 1)", write=True),
    ]
    assert len(warnings) == 0


def test_each_outstation_on_a_shared_connection_is_its_own_unit() -> None:
    reader = Dnp3Reader(Warnings())
    poll = read_request(0, [class_header(0)])
    observed = feed(reader, to_rtu(from_master(poll, outstation=11) + from_master(poll)))
    assert [o.unit for o in observed] == [11, OUTSTATION]
    answer = from_outstation(response(floats(3, [7.0])), outstation=11)
    assert feed(reader, to_scada(answer)) == [Values("dnp3", 1.1, RTU, 11, "30", 3, (7.0,))]
    # an outstation that dialled the master: the frames, not the TCP roles, say who is who
    dialled = Dnp3Reader(Warnings()).feed(to_scada(answer), from_client=True)
    assert dialled == [Values("dnp3", 1.1, RTU, 11, "30", 3, (7.0,))]


def test_bad_frames_are_warnings_and_the_next_good_frame_is_read() -> None:
    warnings = Warnings()
    reader = Dnp3Reader(warnings)
    good = from_master(read_request(0, [class_header(0)]))
    bad_header = bytearray(good)
    bad_header[8] ^= 0xFF  # the header's CRC
    bad_data = bytearray(good)
    bad_data[12] ^= 0xFF  # a byte of user data
    stream = b"GET / HTTP/1.1\r\n" + bytes(bad_header) + bytes(bad_data) + good
    assert feed(reader, to_rtu(stream)) == [request("", 0, 0, "READ class 0 (master 1)")]
    counts = {kind: n for kind, n, _ in warnings.items()}
    assert counts == {
        "DNP3 bytes that are no frame": 1,
        "DNP3 frame header CRC or length wrong": 1,
        "DNP3 frame data CRC wrong": 1,
    }
    where = dict((kind, at) for kind, _, at in warnings.items())
    assert where["DNP3 bytes that are no frame"] == f"{SCADA} → {RTU} at byte 0"


def test_malformed_answers_unknown_functions_and_oversized_fragments_are_warnings() -> None:
    warnings = Warnings()
    reader = Dnp3Reader(warnings)
    short = response(bytes((30, 5, 0x00, 0, 9)) + struct.pack("<Bf", ONLINE, 1.0))  # 10 claimed
    unknown = bytes((0xC0, 77))
    bad_control = bytes((0xC0, 5, 99, 9, 0x28, 1, 0, 0, 0))  # an object no control has
    huge = response(floats(0, [0.0] * 420))  # 2,105 bytes: over a fragment's 2,048
    assert feed(reader, to_scada(from_outstation(short) + from_outstation(huge))) == []
    bad_read = bytes((0xC0, 1, 60, 1, 0x06, 30, 5, 0x5B))  # class 0, then a qualifier unknown
    observed = feed(reader, to_rtu(from_master(unknown, bad_control, bad_read)))
    assert observed == [
        request("", 0, 0, "DIRECT_OPERATE (master 1)", write=True),
        request("", 0, 0, "READ class 0 (master 1)"),  # what came before the bad header
    ]
    kinds = {kind for kind, _, _ in warnings.items()}
    assert kinds == {
        "DNP3 response malformed",
        "DNP3 fragment over 2048 bytes",
        "DNP3 function 77 unknown",
        "DNP3 DIRECT_OPERATE request not read",
        "DNP3 READ request not read",
    }


def test_a_gap_drops_the_frame_in_progress_and_reading_resumes() -> None:
    warnings = Warnings()
    reader = Dnp3Reader(warnings)
    frames = BIG  # three frames of one fragment
    first_frame_and_a_half = frames[:400]
    feed(reader, to_scada(first_frame_and_a_half))
    # the capture lost bytes: the rest of this fragment never arrives, the next one does
    after = frames[400:] + from_outstation(response(floats(0, [5.0])))
    assert feed(reader, to_scada(after, gap=True)) == [
        Values("dnp3", 1.1, RTU, OUTSTATION, "30", 0, (5.0,))
    ]
    assert {kind for kind, _, _ in warnings.items()} == {"DNP3 frame cut by a gap in the capture"}


def first_segment_and_rest(outstation: int) -> tuple[bytes, bytes]:
    """An outstation's answer of 120 floats: the frame of its first transport segment (the
    fragment is then in progress), and the frames that complete it."""
    control = PRM | PRI_UNCONFIRMED_USER_DATA
    apdu = response(floats(0, [float(i) for i in range(120)]))
    frames = [encode_frame(control, MASTER, outstation, s) for s in segment(apdu, 0)]
    return frames[0], b"".join(frames[1:])


def test_a_gap_drops_its_own_direction_fragments_whatever_the_others_hold() -> None:
    """A capture can leave thousands of link-address pairs mid-fragment in one direction and
    then bring gap after gap in the other: each gap must not walk the others' fragments (it
    did, 1.7 ms a gap with 4,096 of them). Counted in Python calls, which load does not change."""

    def reader_and_gap_cost(outstations: int) -> tuple[Dnp3Reader, int]:
        reader = Dnp3Reader(Warnings())
        feed(reader, to_scada(b"".join(first_segment_and_rest(o)[0] for o in range(outstations))))
        calls = 0

        def count(frame: FrameType, event: str, arg: Any) -> None:
            nonlocal calls
            calls += event == "call"

        sys.setprofile(count)
        try:
            reader.feed(to_rtu(b"\x00", gap=True), from_client=True)
        finally:
            sys.setprofile(None)
        return reader, calls

    reader, cost = reader_and_gap_cost(300)
    assert cost == reader_and_gap_cost(1)[1]
    # the gap was the master's: the outstations' fragments in progress complete
    assert feed(reader, to_scada(first_segment_and_rest(7)[1])) == [
        Values("dnp3", 1.1, RTU, 7, "30", 0, tuple(float(i) for i in range(120)))
    ]
    # a gap in the outstations' direction drops theirs
    assert feed(reader, to_scada(b"", gap=True), to_scada(first_segment_and_rest(8)[1])) == []


def test_fragments_in_progress_are_bounded_in_all_and_the_least_recent_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dnp3, "MAX_FRAGMENTS", 8)
    reader = Dnp3Reader(Warnings())
    masters = [Peer("10.0.0.5", port) for port in (49152, 49153, 49154)]
    for outstation in range(12):  # 12 fragments begun over three connections
        master = masters[outstation % 3]
        start = first_segment_and_rest(outstation)[0]
        reader.feed(Chunk(1.0, RTU, master, start, gap=False), from_client=False)
    assert reader._fragment_count == 8
    held = [len(state.fragments) for state in reader._directions.values()]
    assert sum(held) == 8
    # the most recent fragment completes; the first one begun was forgotten
    for outstation, expected in ((11, 1), (0, 0)):
        rest = first_segment_and_rest(outstation)[1]
        values = reader.feed(Chunk(2.0, RTU, masters[outstation % 3], rest, False), False)
        assert len(values) == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=400), max_size=8), st.booleans())
def test_any_bytes_are_read_without_an_exception_and_little_is_held(
    chunks: list[bytes], gaps: bool
) -> None:
    reader = Dnp3Reader(Warnings())
    for n, data in enumerate(chunks):
        # garbage, and garbage that starts like a frame
        reader.feed(to_scada(b"\x05\x64" + data if n % 2 else data, gap=gaps), from_client=False)
    for state in reader._directions.values():
        assert len(state.buffer) < 292  # never more than one frame's bytes


def test_a_flood_of_garbage_keeps_memory_bounded() -> None:
    warnings = Warnings()
    reader = Dnp3Reader(warnings)
    junk = bytes(range(256)).replace(b"\x05", b"") * 40
    for _ in range(100):  # about a megabyte
        assert reader.feed(to_rtu(junk), from_client=True) == []
    assert all(len(s.buffer) <= 1 for s in reader._directions.values())
    assert warnings.items()[0][:2] == ("DNP3 bytes that are no frame", 100)
