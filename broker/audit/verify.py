"""`dmzbroker audit verify`: prove a writer's chain, or name the first place it breaks.

Checks, entry by entry: the hash matches the content (edited field), seq follows the
previous one (deleted, duplicated, replayed or reordered entry), prev_hash names the previous
entry (removed, reordered or spliced entry), the writer is this log's. Each checkpoint must
vouch for the chain's head at its place and carry a valid signature by the appliance's audit
key, for the same appliance throughout (a log spliced in from another appliance fails here).
Entries after the last checkpoint cannot be proven: they are reported as a window.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit.entry import CHECKPOINT, EXPIRED, GENESIS, checkpoint_message, raw_hash
from broker.audit.segments import SUFFIX, read_lines, segment_numbers
from broker.trust.keys import verifies


@dataclass
class WriterReport:
    writer: str
    entries: int = 0
    checkpoints: int = 0
    problem: str | None = None  # the first break, with its place
    unproven: tuple[int, int] | None = None  # seq range after the last checkpoint
    torn: list[str] = field(default_factory=list)  # places where a crash cut a line

    @property
    def intact(self) -> bool:
        return self.problem is None and self.unproven is None


class _Link(msgspec.Struct):
    """The fields verification reads; the rest of a line is covered by its hash."""

    seq: Any = None
    writer: Any = None
    event: Any = None
    prev_hash: Any = None
    hash: Any = None
    details: Any = None


_decode_link = msgspec.json.Decoder(_Link).decode


@dataclass
class _Segment:
    """One segment checked on its own, from its first entry; joined to the others later."""

    name: str
    first: tuple[int, str] | None = None  # seq and prev_hash of the first entry
    last: tuple[int, str] | None = None  # seq and hash of the last entry
    entries: int = 0
    checkpoints: int = 0
    last_checkpoint_seq: int = 0
    appliance: tuple[str, int, str] | None = None  # its first checkpoint's: name, line, place
    anchors: list[tuple[Any, Any]] = field(default_factory=list)  # (through_seq, head) of expiries
    problem: str | None = None
    problem_line: int = 0
    tail: int = 0  # bytes of a cut-off line at the end


PARALLEL_BYTES = 4 * 1024 * 1024  # below this, worker processes cost more than they save


def verify_writer(directory: Path, pubkey: Ed25519PublicKey | None) -> WriterReport:
    """Check each segment on its own (in parallel for large logs), then join them."""
    paths = [directory / f"{n:010d}{SUFFIX}" for n in segment_numbers(directory)]
    raw_key = None if pubkey is None else pubkey.public_bytes_raw()
    jobs = [(path, directory.name, raw_key) for path in paths]
    if len(paths) > 1 and sum(p.stat().st_size for p in paths) > PARALLEL_BYTES:
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            segments = list(pool.map(_verify_segment, *zip(*jobs, strict=True)))
    else:
        segments = [_verify_segment(*job) for job in jobs]
    return _join(directory.name, segments)


def _join(writer: str, segments: list[_Segment]) -> WriterReport:
    report = WriterReport(writer)
    expected_seq, head, appliance = 1, GENESIS, None
    last_checkpoint_seq = 0
    anchors = {anchor for segment in segments for anchor in segment.anchors}
    for position, segment in enumerate(segments):
        if segment.first is not None:
            seq, prev = segment.first
            if position == 0 and (seq - 1, prev) in anchors:  # older segments were expired
                expected_seq, head = seq, prev
            link = _Link(seq=seq, writer=writer, prev_hash=prev)
            problem = _continuity(link, expected_seq, head)
            if problem is not None:
                report.problem = f"{segment.name} line 1 (seq {seq}): {problem}"
                return report
        if segment.appliance is not None:
            name, line, place = segment.appliance
            first_break = segment.problem is None or line <= segment.problem_line
            if appliance is not None and name != appliance and first_break:
                report.problem = (
                    f"{place}: a checkpoint of appliance {name!r} in the log of {appliance!r} "
                    "(spliced from another appliance)"
                )
                return report
            appliance = name
        report.entries += segment.entries
        report.checkpoints += segment.checkpoints
        last_checkpoint_seq = max(last_checkpoint_seq, segment.last_checkpoint_seq)
        if segment.problem is not None:
            report.problem = segment.problem
            return report
        if segment.last is not None:
            expected_seq, head = segment.last[0] + 1, segment.last[1]
        if segment.tail:
            place = f"{segment.name}: {segment.tail} bytes of a cut-off line at the end"
            if position < len(segments) - 1:
                place += " (a crash; the chain continues in the next segment)"
            report.torn.append(place)
    if expected_seq - 1 > last_checkpoint_seq:
        report.unproven = (last_checkpoint_seq + 1, expected_seq - 1)
    return report


def _verify_segment(path: Path, writer: str, raw_key: bytes | None) -> _Segment:
    pubkey = None if raw_key is None else Ed25519PublicKey.from_public_bytes(raw_key)
    segment = _Segment(path.name)
    lines, tail = read_lines(path)
    segment.tail = len(tail)
    expected_seq, head, appliance = 0, "", None
    for line_number, line in enumerate(lines, start=1):
        try:
            link = _decode_link(line)
        except msgspec.DecodeError:
            segment.problem = f"{path.name} line {line_number}: not an audit entry"
            segment.problem_line = line_number
            return segment
        if segment.first is None and isinstance(link.seq, int):  # the join checks its place
            segment.first = (link.seq, str(link.prev_hash))
            expected_seq, head = link.seq, str(link.prev_hash)
        problem = _check(line, link, writer, expected_seq, head)
        ahead = isinstance(link.seq, int) and link.seq > expected_seq
        if problem is not None and ahead and _comes_next(lines, line_number, expected_seq):
            problem = f"reordered: seq {link.seq} stands before seq {expected_seq}"
        if problem is None and link.event == CHECKPOINT:
            if segment.appliance is None:  # the join compares it with the other segments'
                claimed = link.details.get("appliance") if isinstance(link.details, dict) else None
                place = f"{path.name} line {line_number} (seq {link.seq})"
                segment.appliance = (str(claimed), line_number, place)
            problem, appliance = _check_checkpoint(link, writer, appliance, pubkey)
            if problem is None:
                segment.checkpoints += 1
                segment.last_checkpoint_seq = link.seq
        if problem is not None:
            segment.problem = f"{path.name} line {line_number} (seq {link.seq}): {problem}"
            segment.problem_line = line_number
            return segment
        if link.event == EXPIRED and isinstance(link.details, dict):
            segment.anchors.append((link.details.get("through_seq"), link.details.get("head")))
        expected_seq, head = link.seq + 1, link.hash
        segment.last = (link.seq, link.hash)
        segment.entries += 1
    return segment


def _comes_next(lines: list[bytes], line_number: int, expected_seq: int) -> bool:
    """Whether the line after this one holds the seq expected here (two entries swapped)."""
    if line_number >= len(lines):
        return False
    with contextlib.suppress(msgspec.DecodeError):
        return bool(_decode_link(lines[line_number]).seq == expected_seq)
    return False


def _check(line: bytes, link: _Link, writer: str, expected_seq: int, head: str) -> str | None:
    if link.writer != writer:
        return f"an entry of writer {link.writer!r} in the {writer!r} log (spliced)"
    if not isinstance(link.hash, str) or raw_hash(line, link.hash) != link.hash:
        return "edited: the entry's content does not match its hash"
    return _continuity(link, expected_seq, head)


def _continuity(link: _Link, expected_seq: int, head: str) -> str | None:
    """Whether the entry takes the place after (expected_seq - 1, head) in the chain."""
    seq = link.seq
    if not isinstance(seq, int) or isinstance(seq, bool):
        return "edited: seq is not a number"
    if seq < expected_seq:
        return f"seq {seq} comes again after {expected_seq - 1} (duplicated, replayed or reordered)"
    if seq > expected_seq:
        return f"seq jumps from {expected_seq - 1} to {seq}: {seq - expected_seq} entries deleted"
    if link.prev_hash != head:
        return "does not follow the entry before it (removed, reordered or spliced entries)"
    return None


def _check_checkpoint(
    link: _Link, writer: str, appliance: str | None, pubkey: Ed25519PublicKey | None
) -> tuple[str | None, str | None]:
    details = link.details if isinstance(link.details, dict) else {}
    if details.get("head") != link.prev_hash or details.get("covers_seq") != link.seq - 1:
        return "a checkpoint that vouches for another chain", appliance
    if appliance is not None and details.get("appliance") != appliance:
        return (
            f"a checkpoint of appliance {details.get('appliance')!r} in the log of "
            f"{appliance!r} (spliced from another appliance)",
            appliance,
        )
    if pubkey is not None:
        message = checkpoint_message(
            str(details.get("appliance")), writer, link.seq - 1, str(details.get("head"))
        )
        try:
            signature = base64.b64decode(str(details.get("signature")), validate=True)
        except binascii.Error:
            signature = b""
        if not verifies(pubkey, signature, message):
            return "bad checkpoint signature (not made with this appliance's audit key)", appliance
    return None, str(details.get("appliance"))


def writers(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
