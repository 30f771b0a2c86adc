"""The Modbus/TCP reader of passive discovery: frames built by pymodbus's own encoder (or by
struct where pymodbus would refuse to build them), fed as chunks split and coalesced any way;
every bad input a warning, never an exception."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu import bit_message as bits
from pymodbus.pdu import register_message as registers

from broker.passive.capture import Packet
from broker.passive.modbus import ModbusReader
from broker.passive.observations import Observation, Peer, Request, Values, Warnings
from broker.passive.streams import ACK, RST, SYN, Chunk, Streams

SCADA = Peer("10.0.0.5", 49152)
PLC = Peer("10.0.0.7", 502)
_FRAMER = FramerSocket(DecodePDU(False))


def frame(pdu: ModbusPDU) -> bytes:
    return _FRAMER.buildFrame(pdu)


def raw(tid: int, unit: int, pdu: bytes, *, protocol: int = 0, length: int | None = None) -> bytes:
    """A frame as a device or a hostile client may send it, whatever pymodbus would build."""
    size = len(pdu) + 1 if length is None else length
    return struct.pack(">HHHB", tid, protocol, size, unit) + pdu


def ask(
    reader: ModbusReader, data: bytes, time: float = 1.0, gap: bool = False
) -> list[Observation]:
    return reader.feed(Chunk(time=time, src=SCADA, dst=PLC, data=data, gap=gap), from_client=True)


def answer(
    reader: ModbusReader, data: bytes, time: float = 2.0, gap: bool = False
) -> list[Observation]:
    return reader.feed(Chunk(time=time, src=PLC, dst=SCADA, data=data, gap=gap), from_client=False)


def kinds(warnings: Warnings) -> dict[str, int]:
    return {kind: n for kind, n, _where in warnings.items()}


def read(unit: int, table: str, start: int, count: int, fc: int, time: float = 1.0) -> Request:
    return Request("modbus", time, SCADA.host, PLC, unit, table, start, count, f"FC{fc}", False)


def test_a_read_and_its_answer_give_the_request_then_the_words_at_the_answers_time() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    request = registers.ReadHoldingRegistersRequest(
        dev_id=3, transaction_id=7, address=100, count=3
    )
    assert ask(reader, frame(request), time=10.0) == [read(3, "holding_register", 100, 3, 3, 10.0)]
    response = registers.ReadHoldingRegistersResponse(
        dev_id=3, transaction_id=7, registers=[1, 0xFFFF, 0x8000]
    )
    assert answer(reader, frame(response), time=10.25) == [
        Values("modbus", 10.25, PLC, 3, "holding_register", 100, (1, 0xFFFF, 0x8000))
    ]
    assert len(warnings) == 0


def test_each_read_function_gives_its_table_and_its_bits_or_words() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    pattern = [True, False, True, True, False, False, False, False, True, True]
    cases = [
        (bits.ReadCoilsRequest, bits.ReadCoilsResponse, "coil", {"bits": pattern}, tuple(pattern)),
        (bits.ReadDiscreteInputsRequest, bits.ReadDiscreteInputsResponse, "discrete_input",
         {"bits": pattern}, tuple(pattern)),
        (registers.ReadHoldingRegistersRequest, registers.ReadHoldingRegistersResponse,
         "holding_register", {"registers": [5] * 10}, (5,) * 10),
        (registers.ReadInputRegistersRequest, registers.ReadInputRegistersResponse,
         "input_register", {"registers": list(range(10))}, tuple(range(10))),
    ]  # fmt: skip
    for tid, (request, response, table, payload, values) in enumerate(cases, start=1):
        asked = ask(reader, frame(request(dev_id=1, transaction_id=tid, address=20, count=10)))
        assert asked == [read(1, table, 20, 10, tid)]
        got = answer(reader, frame(response(dev_id=1, transaction_id=tid, **payload)))
        assert got == [Values("modbus", 2.0, PLC, 1, table, 20, values)]
    assert len(warnings) == 0


def test_writes_are_requests_marked_write_with_the_written_values_at_the_requests_time() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    writes = [
        (bits.WriteSingleCoilRequest(dev_id=1, transaction_id=1, address=4, bits=[True]),
         bits.WriteSingleCoilResponse(dev_id=1, transaction_id=1, address=4, bits=[True]),
         "coil", 4, (True,), 5),
        (registers.WriteSingleRegisterRequest(dev_id=1, transaction_id=2, address=9, registers=[215]),
         registers.WriteSingleRegisterResponse(dev_id=1, transaction_id=2, address=9, registers=[215]),
         "holding_register", 9, (215,), 6),
        (bits.WriteMultipleCoilsRequest(dev_id=1, transaction_id=3, address=0, bits=[False, True, True]),
         bits.WriteMultipleCoilsResponse(dev_id=1, transaction_id=3, address=0, count=3),
         "coil", 0, (False, True, True), 15),
        (registers.WriteMultipleRegistersRequest(dev_id=1, transaction_id=4, address=40, registers=[1, 2]),
         registers.WriteMultipleRegistersResponse(dev_id=1, transaction_id=4, address=40, count=2),
         "holding_register", 40, (1, 2), 16),
    ]  # fmt: skip
    for request, response, table, start, values, fc in writes:
        assert ask(reader, frame(request), time=5.0) == [
            Request("modbus", 5.0, SCADA.host, PLC, 1, table, start, len(values), f"FC{fc}", True),
            Values("modbus", 5.0, PLC, 1, table, start, values, written=True),
        ]
        assert answer(reader, frame(response)) == []  # the echo carries nothing new
    assert len(warnings) == 0


def test_a_read_write_request_is_a_read_a_write_and_the_written_values() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    request = registers.ReadWriteMultipleRegistersRequest(
        read_address=10,
        read_count=2,
        write_address=30,
        write_registers=[7, 8, 9],
        dev_id=2,
        transaction_id=5,
    )
    assert ask(reader, frame(request)) == [
        read(2, "holding_register", 10, 2, 23),
        Request("modbus", 1.0, SCADA.host, PLC, 2, "holding_register", 30, 3, "FC23", True),
        Values("modbus", 1.0, PLC, 2, "holding_register", 30, (7, 8, 9), written=True),
    ]
    response = registers.ReadWriteMultipleRegistersResponse(
        dev_id=2, transaction_id=5, registers=[11, 12]
    )
    assert answer(reader, frame(response)) == [
        Values("modbus", 2.0, PLC, 2, "holding_register", 10, (11, 12))
    ]
    assert len(warnings) == 0


def test_other_functions_are_requests_without_a_table_and_a_warning() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    restart = raw(1, 1, bytes([8, 0, 1, 0, 0]))  # diagnostics: restart communications
    identify = raw(2, 1, bytes([43, 14, 1, 0]))  # read device identification
    assert ask(reader, restart + identify) == [
        Request("modbus", 1.0, SCADA.host, PLC, 1, "", 0, 0, "FC8", True),
        Request("modbus", 1.0, SCADA.host, PLC, 1, "", 0, 0, "FC43", False),
    ]
    assert answer(reader, raw(1, 1, bytes([8, 0, 1, 0, 0]))) == []  # matched: no warning
    assert kinds(warnings) == {
        "Modbus function 8 seen (not a read or write)": 1,
        "Modbus function 43 seen (not a read or write)": 1,
    }


def test_pipelined_requests_are_matched_by_transaction_unit_and_function() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    requests = b"".join(
        frame(
            registers.ReadHoldingRegistersRequest(
                dev_id=unit, transaction_id=9, address=unit * 10, count=1
            )
        )
        for unit in (1, 2, 3)
    ) + frame(registers.ReadInputRegistersRequest(dev_id=1, transaction_id=9, address=500, count=1))
    assert len(ask(reader, requests)) == 4
    answers = [  # in another order than asked, same transaction id
        frame(registers.ReadInputRegistersResponse(dev_id=1, transaction_id=9, registers=[4])),
        frame(registers.ReadHoldingRegistersResponse(dev_id=3, transaction_id=9, registers=[3])),
        frame(registers.ReadHoldingRegistersResponse(dev_id=1, transaction_id=9, registers=[1])),
        frame(registers.ReadHoldingRegistersResponse(dev_id=2, transaction_id=9, registers=[2])),
    ]
    got = answer(reader, b"".join(answers))
    assert [(v.unit, v.table, v.start, v.values) for v in got if isinstance(v, Values)] == [
        (1, "input_register", 500, (4,)),
        (3, "holding_register", 30, (3,)),
        (1, "holding_register", 10, (1,)),
        (2, "holding_register", 20, (2,)),
    ]
    assert len(warnings) == 0


def test_connections_are_kept_apart() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    other = Peer("10.0.0.6", 40000)
    ask(
        reader,
        frame(
            registers.ReadHoldingRegistersRequest(dev_id=1, transaction_id=1, address=0, count=1)
        ),
    )
    response = frame(
        registers.ReadHoldingRegistersResponse(dev_id=1, transaction_id=1, registers=[1])
    )
    # the same answer on another connection answers nothing asked there
    assert reader.feed(Chunk(2.0, PLC, other, response, False), from_client=False) == []
    assert kinds(warnings) == {"Modbus answer to no request seen": 1}
    assert answer(reader, response) == [Values("modbus", 2.0, PLC, 1, "holding_register", 0, (1,))]


def test_an_exception_answer_gives_no_values_and_a_warning_naming_it() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    ask(
        reader,
        frame(
            registers.ReadHoldingRegistersRequest(dev_id=4, transaction_id=1, address=0, count=2)
        ),
    )
    refused = ExceptionResponse(3, exception_code=2, device_id=4, transaction=1)
    assert answer(reader, frame(refused)) == []
    assert kinds(warnings) == {"Modbus exception 2 to FC3 at unit 4": 1}
    # the request was settled: a late answer with its transaction id answers nothing
    late = frame(
        registers.ReadHoldingRegistersResponse(dev_id=4, transaction_id=1, registers=[1, 2])
    )
    assert answer(reader, late) == []
    assert kinds(warnings)["Modbus answer to no request seen"] == 1


def test_an_answer_that_does_not_fit_its_request_gives_no_values() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    ask(
        reader,
        frame(
            registers.ReadHoldingRegistersRequest(dev_id=1, transaction_id=1, address=0, count=2)
        ),
    )
    short = frame(registers.ReadHoldingRegistersResponse(dev_id=1, transaction_id=1, registers=[1]))
    assert answer(reader, short) == []
    ask(reader, frame(bits.ReadCoilsRequest(dev_id=1, transaction_id=2, address=0, count=9)))
    one_byte = frame(bits.ReadCoilsResponse(dev_id=1, transaction_id=2, bits=[True] * 8))
    assert answer(reader, one_byte) == []
    ask(
        reader,
        frame(
            registers.ReadHoldingRegistersRequest(dev_id=1, transaction_id=3, address=0, count=1)
        ),
    )
    lying = raw(3, 1, bytes([3, 4, 0, 1]))  # claims 4 bytes, carries 2
    assert answer(reader, lying) == []
    assert kinds(warnings) == {
        "Modbus FC3 answer does not fit its request": 2,
        "Modbus FC1 answer does not fit its request": 1,
    }


def test_malformed_requests_give_a_warning_and_nothing_else() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    malformed = [
        raw(1, 1, struct.pack(">BHH", 3, 0, 0)),  # no registers
        raw(2, 1, struct.pack(">BHH", 3, 0, 126)),  # more than 125
        raw(3, 1, struct.pack(">BHH", 1, 0xFFFF, 2)),  # past the last address
        raw(4, 1, struct.pack(">BHH", 5, 1, 0x1234)),  # a coil is on or off
        raw(5, 1, struct.pack(">BHHBHH", 16, 0, 2, 3, 1, 2)),  # byte count not 2 × quantity
        raw(6, 1, struct.pack(">BHHB", 15, 0, 9, 1) + b"\x01"),  # 9 coils in one byte
        raw(7, 1, struct.pack(">BHHH", 6, 0, 1, 2)),  # one word too many
    ]
    first = frame(
        registers.ReadHoldingRegistersRequest(dev_id=1, transaction_id=0, address=0, count=1)
    )
    assert len(ask(reader, first)) == 1  # framing found: malformed frames are now frames
    assert ask(reader, b"".join(malformed)) == []
    assert kinds(warnings) == {
        "Modbus FC3 request malformed": 2,
        "Modbus FC1 request malformed": 1,
        "Modbus FC5 request malformed": 1,
        "Modbus FC16 request malformed": 1,
        "Modbus FC15 request malformed": 1,
        "Modbus FC6 request malformed": 1,
    }


def test_a_bad_header_is_one_warning_then_the_next_real_frame_is_found() -> None:
    first = frame(
        registers.ReadHoldingRegistersRequest(dev_id=1, transaction_id=1, address=0, count=1)
    )
    good = frame(
        registers.ReadHoldingRegistersRequest(dev_id=1, transaction_id=2, address=5, count=1)
    )
    for bad in (
        raw(1, 1, struct.pack(">BHH", 3, 0, 1), protocol=1),
        raw(1, 1, b"\x03", length=0),
        raw(1, 1, b"\x03", length=1),
        raw(1, 1, b"\x03", length=255),
        b"GET / HTTP/1.1\r\nHost: plc\r\n\r\n",
    ):
        warnings = Warnings()
        reader = ModbusReader(warnings)
        assert len(ask(reader, first)) == 1
        assert ask(reader, bad + good) == [read(1, "holding_register", 5, 1, 3)]
        assert kinds(warnings) == {"Modbus header invalid (protocol id or length)": 1}


def test_a_capture_that_starts_mid_frame_skips_to_the_first_whole_frame_with_one_warning() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    frames = [
        frame(
            registers.WriteMultipleRegistersRequest(
                dev_id=1, transaction_id=t, address=t, registers=[0, 6, 259]
            )
        )
        for t in range(3)
    ]
    got = ask(reader, frames[0][5:] + frames[1] + frames[2])
    assert [o.start for o in got if isinstance(o, Values)] == [1, 2]
    assert kinds(warnings) == {"Modbus bytes skipped to find where a frame starts": 1}


def test_after_a_gap_the_partial_frame_is_dropped_and_framing_found_again() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    frames = [
        frame(registers.ReadHoldingRegistersRequest(dev_id=1, transaction_id=t, address=t, count=2))
        for t in range(4)
    ]
    assert len(ask(reader, frames[0] + frames[1][:5])) == 1
    # the rest of frames[1] and the start of frames[2] were lost: the chunk starts mid-frame
    got = ask(reader, frames[2][9:] + frames[3], gap=True)
    assert got == [read(1, "holding_register", 3, 2, 3)]
    assert kinds(warnings) == {
        "Modbus frame cut by a gap in the capture": 1,
        "Modbus bytes skipped to find where a frame starts": 1,
    }


@pytest.mark.parametrize("new_request_captured", [False, True])
def test_an_old_connections_request_is_never_answered_by_a_new_one_on_the_same_ports(
    new_request_captured: bool,
) -> None:
    """A connection dies with a request unanswered; the poller connects again from the same
    port and asks with the same transaction id. The answer belongs to the new request, or to
    none when the capture missed it: never to the old one (it would give hr-0's values)."""
    warnings = Warnings()
    streams, reader = Streams(warnings), ModbusReader(warnings)

    def tcp(time: float, src: Peer, seq: int, flags: int, data: bytes = b"") -> Packet:
        dst = PLC if src == SCADA else SCADA
        return Packet(int(time * 10), time, "tcp", src, dst, data, seq, flags, 0)

    def old_read(start: int) -> bytes:
        pdu = registers.ReadHoldingRegistersRequest(
            dev_id=1, transaction_id=1, address=start, count=2
        )
        return frame(pdu)

    answer_frame = frame(
        registers.ReadHoldingRegistersResponse(dev_id=1, transaction_id=1, registers=[7, 8])
    )
    capture = [
        tcp(0.0, SCADA, 100, SYN),
        tcp(0.0, PLC, 500, SYN | ACK),
        tcp(1.0, SCADA, 101, ACK, old_read(0)),  # never answered
        tcp(2.0, SCADA, 113, RST),
        tcp(3.0, SCADA, 1000, SYN),  # the same ports again
        tcp(3.0, PLC, 5000, SYN | ACK),
    ]
    if new_request_captured:
        capture.append(tcp(3.5, SCADA, 1001, ACK, old_read(100)))
    capture.append(tcp(4.0, PLC, 5001, ACK, answer_frame))
    found = [
        o
        for packet in capture
        for chunk in streams.add(packet)
        for o in reader.feed(chunk, from_client=chunk.src == SCADA)
    ]
    values = [(o.start, o.values) for o in found if isinstance(o, Values)]
    assert values == ([(100, (7, 8))] if new_request_captured else [])
    if not new_request_captured:
        assert kinds(warnings) == {"Modbus answer to no request seen": 1}


def test_a_frame_too_short_for_its_function_at_a_streams_start_is_skipped() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    ask(
        reader,
        frame(
            registers.ReadHoldingRegistersRequest(dev_id=1, transaction_id=1, address=0, count=1)
        ),
    )
    good = frame(registers.ReadHoldingRegistersResponse(dev_id=1, transaction_id=1, registers=[7]))
    got = answer(reader, raw(1, 1, b"\x03") + good)  # a read's answer of one byte
    assert got == [Values("modbus", 2.0, PLC, 1, "holding_register", 0, (7,))]
    assert kinds(warnings) == {"Modbus bytes skipped to find where a frame starts": 1}


@pytest.mark.parametrize(
    "false_start",
    [
        bytes.fromhex("0001 0000 0006 01 63 0000 0000"),  # a header, but function 99 is not public
        bytes.fromhex("0001 0000 0010 01 03"),  # a read request cannot be 16 bytes long
    ],
)
def test_after_a_gap_only_a_frame_start_that_looks_like_one_is_trusted(false_start: bytes) -> None:
    """What is left of a lost frame (a write's register values) can hold a valid MBAP header:
    after a gap, a frame start needs a public function and the length that function gives."""
    warnings = Warnings()
    reader = ModbusReader(warnings)
    good = b"".join(
        frame(registers.ReadHoldingRegistersRequest(dev_id=1, transaction_id=t, address=5, count=1))
        for t in range(3)
    )
    assert ask(reader, false_start + good, gap=True) == [read(1, "holding_register", 5, 1, 3)] * 3
    assert kinds(warnings) == {"Modbus bytes skipped to find where a frame starts": 1}


def test_unanswered_requests_are_bounded_and_reported() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings, max_pending=8)
    for tid in range(10):
        ask(
            reader,
            frame(
                registers.ReadHoldingRegistersRequest(
                    dev_id=1, transaction_id=tid, address=0, count=1
                )
            ),
        )
    assert kinds(warnings) == {
        "Modbus requests unanswered beyond 8 on one connection: oldest forgotten": 2
    }
    first = frame(registers.ReadHoldingRegistersResponse(dev_id=1, transaction_id=0, registers=[1]))
    last = frame(registers.ReadHoldingRegistersResponse(dev_id=1, transaction_id=9, registers=[1]))
    assert answer(reader, first) == []
    assert len(answer(reader, last)) == 1
    # a transaction id used again before its answer came
    again = frame(
        registers.ReadHoldingRegistersRequest(dev_id=1, transaction_id=5, address=0, count=1)
    )
    ask(reader, again)
    assert kinds(warnings)["Modbus request not answered (its transaction id was used again)"] == 1


