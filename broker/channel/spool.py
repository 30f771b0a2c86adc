"""The default one-way channel: append-only segment files on a local file system.

The plant half holds the `SpoolSender`, the only writer. The enterprise half holds a
`SpoolReceiver`, which only reads the spool and keeps its position in its own state
directory: nothing it does can reach the plant half.

Frame: magic | u32 payload length | u32 CRC-32 | payload. Two kinds, told apart by the magic:
- b"DZ", records: CRC-32 of (length + payload); the payload holds up to FRAME_RECORDS
  records with consecutive seq (one encode and one CRC for all of them: a record with
  context cost 6.3 µs to send in a frame of its own, 4.3 µs in frames of 256). Since issue
  19 each asset's shared context is written once per frame (broker.records, ADR 0030: a
  third of the bytes); payloads written before, bare arrays of records, still decode.
- b"DA", an audit checkpoint of the plant half's audit log, crossing to be witnessed (ADR
  0003's amendment): CRC-32 of (magic + length + payload), so one damaged magic byte never
  turns a frame of one kind into the other; the payload is the checkpoint entry's canonical
  JSON line. Receivers never return these as records: a caller that asks gets the payloads
  (unverified bytes) apart, every other reader skips them; the position moves past either way.
- b"DR", resync records (ADR 0019): written only by the diode receiver on an IT host, they
  carry the latest value of signals whose records were lost on the diode, with the plant's own
  seq, which is below the spool's position. Same payload as b"DZ", CRC as b"DA". Receivers
  return them apart (`resync`) as latest-value updates, never as records in seq order; a
  reader that does not ask skips them.
Spools written before checkpoint frames existed hold only records frames and read as before.

Segments are `NNNNNNNNNN.seg`, numbered upwards. The sender starts a new segment every time
it opens, so a segment with a successor is final: incomplete or corrupt bytes at its end
are a torn tail from a crash, skipped and counted, never parsed. Only the newest segment can
still grow, so the receiver waits there instead of skipping.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import msgspec
import structlog

from broker.errors import ChannelError
from broker.folder_lock import FolderLock
from broker.records import FRAME_RECORDS as FRAME_RECORDS  # noqa: PLC0414 (re-exported)
from broker.records import Record, decode_frame_payload, encode_frame_payload

MAGIC = b"DZ"  # a frame of records
CHECKPOINT_MAGIC = b"DA"  # a frame holding one audit checkpoint entry
RESYNC_MAGIC = b"DR"  # a frame of resync records (the diode receiver's, ADR 0019)
KINDS = (MAGIC, CHECKPOINT_MAGIC, RESYNC_MAGIC)
HEADER = struct.Struct("<2sII")  # magic, payload length, CRC-32 (see the module docstring)
MAX_PAYLOAD = 1024 * 1024  # bytes; a record is a few hundred
READ_CHUNK = 4 * MAX_PAYLOAD  # must exceed one whole frame, see SpoolReceiver._advance
SUFFIX = ".seg"
POSITION_FILE = "spool-position.json"

log = structlog.get_logger("spool")


class Frame(NamedTuple):
    kind: bytes  # MAGIC, CHECKPOINT_MAGIC or RESYNC_MAGIC
    payload: bytes


def frame(payload: bytes, kind: bytes = MAGIC) -> bytes:
    length = struct.pack("<I", len(payload))
    return HEADER.pack(kind, len(payload), _crc(kind, length, payload)) + payload


def _crc(kind: bytes, length: bytes, payload: bytes) -> int:
    """Records frames keep the CRC they always had; any other kind covers its magic too."""
    return zlib.crc32(payload, zlib.crc32(length if kind == MAGIC else kind + length))


def checkpoint_frame(entry: bytes) -> bytes:
    """A frame for one audit checkpoint entry (its canonical JSON line, without newline)."""
    if not 0 < len(entry) <= MAX_PAYLOAD:
        raise ValueError(f"an audit checkpoint entry of {len(entry)} bytes cannot cross")
    return frame(entry, CHECKPOINT_MAGIC)


def encode_frames(
    records: Sequence[Record],
    too_large: list[RecordTooLarge] | None = None,
    kind: bytes = MAGIC,
) -> list[bytes]:
    """Frames of up to FRAME_RECORDS records; a frame over MAX_PAYLOAD is split in halves.
    A record over it alone raises RecordTooLarge, or, given `too_large`, is left out and
    added there (the rest is encoded once, whatever the number of such records)."""
    frames: list[bytes] = []
    pending = [records[i : i + FRAME_RECORDS] for i in range(0, len(records), FRAME_RECORDS)]
    while pending:
        chunk = pending.pop(0)
        payload = encode_frame_payload(chunk)
        if len(payload) <= MAX_PAYLOAD:
            frames.append(frame(payload, kind))
        elif len(chunk) > 1:
            half = len(chunk) // 2
            pending[:0] = [chunk[:half], chunk[half:]]
        elif too_large is None:
            raise RecordTooLarge(chunk[0], len(payload))
        else:
            too_large.append(RecordTooLarge(chunk[0], len(payload)))
    return frames


class RecordTooLarge(Exception):
    """One record encodes to more than a frame may hold: it can never cross."""

    def __init__(self, record: Record, size: int) -> None:
        super().__init__(f"{record.signal}: {size} bytes, above {MAX_PAYLOAD}")
        self.record = record
        self.size = size


def parse_frames(buf: bytes, most: int | None = None) -> tuple[list[Frame], int, bool]:
    """Split `buf` into whole, valid frames of either kind, at most `most` of them.

    Returns the frames, the offset just after the last one returned, and whether parsing
    stopped at the end of `buf` (False: at an incomplete or corrupt frame, or at `most`).
    """
    frames: list[Frame] = []
    pos = 0
    end = len(buf)
    while pos < end:
        if most is not None and len(frames) >= most:
            return frames, pos, False
        if end - pos < HEADER.size:
            return frames, pos, False
        magic, length, crc = HEADER.unpack_from(buf, pos)
        if magic not in KINDS or not 0 < length <= MAX_PAYLOAD:
            return frames, pos, False
        start = pos + HEADER.size
        if start + length > end:
            return frames, pos, False
        payload = buf[start : start + length]
        if _crc(magic, buf[pos + 2 : pos + 6], payload) != crc:
            return frames, pos, False
        frames.append(Frame(magic, payload))
        pos = start + length
    return frames, pos, True


def segment_numbers(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []  # the plant half has not written yet
    except OSError as e:
        raise ChannelError(f"spool {directory}: cannot list: {e.strerror}") from e
    return sorted(int(n[: -len(SUFFIX)]) for n in names if n.endswith(SUFFIX) and n[:-4].isdigit())


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"{number:010d}{SUFFIX}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolSender:
    """Appends records to the spool; the plant half's only way to the enterprise side.

    `send()` is a group commit: one write and one fsync per batch. It blocks; call it from
    a worker thread. Never reads anything written by the enterprise side. Holds the spool's
    folder lock until `close()`: a second sender would reuse seq numbers and strand the
    receiver on its segments (raises FolderLockError naming the holder).
    """

    def __init__(self, directory: Path, segment_bytes: int, retention_bytes: int) -> None:
        self._dir = directory
        self._segment_bytes = segment_bytes
        self._retention_bytes = retention_bytes
        try:
            directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as e:
            raise ChannelError(f"spool {directory}: cannot create: {e.strerror}") from e
        self._lock = FolderLock(directory)
        self._fd = -1
        self._too_large: set[str] = set()  # signals whose record was dropped, logged once
        try:
            numbers = segment_numbers(directory)
            self.next_seq = _last_seq(directory, numbers) + 1
            self._sizes = {n: segment_path(directory, n).stat().st_size for n in numbers}
            self._open_segment((numbers[-1] + 1) if numbers else 1)
        except BaseException:
            self._lock.release()
            raise

    def send(self, records: Sequence[Record], checkpoints: Sequence[bytes] = ()) -> None:
        """Stamp `seq` on each record and make the batch durable, with the audit checkpoint
        entries given (canonical JSON lines) in frames of their own after the records. A
        record too large for any frame (a huge text value) is dropped with an error, logged
        once per signal until it crosses again, and the rest of the batch goes on without a
        gap in `seq`."""
        first_seq = self.next_seq
        tail = [checkpoint_frame(entry) for entry in checkpoints]
        frames: list[bytes] = []
        while True:  # ends: each round without a break drops at least one record
            if not records:
                frames = []  # none, or all too large
                break
            for seq, record in enumerate(records, start=first_seq):
                record.seq = seq
            too_large: list[RecordTooLarge] = []
            frames = encode_frames(records, too_large)
            if not too_large:
                break
            # Stamped again below without them, each seq no larger than before: the rest
            # fits as it did, and the batch is encoded once more, not once per record.
            self._refuse(too_large)
            dropped = {id(e.record) for e in too_large}
            records = [r for r in records if id(r) not in dropped]
        if not records and not tail:
            return
        if self._too_large:  # a signal whose record crosses again is logged if it recurs
            self._too_large.difference_update(r.signal for r in records)
        self._write(b"".join([*frames, *tail]))
        self.next_seq = first_seq + len(records)

    def forward(
        self,
        records: Sequence[Record],
        resync: Sequence[Record] = (),
        checkpoints: Sequence[bytes] = (),
    ) -> int:
        """Append records that already carry their seq (the plant's, across a diode: ADR
        0019), never restamped: those at or below the last seq written are left out (a
        repeat). Then `resync` records, whatever their seq, in b"DR" frames, and the audit
        checkpoint entries. One write and one fsync; returns how many records were left
        out. Raises RecordTooLarge like `send` never does: what crossed a diode fitted a
        frame on the plant's side."""
        fresh: list[Record] = []
        for record in records:
            if record.seq >= self.next_seq:
                fresh.append(record)
                self.next_seq = record.seq + 1
        frames = encode_frames(fresh) + encode_frames(resync, kind=RESYNC_MAGIC)
        frames += [checkpoint_frame(entry) for entry in checkpoints]
        if frames:
            self._write(b"".join(frames))
        return len(records) - len(fresh)

    def _write(self, batch: bytes) -> None:
        """Append whole frames durably (one write, one fsync), rolling segments over."""
        data = memoryview(batch)
        size = self._sizes[self._number]
        try:
            while data:  # a full disk can take part of a write
                data = data[os.write(self._fd, data) :]
            os.fsync(self._fd)
        except OSError as e:
            # Leave no partial batch behind: the next batch starts on a frame boundary.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise ChannelError(f"spool {self._dir}: cannot write: {e.strerror}") from e
        self._sizes[self._number] = size + len(batch)
        if self._sizes[self._number] >= self._segment_bytes:
            self._open_segment(self._number + 1)
            self._enforce_retention()

    def _refuse(self, too_large: list[RecordTooLarge]) -> None:
        for e in too_large:
            if e.record.signal not in self._too_large:
                self._too_large.add(e.record.signal)
                log.error(
                    "record_too_large",
                    signal=e.record.signal,
                    bytes=e.size,
                    limit=MAX_PAYLOAD,
                    what_to_do="shorten the value at its source or the texts of its asset's model",
                )

    def close(self) -> None:
        self._close_segment()
        self._lock.release()

    def _close_segment(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _open_segment(self, number: int) -> None:
        self._close_segment()
        path = segment_path(self._dir, number)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
            _fsync_dir(self._dir)
        except OSError as e:
            raise ChannelError(f"spool {path}: cannot create segment: {e.strerror}") from e
        self._number = number
        self._sizes[number] = 0

    def _enforce_retention(self) -> None:
        total = sum(self._sizes.values())
        # Never the newest two: the one being written and the last full one, which holds
        # the seq a restarted sender continues from.
        for number in sorted(self._sizes)[:-2]:
            if total <= self._retention_bytes:
                break
            total -= self._sizes.pop(number)
            with contextlib.suppress(FileNotFoundError):
                segment_path(self._dir, number).unlink()
            log.warning(
                "spool_segment_expired", segment=number, retention_bytes=self._retention_bytes
            )


def _last_seq(directory: Path, numbers: list[int]) -> int:
    """The seq of the last valid record in the spool, 0 if there is none."""
    for number in reversed(numbers):
        frames, _, _ = parse_frames(segment_path(directory, number).read_bytes())
        for kind, payload in reversed(frames):
            if kind != MAGIC:
                continue
            with contextlib.suppress(msgspec.DecodeError):
                if records := decode_frame_payload(payload):
                    return records[-1].seq
    return 0


class Position(msgspec.Struct):
    segment: int = 0  # 0: before the first segment
    offset: int = 0
    seq: int = 0  # last record delivered


class SpoolReceiver:
    """Reads records in order, skipping torn tails; keeps its position in `state_dir`.

    The position is saved by `commit()`, after the caller has handled what `receive()`
    returned; after a restart, reading resumes there: no record is delivered twice. A caller
    that reads ahead of what it has handled (a sink writing batch n while it reads batch
    n + 1) takes a `mark()` after each batch and saves that one with `commit(mark)`.
    """

    def __init__(self, directory: Path, state_dir: Path, reader: str = "") -> None:
        """`reader` names a second reader of the same spool, with a position of its own."""
        self._dir = directory
        self._position_file = state_dir / (
            f"spool-position-{reader}.json" if reader else POSITION_FILE
        )
        try:
            state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._pos = msgspec.json.decode(self._position_file.read_bytes(), type=Position)
        except FileNotFoundError:
            self._pos = Position()
        except (OSError, msgspec.DecodeError) as e:
            raise ChannelError(f"{self._position_file}: unreadable spool position: {e}") from e
        self._saved = msgspec.structs.replace(self._pos)
        self._fd = -1
        self._fd_segment = 0
        self.torn_bytes = 0  # skipped at the end of final segments
        self.lost_records = 0  # gaps in seq: expired by retention before they were read
        self.bad_records = 0  # valid frames whose payload did not decode
        self.stale_records = 0  # records at or below the last delivered seq, skipped
        self.checkpoint_frames = 0  # audit checkpoint frames read (never returned as records)

    @property
    def last_seq(self) -> int:
        return self._pos.seq

    def receive(
        self,
        max_records: int = 5000,
        checkpoints: list[bytes] | None = None,
        resync: list[Record] | None = None,
    ) -> list[Record]:
        """The next records in order, whole frames at a time: at most `max_records` unless
        the first frame alone holds more; empty when there is nothing new.

        Audit checkpoint frames read on the way are never records: their payloads (unverified
        bytes) are appended to `checkpoints` if given, else skipped; either way `commit()`
        moves the position past them. So a caller that takes them must commit after handling
        them even when no record came. Resync records (b"DR") likewise go to `resync` if
        given, without touching `last_seq` or the lost and stale counts."""
        records: list[Record] = []
        while len(records) < max_records:
            frames = self._advance(max(1, (max_records - len(records)) // FRAME_RECORDS))
            if frames is None:
                break
            for kind, payload in frames:
                if kind == CHECKPOINT_MAGIC:
                    self.checkpoint_frames += 1
                    if checkpoints is not None:
                        checkpoints.append(payload)
                    continue
                if kind == RESYNC_MAGIC and resync is None:
                    continue
                try:
                    batch = decode_frame_payload(payload)
                except msgspec.DecodeError:
                    self.bad_records += 1  # a whole frame: the CRC held, so the writer wrote it
                    log.error("spool_frame_undecodable", segment=self._pos.segment)
                    continue
                if kind == RESYNC_MAGIC:
                    assert resync is not None
                    resync.extend(batch)
                    continue
                self._take(batch, records)
        return records

    def _take(self, batch: list[Record], records: list[Record]) -> None:
        """Append the records of one frame that follow the last delivered seq."""
        for record in batch:
            if record.seq <= self._pos.seq:
                self.stale_records += 1  # delivered before: never deliver twice
                continue
            if record.seq > self._pos.seq + 1:
                self.lost_records += record.seq - self._pos.seq - 1
                log.error("spool_records_lost", after_seq=self._pos.seq, first_seq=record.seq)
            self._pos.seq = record.seq
            records.append(record)

    def mark(self) -> Position:
        """The position after the records returned so far, to `commit` later."""
        return msgspec.structs.replace(self._pos)

    def commit(self, mark: Position | None = None) -> None:
        """Persist the position after the records returned so far, or `mark` (taken by
        `mark()` since the last commit: a position never moves back).

        Atomic and durable (write, fsync, rename), so a killed process resumes exactly
        here. The directory entry is not fsynced: after a power loss the reader may resume
        from the previous position and deliver again a few records whose `seq` consumers
        have already seen (ADR 0003). The temporary name is fixed on purpose: the enterprise
        half holds the lock on its state folder (ADR 0013), so no other process writes here,
        and a crash leaves at most this one file behind, overwritten by the next commit.
        """
        position = self._pos if mark is None else mark
        if (position.segment, position.offset) < (self._saved.segment, self._saved.offset):
            raise RuntimeError(f"spool position {position} is before the one saved")
        tmp = self._position_file.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(msgspec.json.encode(position))
                f.flush()
                os.fsync(f.fileno())  # so a power loss never leaves an empty position file
            os.replace(tmp, self._position_file)
        except OSError as e:
            raise ChannelError(f"{self._position_file}: cannot save position: {e.strerror}") from e
        self._saved = msgspec.structs.replace(position)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _advance(self, most: int) -> list[Frame] | None:
        """The next whole frames (at most `most`), moving across segments.

        None when caught up.
        """
        while True:
            if not self._open_current():
                return None
            size = os.fstat(self._fd).st_size
            buf = os.pread(self._fd, min(size - self._pos.offset, READ_CHUNK), self._pos.offset)
            frames, used, _ = parse_frames(buf, most)
            self._pos.offset += used
            if frames:
                return frames
            # Nothing whole at this offset. READ_CHUNK exceeds any frame, so the rest of the
            # file is either empty or invalid. Only a final segment may be skipped past.
            later = [n for n in segment_numbers(self._dir) if n > self._pos.segment]
            if not later:
                return None
            # A later segment exists, so this one is final; it may have grown since we looked.
            if os.fstat(self._fd).st_size > size:
                continue
            if size > self._pos.offset:
                self.torn_bytes += size - self._pos.offset
                log.warning(
                    "spool_torn_tail_skipped",
                    segment=self._pos.segment,
                    offset=self._pos.offset,
                    bytes=size - self._pos.offset,
                )
            self._pos.segment, self._pos.offset = later[0], 0

    def _open_current(self) -> bool:
        """Open the segment at the position, moving on if it expired; False if there is none."""
        if self._fd >= 0 and self._fd_segment == self._pos.segment:
            return True
        self.close()
        while True:
            numbers = [n for n in segment_numbers(self._dir) if n >= self._pos.segment]
            if not numbers:
                return False
            if numbers[0] != self._pos.segment:  # first start, or expired by retention
                self._pos.segment, self._pos.offset = numbers[0], 0
            try:
                self._fd = os.open(segment_path(self._dir, self._pos.segment), os.O_RDONLY)
            except FileNotFoundError:
                continue  # expired between the listing and the open
            except OSError as e:
                raise ChannelError(f"spool {self._dir}: cannot read: {e.strerror}") from e
            self._fd_segment = self._pos.segment
            return True
