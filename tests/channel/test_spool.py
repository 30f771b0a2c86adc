"""The one-way spool: SpoolSender writes segment files, SpoolReceiver reads them in order."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog

from broker.channel import spool as spool_module
from broker.channel.spool import (
    CHECKPOINT_MAGIC,
    FRAME_RECORDS,
    HEADER,
    KINDS,
    MAGIC,
    MAX_PAYLOAD,
    POSITION_FILE,
    RESYNC_MAGIC,
    Position,
    SpoolReceiver,
    SpoolSender,
    frame,
    parse_frames,
    segment_numbers,
    segment_path,
)
from broker.errors import ChannelError
from broker.folder_lock import FolderLockError
from broker.records import Context, Record, decode_frame_payload, encode_frame_payload

SEGMENT_BYTES = 4096
RETENTION_BYTES = 1 << 30  # effectively unlimited


def record(value: object) -> Record:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    return Record(
        signal="site/area/asset/measure",
        value=value,
        unit="bar",
        quality="good",
        source_time=now,
        broker_time=now,
        policy_version=1,
        context=Context(),
    )


def send(spool: Path, values: list[object], batch: int = 5, **sizes: int) -> None:
    """Send `values` as records, `batch` at a time, with a fresh sender that is then closed."""
    sender = SpoolSender(
        spool,
        segment_bytes=sizes.get("segment_bytes", SEGMENT_BYTES),
        retention_bytes=sizes.get("retention_bytes", RETENTION_BYTES),
    )
    try:
        for i in range(0, len(values), batch):
            sender.send([record(v) for v in values[i : i + batch]])
    finally:
        sender.close()


def drain(receiver: SpoolReceiver, rounds: int = 200) -> list[Record]:
    """Everything the receiver has to give right now (bounded)."""
    out: list[Record] = []
    for _ in range(rounds):
        batch = receiver.receive()
        if not batch:
            return out
        out.extend(batch)
    raise AssertionError(f"receiver still delivering after {rounds} rounds")


def seqs(records: list[Record]) -> list[int]:
    return [r.seq for r in records]


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def test_records_round_trip_in_order_across_segments(spool: Path, state: Path) -> None:
    send(spool, list(range(100)))
    assert len(segment_numbers(spool)) > 2  # the test really crosses segments

    got = drain(SpoolReceiver(spool, state))

    assert seqs(got) == list(range(1, 101))
    assert [r.value for r in got] == list(range(100))


def test_sender_stamps_seq_on_the_records_it_sends(spool: Path) -> None:
    sender = SpoolSender(spool, SEGMENT_BYTES, RETENTION_BYTES)
    batch = [record(i) for i in range(3)]
    sender.send(batch)
    sender.close()

    assert seqs(batch) == [1, 2, 3]


def test_new_sender_continues_seq_and_starts_a_new_segment(spool: Path, state: Path) -> None:
    send(spool, list(range(10)))
    before = segment_numbers(spool)

    sender = SpoolSender(spool, SEGMENT_BYTES, RETENTION_BYTES)
    after = segment_numbers(spool)
    sender.send([record("again")])
    sender.close()

    assert sender.next_seq == 12
    assert after == [*before, before[-1] + 1]
    assert seqs(drain(SpoolReceiver(spool, state))) == list(range(1, 12))


def test_a_second_sender_is_refused_while_the_receiver_reads_without_a_lock(
    spool: Path, state: Path
) -> None:
    sender = SpoolSender(spool, SEGMENT_BYTES, RETENTION_BYTES)
    try:
        segments = segment_numbers(spool)
        with pytest.raises(FolderLockError, match=f"{spool}: in use by another dmzbroker"):
            SpoolSender(spool, SEGMENT_BYTES, RETENTION_BYTES)
        assert segment_numbers(spool) == segments  # the refused one created nothing
        sender.send([record(i) for i in range(3)])
        assert seqs(drain(SpoolReceiver(spool, state))) == [1, 2, 3]  # readers need no lock
    finally:
        sender.close()
    again = SpoolSender(spool, SEGMENT_BYTES, RETENTION_BYTES)  # close() let go of it
    again.close()


def test_new_receiver_resumes_after_the_committed_position(spool: Path, state: Path) -> None:
    send(spool, list(range(10)))
    first = SpoolReceiver(spool, state)
    assert seqs(drain(first)) == list(range(1, 11))
    first.commit()
    first.close()
    send(spool, list(range(10, 20)))

    second = SpoolReceiver(spool, state)

    assert second.last_seq == 10
    assert seqs(drain(second)) == list(range(11, 21))


def test_receiver_without_commit_redelivers_from_the_last_commit(spool: Path, state: Path) -> None:
    send(spool, list(range(10)))
    first = SpoolReceiver(spool, state)
    drain(first)
    first.commit()
    send(spool, list(range(10, 15)))
    assert seqs(drain(first)) == list(range(11, 16))
    first.close()  # no commit for seq 11..15

    second = SpoolReceiver(spool, state)

    assert seqs(drain(second)) == list(range(11, 16))


# Bad bytes at the end of a segment, each one what a crash (or a bad disk) can leave behind.
# The records inside use seq 11, the seq the next sender gives out: misparsing one would show
# up as a duplicate seq 11 or as a "TORN"/"CORRUPT" value.
def half_frame() -> bytes:
    r = record("TORN")
    r.seq = 11
    whole = frame(encode_frame_payload([r]))
    return whole[: len(whole) // 2]


def bad_crc_frame() -> bytes:
    r = record("CORRUPT")
    r.seq = 11
    whole = bytearray(frame(encode_frame_payload([r])))
    whole[6] ^= 0xFF  # first byte of the CRC field
    return bytes(whole)


def zeros() -> bytes:
    return bytes(37)


BAD_TAILS = pytest.mark.parametrize(
    "bad", [half_frame, bad_crc_frame, zeros], ids=lambda f: f.__name__
)


def append_to_newest_segment(spool: Path, data: bytes) -> None:
    with segment_path(spool, segment_numbers(spool)[-1]).open("ab") as f:
        f.write(data)


@BAD_TAILS
def test_torn_tail_of_a_final_segment_is_skipped_and_counted(
    spool: Path, state: Path, bad: Callable[[], bytes]
) -> None:
    send(spool, list(range(10)))
    tail = bad()
    append_to_newest_segment(spool, tail)
    send(spool, list(range(10, 20)))  # a new sender: the torn segment is now final

    receiver = SpoolReceiver(spool, state)
    got = drain(receiver)

    assert seqs(got) == list(range(1, 21))
    assert [r.value for r in got] == list(range(20))
    assert receiver.torn_bytes == len(tail)
    assert receiver.bad_records == 0


@BAD_TAILS
def test_receiver_waits_at_bad_bytes_in_the_newest_segment(
    spool: Path, state: Path, bad: Callable[[], bytes]
) -> None:
    send(spool, list(range(5)))
    tail = bad()
    append_to_newest_segment(spool, tail)
    receiver = SpoolReceiver(spool, state)
    assert seqs(drain(receiver)) == [1, 2, 3, 4, 5]

    assert receiver.receive() == []
    assert receiver.receive() == []
    assert receiver.torn_bytes == 0  # not skipped: the segment may still grow

    send(spool, list(range(5, 10)))

    assert seqs(drain(receiver)) == [6, 7, 8, 9, 10]
    assert receiver.torn_bytes == len(tail)


def test_retention_deletes_old_segments_and_receiver_counts_lost_records(
    spool: Path, state: Path
) -> None:
    sizes = {"segment_bytes": 1024, "retention_bytes": 4096}
    total = 300
    send(spool, list(range(10)), batch=1, **sizes)
    receiver = SpoolReceiver(spool, state)
    early = drain(receiver)
    receiver.close()
    assert seqs(early) == list(range(1, 11))

    send(spool, list(range(10, total)), batch=1, **sizes)
    oldest = segment_numbers(spool)[0]
    assert oldest > 1  # retention did delete segments
    frames, _, _ = parse_frames(segment_path(spool, oldest).read_bytes())
    first_kept = decode_frame_payload(frames[0].payload)[0].seq
    assert first_kept > 11  # records 11.. were deleted before the receiver read them

    late = drain(receiver)

    assert seqs(late) == list(range(first_kept, total + 1))
    assert receiver.lost_records == first_kept - 11
    assert receiver.lost_records == total - len(early) - len(late)


def test_fresh_receiver_counts_records_expired_before_its_first_read(
    spool: Path, state: Path
) -> None:
    send(spool, list(range(300)), batch=1, segment_bytes=1024, retention_bytes=4096)
    receiver = SpoolReceiver(spool, state)

    got = drain(receiver)

    assert got[0].seq > 1  # the first records expired
    assert receiver.lost_records == got[0].seq - 1


def test_receiver_continues_in_order_after_lost_records(spool: Path, state: Path) -> None:
    sizes = {"segment_bytes": 1024, "retention_bytes": 4096}
    send(spool, list(range(5)), batch=1, **sizes)
    receiver = SpoolReceiver(spool, state)
    drain(receiver)
    receiver.close()
    send(spool, list(range(5, 300)), batch=1, **sizes)
    drain(receiver)
    lost = receiver.lost_records
    assert lost > 0

    send(spool, list(range(300, 310)), batch=1, **sizes)

    assert seqs(drain(receiver)) == list(range(301, 311))
    assert receiver.lost_records == lost


# Audit checkpoint frames: the plant's checkpoints crossing to be witnessed


def checkpoint_line(seq: int) -> bytes:
    return b'{"event":"audit_checkpoint","seq":%d}' % seq


def test_checkpoint_frames_are_never_records_and_go_only_to_a_reader_that_asks(
    spool: Path, state: Path
) -> None:
    sender = SpoolSender(spool, segment_bytes=1 << 20, retention_bytes=RETENTION_BYTES)
    try:
        sender.send([record(1), record(2)], [checkpoint_line(7)])
        sender.send([], [checkpoint_line(9)])  # no scan came: the checkpoint crosses alone
        sender.send([record(3)])
        sender.send([], [checkpoint_line(12), checkpoint_line(15)])
        assert sender.next_seq == 4  # checkpoints take no record seq
    finally:
        sender.close()

    asking = SpoolReceiver(spool, state)
    taken: list[bytes] = []
    assert seqs(asking.receive(checkpoints=taken)) == [1, 2, 3]
    assert taken == [checkpoint_line(n) for n in (7, 9, 12, 15)]
    asking.commit()  # past the trailing checkpoint frames too
    again: list[bytes] = []
    assert SpoolReceiver(spool, state).receive(checkpoints=again) == [] and again == []

    other = SpoolReceiver(spool, state, reader="mqtt")  # a consumer-facing reader
    assert [r.value for r in other.receive()] == [1, 2, 3]
    assert other.checkpoint_frames == 4
    other.commit()
    assert SpoolReceiver(spool, state, reader="mqtt").receive() == []


def stamped(seq: int, value: object, signal: str = "site/area/asset/measure") -> Record:
    r = record(value)
    r.signal, r.seq = signal, seq
    return r


def test_forward_keeps_the_seq_records_carry_and_leaves_out_repeats(
    spool: Path, state: Path
) -> None:
    """The diode receiver's spool: the plant's seq crosses unchanged, gaps stay gaps (the
    reader counts them as lost), and a repeat at or below the last seq written is left out."""
    sender = SpoolSender(spool, segment_bytes=1 << 20, retention_bytes=RETENTION_BYTES)
    try:
        assert sender.forward([stamped(5, "a"), stamped(6, "b")], checkpoints=[b"{}"]) == 0
        assert sender.forward([stamped(6, "b"), stamped(9, "c"), stamped(4, "old")]) == 2
        assert sender.next_seq == 10
    finally:
        sender.close()
    assert SpoolSender(spool, 1 << 20, RETENTION_BYTES).next_seq == 10  # continues after 9
    receiver = SpoolReceiver(spool, state)
    checkpoints: list[bytes] = []
    got = receiver.receive(checkpoints=checkpoints)
    assert [(r.seq, r.value) for r in got] == [(5, "a"), (6, "b"), (9, "c")]
    assert checkpoints == [b"{}"]
    assert receiver.lost_records == 4 + 2  # 1..4 before the first, 7..8


def test_resync_frames_reach_only_a_reader_that_asks_and_leave_the_position_alone(
    spool: Path, state: Path
) -> None:
    sender = SpoolSender(spool, segment_bytes=1 << 20, retention_bytes=RETENTION_BYTES)
    try:
        sender.forward([stamped(1, "x", "s/a"), stamped(2, "y", "s/b")])
        written = sender.forward([stamped(3, "z", "s/a")], resync=[stamped(2, "y", "s/b")])
        assert written == 0 and sender.next_seq == 4  # a resync record takes no seq
    finally:
        sender.close()
    asking = SpoolReceiver(spool, state)
    resync: list[Record] = []
    assert seqs(asking.receive(resync=resync)) == [1, 2, 3]
    assert [(r.seq, r.signal) for r in resync] == [(2, "s/b")]
    assert asking.last_seq == 3 and asking.stale_records == 0 and asking.lost_records == 0
    other = SpoolReceiver(spool, state, reader="mqtt")
    assert seqs(other.receive()) == [1, 2, 3]  # skips them


def test_a_resync_frame_relabelled_as_records_is_refused() -> None:
    payload = encode_frame_payload([record(42)])
    assert parse_frames(MAGIC + frame(payload, RESYNC_MAGIC)[2:])[0] == []
    assert parse_frames(RESYNC_MAGIC + frame(payload)[2:])[0] == []


def test_a_new_sender_continues_seq_past_trailing_checkpoint_frames(spool: Path) -> None:
    send(spool, list(range(5)))
    sender = SpoolSender(spool, segment_bytes=1 << 20, retention_bytes=RETENTION_BYTES)
    try:
        sender.send([], [checkpoint_line(3)])
    finally:
        sender.close()

    assert SpoolSender(spool, 1 << 20, RETENTION_BYTES).next_seq == 6


def test_a_checkpoint_too_large_for_a_frame_is_refused_before_anything_is_written(
    spool: Path,
) -> None:
    sender = SpoolSender(spool, segment_bytes=1 << 20, retention_bytes=RETENTION_BYTES)
    try:
        with pytest.raises(ValueError, match="cannot cross"):
            sender.send([record(1)], [b"x" * (MAX_PAYLOAD + 1)])
        assert sender.next_seq == 1
    finally:
        sender.close()
    assert segment_path(spool, 1).stat().st_size == 0


def test_receiver_never_redelivers_a_seq_it_has_already_delivered(spool: Path, state: Path) -> None:
    send(spool, list(range(10)))
    state.mkdir()
    # A position whose offset lags behind its seq: the first five records were delivered.
    (state / POSITION_FILE).write_bytes(msgspec.json.encode(Position(segment=1, offset=0, seq=5)))

    assert seqs(drain(SpoolReceiver(spool, state))) == [6, 7, 8, 9, 10]


def test_corrupt_position_file_raises_channel_error_naming_the_file(
    spool: Path, state: Path
) -> None:
    state.mkdir()
    position = state / POSITION_FILE
    position.write_bytes(b"{not json")

    with pytest.raises(ChannelError) as error:
        SpoolReceiver(spool, state)

    assert str(position) in str(error.value)


# parse_frames on hostile input


def check_only_whole_valid_frames(buf: bytes) -> None:
    """The returned frames, re-framed, are exactly the bytes parse_frames consumed."""
    frames, used, at_end = parse_frames(buf)
    assert b"".join(frame(f.payload, f.kind) for f in frames) == buf[:used]
    assert at_end == (used == len(buf))


def valid_frames(rng: random.Random, n: int) -> bytes:
    return b"".join(frame(rng.randbytes(rng.randint(1, 64)), rng.choice(KINDS)) for _ in range(n))


def test_parse_frames_on_random_bytes() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        buf = rng.randbytes(rng.randint(0, 200))
        if rng.random() < 0.5:
            buf = rng.choice(KINDS) + buf  # get past the magic check now and then
        check_only_whole_valid_frames(buf)


def test_parse_frames_on_truncated_frames() -> None:
    rng = random.Random(2)
    for _ in range(500):
        whole = valid_frames(rng, rng.randint(1, 5))
        cut = rng.randint(0, len(whole))
        check_only_whole_valid_frames(whole[:cut])


def test_parse_frames_on_frames_with_one_corrupted_byte() -> None:
    rng = random.Random(3)
    for _ in range(500):
        buf = bytearray(valid_frames(rng, rng.randint(1, 5)))
        buf[rng.randrange(len(buf))] ^= rng.randint(1, 255)
        check_only_whole_valid_frames(bytes(buf))


@pytest.mark.parametrize("kind", KINDS)
def test_parse_frames_rejects_every_single_byte_corruption_of_one_frame(kind: bytes) -> None:
    whole = frame(encode_frame_payload([record(42)]), kind)
    for i in range(len(whole)):
        buf = bytearray(whole)
        buf[i] ^= 0x01
        assert parse_frames(bytes(buf))[0] == [], f"corrupted byte {i} still parsed"


def test_a_frame_whose_magic_is_changed_to_the_other_kind_is_refused() -> None:
    """A damaged magic never turns records into a checkpoint or a checkpoint into records:
    the checkpoint kind's CRC covers its magic."""
    payload = encode_frame_payload([record(42)])
    records_frame, checkpoint = frame(payload), frame(payload, CHECKPOINT_MAGIC)
    assert parse_frames(CHECKPOINT_MAGIC + records_frame[2:])[0] == []
    assert parse_frames(MAGIC + checkpoint[2:])[0] == []


