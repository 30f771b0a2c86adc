"""The DNP3 link and transport layers (broker/plant/connectors/dnp3_frames.py): frames and
CRCs, addresses, the link answers a master owes, and transport reassembly, on crafted bytes.
The yadnp3 outstation's reading of our frames is in test_dnp3_objects.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.plant.connectors.dnp3_frames import (
    DIR,
    FCB,
    FCV,
    FIN,
    FIR,
    MAX_ADDRESS,
    MAX_FRAGMENT,
    PRI_CONFIRMED_USER_DATA,
    PRI_REQUEST_LINK_STATUS,
    PRI_RESET_LINK_STATES,
    PRI_TEST_LINK_STATES,
    PRI_UNCONFIRMED_USER_DATA,
    PRM,
    SEC_ACK,
    SEC_LINK_STATUS,
    Channel,
    FrameError,
    Reassembler,
    crc16,
    encode_frame,
    segment,
)

MASTER, OUTSTATION = 1, 1024
UNCONFIRMED = PRM | PRI_UNCONFIRMED_USER_DATA  # from an outstation: DIR clear
addresses = st.integers(0, MAX_ADDRESS)
apdus = st.binary(min_size=1, max_size=MAX_FRAGMENT)


def outstation_frames(apdu: bytes, master: int = MASTER, outstation: int = OUTSTATION) -> bytes:
    return b"".join(encode_frame(UNCONFIRMED, master, outstation, s) for s in segment(apdu, seq=5))


class CountingChannel(Channel):
    """The master's Channel, counting its work instead of timing it (a loaded CI machine
    stalls for seconds; the work does not change): headers checked, one per turn of the
    receive loop, and bytes of the frames parsed, each block's CRC computed over them."""

    def __init__(self) -> None:
        super().__init__(MASTER, OUTSTATION)
        self.headers = 0
        self.framed = 0

    def _check_header(self, header: bytes) -> int:
        self.headers += 1
        return super()._check_header(header)

    def _frame(self, frame: bytes) -> bytes | None:
        self.framed += len(frame)
        return super()._frame(frame)


def unframe(frames: bytes) -> list[tuple[int, int, int, bytes]]:
    """(control, destination, source, user data) of each frame, checking every CRC: the
    reading of an outstation, written here from the standard and not from the module."""
    out = []
    while frames:
        assert frames[:2] == b"\x05\x64"
        assert int.from_bytes(frames[8:10], "little") == crc16(frames[:8])
        user = frames[2] - 5
        pos, data = 10, b""
        while len(data) < user:
            block = frames[pos : pos + min(16, user - len(data))]
            assert frames[pos + len(block) : pos + len(block) + 2] == crc16(block).to_bytes(
                2, "little"
            )
            data += block
            pos += len(block) + 2
        dest, src = (int.from_bytes(frames[i : i + 2], "little") for i in (4, 6))
        out.append((frames[3], dest, src, data))
        frames = frames[pos:]
    return out


def test_crc16_dnp_check_value() -> None:
    # The catalogue check value of CRC-16/DNP: the CRC of the nine octets "123456789".
    assert crc16(b"123456789") == 0xEA82


def test_frames_match_the_reference_stack_and_the_standard() -> None:
    # opendnp3's own test vector: RESET_LINK_STATES from 1024 to 1 (we build, never send it).
    assert encode_frame(PRM | DIR | 0, 1, 1024).hex(" ") == "05 64 05 c0 01 00 00 04 e9 21"
    # An integrity poll (READ class 0) from master 1 to outstation 1024: one segment, FIR|FIN.
    frames = Channel(MASTER, OUTSTATION).request(bytes.fromhex("c0013c0106"))
    assert frames.hex(" ") == "05 64 0b c4 00 04 01 00 ca 8a c0 c0 01 3c 01 06 ff 50"


@settings(max_examples=150, deadline=None)
@given(master=addresses, outstation=addresses, apdu=apdus, cut=st.integers(1, 300))
def test_apdus_from_the_outstation_come_through_whole(
    master: int, outstation: int, apdu: bytes, cut: int
) -> None:
    if master == outstation:
        return
    wire = outstation_frames(apdu, master, outstation)
    channel = Channel(master, outstation)
    got = []
    for i in range(0, len(wire), cut):  # in any chunking
        got += channel.receive(wire[i : i + cut])
    assert got == [apdu]
    assert channel.replies() == b""


