"""SpoolReplay: the records after a seq, read from a real spool without moving any position."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.channel import spool_replay
from broker.channel.spool import (
    FRAME_RECORDS,
    SpoolReceiver,
    SpoolSender,
    segment_numbers,
    segment_path,
)
from broker.channel.spool_replay import CHUNK_BYTES, Gone, SpoolReplay, first_seq
from broker.records import Context, Record, Value

UNLIMITED = 1 << 30


def record(seq: int = 0, value: Value = 1.0, signal: str = "site/area/asset/measure") -> Record:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    return Record(
        signal=signal, value=value, unit="bar", quality="good", source_time=now,
        broker_time=now, policy_version=1, context=Context(), seq=seq,
    )  # fmt: skip


def write(spool: Path, count: int, segment_bytes: int = 8192, retention: int = UNLIMITED) -> None:
    """`count` records, 50 per batch, by a real sender that is then closed."""
    sender = SpoolSender(spool, segment_bytes, retention)
    try:
        for start in range(0, count, 50):
            sender.send([record(value=float(i)) for i in range(start, min(count, start + 50))])
    finally:
        sender.close()


def replay_all(replay: SpoolReplay, most: int = 1024) -> list[Record | Gone]:
    steps: list[Record | Gone] = []
    for _ in range(100_000):
        if replay.done:
            return steps
        steps += replay.read(most)
    raise AssertionError("the replay never ended")


def seqs(steps: list[Record | Gone]) -> list[int]:
    return [s.seq for s in steps if isinstance(s, Record)]


def test_replays_the_range_in_order_across_segments(tmp_path: Path) -> None:
    write(tmp_path, 2000)
    assert len(segment_numbers(tmp_path)) > 20
    steps = replay_all(SpoolReplay(tmp_path, after_seq=733, up_to_seq=1801))
    assert seqs(steps) == list(range(734, 1802))
    assert not any(isinstance(s, Gone) for s in steps)
    assert replay_all(SpoolReplay(tmp_path, after_seq=0, up_to_seq=2000))[0].seq == 1  # type: ignore[union-attr]


def test_moves_no_position_and_writes_nothing(tmp_path: Path) -> None:
    spool, state = tmp_path / "spool", tmp_path / "state"
    write(spool, 500)
    receiver = SpoolReceiver(spool, state)
    assert len(receiver.receive(max_records=200)) == 200
    receiver.commit()
    receiver.close()
    before = {
        p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (spool, state) for p in p.iterdir()
    }
    assert len(seqs(replay_all(SpoolReplay(spool, 0, 500)))) == 500
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (spool, state) for p in p.iterdir()}
    assert after == before
    resumed = SpoolReceiver(spool, state)
    assert resumed.last_seq == 200 and resumed.receive()[0].seq == 201


def test_the_start_is_found_by_a_binary_search_over_first_seqs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, 5000)
    segments = len(segment_numbers(tmp_path))
    assert segments > 60
    looked: list[int] = []

    def counting(directory: Path, number: int) -> int | None:
        looked.append(number)
        return first_seq(directory, number)

    monkeypatch.setattr(spool_replay, "first_seq", counting)
    replay = SpoolReplay(tmp_path, after_seq=4321, up_to_seq=4400)
    assert seqs(replay_all(replay)) == list(range(4322, 4401))
    assert len(looked) <= segments.bit_length() + 1  # not one look per segment


def test_records_removed_by_retention_are_announced_as_gone(tmp_path: Path) -> None:
    write(tmp_path, 3000, segment_bytes=8192, retention=40_000)
    first_held = first_seq(tmp_path, segment_numbers(tmp_path)[0])
    assert first_held is not None and first_held > 1
    steps = replay_all(SpoolReplay(tmp_path, after_seq=10, up_to_seq=3000))
    assert steps[0] == Gone(11, first_held - 1)
    assert seqs(steps) == list(range(first_held, 3001))
    assert sum(isinstance(s, Gone) for s in steps) == 1


def test_a_segment_expiring_during_the_replay_is_a_gone_range(tmp_path: Path) -> None:
    write(tmp_path, 2000)
    numbers = segment_numbers(tmp_path)
    replay = SpoolReplay(tmp_path, after_seq=0, up_to_seq=2000)
    got = replay.read(50)  # the first segment is open
    removed = numbers[3]
    lost_from, next_first = first_seq(tmp_path, removed), first_seq(tmp_path, numbers[4])
    assert lost_from is not None and next_first is not None
    segment_path(tmp_path, removed).unlink()  # as the sender's retention does
    steps = got + replay_all(replay)
    assert Gone(lost_from, next_first - 1) in steps
    held = seqs(steps)
    assert held == sorted(held) and len(held) == 2000 - (next_first - lost_from)
    gone_at = steps.index(Gone(lost_from, next_first - 1))
    assert steps[gone_at + 1].seq == next_first  # type: ignore[union-attr]


def test_checkpoint_and_resync_frames_are_never_replayed(tmp_path: Path) -> None:
    sender = SpoolSender(tmp_path, 1 << 20, UNLIMITED)
    try:
        sender.forward([record(1), record(2)], checkpoints=[b'{"event":"audit_checkpoint"}'])
        sender.forward([record(3, "x")], resync=[record(2, "resent", "s/other")])
        sender.send([record(value=4.0)], checkpoints=[b"{}"])
    finally:
        sender.close()
    steps = replay_all(SpoolReplay(tmp_path, 0, 4))
    assert [(s.seq, s.value) for s in steps if isinstance(s, Record)] == [
        (1, 1.0), (2, 1.0), (3, "x"), (4, 4.0),
    ]  # fmt: skip
    assert all(isinstance(s, Record) for s in steps)


def test_a_gap_in_the_spools_seq_is_announced_where_it_is(tmp_path: Path) -> None:
    sender = SpoolSender(tmp_path, 1 << 20, UNLIMITED)
    try:
        sender.forward([record(1), record(2), record(7), record(8)])  # a diode lost 3..6
    finally:
        sender.close()
    steps = replay_all(SpoolReplay(tmp_path, 0, 8))
    assert [s if isinstance(s, Gone) else s.seq for s in steps] == [1, 2, Gone(3, 6), 7, 8]


def test_seq_beyond_what_the_spool_holds_is_gone_not_waited_for(tmp_path: Path) -> None:
    write(tmp_path, 100)
    steps = replay_all(SpoolReplay(tmp_path, 90, 120))
    assert seqs(steps) == list(range(91, 101)) and steps[-1] == Gone(101, 120)
    assert replay_all(SpoolReplay(tmp_path / "none", 5, 9)) == [Gone(6, 9)]


def test_nothing_is_read_when_there_is_nothing_after_the_seq(tmp_path: Path) -> None:
    write(tmp_path, 100)
    replay = SpoolReplay(tmp_path, 100, 100)
    assert replay.done and replay.read() == []


def test_a_torn_tail_of_a_final_segment_is_skipped(tmp_path: Path) -> None:
    write(tmp_path, 100, segment_bytes=1 << 20)
    with open(segment_path(tmp_path, segment_numbers(tmp_path)[-1]), "ab") as f:
        f.write(b"DZ\x10\x00\x00\x00torn")  # a crash mid-write
    write(tmp_path, 100, segment_bytes=1 << 20)  # a restarted sender: a new segment
    replay = SpoolReplay(tmp_path, 50, 200)
    assert seqs(replay_all(replay)) == list(range(51, 201))
    assert replay.torn_bytes == 10


def test_each_read_is_bounded_and_a_frame_larger_than_a_chunk_is_read_whole(
    tmp_path: Path,
) -> None:
    big = "v" * 3000  # a frame of 256 of them is about three chunks
    sender = SpoolSender(tmp_path, 1 << 22, UNLIMITED)
    try:
        sender.send([record(value=big) for _ in range(FRAME_RECORDS * 3)])
    finally:
        sender.close()
    assert os.path.getsize(segment_path(tmp_path, 1)) > 2 * CHUNK_BYTES
    replay = SpoolReplay(tmp_path, 0, FRAME_RECORDS * 3)
    reads = []
    while not replay.done:
        reads.append(replay.read(most=10))
    assert max(len(r) for r in reads) <= FRAME_RECORDS  # one frame per read at this size
    assert [s.seq for r in reads for s in r] == list(range(1, FRAME_RECORDS * 3 + 1))  # type: ignore[union-attr]
