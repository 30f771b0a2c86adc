"""The diode's datagram codec and the receiver's reordering, without sockets."""

from __future__ import annotations

import random
import struct
import zlib
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.channel import datagrams as dg
from broker.channel.sequence import HELD_BYTES, REORDER_DATAGRAMS, REORDER_S, Lost, Reorder
from broker.records import Context, Record, encode_frame_payload

SESSION = 0x1234_5678_9ABC_DEF0


def record(seq: int, signal: str = "site/area/asset/measure", value: object = 1.5) -> Record:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    return Record(
        signal=signal, value=value, unit="bar", quality="good", source_time=now,
        broker_time=now, policy_version=1, context=Context(), seq=seq,
    )  # fmt: skip


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_are_decoded_or_refused_with_a_reason(data: bytes) -> None:
    try:
        dg.decode(data)
    except dg.DatagramError as e:
        assert e.reason


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(sorted(dg.KIND_NAMES)),
    st.integers(0, 2**64 - 1),
    st.integers(1, 2**64 - 1),
    st.binary(max_size=1500),
)
def test_a_datagram_with_a_valid_crc_and_any_payload_is_decoded_or_refused(
    kind: int, session: int, seq: int, payload: bytes
) -> None:
    """A CRC is no check of content: a well-framed datagram with a hostile payload must
    still end in a decode or a DatagramError."""
    try:
        got = dg.decode(dg.encode(kind, session, seq, payload))
    except dg.DatagramError as e:
        assert e.reason == "payload"
    else:
        assert (got.kind, got.session, got.seq) == (kind, session, seq)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=dg.HEADER.size, max_size=600), st.data())
def test_every_single_bit_flip_of_a_datagram_is_refused(
    payload: bytes, data: st.DataObject
) -> None:
    whole = bytearray(dg.encode(dg.CHECKPOINT, SESSION, 7, payload))
    bit = data.draw(st.integers(0, len(whole) * 8 - 1))
    whole[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(dg.DatagramError):
        dg.decode(bytes(whole))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "short"),
        (b"DD" + bytes(10), "short"),
        (b"XX" + bytes(40), "magic"),
        (dg.encode(dg.RECORDS, SESSION, 1, b"x")[:-1] + b"y", "crc"),
        (dg.encode(99, SESSION, 1, b"x"), "kind"),
        (dg.encode(dg.HEARTBEAT, SESSION, 0, bytes(16)), "seq"),
        (dg.encode(dg.HEARTBEAT, SESSION, 1, bytes(15)), "payload"),
        (dg.encode(dg.RECORDS, SESSION, 1, b"\x90"), "payload"),  # an empty array
        (bytes(dg.MAX_DATAGRAM + 1), "oversized"),
    ],
)
def test_refusals_name_their_reason(data: bytes, reason: str) -> None:
    with pytest.raises(dg.DatagramError) as refused:
        dg.decode(data)
    assert refused.value.reason == reason


def test_another_version_is_refused() -> None:
    head = struct.pack("<2sBBQQ", b"DD", 2, dg.HEARTBEAT, SESSION, 1)
    payload = bytes(16)
    data = head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload
    with pytest.raises(dg.DatagramError) as refused:
        dg.decode(data)
    assert refused.value.reason == "version"


def test_records_are_packed_to_fit_and_numbered_from_one() -> None:
    framer = dg.Framer(SESSION, 1400)
    records = [record(seq, f"site/a/{seq}/m") for seq in range(1, 101)]
    out = framer.records(records)
    assert 1 < len(out) < 100 and all(len(d) <= 1400 for d in out)
    decoded = [dg.decode(d) for d in out]
    assert [d.seq for d in decoded] == list(range(1, len(out) + 1))
    assert [r.seq for d in decoded for r in d.body] == list(range(1, 101))  # type: ignore[union-attr]


def test_a_record_larger_than_a_datagram_is_fragmented_and_each_fragment_stands_alone() -> None:
    framer = dg.Framer(SESSION, 512)
    big = record(9, value="x" * 5000)
    out = framer.records([record(8), big, record(10)])
    decoded = [dg.decode(d) for d in out]
    kinds = [d.kind for d in decoded]
    assert kinds[0] == dg.RECORDS and kinds[-1] == dg.RECORDS
    fragments = [d.body for d in decoded if isinstance(d.body, dg.Fragment)]
    assert len(fragments) >= 10 and all(len(d) <= 512 for d in out)
    assert [f.part for f in fragments] == list(range(len(fragments)))
    whole = dg.decode_body(fragments[0].kind, b"".join(f.chunk for f in fragments))
    assert whole == [big]


def test_a_large_checkpoint_is_fragmented() -> None:
    entry = b'{"event":"audit_checkpoint","x":"' + b"y" * 3000 + b'"}'
    out = dg.Framer(SESSION, 1000).checkpoint(entry)
    fragments = [dg.decode(d).body for d in out]
    assert all(isinstance(f, dg.Fragment) and f.kind == dg.CHECKPOINT for f in fragments)
    assert b"".join(f.chunk for f in fragments) == entry  # type: ignore[union-attr]