@settings(max_examples=100, deadline=None)
@given(master=addresses, outstation=addresses, apdu=apdus)
def test_requests_are_unconfirmed_user_data_from_master_to_outstation(
    master: int, outstation: int, apdu: bytes
) -> None:
    if master == outstation:
        return
    channel = Channel(master, outstation)
    for _ in range(2):  # the transport sequence carries on between requests
        reassembler = Reassembler()
        rebuilt = []
        for control, dest, src, data in unframe(channel.request(apdu)):
            assert control == DIR | PRM | PRI_UNCONFIRMED_USER_DATA
            assert (dest, src) == (outstation, master)
            assert 2 <= len(data) <= 250
            rebuilt.append(reassembler.add(data))
        assert rebuilt[-1] == apdu and set(rebuilt[:-1]) <= {None}


@settings(max_examples=150, deadline=None)
@given(apdu=st.binary(min_size=1, max_size=400), data=st.data())
def test_any_single_flipped_bit_is_caught(apdu: bytes, data: st.DataObject) -> None:
    wire = bytearray(outstation_frames(apdu))
    bit = data.draw(st.integers(0, len(wire) * 8 - 1))
    wire[bit // 8] ^= 1 << bit % 8
    with pytest.raises(FrameError):
        Channel(MASTER, OUTSTATION).receive(bytes(wire))


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=8), prefix=st.booleans())
def test_arbitrary_bytes_raise_only_frame_error_and_return_quickly(
    chunks: list[bytes], prefix: bool
) -> None:
    channel = CountingChannel()
    received = [b"\x05\x64"] * prefix + chunks  # the prefix: into the header and CRC checks
    try:
        for chunk in received:
            for apdu in channel.receive(chunk):
                assert 0 < len(apdu) <= MAX_FRAGMENT
    except FrameError:
        pass
    # quickly: work linear in the input. Each turn of the loop consumes a frame (10 bytes at
    # least) or ends the call, and each byte is parsed in one frame at most.
    total = sum(len(chunk) for chunk in received)
    assert channel.headers <= total // 10 + len(received)
    assert channel.framed <= total


@pytest.mark.parametrize(
    ("source", "destination", "control"),
    [
        (OUTSTATION + 1, MASTER, UNCONFIRMED),  # another outstation
        (OUTSTATION, MASTER + 1, UNCONFIRMED),  # to another master
        (OUTSTATION, 0xFFFF, UNCONFIRMED),  # a broadcast
        (OUTSTATION, MASTER, UNCONFIRMED | DIR),  # a master's frame
        (OUTSTATION, MASTER, PRM | PRI_REQUEST_LINK_STATUS),  # length 5 needed: data is here
    ],
)
def test_frames_not_from_the_outstation_to_the_master_are_refused(
    source: int, destination: int, control: int
) -> None:
    channel = Channel(MASTER, OUTSTATION)
    frame = encode_frame(control, destination, source, bytes((FIR | FIN, 0xC0, 0x81, 0, 0)))
    with pytest.raises(FrameError, match="frame at byte 0"):
        channel.receive(frame)
    assert channel.replies() == b""


def test_a_bad_start_is_refused_at_once_and_a_partial_one_waits() -> None:
    with pytest.raises(FrameError, match="no frame start"):
        Channel(MASTER, OUTSTATION).receive(b"\x05\x65")
    with pytest.raises(FrameError, match="no frame start"):
        Channel(MASTER, OUTSTATION).receive(b"\x00")
    channel = Channel(MASTER, OUTSTATION)
    good = encode_frame(UNCONFIRMED, MASTER, OUTSTATION, b"\xc0\xc0\x81\x00\x00")
    assert channel.receive(good + b"\x05") == [b"\xc0\x81\x00\x00"]
    with pytest.raises(FrameError, match=f"byte {len(good)}"):
        channel.receive(b"\x00")