def test_connections_are_bounded_least_recently_seen_forgotten() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings, max_connections=2)
    request = frame(
        registers.ReadHoldingRegistersRequest(dev_id=1, transaction_id=1, address=0, count=1)
    )
    response = frame(
        registers.ReadHoldingRegistersResponse(dev_id=1, transaction_id=1, registers=[1])
    )
    clients = [Peer("10.0.0.5", port) for port in (40001, 40002, 40003)]
    for client in clients:
        reader.feed(Chunk(1.0, client, PLC, request, False), from_client=True)
    assert kinds(warnings) == {"Modbus connections beyond 2: least recently seen forgotten": 1}
    assert reader.feed(Chunk(2.0, PLC, clients[0], response, False), from_client=False) == []
    assert len(reader.feed(Chunk(2.0, PLC, clients[2], response, False), from_client=False)) == 1


def test_unanswered_requests_in_all_are_bounded_least_recently_seen_connections_first() -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings, max_pending=8, max_pending_total=16)
    forgetting = (
        "Modbus requests unanswered beyond 16 in all: those of the least recently seen "
        "connections forgotten"
    )
    requests = [
        frame(registers.ReadHoldingRegistersRequest(dev_id=1, transaction_id=t, address=0, count=1))
        for t in range(6)
    ]
    clients = [Peer("10.0.0.5", port) for port in (40001, 40002, 40003, 40004)]
    for client in clients:  # 24 unanswered: the first two connections' are forgotten
        reader.feed(Chunk(1.0, client, PLC, b"".join(requests), False), from_client=True)
    assert kinds(warnings) == {forgetting: 2}
    response = frame(
        registers.ReadHoldingRegistersResponse(dev_id=1, transaction_id=5, registers=[1])
    )
    answered = [
        len(reader.feed(Chunk(2.0, PLC, client, response, False), from_client=False))
        for client in clients
    ]
    assert answered == [0, 0, 1, 1]
    # an answer frees its place: the bound is on what is still unanswered (10 now)
    for client in clients[:2]:
        for _ in range(3):
            reader.feed(Chunk(3.0, client, PLC, requests[5], False), from_client=True)
            reader.feed(Chunk(3.0, PLC, client, response, False), from_client=False)
    assert kinds(warnings)[forgetting] == 2


