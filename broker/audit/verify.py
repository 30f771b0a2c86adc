"""`dmzbroker audit verify`: prove each writer's chain, or name the first place it breaks.

Checks, entry by entry: the hash matches the content (edited field), seq follows the
previous one (deleted, duplicated, replayed or reordered entry), prev_hash names the previous
entry (removed, reordered or spliced entry), the writer is this log's. Each checkpoint must
vouch for the chain's head at its place and carry a valid signature by the key of the epoch
its seq belongs to (broker.audit.epochs, certified from `audit.pub`), for the same appliance
throughout: a key taken later cannot sign an earlier seq, and a log spliced in from another
appliance fails.

Three verdicts per writer: INTACT; INTACT with the newest entries not yet under a checkpoint
(a running writer's tail: a warning); BROKEN at a place, or UNPROVEN (an `audit_chain_break`
the writer recorded, forever; a missing key chain; an expiry anchor no checkpoint seals).
Problems in the tail a chain break did not adopt belong to that break. Witnesses (copies of
checkpoints kept elsewhere, broker.audit.witness) make truncation visible: the log must still
hold every checkpoint a witness holds.

This module only reads: it never changes a log, and it never takes an entry's word for what a
checkpoint has not sealed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit import epochs as epoch_chain
from broker.audit.entry import (
    CHAIN_BREAK,
    CHECKPOINT,
    EXPIRED,
    GENESIS,
    checkpoint_message,
    raw_hash,
)
from broker.audit.segments import SUFFIX, read_lines, segment_numbers
from broker.audit.witness import WITNESSED, Witness, WitnessFile, from_witnessed
from broker.trust.keys import key_id, verifies

# An epoch as it travels to a worker process: number, from_seq, raw public key, line.
_EpochRow = tuple[int, int, bytes, int]


@dataclass(frozen=True)
class ChainBreak:
    """An `audit_chain_break` entry: the writer's start found a tail it did not adopt."""

    seq: int
    place: str  # segment and line
    details: dict[str, Any]

    def describe(self) -> str:
        d = self.details
        unadopted = d.get("unadopted")
        tail = (
            f"seq {unadopted[0]}..{unadopted[1]} not adopted"
            if isinstance(unadopted, list) and len(unadopted) == 2
            else "nothing left unadopted"
        )
        return (
            f"chain break at seq {self.seq} ({self.place}): last good seq "
            f"{d.get('last_good_seq')} (hash {str(d.get('last_good_hash'))[:16]}…), "
            f"first bad {d.get('first_bad') or 'none'}, {tail}: {d.get('reason')}"
        )


@dataclass
class WriterReport:
    writer: str
    entries: int = 0
    checkpoints: int = 0
    witnesses: int = 0  # witnesses whose checkpoint the log holds
    problem: str | None = None  # BROKEN: the first break, with its place
    unproven: list[str] = field(default_factory=list)  # what cannot be proven, with where
    breaks: list[ChainBreak] = field(default_factory=list)
    window: tuple[int, int] | None = None  # seq range after the last checkpoint (a live tail)
    torn: list[str] = field(default_factory=list)  # places where a crash cut a line
    notes: list[str] = field(default_factory=list)
    signatures_checked: bool = False
    appliance: str | None = None
    witnessed: list[Witness] = field(default_factory=list)  # other writers' checkpoints held here
    # For checking witnesses after the chain: the proven checkpoints' hashes by seq, the
    # first and highest seq in the log, and the key chain.
    sealed: dict[int, str] = field(default_factory=dict, repr=False)
    first_seq: int = 0
    last_seq: int = 0
    epochs: list[epoch_chain.Epoch] | None = field(default=None, repr=False)

    @property
    def intact(self) -> bool:
        """INTACT, with or without a window of newest entries not yet under a checkpoint."""
        return self.problem is None and not self.unproven

    @property
    def verdict(self) -> str:
        if self.problem is not None:
            return f"BROKEN at {self.problem}"
        if self.unproven:
            more = f" (and {len(self.unproven) - 1} more)" if len(self.unproven) > 1 else ""
            return f"UNPROVEN: {self.unproven[0]}{more}"
        if self.window is not None:
            first, last = self.window
            return (
                f"INTACT, {last - first + 1} newest entries (seq {first}..{last}) "
                "not yet under a checkpoint"
            )
        return "INTACT"


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
    opening_break: ChainBreak | None = None  # when the first entry is an audit_chain_break
    last: tuple[int, str] | None = None  # seq and hash of the last entry before any problem
    highest: int = 0  # the highest seq on any line, also after a problem
    entries: int = 0
    checkpoints: list[tuple[int, str]] = field(default_factory=list)  # (seq, hash), verified
    appliance: tuple[str, int, str] | None = None  # its first checkpoint's: name, line, place
    anchors: list[tuple[int, Any, Any]] = field(default_factory=list)  # seq, through_seq, head
    breaks: list[ChainBreak] = field(default_factory=list)
    witnessed: list[tuple[int, Any]] = field(default_factory=list)  # seq, details
    problem: str | None = None
    problem_line: int = 0
    tail: int = 0  # bytes of a cut-off line at the end


