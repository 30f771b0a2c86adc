"""The DNP3 application layer (broker/plant/connectors/dnp3_objects.py): the READ and
CONFIRM bytes, response parsing of every group and variation the connector reads, the
bounds on hostile counts, flags to quality, IIN names; and a READ answered by the reference
stack (yadnp3's opendnp3 outstation in a subprocess) through our link layer."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.plant.connectors.dnp3_frames import Channel, FrameError
from broker.plant.connectors.dnp3_objects import (
    FUNCTIONS_SENT,
    Header,
    Point,
    Response,
    class_header,
    confirm,
    indications,
    parse_response,
    quality_of,
    range_header,
    read_request,
)
from tests.plant.connectors.dnp3_outstation import CountingProxy, Dnp3Outstation

ONLINE = 0x01
T0 = datetime(2026, 12, 6, 3, 0, 0, 123000, tzinfo=UTC)
T0_MS = int((T0 - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(milliseconds=1))


def response(*objects: bytes, control: int = 0xC0, function: int = 129, iin: int = 0) -> bytes:
    return bytes((control, function)) + iin.to_bytes(2, "little") + b"".join(objects)


def time48(ms: int) -> bytes:
    return ms.to_bytes(6, "little")


# --- requests ---------------------------------------------------------------------------


def test_read_and_confirm_bytes_are_those_of_the_standard() -> None:
    assert FUNCTIONS_SENT == {"CONFIRM": 0, "READ": 1}
    # Integrity poll: READ (01), FIR|FIN seq 0, g60v1 qualifier 06.
    assert read_request(0, [class_header(0)]).hex(" ") == "c0 01 3c 01 06"
    # Event poll of classes 1, 2 and 3, seq 5.
    events = read_request(5, [class_header(c) for c in (1, 2, 3)])
    assert events.hex(" ") == "c5 01 3c 02 06 3c 03 06 3c 04 06"
    # Analog inputs 0..9 as floats (1-octet start/stop), and 0..300 (2-octet).
    assert read_request(15, [range_header(30, 5, 0, 9)]).hex(" ") == "cf 01 1e 05 00 00 09"
    ranged = read_request(1, [range_header(1, 0, 256, 300)])
    assert ranged.hex(" ") == "c1 01 01 00 01 00 01 2c 01"
    # CONFIRM of response seq 3, and of unsolicited response seq 5 (UNS set).
    assert confirm(3, unsolicited=False).hex(" ") == "c3 00"
    assert confirm(5, unsolicited=True).hex(" ") == "d5 00"


@settings(max_examples=100, deadline=None)
@given(
    seq=st.integers(0, 15),
    headers=st.lists(
        st.one_of(
            st.integers(0, 3).map(class_header),
            st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF))
            .flatmap(lambda t: st.tuples(st.just(t), st.integers(t[2], 0xFFFF)))
            .map(lambda p: range_header(p[0][0], p[0][1], p[0][2], p[1])),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_every_request_is_a_read_or_a_confirm(seq: int, headers: list[Header]) -> None:
    request = read_request(seq, headers)
    assert request[1] == FUNCTIONS_SENT["READ"] and request[0] == 0xC0 | seq
    for unsolicited in (False, True):
        assert confirm(seq, unsolicited=unsolicited)[1] == FUNCTIONS_SENT["CONFIRM"]


def test_requests_refuse_what_they_cannot_say() -> None:
    with pytest.raises(ValueError, match="class 4"):
        class_header(4)
    with pytest.raises(ValueError, match="sequence 16"):
        read_request(16, [class_header(0)])
    with pytest.raises(ValueError, match=r"range 5\.\.4"):
        range_header(30, 1, 5, 4)
    with pytest.raises(ValueError, match="at least one"):
        read_request(0, [])


# --- responses: every group and variation -----------------------------------------------

# The object layouts of IEEE 1815-2012 Annex A, written out here from the standard:
# (group, variation) → (struct format of the value, "" when the state is in the flags;
# whether a flags octet leads; the time: "", "abs" (48-bit ms) or "rel" (16-bit ms after g51))
STANDARD: dict[tuple[int, int], tuple[str, bool, str]] = {
    (1, 2): ("", True, ""),
    (2, 1): ("", True, ""), (2, 2): ("", True, "abs"), (2, 3): ("", True, "rel"),
    (3, 2): ("", True, ""),
    (4, 1): ("", True, ""), (4, 2): ("", True, "abs"), (4, 3): ("", True, "rel"),
    (10, 2): ("", True, ""),
    (11, 1): ("", True, ""), (11, 2): ("", True, "abs"),
    (20, 1): ("I", True, ""), (20, 2): ("H", True, ""), (20, 3): ("I", True, ""),
    (20, 4): ("H", True, ""), (20, 5): ("I", False, ""), (20, 6): ("H", False, ""),
    (20, 7): ("I", False, ""), (20, 8): ("H", False, ""),
    (21, 1): ("I", True, ""), (21, 2): ("H", True, ""), (21, 3): ("I", True, ""),
    (21, 4): ("H", True, ""), (21, 5): ("I", True, "abs"), (21, 6): ("H", True, "abs"),
    (21, 7): ("I", True, "abs"), (21, 8): ("H", True, "abs"), (21, 9): ("I", False, ""),
    (21, 10): ("H", False, ""), (21, 11): ("I", False, ""), (21, 12): ("H", False, ""),
    **{(g, v): (("I", "H")[(v - 1) % 2], True, "abs" if v > 4 else "")
       for g in (22, 23) for v in range(1, 9)},
    (30, 1): ("i", True, ""), (30, 2): ("h", True, ""), (30, 3): ("i", False, ""),
    (30, 4): ("h", False, ""), (30, 5): ("f", True, ""), (30, 6): ("d", True, ""),
    **{(g, v): (n, True, t) for g in (32, 42) for v, (n, t) in enumerate(
        [("i", ""), ("h", ""), ("i", "abs"), ("h", "abs"),
         ("f", ""), ("d", ""), ("f", "abs"), ("d", "abs")], start=1)},
    (40, 1): ("i", True, ""), (40, 2): ("h", True, ""), (40, 3): ("f", True, ""),
    (40, 4): ("d", True, ""),
}  # fmt: skip
STATIC = {2: 1, 4: 3, 11: 10, 22: 20, 23: 21, 32: 30, 42: 40}
SAMPLE = {"I": 4_000_000_000, "H": 65_000, "i": -2_000_000_000, "h": -32_000, "f": 16.654696, "d": 0.1}  # fmt: skip
QUALIFIERS = (0x00, 0x01, 0x17, 0x28)


def encode_objects(group: int, variation: int, qualifier: int, flags: int) -> tuple[bytes, list[int]]:  # fmt: skip
    """Two objects of (group, variation) under `qualifier`, and the indexes they carry."""
    number, has_flags, kind = STANDARD[group, variation]
    indexes = [7, 8] if qualifier in (0x00, 0x01) else [7, 300 if qualifier == 0x28 else 200]
    objects = []
    for n, index in enumerate(indexes):
        body = bytes((flags,)) if has_flags else b""
        body += struct.pack("<" + number, SAMPLE[number]) if number else b""
        body += time48(T0_MS + n) if kind == "abs" else (500 + n).to_bytes(2, "little") if kind == "rel" else b""  # fmt: skip
        prefix = {0x17: 1, 0x28: 2}.get(qualifier, 0)
        objects.append(index.to_bytes(prefix, "little") + body if prefix else body)
    width = 1 if qualifier in (0x00, 0x17) else 2
    range_ = (7).to_bytes(width, "little") + (8).to_bytes(width, "little") if qualifier < 2 else (2).to_bytes(width, "little")  # fmt: skip
    return bytes((group, variation, qualifier)) + range_ + b"".join(objects), indexes


@pytest.mark.parametrize(("group", "variation"), sorted(STANDARD))
def test_every_group_and_variation_parses_to_its_values(group: int, variation: int) -> None:
    number, has_flags, kind = STANDARD[group, variation]
    cto = bytes((51, 1, 0x07, 1)) + time48(T0_MS)  # common time of occurrence, for "rel"
    flags = ONLINE | 0x80 if number == "" else ONLINE | 0x20
    for qualifier in QUALIFIERS:
        objects, indexes = encode_objects(group, variation, qualifier, flags)
        parsed = parse_response(response(cto, objects))
        assert parsed.skipped == []
        expected_value: object
        if number == "":
            expected_value = "on" if STATIC.get(group, group) == 3 else True
        elif number == "f":
            expected_value = 16.654696  # float32_text, not 16.654695510864258
        else:
            expected_value = SAMPLE[number]
        times = {
            "abs": [T0, T0 + timedelta(milliseconds=1)],
            "rel": [T0 + timedelta(milliseconds=500), T0 + timedelta(milliseconds=501)],
            "": [None, None],
        }[kind]
        assert parsed.points == [
            Point(
                group=STATIC.get(group, group),
                variation=variation,
                index=index,
                value=expected_value,
                flags=flags if has_flags else None,
                time=when,
                event=group in STATIC,
            )
            for index, when in zip(indexes, times, strict=True)
        ]


def test_packed_binaries_and_double_bits() -> None:
    parsed = parse_response(
        response(
            bytes((1, 1, 0x00, 3, 12)) + bytes((0b1000_0101, 0b0000_0011)),  # 3..12: 10 bits
            bytes((3, 1, 0x00, 0, 4)) + bytes((0b11_10_01_00, 0b00000010)),  # 0..4: 5 pairs
            bytes((10, 1, 0x01, 0, 0, 1, 0)) + bytes((0b10,)),  # 2-octet range 0..1
        )
    )
    assert parsed.skipped == []
    bits = [(p.group, p.index, p.value) for p in parsed.points]
    assert bits[:10] == [(1, 3 + i, v) for i, v in enumerate([1, 0, 1, 0, 0, 0, 0, 1, 1, 1])]
    doubles = ["intermediate", "off", "on", "indeterminate", "on"]
    assert bits[10:15] == [(3, i, v) for i, v in enumerate(doubles)]
    assert bits[15:] == [(10, 0, False), (10, 1, True)]
    assert {p.flags for p in parsed.points} == {None}


def test_a_hand_made_event_response() -> None:
    # Unsolicited response seq 2 asking confirmation, IIN1 DEVICE_RESTART|CLASS_1_EVENTS:
    # g32v7 (float with time) index 5 = 21.5, online; then g2v2 index 1 on.
    apdu = bytes.fromhex("f2 82 82 00  20 07 28 01 00 05 00 01 00 00 ac 41") + time48(T0_MS)
    apdu += bytes.fromhex("02 02 17 01 01 81") + time48(T0_MS + 5)
    parsed = parse_response(apdu)
    assert parsed[:7] == (130, 2, True, True, True, True, 0x82)
    assert parsed.points == [
        Point(30, 7, 5, 21.5, ONLINE, T0, True),
        Point(1, 2, 1, True, 0x81, T0 + timedelta(milliseconds=5), True),
    ]
    assert indications(parsed.iin) == ["CLASS_1_EVENTS", "DEVICE_RESTART"]


def test_time_objects_and_octet_strings_are_passed_over() -> None:
    point = bytes((30, 1, 0x00, 0, 0, ONLINE)) + (42).to_bytes(4, "little", signed=True)
    apdu = response(
        bytes((50, 1, 0x07, 1)) + time48(T0_MS),
        point,
        bytes((50, 4, 0x17, 1, 9)) + time48(T0_MS) + bytes(5),  # the one dnp3py stops at
        bytes((52, 2, 0x07, 1, 10, 0)),
        bytes((80, 1, 0x00, 0, 15, 0x80, 0)),
        bytes((110, 3, 0x00, 0, 0)) + b"abc",
        point,
    )
    parsed = parse_response(apdu)
    assert parsed.skipped == []
    assert [p.value for p in parsed.points] == [42, 42]


def test_an_unknown_object_stops_the_parse_and_keeps_what_came_before() -> None:
    point = bytes((30, 1, 0x00, 0, 0, ONLINE)) + (42).to_bytes(4, "little")
    apdu = response(point, bytes((0, 254, 0x06)), point)
    parsed = parse_response(apdu)
    assert [p.value for p in parsed.points] == [42]
    assert parsed.skipped == ["g0v254 at byte 14: not read (an object it cannot size); the 13 bytes from there are lost"]  # fmt: skip
    # A qualifier it cannot size by stops the same way.
    parsed = parse_response(response(point, bytes((30, 1, 0x5B, 1, 0, 0)), point))
    assert [p.value for p in parsed.points] == [42]
    assert parsed.skipped[0].startswith("g30v1 at byte 14: not read (qualifier 0x5b)")


def test_headers_it_can_size_but_not_place_are_skipped_alone() -> None:
    point = bytes((30, 1, 0x00, 0, 0, ONLINE)) + (42).to_bytes(4, "little")
    relative = bytes((2, 3, 0x17, 1, 4, 0x81, 0, 0))  # no g51 before it
    count_only = bytes((30, 1, 0x07, 1, ONLINE)) + bytes(4)  # no index
    parsed = parse_response(response(relative, count_only, point))
    assert [p.value for p in parsed.points] == [42]
    assert [s.split(":")[0] for s in parsed.skipped] == ["g2v3 at byte 4", "g30v1 at byte 12"]


@pytest.mark.parametrize(
    "header",
    [
        bytes((30, 1, 0x01, 0, 0, 0xFF, 0xFF)),  # 65536 points by range
        bytes((30, 1, 0x28, 0xFF, 0xFF)),  # 65535 by count
        bytes((1, 1, 0x01, 0, 0, 0xFF, 0xFF)),  # 65536 packed bits
    ],
)
def test_a_count_the_bytes_do_not_hold_is_refused_without_allocating(header: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="present"):
            parse_response(response(header + b"\x01\x02\x03"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # 65,536 points would take megabytes: nothing was made for them


@pytest.mark.parametrize(
    ("apdu", "problem"),
    [
        (b"\xc0\x81\x00", "shorter than its 4-byte header"),
        (b"\xc0\x01\x00\x00", "function code 1 at byte 1 is no response"),
        (b"\xc0\x82\x00\x00", "130 with the UNS bit clear"),
        (b"\xd0\x81\x00\x00", "129 with the UNS bit set"),
        (response(bytes((30, 1))), "an object header at byte 4"),
        (response(bytes((30, 1, 0x00, 5, 4))), "range 5..4 runs backwards"),
        (response(bytes((30, 1, 0x01, 5))), "g30v1's range at byte 7"),
    ],
)
def test_malformed_responses_say_what_and_where(apdu: bytes, problem: str) -> None:
    with pytest.raises(FrameError, match=re.escape(problem)):
        parse_response(apdu)


def test_a_time_out_of_range_loses_the_time_not_the_point_nor_the_fragment() -> None:
    """Some devices send all ones for "no time": the value stays, uncertain, and parsing goes on."""
    parsed = parse_response(
        response(
            bytes((32, 3, 0x28, 1, 0, 4, 0, ONLINE)) + struct.pack("<i", 5) + b"\xff" * 6,
            bytes((30, 1, 0x00, 0, 0, ONLINE)) + struct.pack("<i", 7),
        )
    )
    event, static = parsed.points
    assert (event.group, event.index, event.value, event.time, event.event) == (
        30,
        4,
        5,
        None,
        True,
    )
    quality, reason = quality_of(event)
    assert quality == "uncertain" and "time is out of range" in (reason or "")
    assert (static.value, quality_of(static)) == (7, ("good", None))
    # Packed and flag-less variations carry no time: no time there is no fault.
    assert quality_of(Point(30, 3, 0, 1, None, None, False)) == ("good", None)


@settings(max_examples=400, deadline=None)
@given(
    body=st.binary(max_size=120)
    | st.lists(
        st.tuples(
            st.sampled_from(sorted({g for g, _ in STANDARD} | {50, 51, 52, 80, 110, 0, 12})),
            st.integers(0, 12),
            st.sampled_from((0x00, 0x01, 0x06, 0x07, 0x08, 0x17, 0x28, 0x5B)),
            st.binary(max_size=20),
        ),
        max_size=4,
    ).map(lambda hs: b"".join(bytes((g, v, q)) + rest for g, v, q, rest in hs)),
    head=st.binary(min_size=4, max_size=4) | st.just(b"\xc0\x81\x00\x00"),
)
def test_arbitrary_bytes_raise_only_frame_error(body: bytes, head: bytes) -> None:
    try:
        parsed = parse_response(head + body)
    except FrameError:
        return
    assert len(parsed.points) <= len(body) * 8
    for point in parsed.points:
        quality_of(point)


# --- flags and indications --------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "flags", "expected"),
    [
        (30, ONLINE, ("good", None)),
        (30, None, ("good", None)),
        (30, 0x00, ("bad", "DNP3 flags: not ONLINE")),
        (30, 0x02, ("bad", "DNP3 flags: not ONLINE, RESTART")),
        (30, ONLINE | 0x04, ("bad", "DNP3 flags: COMM_LOST")),
        (30, ONLINE | 0x02, ("uncertain", "DNP3 flags: RESTART")),
        (30, ONLINE | 0x10 | 0x20, ("uncertain", "DNP3 flags: LOCAL_FORCED, OVER_RANGE")),
        (40, ONLINE | 0x08 | 0x40, ("uncertain", "DNP3 flags: REMOTE_FORCED, REFERENCE_ERR")),
        (1, ONLINE | 0x20 | 0x80, ("uncertain", "DNP3 flags: CHATTER_FILTER")),
        (1, ONLINE | 0x80, ("good", None)),  # the state bit is no flag
        (3, ONLINE | 0xC0, ("good", None)),
        (10, ONLINE | 0x60, ("good", None)),  # reserved bits of an output status
        (20, ONLINE | 0x20, ("uncertain", "DNP3 flags: ROLLOVER")),
        (21, ONLINE | 0x40, ("uncertain", "DNP3 flags: DISCONTINUITY")),
    ],
)
def test_flags_map_to_quality_naming_them(
    group: int, flags: int | None, expected: tuple[str, str | None]
) -> None:
    assert quality_of(Point(group, 1, 0, 0, flags, None, False)) == expected


def test_indications_name_the_set_bits() -> None:
    assert indications(0) == []
    assert indications(0x80) == ["DEVICE_RESTART"]
    assert indications(0x70 | 0x2000 | 0x0700) == [
        "NEED_TIME", "LOCAL_CONTROL", "DEVICE_TROUBLE",
        "NO_FUNC_CODE_SUPPORT", "OBJECT_UNKNOWN", "PARAMETER_ERROR", "CONFIG_CORRUPT",
    ]  # fmt: skip
    assert indications(0x0800) == ["EVENT_BUFFER_OVERFLOW"]


# --- against the reference stack --------------------------------------------------------


@pytest.fixture
def station() -> Iterator[Dnp3Outstation]:
    with Dnp3Outstation(size=3) as outstation:
        outstation.set("analog", 0, 21.5)
        outstation.set("binary", 1, True)
        yield outstation


def exchange(connection: socket.socket, channel: Channel, request: bytes) -> bytes:
    connection.sendall(channel.request(request))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        chunk = connection.recv(4096)
        assert chunk, "the outstation closed the connection"
        connection.sendall(channel.replies())
        if apdus := channel.receive(chunk):
            return apdus[0]
    raise AssertionError("no response within 5 s")


def talk(port: int) -> tuple[Response, Response]:
    """An integrity poll and a static read, in this thread (the proxy serves in the loop)."""
    channel = Channel(master=1, outstation=1024)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        integrity = parse_response(exchange(connection, channel, read_request(0, [class_header(0)])))  # fmt: skip
        floats = parse_response(exchange(connection, channel, read_request(1, [range_header(30, 5, 0, 2)])))  # fmt: skip
    return integrity, floats


async def test_the_reference_outstation_answers_our_reads(station: Dnp3Outstation) -> None:
    async with CountingProxy(station.port) as proxy:
        integrity, floats = await asyncio.to_thread(talk, proxy.port)
    assert dict(proxy.functions) == {"READ": 2}  # what the codec sent, counted on the wire
    proxy.assert_read_only()
    assert (integrity.function, integrity.seq, integrity.skipped) == (129, 0, [])
    assert "DEVICE_RESTART" in indications(integrity.iin)  # set at start, and we leave it so
    points = {(p.group, p.index): p for p in integrity.points}
    assert {g for g, _ in points} == {1, 3, 10, 20, 21, 30, 40}
    assert points[1, 1].value is True and quality_of(points[1, 1]) == ("good", None)
    assert points[30, 0].flags == ONLINE and points[30, 0].value in (21, 22)
    assert quality_of(points[1, 0]) == ("bad", "DNP3 flags: not ONLINE, RESTART")  # never set
    assert floats.seq == 1
    assert [(p.index, p.value, p.flags) for p in floats.points] == [(0, 21.5, ONLINE), (1, 0.0, 0x02), (2, 0.0, 0x02)]  # fmt: skip