# A transaction: unit, table's read function, start, the values the device answers.
TRANSACTION = st.one_of(
    st.tuples(st.integers(0, 255), st.sampled_from([1, 2]), st.integers(0, 1000),
              st.lists(st.booleans(), min_size=1, max_size=40)),
    st.tuples(st.integers(0, 255), st.sampled_from([3, 4]), st.integers(0, 1000),
              st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=125)),
)  # fmt: skip
_PDUS = {
    1: (bits.ReadCoilsRequest, bits.ReadCoilsResponse, "coil", "bits"),
    2: (bits.ReadDiscreteInputsRequest, bits.ReadDiscreteInputsResponse, "discrete_input", "bits"),
    3: (registers.ReadHoldingRegistersRequest, registers.ReadHoldingRegistersResponse, "holding_register", "registers"),
    4: (registers.ReadInputRegistersRequest, registers.ReadInputRegistersResponse, "input_register", "registers"),
}  # fmt: skip


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=150, deadline=None)
@given(st.lists(TRANSACTION, min_size=1, max_size=30), st.lists(st.integers(0, 10**6), max_size=60),
       st.lists(st.integers(0, 10**6), max_size=60))  # fmt: skip
def test_frames_split_and_coalesced_any_way_give_every_request_and_value(
    transactions: list[tuple[int, int, int, list[bool] | list[int]]],
    request_cuts: list[int],
    answer_cuts: list[int],
) -> None:
    warnings = Warnings()
    reader = ModbusReader(warnings)
    requests = answers = b""
    expected_requests: list[Observation] = []
    expected_values: list[Observation] = []
    for tid, (unit, fc, start, values) in enumerate(transactions):
        request, response, table, key = _PDUS[fc]
        requests += frame(
            request(dev_id=unit, transaction_id=tid, address=start, count=len(values))
        )
        answers += frame(response(dev_id=unit, transaction_id=tid, **{key: values}))
        expected_requests.append(read(unit, table, start, len(values), fc))
        expected_values.append(Values("modbus", 2.0, PLC, unit, table, start, tuple(values)))
    got_requests = [o for piece in split(requests, request_cuts) for o in ask(reader, piece)]
    got_values = [o for piece in split(answers, answer_cuts) for o in answer(reader, piece)]
    assert got_requests == expected_requests
    assert got_values == expected_values
    assert len(warnings) == 0