PARALLEL_BYTES = 4 * 1024 * 1024  # below this, worker processes cost more than they save


def verify_writer(
    directory: Path, pubkey: Ed25519PublicKey | None, witnesses: Iterable[Witness] = ()
) -> WriterReport:
    """The verdict on one writer's log, `pubkey` being the root audit key (`audit.pub`)."""
    report = _verify_chain(directory, pubkey)
    check_witnesses(report, witnesses)
    return report


def verify_dir(
    root: Path, pubkey: Ed25519PublicKey | None, files: Sequence[WitnessFile] = ()
) -> list[WriterReport]:
    """Every writer's verdict, each checked against the witnesses in `files` and those the
    other writers of `root` recorded (`audit_checkpoint_witnessed`). A writer that witnesses
    name but whose folder is gone is reported too."""
    reports = {d.name: _verify_chain(d, pubkey) for d in writers(root)}
    found = [w for f in files for w in f.witnesses]
    found += [w for r in reports.values() for w in r.witnessed if w.writer != r.writer]
    appliances = {r.appliance for r in reports.values() if r.appliance is not None}
    for name in sorted({w.writer for w in found if w.appliance in appliances} - set(reports)):
        reports[name] = WriterReport(name, signatures_checked=pubkey is not None)
    for name, report in reports.items():
        check_witnesses(report, (w for w in found if w.writer == name), appliances)
    return [reports[name] for name in sorted(reports)]


def check_witnesses(
    report: WriterReport, witnesses: Iterable[Witness], appliances: set[str] | None = None
) -> None:
    """Demand that the log holds each witness's checkpoint, with the same hash.

    Witnesses of another appliance are skipped (a collector serves many); so are those whose
    signature does not verify under the writer's key chain (anyone can write a file). One
    whose seq was expired from the log is not counted against it.
    """
    mine = appliances or ({report.appliance} if report.appliance is not None else None)
    skipped = {"another appliance": 0, "a bad signature": 0, "expired": 0}
    for witness in sorted(witnesses, key=lambda w: w.seq):
        if mine is not None and witness.appliance not in mine:
            skipped["another appliance"] += 1
            continue
        if report.epochs is not None and _signature_problem(
            report.epochs,
            witness.seq,
            appliance=witness.appliance,
            writer=report.writer,
            covers_seq=witness.seq - 1,  # a checkpoint signs the seq before its own
            head=witness.head,
            epoch=witness.epoch,
            signature=witness.signature,
        ):
            skipped["a bad signature"] += 1
            continue
        if report.problem is not None:
            continue  # already broken: the first problem is the one to report
        if report.last_seq == 0:
            report.problem = (
                f"the log of {report.writer!r}: it holds no entry, but a witness "
                f"({witness.source}) holds its checkpoint at seq {witness.seq}: deleted"
            )
        elif witness.seq > report.last_seq:
            report.problem = (
                f"the end (seq {report.last_seq}): the log ends at seq {report.last_seq}, but a "
                f"witness ({witness.source}) holds a checkpoint at seq {witness.seq}: truncated"
            )
        elif witness.seq < report.first_seq:
            skipped["expired"] += 1
        elif report.sealed.get(witness.seq) == witness.hash:
            report.witnesses += 1
        else:
            report.problem = (
                f"seq {witness.seq}: a witness ({witness.source}) holds a checkpoint there "
                f"(hash {witness.hash[:16]}…) that the log does not prove: replaced or removed"
            )
    for why, count in skipped.items():
        if count:
            report.notes.append(f"{count} witnesses not counted: {why}")


