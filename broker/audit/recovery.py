"""What a writer finds in its own log at start: the last checkpoint it may continue from.

The writer adopts its log only when the log ends exactly with a checkpoint whose signature
verifies under the writer's epoch chain (broker.audit.epochs). Anything after that checkpoint
(a crash's unsealed tail, or entries changed, dropped or added without the key) is never
continued: `examine` describes it, and the writer records an `audit_chain_break` instead
(ADR 0016). This module only reads: it never changes a segment.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit.entry import CHECKPOINT, GENESIS, checkpoint_message, raw_hash
from broker.audit.epochs import Epoch, key_for
from broker.audit.segments import read_lines, segment_path
from broker.trust.keys import verifies


@dataclass(frozen=True)
class Found:
    last_good_seq: int  # the last checkpoint that verifies (0: none)
    last_good_hash: str  # its hash (GENESIS: none)
    highest_seq: int  # the highest seq written after it, else last_good_seq
    unadopted: tuple[int, int] | None  # the seqs found after it, first and last
    first_bad: str | None  # "<segment file> line N": the first line after it that is wrong
    problem: str  # what is after it, in words; "" when the log ends with it

    @property
    def adoptable(self) -> bool:
        return not self.problem


def examine(
    directory: Path, numbers: list[int], epochs: list[Epoch], appliance: str, writer: str
) -> Found:
    """Walk back from the newest segment to the last valid checkpoint; describe what follows.

    Two passes, one segment in memory at a time: a log without any valid checkpoint (one
    written before ADR 0016, or emptied of them) is read whole, but never held whole.
    """
    seq, head, position = 0, GENESIS, (numbers[0] if numbers else 0, 0)
    for number in reversed(numbers):
        path = segment_path(directory, number)
        lines, _, _ = _read(path)
        index = next(
            (
                i
                for i in range(len(lines) - 1, -1, -1)
                if _sealed(lines[i], _decode(lines[i]), epochs, appliance, writer)
            ),
            None,
        )
        if index is not None:
            entry = msgspec.json.decode(lines[index])
            seq, head, position = int(entry["seq"]), str(entry["hash"]), (number, index + 1)
            break
    return _describe(directory, [n for n in numbers if n >= position[0]], position[1], seq, head)


def _describe(directory: Path, numbers: list[int], skip: int, seq: int, head: str) -> Found:
    """What follows the first `skip` lines of the first of `numbers`, after checkpoint `seq`."""
    first_seq: int | None = None
    last_seq = seq
    count = 0
    first_bad: str | None = None
    expected_seq, expected_prev = seq + 1, cast(object, head)
    unreadable: list[str] = []
    for i, number in enumerate(numbers):
        path = segment_path(directory, number)
        lines, tail, error = _read(path)
        if error:
            unreadable.append(f"{path.name} ({error})")
            if first_bad is None:
                first_bad = f"{path.name} line 1"
            continue
        start = skip if i == 0 else 0
        for line_number, line in enumerate(lines[start:], start=start + 1):
            count += 1
            entry = _decode(line)
            found = entry.get("seq") if entry is not None else None
            ok = entry is not None and type(found) is int
            if ok:
                assert entry is not None and isinstance(found, int)
                first_seq = found if first_seq is None else min(first_seq, found)
                last_seq = max(last_seq, found)
                ok = (
                    found == expected_seq
                    and entry.get("prev_hash") == expected_prev
                    and isinstance(entry.get("hash"), str)
                    and raw_hash(line, entry["hash"]) == entry["hash"]
                )
                expected_seq, expected_prev = expected_seq + 1, entry.get("hash")
            if not ok and first_bad is None:
                first_bad = f"{path.name} line {line_number}"
        if tail and first_bad is None:
            first_bad = f"{path.name} line {len(lines) + 1}"  # a torn last line
    unadopted = (first_seq, last_seq) if first_seq is not None else None
    if unreadable:
        problem = f"cannot read {', '.join(unreadable)}: not adopted"
    elif first_bad is not None:
        problem = f"{first_bad} does not continue the chain from the last checkpoint"
    elif count:
        problem = (
            f"{count} entr{'y' if count == 1 else 'ies'} after the last checkpoint "
            "never sealed (the writer stopped without its closing checkpoint, or they were "
            "written without the key)"
        )
    else:
        problem = ""
    return Found(seq, head, last_seq, unadopted, first_bad, problem)


def _read(path: Path) -> tuple[list[bytes], bytes, str]:
    """A segment's lines and tail, or why it cannot be read (a FIFO, a link, a folder, a
    giant): such a segment is a break to record, never a reason not to start."""
    try:
        lines, tail = read_lines(path)
    except OSError as e:
        return [], b"", e.strerror or type(e).__name__
    return lines, tail, ""


def _decode(line: bytes) -> dict[str, Any] | None:
    try:
        unverified: Any = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return None
    return unverified if isinstance(unverified, dict) else None


def _sealed(
    line: bytes, entry: dict[str, Any] | None, epochs: list[Epoch], appliance: str, writer: str
) -> bool:
    """Whether this line is a whole checkpoint of this writer, signed by its seq's epoch key."""
    if entry is None:
        return False
    details = entry.get("details")
    seq = entry.get("seq")
    if entry.get("event") != CHECKPOINT or not isinstance(details, dict) or type(seq) is not int:
        return False
    claimed = entry.get("hash")
    if not isinstance(claimed, str) or raw_hash(line, claimed) != claimed:
        return False
    epoch = key_for(epochs, seq)
    if (
        epoch is None
        or entry.get("writer") != writer
        or details.get("appliance") != appliance
        or details.get("covers_seq") != seq - 1
        or details.get("head") != entry.get("prev_hash")
        or details.get("epoch") != epoch.number
        or details.get("keyid") != epoch.keyid
        or not isinstance(details.get("head"), str)
        or not isinstance(details.get("signature"), str)
    ):
        return False
    return _signed(epoch.key, details, writer)


def _signed(key: Ed25519PublicKey, details: dict[str, Any], writer: str) -> bool:
    try:
        signature = base64.b64decode(details["signature"], validate=True)
    except (binascii.Error, ValueError):
        return False
    return verifies(key, signature, checkpoint_message(writer, details))