def test_a_heartbeat_carries_the_last_record_seq_and_the_count_sent() -> None:
    framer = dg.Framer(SESSION, 1400)
    framer.records([record(1)])
    beat = dg.decode(framer.heartbeat(41, 1000))
    assert (beat.kind, beat.seq, beat.body) == (dg.HEARTBEAT, 2, dg.Heartbeat(41, 1000))


def test_reorder_releases_in_order_and_drops_duplicates() -> None:
    order: Reorder[int] = Reorder()
    arrivals = [3, 1, 1, 2, 5, 4, 3, 6]
    assert [order.offer(s, s, 0.0) for s in arrivals] == [
        True, True, False, True, True, True, False, True,
    ]  # fmt: skip
    assert order.release(0.0) == [1, 2, 3, 4, 5, 6]
    assert order.duplicates == 2
    assert not order.offer(2, 2, 0.0)  # after release, still a duplicate


def test_a_gap_is_declared_only_after_the_window_and_exactly_once() -> None:
    order: Reorder[int] = Reorder()
    for s in (1, 2, 5, 6, 9):
        order.offer(s, s, 10.0)
    assert order.release(10.0 + REORDER_S / 2) == [1, 2]  # 3 and 4 may still come
    assert order.offer(4, 4, 10.1)
    assert order.release(10.0 + REORDER_S) == [Lost(3, 3), 4, 5, 6, Lost(7, 8), 9]
    assert order.release(100.0) == []
    assert not order.offer(3, 3, 100.0)  # late: counted as a duplicate, never delivered


def test_a_gap_is_declared_early_when_the_window_in_datagrams_has_passed() -> None:
    order: Reorder[int] = Reorder()
    order.offer(1, 1, 0.0)
    last = REORDER_DATAGRAMS + 3
    order.offer(last, last, 0.0)
    assert order.release(0.0) == [1, Lost(2, last - 1), last]


def test_random_loss_duplication_and_reordering_reports_exactly_the_losses() -> None:
    rng = random.Random(14)
    total = 5000
    dropped = {s for s in range(1, total + 1) if rng.random() < 0.05}
    arrivals = [s for s in range(1, total + 1) if s not in dropped]
    arrivals += rng.sample(arrivals, 300)  # duplicates
    for i in range(0, len(arrivals) - 8, 8):  # reordered within small windows
        window = arrivals[i : i + 8]
        rng.shuffle(window)
        arrivals[i : i + 8] = window
    order: Reorder[int] = Reorder()
    released: list[int | Lost] = []
    for s in arrivals:
        order.offer(s, s, 0.0)
        released += order.release(0.0)
    released += order.end()
    delivered = [x for x in released if isinstance(x, int)]
    lost = {s for x in released if isinstance(x, Lost) for s in range(x.first, x.last + 1)}
    assert delivered == sorted(set(arrivals))
    assert lost == dropped


def test_a_gap_is_declared_early_when_what_is_held_exceeds_its_bytes() -> None:
    order: Reorder[bytes] = Reorder()
    order.offer(1, b"a", 0.0, 1)
    size = HELD_BYTES // 4
    for seq in range(3, 8):  # 5 datagrams of a quarter of the bound wait behind seq 2
        order.offer(seq, b"x", 0.0, size)
    assert order.held_bytes == 1 + 5 * size
    assert order.release(0.0) == [b"a", Lost(2, 2), *[b"x"] * 5]
    assert order.held_bytes == 0


def test_pieces_are_numbered_when_sent_whatever_came_between() -> None:
    """The sender queues pieces and numbers each as it sends it: a heartbeat made while
    data waits takes the next seq, and a fragmented message still names its first part."""
    framer = dg.Framer(SESSION, 512)
    pieces = framer.pieces([record(1), record(2, value="x" * 2000)])
    assert framer.seq == 0 and [p.kind for p in pieces][:2] == [dg.RECORDS, dg.FRAGMENT]
    beat = dg.decode(framer.heartbeat(0, 0))
    numbered = [dg.decode(framer.number(p)) for p in pieces]
    assert beat.seq == 1 and [d.seq for d in numbered] == list(range(2, 2 + len(pieces)))
    fragments = [d.body for d in numbered if isinstance(d.body, dg.Fragment)]
    assert {f.message for f in fragments} == {3} and pieces[-1].last_record_seq == 2


def test_a_shared_context_payload_is_refused_and_the_next_datagram_decodes() -> None:
    """The sender writes bare record arrays only (ADR 0030): the spool's shared-context map,
    and the rows it would multiply, are never parsed from the diode's port."""
    shared = encode_frame_payload([record(1), record(2)])
    with pytest.raises(dg.DatagramError, match="records: Expected `array`, got `object`") as e:
        dg.decode(dg.encode(dg.RECORDS, SESSION, 1, shared))
    assert e.value.reason == "payload"
    (good,) = dg.Framer(SESSION, dg.MIN_DATAGRAM).records([record(3)])
    assert dg.decode(good).body == [record(3)]