def _verify_chain(directory: Path, pubkey: Ed25519PublicKey | None) -> WriterReport:
    """Check each segment on its own (in parallel for large logs), then join them."""
    chain: list[epoch_chain.Epoch] | None = None
    chain_problem = None
    if pubkey is not None:
        chain, chain_problem = epoch_chain.read_chain(directory, pubkey)
    missing = chain_problem is not None and not (directory / epoch_chain.CHAIN_FILE).exists()
    if missing:
        chain = None  # nothing to check signatures with: said below, never taken as broken
    table = None if chain is None else [_row(e) for e in chain]
    paths = [directory / f"{n:010d}{SUFFIX}" for n in segment_numbers(directory)]
    jobs = [(path, directory.name, table) for path in paths]
    if len(paths) > 1 and sum(p.stat().st_size for p in paths) > PARALLEL_BYTES:
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            segments = list(pool.map(_verify_segment, *zip(*jobs, strict=True)))
    else:
        segments = [_verify_segment(*job) for job in jobs]
    report = WriterReport(directory.name, signatures_checked=chain is not None, epochs=chain)
    if missing:
        report.unproven.append(f"{chain_problem}: no checkpoint signature can be checked")
    elif chain_problem is not None:
        report.problem = chain_problem  # before anything the log says: its keys are in doubt
    _join(report, segments)
    return report


def _row(epoch: epoch_chain.Epoch) -> _EpochRow:
    return epoch.number, epoch.from_seq, epoch.key.public_bytes_raw(), epoch.line


def _join(report: WriterReport, segments: list[_Segment]) -> None:
    _Joiner(report, segments).join(segments)