def test_a_records_frame_written_before_checkpoint_frames_existed_still_parses() -> None:
    payload = encode_frame_payload([record(42)])
    length = struct.pack("<I", len(payload))
    old = HEADER.pack(b"DZ", len(payload), zlib.crc32(payload, zlib.crc32(length))) + payload

    assert parse_frames(old) == ([(MAGIC, payload)], len(old), True)


def test_parse_frames_stops_at_a_truncated_frame_after_whole_ones() -> None:
    first, second = frame(b"one"), frame(b"two")

    frames, used, at_end = parse_frames(first + second[:-1])

    assert (frames, used, at_end) == ([(MAGIC, b"one")], len(first), False)


def test_parse_frames_rejects_an_oversize_length_field() -> None:
    payload = bytes(MAX_PAYLOAD + 1)
    length = struct.pack("<I", len(payload))
    oversize = HEADER.pack(b"DZ", len(payload), zlib.crc32(payload, zlib.crc32(length))) + payload

    assert parse_frames(frame(b"ok") + oversize) == ([(MAGIC, b"ok")], len(frame(b"ok")), False)


def test_parse_frames_rejects_an_empty_frame() -> None:
    assert parse_frames(frame(b"")) == ([], 0, False)


def test_receive_returns_at_most_max_records_and_the_rest_next_time(
    spool: Path, state: Path
) -> None:
    send(spool, list(range(100)), batch=10, segment_bytes=1 << 20)  # frames of 10 records
    receiver = SpoolReceiver(spool, state)
    assert seqs(receiver.receive(max_records=30)) == list(range(1, 31))
    receiver.commit()
    resumed = SpoolReceiver(spool, state)
    assert seqs(resumed.receive(max_records=1000)) == list(range(31, 101))