def test_link_status_is_answered_once_reset_and_test_are_acked() -> None:
    channel = Channel(MASTER, OUTSTATION)
    ask = encode_frame(PRM | PRI_REQUEST_LINK_STATUS, MASTER, OUTSTATION)
    assert channel.receive(ask + ask) == []
    # LINK_STATUS (11) from master 1 to outstation 1024, DIR set, PRM clear: 0x8B.
    assert channel.replies().hex(" ") == "05 64 05 8b 00 04 01 00 2e f7"
    assert channel.replies() == b""
    ack = encode_frame(DIR | SEC_ACK, OUTSTATION, MASTER)
    channel.receive(encode_frame(PRM | PRI_RESET_LINK_STATES, MASTER, OUTSTATION))
    assert channel.replies() == ack  # a secondary owes it: an answer, never a request of ours
    channel.receive(encode_frame(PRM | FCV | FCB | PRI_TEST_LINK_STATES, MASTER, OUTSTATION))
    assert channel.replies() == ack
    channel.receive(encode_frame(SEC_ACK, MASTER, OUTSTATION))  # answers nothing we sent
    assert channel.replies() == b""


def test_after_a_link_reset_a_confirmed_frame_is_new_whatever_its_fcb() -> None:
    channel = Channel(MASTER, OUTSTATION)
    segment_ = bytes((FIR | FIN, 0xC0, 0x81, 0, 0))
    confirmed = encode_frame(
        PRM | FCV | FCB | PRI_CONFIRMED_USER_DATA, MASTER, OUTSTATION, segment_
    )
    assert channel.receive(confirmed) == [segment_[1:]]
    channel.receive(encode_frame(PRM | PRI_RESET_LINK_STATES, MASTER, OUTSTATION))
    assert channel.receive(confirmed) == [segment_[1:]]  # the same FCB, but after a reset


def test_confirmed_user_data_is_acked_and_a_repeat_is_not_used_twice() -> None:
    channel = Channel(MASTER, OUTSTATION)
    segment_ = bytes((FIR | FIN, 0xC0, 0x81, 0, 0))
    confirmed = PRM | FCV | PRI_CONFIRMED_USER_DATA
    first = encode_frame(confirmed | FCB, MASTER, OUTSTATION, segment_)
    ack = encode_frame(DIR | SEC_ACK, OUTSTATION, MASTER)
    assert channel.receive(first) == [segment_[1:]]
    assert channel.replies() == ack
    assert channel.receive(first) == []  # its ACK was lost: the same FCB again
    assert channel.replies() == ack
    assert channel.receive(encode_frame(confirmed, MASTER, OUTSTATION, segment_)) == [segment_[1:]]
    assert [control for control, *_ in unframe(channel.replies())] == [DIR | SEC_ACK]


def test_replies_never_hold_a_link_request() -> None:
    channel = Channel(MASTER, OUTSTATION)
    for function in range(16):
        for control in (PRM | function, function):
            data = b"\xc0\xc0\x81\x00\x00" if function in (3, 4) and control & PRM else b""
            try:
                channel.receive(encode_frame(control, MASTER, OUTSTATION, data))
            except FrameError:
                channel = Channel(MASTER, OUTSTATION)
            for control_sent, *_ in unframe(channel.replies()):
                assert not control_sent & PRM
                assert control_sent & 0x0F in (SEC_ACK, SEC_LINK_STATUS)


def test_out_of_sequence_segments_are_discarded() -> None:
    parts = [bytes([n]) * 249 for n in range(3)]
    reassembler = Reassembler()
    assert reassembler.add(bytes((7,)) + parts[0]) is None  # no FIR: nothing in progress
    assert reassembler.add(bytes((FIR | 10,)) + parts[0]) is None
    assert reassembler.add(bytes((12,)) + parts[2]) is None  # seq 12, not 11: dropped
    assert reassembler.add(bytes((11,)) + parts[1]) is None
    assert reassembler.add(bytes((FIN | 12,)) + parts[2]) == b"".join(parts)
    # A FIR in the middle starts over.
    assert reassembler.add(bytes((FIR | 63,)) + parts[0]) is None
    assert reassembler.add(bytes((FIR | FIN | 1,)) + parts[1]) == parts[1]
    # The sequence wraps from 63 to 0.
    assert reassembler.add(bytes((FIR | 63,)) + parts[0]) is None
    assert reassembler.add(bytes((FIN | 0,)) + parts[1]) == parts[0] + parts[1]


