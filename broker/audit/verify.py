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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit.entry import CHECKPOINT, GENESIS, checkpoint_message, raw_hash
from broker.audit.log import SUFFIX, read_lines, segment_numbers
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


def verify_writer(directory: Path, pubkey: Ed25519PublicKey | None) -> WriterReport:
    report = WriterReport(directory.name)
    expected_seq, head, appliance = 1, GENESIS, None
    last_checkpoint_seq = 0
    numbers = segment_numbers(directory)
    for position, number in enumerate(numbers):
        path = directory / f"{number:010d}{SUFFIX}"
        lines, tail = read_lines(path)
        for line_number, line in enumerate(lines, start=1):
            try:
                link = _decode_link(line)
            except msgspec.DecodeError:
                report.problem = f"{path.name} line {line_number}: not an audit entry"
                return report
            problem = _check(line, link, report.writer, expected_seq, head)
            ahead = isinstance(link.seq, int) and link.seq > expected_seq
            if problem is not None and ahead and _comes_next(lines, line_number, expected_seq):
                problem = f"reordered: seq {link.seq} stands before seq {expected_seq}"
            if problem is None and link.event == CHECKPOINT:
                problem, appliance = _check_checkpoint(link, report.writer, appliance, pubkey)
                if problem is None:
                    report.checkpoints += 1
                    last_checkpoint_seq = link.seq
            if problem is not None:
                report.problem = f"{path.name} line {line_number} (seq {link.seq}): {problem}"
                return report
            expected_seq, head = link.seq + 1, link.hash
            report.entries += 1
        if tail:
            place = f"{path.name}: {len(tail)} bytes of a cut-off line at the end"
            if position < len(numbers) - 1:
                report.torn.append(place + " (a crash; the chain continues in the next segment)")
            else:
                report.torn.append(place)
    if expected_seq - 1 > last_checkpoint_seq:
        report.unproven = (last_checkpoint_seq + 1, expected_seq - 1)
    return report


def _comes_next(lines: list[bytes], line_number: int, expected_seq: int) -> bool:
    """Whether the line after this one holds the seq expected here (two entries swapped)."""
    if line_number >= len(lines):
        return False
    with contextlib.suppress(msgspec.DecodeError):
        return bool(_decode_link(lines[line_number]).seq == expected_seq)
    return False


def _check(  # noqa: PLR0911 - one return per kind of break
    line: bytes, link: _Link, writer: str, expected_seq: int, head: str
) -> str | None:
    if link.writer != writer:
        return f"an entry of writer {link.writer!r} in the {writer!r} log (spliced)"
    if not isinstance(link.hash, str) or raw_hash(line, link.hash) != link.hash:
        return "edited: the entry's content does not match its hash"
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