def test_a_frame_is_delivered_whole_even_past_max_records(spool: Path, state: Path) -> None:
    send(spool, list(range(100)), batch=100)
    receiver = SpoolReceiver(spool, state)
    assert seqs(receiver.receive(max_records=30)) == list(range(1, 101))


def test_a_large_batch_is_written_as_frames_of_at_most_frame_records(spool: Path) -> None:
    send(spool, list(range(2 * FRAME_RECORDS + 1)), batch=2 * FRAME_RECORDS + 1)
    frames, _, at_end = parse_frames(segment_path(spool, 1).read_bytes())
    sizes = [len(decode_frame_payload(f.payload)) for f in frames]
    assert at_end and sizes == [FRAME_RECORDS, FRAME_RECORDS, 1]


def test_a_frame_over_the_payload_limit_is_split(spool: Path, state: Path) -> None:
    big = "x" * (MAX_PAYLOAD // 3)  # three of them do not fit one frame
    send(spool, [big] * 3, batch=3)
    frames, _, _ = parse_frames(segment_path(spool, 1).read_bytes())
    assert [len(decode_frame_payload(f.payload)) for f in frames] == [1, 2]
    assert [r.value for r in drain(SpoolReceiver(spool, state))] == [big] * 3


def test_a_record_over_the_payload_limit_is_dropped_and_the_rest_is_written(
    spool: Path, state: Path
) -> None:
    with structlog.testing.capture_logs() as logs:
        send(spool, ["before", "x" * MAX_PAYLOAD, "after"], batch=3)

    received = drain(SpoolReceiver(spool, state))
    assert [(r.seq, r.value) for r in received] == [(1, "before"), (2, "after")]  # no gap
    (dropped,) = [e for e in logs if e["event"] == "record_too_large"]
    assert dropped["signal"] == "site/area/asset/measure" and dropped["bytes"] > MAX_PAYLOAD


def test_records_too_large_are_logged_once_per_signal_and_the_batch_encoded_twice(
    spool: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OPC UA text of a megabyte read every poll: the spool logs it once, not per
    batch, and a batch with several such records is encoded twice, not once per record."""
    payloads: list[int] = []  # records in each frame payload encoded

    def counted(records: Any) -> bytes:
        payloads.append(len(records))
        return encode_frame_payload(records)

    monkeypatch.setattr(spool_module, "encode_frame_payload", counted)

    def huge() -> Record:
        return msgspec.structs.replace(record("x" * MAX_PAYLOAD), signal="site/area/asset/text")

    sender = SpoolSender(spool, segment_bytes=SEGMENT_BYTES, retention_bytes=RETENTION_BYTES)
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(5):  # five polls
                sender.send([record("ok"), huge(), huge(), huge()])
            first_polls = len(payloads)
            fixed = msgspec.structs.replace(record("fixed at its source"), signal=huge().signal)
            sender.send([fixed])  # it crosses again
            sender.send([huge()])  # and a new episode is logged again
    finally:
        sender.close()
    received = drain(SpoolReceiver(spool, state))
    assert [r.value for r in received] == ["ok"] * 5 + ["fixed at its source"]
    assert seqs(received) == list(range(1, 7))  # no gap where records were dropped
    dropped = [e for e in logs if e["event"] == "record_too_large"]
    assert len(dropped) == 2, dropped  # once for five polls, once after it crossed again
    # Per poll: the batch of 4, its 2 halves, their 4 halves, then the one record left,
    # however many of them are too large (before: the whole batch again for each).
    assert first_polls == 5 * (1 + 2 + 4 + 1), payloads


FULL_DISK = """
import resource, signal, sys
from datetime import UTC, datetime
from pathlib import Path
from broker.channel.spool import SpoolSender
from broker.errors import ChannelError
from broker.folder_lock import FolderLockError
from broker.records import Context, Record

# A file size limit makes write() fail part-way, as a full disk does (EFBIG instead of ENOSPC).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
sender = SpoolSender(Path(sys.argv[1]), segment_bytes=1 << 20, retention_bytes=1 << 30)
now = datetime.now(UTC)
sent = 0
for batch in range(1000):
    records = [Record(signal="a/b", value=float(i), unit="", quality="good", source_time=now,
                      broker_time=now, policy_version=1, context=Context()) for i in range(7)]
    try:
        sender.send(records)
    except ChannelError as e:
        print(sent, sender.next_seq, e)
        break
    sent += len(records)
"""


def test_a_write_cut_short_by_a_full_disk_leaves_only_whole_frames(
    spool: Path, state: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(spool)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    sent, next_seq, *error = result.stdout.split()
    assert "cannot write" in " ".join(error), result.stdout + result.stderr
    assert int(next_seq) == int(sent) + 1  # the failed batch's seqs are handed out again
    receiver = SpoolReceiver(spool, state)
    delivered = drain(receiver)
    assert seqs(delivered) == list(range(1, int(sent) + 1))
    send(spool, [1, 2, 3], batch=3)  # a new sender continues right after what was durable
    assert seqs(drain(receiver)) == [int(sent) + 1, int(sent) + 2, int(sent) + 3]
    assert receiver.torn_bytes == 0  # the partial batch was cut off, not left behind


# A reader that reads ahead of what it has handled (the PostgreSQL sink reads batch n + 1
# while the database commits batch n) saves marks, never the read position itself.
def read_ahead(receiver: SpoolReceiver, batches: int, size: int) -> list[Any]:
    """`batches` batches of `size` records, each with the mark taken right after it."""
    taken = []
    for _ in range(batches):
        batch = receiver.receive(max_records=size)
        taken.append((seqs(batch), receiver.mark()))
    return taken


def test_a_crash_between_marks_replays_exactly_the_batches_not_committed(
    spool: Path, state: Path
) -> None:
    send(spool, list(range(40)), batch=5)  # frames of 5 records, across segments
    first = SpoolReceiver(spool, state)
    (one, mark_one), (two, mark_two), (three, _) = read_ahead(first, 3, 10)
    assert (one, two, three) == ([*range(1, 11)], [*range(11, 21)], [*range(21, 31)])
    first.commit(mark_one)  # batch one committed; two and three read, not committed
    first.close()  # the process dies here: only the position file survives

    second = SpoolReceiver(spool, state)
    assert second.last_seq == 10
    assert seqs(drain(second)) == list(range(11, 41))  # two, three and the rest: none skipped
    second.close()

    third = SpoolReceiver(spool, state)  # still at mark one: `second` committed nothing
    (again, mark_again), _ = read_ahead(third, 2, 10)
    assert again == two and mark_again == mark_two  # the same batch ends at the same mark
    third.commit(mark_again)
    third.close()
    assert seqs(drain(SpoolReceiver(spool, state))) == list(range(21, 41))


def test_marks_committed_in_turn_while_reading_ahead_deliver_every_record_once(
    spool: Path, state: Path
) -> None:
    """Read one batch ahead, commit the one before, and crash after each commit in turn."""
    send(spool, list(range(60)), batch=3)
    delivered: list[int] = []
    for _ in range(100):  # bounded: each round commits one batch
        receiver = SpoolReceiver(spool, state)
        (batch, mark), (_, _) = read_ahead(receiver, 2, 6)
        if not batch:
            break
        receiver.commit(mark)  # the first batch is handled; the second was read ahead only
        receiver.close()
        delivered.extend(batch)
    assert delivered == list(range(1, 61))


def test_a_mark_behind_the_saved_position_is_refused(spool: Path, state: Path) -> None:
    send(spool, list(range(20)), batch=5)
    receiver = SpoolReceiver(spool, state)
    (_, older), (_, newer) = read_ahead(receiver, 2, 5)
    receiver.commit(newer)
    with pytest.raises(RuntimeError, match="before the one saved"):
        receiver.commit(older)
    receiver.commit()  # the read position itself is never behind
    receiver.close()
    assert seqs(drain(SpoolReceiver(spool, state))) == list(range(11, 21))