def test_a_fragment_over_max_fragment_is_refused() -> None:
    channel = Channel(MASTER, OUTSTATION)
    assert channel.receive(outstation_frames(bytes(MAX_FRAGMENT))) == [bytes(MAX_FRAGMENT)]
    with pytest.raises(FrameError, match=f"past {MAX_FRAGMENT} bytes"):
        channel.receive(outstation_frames(bytes(MAX_FRAGMENT + 1)))


def test_misuse_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="master and outstation share"):
        Channel(3, 3)
    with pytest.raises(ValueError, match="outstation address 65535"):
        Channel(1, 0xFFFF)
    with pytest.raises(ValueError, match="empty APDU"):
        Channel(1, 2).request(b"")
    with pytest.raises(ValueError, match="at most 250"):
        encode_frame(0, 1, 2, bytes(251))


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(
        st.tuples(st.integers(0, 255), st.binary(max_size=250)), min_size=1, max_size=12
    )
)
def test_well_framed_arbitrary_link_traffic_raises_only_frame_error(
    frames: list[tuple[int, bytes]],
) -> None:
    # CRCs right, addresses right: every control octet and any user data, past the CRCs.
    channel = Channel(MASTER, OUTSTATION)
    try:
        for control, data in frames:
            for apdu in channel.receive(encode_frame(control, MASTER, OUTSTATION, data)):
                assert 0 < len(apdu) <= MAX_FRAGMENT
            for control_sent, *_ in unframe(channel.replies()):
                assert control_sent in (DIR | SEC_ACK, DIR | SEC_LINK_STATUS)
    except FrameError:
        pass


def test_a_large_chunk_is_read_whole_in_bounded_time() -> None:
    fragment = outstation_frames(bytes(MAX_FRAGMENT))
    wire = fragment * 200  # 200 fragments, ~480 kB in one chunk
    channel = CountingChannel()
    assert len(channel.receive(wire)) == 200
    # bounded by the work, not the clock: each frame's header checked once, each byte parsed
    # once (a second pass, or a rescan per frame, would show here)
    assert channel.headers == 200 * len(unframe(fragment))
    assert channel.framed == len(wire)


def test_a_chunk_of_many_link_service_requests_gets_one_answer_each_kind() -> None:
    """A primary waits for each answer before its next frame: a chunk of 100 asks is a
    flood, answered once, not amplified; confirmed user data is still acked frame by frame."""
    channel = Channel(MASTER, OUTSTATION)
    link_status = encode_frame(DIR | SEC_LINK_STATUS, OUTSTATION, MASTER)
    ack = encode_frame(DIR | SEC_ACK, OUTSTATION, MASTER)
    asks = encode_frame(PRM | PRI_REQUEST_LINK_STATUS, MASTER, OUTSTATION) * 100
    assert channel.receive(asks) == []
    assert channel.replies() == link_status
    resets = encode_frame(PRM | PRI_RESET_LINK_STATES, MASTER, OUTSTATION) * 100
    tests = encode_frame(PRM | FCV | FCB | PRI_TEST_LINK_STATES, MASTER, OUTSTATION) * 100
    channel.receive(resets + tests + asks)
    assert channel.replies() == ack + ack + link_status  # one per kind asked
    channel.receive(asks)
    assert channel.replies() == link_status  # the next chunk is answered again
    segment_ = bytes((FIR | FIN, 0xC0, 0x81, 0, 0))
    data = [
        encode_frame(PRM | FCV | fcb | PRI_CONFIRMED_USER_DATA, MASTER, OUTSTATION, segment_)
        for fcb in (FCB, 0, FCB)
    ]
    assert channel.receive(b"".join(data)) == [segment_[1:]] * 3
    assert channel.replies() == ack * 3
