"""Replay of the spool from a seq, for a consumer that resumes its stream (SSE `Last-Event-ID`).

Reads the segments the plant half wrote and never moves or saves any position: the half's
own reader and every output keep theirs, and nothing here writes to the spool. It finds the
segment to start in by each segment's first seq (segments hold increasing seq), then returns
the records with seq in (after_seq, up_to_seq] in order, skipping audit checkpoint and resync
frames. A range of seq the spool does not hold (removed by retention, lost before it was
written) is returned as `Gone` before the first record after it, so a consumer is told what
it cannot have instead of meeting a silent gap.

Work per `read()` is bounded (a few frames decoded, reads of at most a frame or
`CHUNK_BYTES`), so a caller on an event loop yields between calls and a replay from the
oldest record never holds the loop for long.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import NamedTuple

import msgspec
import structlog

from broker.channel.spool import (
    FRAME_RECORDS,
    HEADER,
    KINDS,
    MAGIC,
    MAX_PAYLOAD,
    Frame,
    parse_frames,
    segment_numbers,
    segment_path,
)
from broker.errors import ChannelError
from broker.records import Record, decode_frame_payload

CHUNK_BYTES = 256 * 1024  # one read; a larger frame is read whole, up to MAX_PAYLOAD

log = structlog.get_logger("spool")


class Gone(NamedTuple):
    """Records from_seq..to_seq (inclusive) are not in the spool."""

    from_seq: int
    to_seq: int


class SpoolReplay:
    """The records after `after_seq` up to `up_to_seq`, read from the spool without a position.

    Raises ChannelError when a segment cannot be read (other than one that expired by
    retention meanwhile, which reads as a gone range).
    """

    def __init__(self, directory: Path, after_seq: int, up_to_seq: int) -> None:
        self._dir = directory
        self.after_seq = after_seq
        self.up_to_seq = up_to_seq
        self._next = after_seq + 1  # the seq wanted next
        self._fd = -1
        self._segment = 0  # 0: the start segment is not chosen yet
        self._offset = 0  # in the segment, of the first byte not yet taken into `_pending`
        self._pending: deque[Frame] = deque()
        self.done = after_seq >= up_to_seq
        self.bad_frames = 0  # whole frames whose payload did not decode
        self.torn_bytes = 0  # skipped at the end of final segments

    def read(self, most: int = 1024) -> list[Record | Gone]:
        """The next records in seq order, each gone range before the record after it.

        Decodes at most `most // FRAME_RECORDS + 1` frames: the answer may be empty while
        `done` is still False (frames of other kinds, or records at or below `after_seq`)."""
        steps: list[Record | Gone] = []
        for _ in range(most // FRAME_RECORDS + 1):
            if self.done:
                break
            frame = self._next_frame()
            if frame is None:  # nothing more in the spool
                self._end(steps)
                break
            if frame.kind != MAGIC:  # an audit checkpoint, or resync values: not records
                continue
            try:
                batch = decode_frame_payload(frame.payload)
            except msgspec.DecodeError:
                self.bad_frames += 1  # its records will be reported gone
                log.error("spool_frame_undecodable", segment=self._segment)
                continue
            self._take(batch, steps)
        if self.done:
            self.close()
        return steps

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _take(self, batch: list[Record], steps: list[Record | Gone]) -> None:
        for record in batch:
            if record.seq < self._next:
                continue
            if record.seq > self.up_to_seq:
                self._end(steps)
                return
            if record.seq > self._next:
                steps.append(Gone(self._next, record.seq - 1))
            steps.append(record)
            self._next = record.seq + 1
            if record.seq == self.up_to_seq:
                self.done = True
                return

    def _end(self, steps: list[Record | Gone]) -> None:
        if self._next <= self.up_to_seq:
            steps.append(Gone(self._next, self.up_to_seq))
        self.done = True

    def _next_frame(self) -> Frame | None:
        """The next whole frame, moving across segments; None when the spool holds no more."""
        while not self._pending:
            if self._fd < 0 and not self._open(self._start() if self._segment == 0 else None):
                return None
            if self._refill():
                continue
            # Nothing whole here. Only a final segment (one with a successor) is left behind:
            # its remaining bytes are a torn tail; the newest one may still be growing.
            later = [n for n in segment_numbers(self._dir) if n > self._segment]
            if not later:
                return None
            size = os.fstat(self._fd).st_size
            if self._refill():
                continue
            self.torn_bytes += max(0, size - self._offset)
            self.close()
            self._segment, self._offset = later[0], 0
        return self._pending.popleft()

    def _refill(self) -> bool:
        """Read whole frames at the offset into `_pending`; False when there are none."""
        frames, used = _frames_at(self._fd, self._offset)
        self._pending.extend(frames)
        self._offset += used
        return bool(frames)

    def _open(self, number: int | None) -> bool:
        """Open segment `number`, or the current one, or the next that still exists."""
        if number is not None:
            self._segment, self._offset = number, 0
        while True:
            numbers = [n for n in segment_numbers(self._dir) if n >= self._segment]
            if not numbers:
                return False
            if numbers[0] != self._segment:  # expired by retention: what it held is gone
                self._segment, self._offset = numbers[0], 0
            try:
                self._fd = os.open(segment_path(self._dir, self._segment), os.O_RDONLY)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise ChannelError(f"spool {self._dir}: cannot read: {e.strerror}") from e
            return True

    def _start(self) -> int:
        """The newest segment whose first seq is at most the one wanted (else the oldest).

        A binary search: segments hold increasing seq. One without a records frame at its
        start counts as starting later, which can only make the replay start earlier."""
        numbers = segment_numbers(self._dir)
        low, high = 0, len(numbers) - 1
        found = 0
        while low <= high:
            middle = (low + high) // 2
            first = first_seq(self._dir, numbers[middle])
            if first is not None and first <= self._next:
                found = middle
                low = middle + 1
            else:
                high = middle - 1
        return numbers[found] if numbers else 1


def first_seq(directory: Path, number: int) -> int | None:
    """The seq of the first record of segment `number`; None if its first chunk holds no
    records frame, or it is gone."""
    try:
        fd = os.open(segment_path(directory, number), os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ChannelError(f"spool {directory}: cannot read: {e.strerror}") from e
    try:
        frames, _ = _frames_at(fd, 0)
    finally:
        os.close(fd)
    for kind, payload in frames:
        if kind == MAGIC:
            try:
                records = decode_frame_payload(payload)
            except msgspec.DecodeError:
                return None
            return records[0].seq if records else None
    return None


def _frames_at(fd: int, offset: int) -> tuple[list[Frame], int]:
    """The whole frames of one chunk at `offset` of an open segment (or the one frame there
    if it is larger than a chunk), and how many bytes they take."""
    size = os.fstat(fd).st_size
    if size <= offset:
        return [], 0
    buf = os.pread(fd, min(size - offset, CHUNK_BYTES), offset)
    frames, used, _ = parse_frames(buf)
    if not frames and len(buf) >= HEADER.size:
        magic, length, _ = HEADER.unpack_from(buf)
        whole = HEADER.size + length
        if magic in KINDS and 0 < length <= MAX_PAYLOAD and len(buf) < whole <= size - offset:
            frames, used, _ = parse_frames(os.pread(fd, whole, offset))
    return frames, used