# Bytes that are, or nearly are, frames: a header with any length before any function and
# body, and frames whose length is right for a body of any bytes.
_CODES = st.sampled_from([*range(25), 43, 0x81, 0x83, 0x90, 0x97, 0xFF])
HEADERISH = st.builds(
    lambda tid, length, unit, code, rest: struct.pack(">HHHBB", tid, 0, length, unit, code) + rest,
    st.integers(0, 3), st.integers(0, 260), st.integers(0, 2), _CODES, st.binary(max_size=260),
)  # fmt: skip
FRAMEISH = st.builds(
    lambda tid, unit, code, body: raw(tid, unit, bytes([code]) + body),
    st.integers(0, 3), st.integers(0, 2), _CODES, st.binary(max_size=252),
)  # fmt: skip
STREAM_PIECE = st.lists(st.one_of(st.binary(max_size=300), HEADERISH, FRAMEISH), max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans(), STREAM_PIECE.map(b"".join)), max_size=20))
def test_any_bytes_in_any_chunks_give_warnings_never_an_exception_and_hold_less_than_a_frame(
    chunks: list[tuple[bool, bool, bytes]],
) -> None:
    """And never a value nobody asked for: every value answered is for a range a request
    read, every value written follows the write request that carried it."""
    reader = ModbusReader(Warnings())
    asked: set[tuple[int, str, int, int]] = set()
    for from_client, gap, data in chunks:
        found = (ask if from_client else answer)(reader, data, gap=gap)
        for i, o in enumerate(found):
            if isinstance(o, Request) and not o.write:
                asked.add((o.unit, o.table, o.start, o.count))
            elif isinstance(o, Values) and o.written:
                assert from_client
                carrier = found[i - 1]
                assert isinstance(carrier, Request) and carrier.write
                assert (carrier.table, carrier.start, carrier.count) == (
                    o.table,
                    o.start,
                    len(o.values),
                )
            elif isinstance(o, Values):
                assert not from_client
                assert (o.unit, o.table, o.start, len(o.values)) in asked
    for connection in reader._connections.values():  # the bound itself, not observable otherwise
        assert len(connection.requests.buffer) < 260
        assert len(connection.answers.buffer) < 260


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=600), st.integers(0, 2**16 - 1), st.lists(st.integers(0, 10**6), max_size=40)
)
def test_after_garbage_and_a_gap_the_frames_beyond_one_frame_length_are_all_found(
    garbage: bytes, tid: int, cuts: list[int]
) -> None:
    """Garbage can look like a frame's start and swallow what follows, but never more than
    the longest frame (260 bytes): every frame starting beyond that is found again."""
    warnings = Warnings()
    reader = ModbusReader(warnings)
    ask(reader, garbage, gap=True)
    good = frame(
        registers.ReadHoldingRegistersRequest(dev_id=1, transaction_id=tid, address=5, count=1)
    )
    got = [o for piece in split(good * 30, cuts) for o in ask(reader, piece)]
    beyond = (len(good) * 30 - 260 - len(good)) // len(good)  # frames wholly past 260 + a frame
    assert got[-beyond:] == [read(1, "holding_register", 5, 1, 3)] * beyond