class _Joiner:
    """Joins segments checked on their own into one chain; a chain break starts a new link."""

    def __init__(self, report: WriterReport, segments: list[_Segment]) -> None:
        self.report = report
        self.started = False  # whether the log's first entry has been placed
        self.expected: tuple[int, str] | None = None  # (seq, prev_hash) the next entry needs
        self.pending: str | None = None  # the first problem since the chain was last proven
        self.link = 0  # chain breaks so far
        self.sealed_link: dict[int, int] = {}  # seq of a proven checkpoint -> its link
        self.sealed_to = 0  # the seq up to which the current link is under a checkpoint
        self.anchors = {(through, head): seq for s in segments for seq, through, head in s.anchors}
        self.anchor_links: dict[tuple[Any, Any], int] = {}  # anchors on the proven chain
        self.opened_by: tuple[Any, Any] | None = None  # the anchor the log's start relies on

    def join(self, segments: list[_Segment]) -> None:
        for position, segment in enumerate(segments):
            if segment.first is not None and not self._place(segment):
                return
            if not _same_appliance(self.report, segment, self.pending):
                return
            self._take(segment, last=position == len(segments) - 1)
        if self.pending is not None:
            self.report.problem = self.report.problem or self.pending
        else:
            self._finish()

    def _place(self, segment: _Segment) -> bool:
        """Join the segment's first entry to the chain; False when that breaks it for good."""
        assert segment.first is not None
        seq, prev = segment.first
        place = f"{segment.name} line 1 (seq {seq})"
        opening = segment.opening_break
        problem = None
        if not self.started:  # the first entry left: seq 1, or the one after an expiry
            self.started = True
            self.report.first_seq = seq
            key = (seq - 1, prev) if opening is None else _anchor_through(self.anchors, seq - 1)
            if (seq, prev) != (1, GENESIS) and key not in self.anchors:
                problem = (
                    f"the log starts at seq {seq} and no expiry anchor accounts for seq "
                    f"1..{seq - 1}: older segments deleted"
                )
            self.opened_by = None if (seq, prev) == (1, GENESIS) else key
        elif opening is not None and (self.pending is not None or self.expected != (seq, prev)):
            problem = _break_links(opening, self.report.sealed, self.report.last_seq)
            self.pending = None  # the break owns what went wrong in the tail it left behind
        elif self.pending is None and self.expected is not None:
            found = _continuity(_Link(seq=seq, prev_hash=prev), *self.expected)
            self.pending = None if found is None else f"{place}: {found}"
        if problem is not None:
            self.report.problem = self.report.problem or f"{place}: {problem}"
            return False
        if opening is not None:
            self.link += 1
            self.sealed_to = opening.seq - 1
        return True

    def _take(self, segment: _Segment, *, last: bool) -> None:
        """Count the segment in; what it proves counts only while the chain is proven."""
        report = self.report
        report.breaks += segment.breaks
        report.last_seq = max(report.last_seq, segment.highest)
        if self.pending is None:
            report.entries += segment.entries
            report.checkpoints += len(segment.checkpoints)
            for seq, entry_hash in segment.checkpoints:
                report.sealed[seq] = entry_hash
                self.sealed_link[seq] = self.link
                self.sealed_to = seq
            for _, through, head in segment.anchors:
                self.anchor_links[(through, head)] = self.link
            for seq, details in segment.witnessed:
                witness = from_witnessed(details, f"{report.writer} log seq {seq}")
                if witness is not None:
                    report.witnessed.append(witness)
            self.pending = segment.problem
        if segment.last is not None:
            self.expected = segment.last[0] + 1, segment.last[1]
        if segment.tail:
            torn = f"{segment.name}: {segment.tail} bytes of a cut-off line at the end"
            if not last:
                torn += " (a crash; the chain continues in the next segment)"
            report.torn.append(torn)

    def _finish(self) -> None:
        """The window of a live tail, the breaks, and whether the log's start is sealed."""
        report = self.report
        if self.expected is not None and self.expected[0] - 1 > self.sealed_to:
            report.window = (self.sealed_to + 1, self.expected[0] - 1)
        report.unproven += [b.describe() for b in report.breaks]
        if self.opened_by is None:
            return
        seq, link = self.anchors[self.opened_by], self.anchor_links.get(self.opened_by, -1)
        if not any(s > seq and self.sealed_link[s] == link for s in self.sealed_link):
            report.unproven.append(
                f"the log starts at seq {report.first_seq}, and the expiry anchor that accounts "
                f"for seq 1..{report.first_seq - 1} (seq {seq}) is under no checkpoint: not "
                "trusted"
            )


def _anchor_through(anchors: dict[tuple[Any, Any], int], through: int) -> tuple[Any, Any] | None:
    """The anchor of an expiry that deleted through `through` (a log whose first remaining
    segment opens with a chain break: the break's predecessor went with the expired ones)."""
    return next((a for a in anchors if a[0] == through), None)


def _break_links(opening: ChainBreak, sealed: dict[int, str], highest: int) -> str | None:
    """Whether a chain break opening a segment continues from a checkpoint the log proves."""
    good_seq = opening.details.get("last_good_seq")
    good_hash = opening.details.get("last_good_hash")
    if not isinstance(good_seq, int) or not (
        (good_seq, good_hash) == (0, GENESIS) or sealed.get(good_seq) == good_hash
    ):
        return (
            f"a chain break names seq {good_seq} as its last good checkpoint, which the log "
            "does not prove (removed, edited or spliced entries)"
        )
    if opening.seq <= highest:
        return f"a chain break takes seq {opening.seq}, which the log already used (replayed)"
    return None


def _same_appliance(report: WriterReport, segment: _Segment, pending: str | None) -> bool:
    """False (and the report says why) when a segment's checkpoints name another appliance."""
    if segment.appliance is None:
        return True
    name, line, place = segment.appliance
    first_break = segment.problem is None or line <= segment.problem_line
    if report.appliance is not None and name != report.appliance and first_break and not pending:
        report.problem = report.problem or (
            f"{place}: a checkpoint of appliance {name!r} in the log of {report.appliance!r} "
            "(spliced from another appliance)"
        )
        return False
    report.appliance = report.appliance or name
    return True


def _verify_segment(path: Path, writer: str, table: list[_EpochRow] | None) -> _Segment:
    chain = None if table is None else [_epoch(row) for row in table]
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
            break
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
            problem, appliance = _check_checkpoint(link, writer, appliance, chain)
            if problem is None:
                segment.checkpoints.append((link.seq, link.hash))
        if problem is not None:
            segment.problem = f"{path.name} line {line_number} (seq {link.seq}): {problem}"
            segment.problem_line = line_number
            break
        if link.event in _NOTED:
            _note(segment, link, line_number)
        expected_seq, head = link.seq + 1, link.hash
        segment.last = (link.seq, link.hash)
        segment.highest = link.seq
        segment.entries += 1
    if segment.problem is not None:
        segment.highest = max([segment.highest, *_seqs(lines[segment.problem_line :])])
    return segment


_NOTED = frozenset({EXPIRED, CHAIN_BREAK, WITNESSED})


def _note(segment: _Segment, link: _Link, line_number: int) -> None:
    """Keep what the join needs of an expiry anchor, a chain break or a witnessed checkpoint."""
    details = link.details if isinstance(link.details, dict) else {}
    if link.event == EXPIRED:
        segment.anchors.append((link.seq, details.get("through_seq"), details.get("head")))
    elif link.event == CHAIN_BREAK:
        segment.breaks.append(ChainBreak(link.seq, f"{segment.name} line {line_number}", details))
        if line_number == 1:
            segment.opening_break = segment.breaks[-1]
    else:
        segment.witnessed.append((link.seq, details))


def _seqs(lines: list[bytes]) -> list[int]:
    """The integer seqs on lines after a problem (how far the log goes, for witnesses)."""
    found = []
    for line in lines:
        with contextlib.suppress(msgspec.DecodeError):
            seq = _decode_link(line).seq
            if isinstance(seq, int) and not isinstance(seq, bool):
                found.append(seq)
    return found


def _epoch(row: _EpochRow) -> epoch_chain.Epoch:
    number, from_seq, raw, line = row
    key = Ed25519PublicKey.from_public_bytes(raw)
    return epoch_chain.Epoch(number, from_seq, key, key_id(key), line)


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
    link: _Link, writer: str, appliance: str | None, chain: list[epoch_chain.Epoch] | None
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
    if chain is not None:
        problem = _signature_problem(
            chain,
            link.seq,
            appliance=str(details.get("appliance")),
            writer=writer,
            covers_seq=link.seq - 1,
            head=str(details.get("head")),
            epoch=details.get("epoch"),
            signature=details.get("signature"),
        )
        if problem is not None:
            return problem, appliance
    return None, str(details.get("appliance"))


def _signature_problem(
    chain: list[epoch_chain.Epoch],
    seq: int,
    *,
    appliance: str,
    writer: str,
    covers_seq: int,
    head: str,
    epoch: Any,
    signature: Any,
) -> str | None:
    """Why checkpoint `seq` is not signed by the key of the epoch its seq belongs to, or None."""
    owner = epoch_chain.key_for(chain, seq)
    if owner is None:
        return f"bad checkpoint signature: no certified epoch key signs seq {seq} (epochs.jsonl)"
    if epoch != owner.number:
        return (
            f"bad checkpoint signature: it claims epoch {epoch}, but seq {seq} belongs to epoch "
            f"{owner.number} (epochs.jsonl line {owner.line}); a later key cannot sign the past"
        )
    try:
        raw = base64.b64decode(str(signature), validate=True)
    except binascii.Error:
        raw = b""
    if not verifies(owner.key, raw, checkpoint_message(appliance, writer, covers_seq, head, epoch)):
        return (
            f"bad checkpoint signature (not made with epoch {owner.number}'s key, "
            f"epochs.jsonl line {owner.line})"
        )
    return None


def writers(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
