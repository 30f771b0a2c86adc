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
    entry_hash,
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
    # first and highest seq in the log, the last deleted checkpoint a trusted expiry anchor
    # carries (seq and hash; 0 without one), and the key chain.
    sealed: dict[int, str] = field(default_factory=dict, repr=False)
    first_seq: int = 0
    last_seq: int = 0
    expired: tuple[int, str] = (0, "")
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

START, STOP, ROLLOVER = "start", "stop", "rollover"  # checkpoint reasons the verifier reads


@dataclass(frozen=True)
class _Anchor:
    """An expiry anchor: its own seq, what it says was deleted, and the last deleted
    checkpoint it carries (retention copies it whole)."""

    seq: int
    through: Any
    head: Any
    checkpoint: Any


@dataclass
class _Segment:
    """One segment checked on its own, from its first entry; joined to the others later."""

    name: str
    first: tuple[int, str] | None = None  # seq and prev_hash of the first entry
    opens: str = ""  # "start" (a start checkpoint), "break" (a chain break) or its first event
    opening_break: ChainBreak | None = None  # when the first entry is an audit_chain_break
    last: tuple[int, str] | None = None  # seq and hash of the last entry before any problem
    closes: str | None = None  # the reason of the checkpoint that is that last entry
    highest: int = 0  # the highest seq on any line, also after a problem
    entries: int = 0
    checkpoints: list[tuple[int, str]] = field(default_factory=list)  # (seq, hash), verified
    signed_to: int = 0  # the highest seq of a checkpoint that verifies, also after a problem
    appliance: tuple[str, int, str] | None = None  # its first checkpoint's: name, line, place
    anchors: list[_Anchor] = field(default_factory=list)
    witnessed: list[tuple[int, Any]] = field(default_factory=list)  # seq, details
    problem: str | None = None
    problem_line: int = 0
    hard: bool = False  # a problem no chain break can account for (the writer never does it)
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
    of an epoch past the end of the key chain is not skipped: the chain only grows, so the
    log and its chain were cut. One whose seq a trusted expiry anchor accounts for is not
    counted against the log.
    """
    mine = appliances or ({report.appliance} if report.appliance is not None else None)
    skipped = {"another appliance": 0, "a bad signature": 0, "expired": 0}
    chain = report.epochs
    for witness in sorted(witnesses, key=lambda w: w.seq):
        if mine is not None and witness.appliance not in mine:
            skipped["another appliance"] += 1
            continue
        cut = chain is not None and _past_chain(chain, witness.details.get("epoch"))
        if (
            chain is not None
            and not cut
            and _signature_problem(chain, witness.seq, report.writer, witness.details)
        ):
            skipped["a bad signature"] += 1
            continue
        if report.problem is not None:
            continue  # already broken: the first problem is the one to report
        if not cut and witness.seq < min(report.first_seq, report.expired[0]):
            skipped["expired"] += 1
            continue
        report.problem = _contradiction(report, witness, chain if cut else None)
        report.witnesses += report.problem is None
    for why, count in skipped.items():
        if count:
            report.notes.append(f"{count} witnesses not counted: {why}")


def _contradiction(
    report: WriterReport, witness: Witness, cut: list[epoch_chain.Epoch] | None
) -> str | None:
    """What the witness shows is missing from the log (`cut`: the key chain, when the
    witness's epoch is past its end), or None when the log holds its checkpoint."""
    if cut is not None:
        end = (
            f"the key chain ends at epoch {cut[-1].number} ({epoch_chain.CHAIN_FILE} line "
            f"{cut[-1].line})"
            if cut
            else f"the key chain ({epoch_chain.CHAIN_FILE}) holds no epoch"
        )
        return (
            f"the end (seq {report.last_seq}): {end}, but a witness ({witness.source}) holds a "
            f"checkpoint at seq {witness.seq} signed in epoch {witness.details.get('epoch')}: "
            "the log and its key chain were cut (truncated)"
        )
    if report.last_seq == 0:
        return (
            f"the log of {report.writer!r}: it holds no entry, but a witness "
            f"({witness.source}) holds its checkpoint at seq {witness.seq}: deleted"
        )
    if witness.seq > report.last_seq:
        return (
            f"the end (seq {report.last_seq}): the log ends at seq {report.last_seq}, but a "
            f"witness ({witness.source}) holds a checkpoint at seq {witness.seq}: truncated"
        )
    expired, expired_hash = report.expired
    if witness.seq < report.first_seq and witness.seq != expired:
        return (
            f"seq {witness.seq}: a witness ({witness.source}) holds a checkpoint there, before "
            f"the log's first entry (seq {report.first_seq}), and no trusted expiry anchor "
            "accounts for it: deleted"
        )
    held = report.sealed.get(witness.seq, expired_hash if witness.seq == expired else None)
    if held == witness.hash:
        return None
    return (
        f"seq {witness.seq}: a witness ({witness.source}) holds a checkpoint there "
        f"(hash {witness.hash[:16]}…) that the log does not prove: replaced or removed"
    )


def _past_chain(chain: list[epoch_chain.Epoch], epoch: Any) -> bool:
    """Whether `epoch` is a number past the last epoch of `chain` (or the chain is empty)."""
    if not chain:
        return True
    return isinstance(epoch, int) and not isinstance(epoch, bool) and epoch > chain[-1].number


def _verify_chain(directory: Path, pubkey: Ed25519PublicKey | None) -> WriterReport:
    """Check each segment on its own (in parallel for large logs), then join them."""
    chain, chain_problem, segments, last = _verify_segments(directory, pubkey)
    report = WriterReport(directory.name, signatures_checked=chain is not None, epochs=chain)
    if chain_problem is not None and chain is None:
        report.unproven.append(f"{chain_problem}: no checkpoint signature can be checked")
    elif chain_problem is not None and chain_problem.endswith(epoch_chain.TORN):
        report.notes.append(
            f"{chain_problem}: an epoch change a crash cut short (the epochs before it hold)"
        )
    elif chain_problem is not None:
        report.problem = chain_problem  # before anything the log says: its keys are in doubt
    joiner = _Joiner(report, segments)
    joiner.join(segments)
    if all(s.first is None for s in segments):
        report.unproven.append(
            f"the log of {report.writer!r} holds no entry: empty log (its segments were "
            "deleted, or its writer never started)"
        )
    if chain is not None and not chain and chain_problem is None:
        report.unproven.append(
            f"{epoch_chain.CHAIN_FILE} holds no epoch: empty key chain (emptied, or its "
            "writer's first start never finished)"
        )
    if (
        last is not None
        and report.problem is None
        and 0 < report.last_seq < last.from_seq
        # A running writer changes epochs after any checkpoint but its closing one
        # (broker.audit.log): its log then ends one seq before the new epoch until it writes.
        and not (report.last_seq == last.from_seq - 1 and joiner.ends not in (None, STOP))
    ):
        report.unproven.append(
            f"the log ends at seq {report.last_seq}, but epoch {last.number} "
            f"({epoch_chain.CHAIN_FILE} line {last.line}) starts at seq {last.from_seq}: its "
            "newest entries were removed (truncated), or its writer crashed right after an "
            "epoch change, before writing (its next start shows which)"
        )
    return report


def _verify_segments(
    directory: Path, pubkey: Ed25519PublicKey | None
) -> tuple[list[epoch_chain.Epoch] | None, str | None, list[_Segment], epoch_chain.Epoch | None]:
    """The key chain (None when it cannot be read or no pubkey), its problem, the segments
    checked with it, and the last epoch certified before they were read (the log reaches
    its from_seq, or one seq short of it; an epoch certified meanwhile it need not)."""
    # The last epoch before the segments are looked at: the log must reach it (below).
    floor = epoch_chain.read_chain(directory, pubkey)[0][-1:] if pubkey is not None else []
    paths = [directory / f"{n:010d}{SUFFIX}" for n in segment_numbers(directory)]
    # The segments as they are now, and then the key chain: every checkpoint in them was
    # signed after its epoch's certificate was written, so the chain read later holds it
    # (the writer only appends to both). What the writer adds meanwhile is left for next time.
    sizes = [_size(path) for path in paths]
    chain: list[epoch_chain.Epoch] | None = None
    chain_problem = None
    if pubkey is not None:
        chain, chain_problem = epoch_chain.read_chain(directory, pubkey)
        if chain_problem is not None and not (directory / epoch_chain.CHAIN_FILE).exists():
            chain = None  # nothing to check signatures with: said, never taken as broken
    table = None if chain is None else [_row(e) for e in chain]
    jobs = [(path, size, directory.name, table) for path, size in zip(paths, sizes, strict=True)]
    if len(paths) > 1 and sum(sizes) > PARALLEL_BYTES:
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            segments = list(pool.map(_verify_segment, *zip(*jobs, strict=True)))
    else:
        segments = [_verify_segment(*job) for job in jobs]
    return chain, chain_problem, segments, floor[0] if floor and chain else None


def _size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0  # gone meanwhile: reading it says so


def _row(epoch: epoch_chain.Epoch) -> _EpochRow:
    return epoch.number, epoch.from_seq, epoch.key.public_bytes_raw(), epoch.line


class _Joiner:
    """Joins segments checked on their own into one chain; a chain break starts a new link."""

    def __init__(self, report: WriterReport, segments: list[_Segment]) -> None:
        self.report = report
        self.started = False  # whether the log's first entry has been placed
        self.expected: tuple[int, str] | None = None  # (seq, prev_hash) the next entry needs
        self.pending: str | None = None  # the first problem since the chain was last proven
        self.hard: str | None = None  # the first problem in a tail that no break accounts for
        self.closes: str | None = None  # the reason of the checkpoint that ended the last segment
        self.ends: str | None = None  # the same, for the log's last segment (None: no checkpoint)
        self.link = 0  # chain breaks so far
        self.sealed_link: dict[int, int] = {}  # seq of a proven checkpoint -> its link
        self.sealed_to = 0  # the seq up to which the current link is under a checkpoint
        self.signed_to = 0  # the highest checkpoint that verifies so far, proven or not
        self.anchors = [a for s in segments for a in s.anchors]
        self.anchor_links: dict[int, int] = {}  # seq of an anchor on the proven chain -> link
        self.opened_by: _Anchor | None = None  # the anchor the log's start relies on

    def join(self, segments: list[_Segment]) -> None:
        for position, segment in enumerate(segments):
            if segment.first is not None and not self._place(segment):
                return
            if not _same_appliance(self.report, segment, self.pending):
                return
            if not self._take(segment, last=position == len(segments) - 1):
                return
        if self.pending is not None:
            self.report.problem = self.report.problem or self.pending
        else:
            self._finish()

    def _broken(self, problem: str) -> bool:
        """Report the first problem (an earlier one still open comes first); stop joining."""
        self.report.problem = self.report.problem or self.pending or problem
        return False

    def _place(self, segment: _Segment) -> bool:
        """Join the segment's first entry to the chain; False when that breaks it for good."""
        assert segment.first is not None
        seq, prev = segment.first
        place = f"{segment.name} line 1 (seq {seq})"
        opening = segment.opening_break
        follows = self.closes
        if not self.started:  # the first entry left: seq 1, or the one after an expiry
            self.started = True
            self.report.first_seq = seq
            follows = None
            if (seq, prev) != (1, GENESIS):
                self.opened_by = _anchor_for(self.anchors, seq, prev, opening)
                if self.opened_by is None:
                    return self._broken(
                        f"{place}: the log starts at seq {seq} and no expiry anchor accounts "
                        f"for seq 1..{seq - 1}: older segments deleted"
                    )
                follows = _reason(self.opened_by.checkpoint)
        elif self.pending is None and self.expected is not None and opening is None:
            found = _continuity(_Link(seq=seq, prev_hash=prev), *self.expected)
            self.pending = None if found is None else f"{place}: {found}"
        if segment.opens and follows != ROLLOVER and segment.opens not in (START, "break"):
            # The writer starts every segment but a rollover's next with its start checkpoint
            # or a chain break: this one was added, or the one before it was removed.
            return self._broken(
                f"{place}: a segment that follows no rollover checkpoint opens with "
                f"{segment.opens!r}, not a start checkpoint or a chain break (added outside "
                "the writer)"
            )
        if opening is not None:
            return self._open_link(segment, opening, place)
        return True

    def _open_link(self, segment: _Segment, opening: ChainBreak, place: str) -> bool:
        """Accept a chain break as the start of a new link only as the writer makes one."""
        report = self.report
        good_seq: Any = opening.details.get("last_good_seq")
        good_hash = opening.details.get("last_good_hash")
        chain = report.epochs
        if not segment.checkpoints:
            # Unsealed: forged, or its writer crashed before the start checkpoint after it
            # (then a later break accounts for it). Never accounts for anything itself.
            self.pending = self.pending or (
                f"{place}: a chain break no checkpoint seals (forged, or its writer crashed "
                "right after writing it)"
            )
            return True
        problem = None
        if chain is not None and not any(e.from_seq == opening.seq for e in chain):
            problem = (
                f"a chain break at seq {opening.seq}, where no epoch of {epoch_chain.CHAIN_FILE} "
                "starts (the writer certifies a new epoch for each break): not the writer's"
            )
        elif self.opened_by is None and not (
            (good_seq, good_hash) == (0, GENESIS) or report.sealed.get(good_seq) == good_hash
        ):
            problem = (
                f"a chain break names seq {good_seq} as its last good checkpoint, which the log "
                "does not prove (removed, edited or spliced entries)"
            )
        elif not isinstance(good_seq, int) or good_seq < self.signed_to:
            problem = (
                f"a chain break names seq {good_seq} as its last good checkpoint, but the log "
                f"holds a valid checkpoint at seq {self.signed_to} before it (the writer "
                "continues from its last one): it hides what went wrong before"
            )
        elif opening.seq <= report.last_seq:
            problem = (
                f"a chain break takes seq {opening.seq}, which the log already used (replayed)"
            )
        if problem is not None:
            return self._broken(f"{place}: {problem}")
        if self.hard is not None:
            return self._broken(self.hard)
        self.pending = None  # the break accounts for what went wrong in the tail it left
        self.link += 1
        self.sealed_to = opening.seq - 1
        report.breaks.append(opening)
        return True

    def _take(self, segment: _Segment, *, last: bool) -> bool:
        """Count the segment in; what it proves counts only while the chain is proven."""
        report = self.report
        report.last_seq = max(report.last_seq, segment.highest)
        self.signed_to = max(self.signed_to, segment.signed_to)
        if segment.hard and self.pending is not None:
            self.hard = self.hard or segment.problem  # in a tail: no break accounts for it
        if self.pending is None:
            report.entries += segment.entries
            report.checkpoints += len(segment.checkpoints)
            for seq, entry_hash in segment.checkpoints:
                report.sealed[seq] = entry_hash
                self.sealed_link[seq] = self.link
                self.sealed_to = seq
            for anchor in segment.anchors:
                self.anchor_links[anchor.seq] = self.link
            for seq, details in segment.witnessed:
                witness = from_witnessed(details, f"{report.writer} log seq {seq}")
                if witness is not None:
                    report.witnessed.append(witness)
            self.pending = segment.problem
            if segment.hard:
                return self._broken(str(segment.problem))
        if segment.last is not None:
            self.expected = segment.last[0] + 1, segment.last[1]
        self.closes = segment.closes if segment.problem is None else None
        if last:
            self.ends = self.closes
        if segment.tail:
            torn = f"{segment.name}: {segment.tail} bytes of a cut-off line at the end"
            if not last:
                torn += " (a crash; the chain continues in the next segment)"
            report.torn.append(torn)
        return True

    def _finish(self) -> None:
        """The window of a live tail, the breaks, and whether the log's start is sealed."""
        report = self.report
        if self.expected is not None and self.expected[0] - 1 > self.sealed_to:
            report.window = (self.sealed_to + 1, self.expected[0] - 1)
        report.unproven += [b.describe() for b in report.breaks]
        anchor = self.opened_by
        if anchor is None:
            return
        link = self.anchor_links.get(anchor.seq, -1)
        why = _anchor_problem(anchor, report.writer, report.epochs)
        if why is None and not any(
            s > anchor.seq and self.sealed_link[s] == link for s in self.sealed_link
        ):
            why = "is under no checkpoint"
        if why is not None:
            report.unproven.append(
                f"the log starts at seq {report.first_seq}, and the expiry anchor that accounts "
                f"for seq 1..{report.first_seq - 1} (seq {anchor.seq}) {why}: not trusted"
            )
            return
        report.expired = (anchor.checkpoint["seq"], anchor.checkpoint["hash"])


def _anchor_for(
    anchors: list[_Anchor], seq: int, prev: str, opening: ChainBreak | None
) -> _Anchor | None:
    """The anchor of the expiry that deleted what came before the log's first entry: the one
    whose last deleted entry that entry follows, or (when a chain break opens it) the one
    whose last deleted checkpoint the break continues from."""
    for anchor in anchors:
        if opening is None and (anchor.through, anchor.head) == (seq - 1, prev):
            return anchor
        checkpoint = anchor.checkpoint if isinstance(anchor.checkpoint, dict) else {}
        continues = (opening.details.get("last_good_seq"), prev) if opening is not None else None
        if continues is not None and continues == (checkpoint.get("seq"), checkpoint.get("hash")):
            return anchor
    return None


def _anchor_problem(
    anchor: _Anchor, writer: str, chain: list[epoch_chain.Epoch] | None
) -> str | None:
    """Why the last deleted checkpoint an anchor carries does not vouch for it, or None.

    It must be a whole checkpoint entry of this writer that ends what was deleted (or that
    a chain break continues from), signed by the key of its own seq's epoch: a key taken
    later cannot make one, so it cannot make an anchor delete older history.
    """
    entry = anchor.checkpoint
    if not isinstance(entry, dict) or entry.get("event") != CHECKPOINT:
        return "carries no deleted checkpoint"
    seq, details = entry.get("seq"), entry.get("details")
    if (
        entry.get("writer") != writer
        or not isinstance(seq, int)
        or not isinstance(details, dict)
        or entry.get("hash") != entry_hash(entry)
        or details.get("head") != entry.get("prev_hash")
    ):
        return "carries a checkpoint that is not a whole entry of this writer"
    if seq == anchor.through and entry["hash"] != anchor.head:
        return "carries a checkpoint that is not the last deleted entry"
    if chain is not None:
        problem = _signature_problem(chain, seq, writer, details)
        if problem is not None:
            return f"carries a checkpoint (seq {seq}) with a {problem}"
    return None


def _reason(entry: Any) -> str | None:
    details = entry.get("details") if isinstance(entry, dict) else None
    return details.get("reason") if isinstance(details, dict) else None


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


def _verify_segment(path: Path, size: int, writer: str, table: list[_EpochRow] | None) -> _Segment:
    """One segment's first `size` bytes (what it held before the key chain was read)."""
    chain = None if table is None else [_epoch(row) for row in table]
    segment = _Segment(path.name)
    try:
        lines, tail = _read_prefix(path, size)
    except OSError as e:
        segment.problem = f"{path.name}: cannot read: {e.strerror or e}"
        return segment
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
        details = link.details if isinstance(link.details, dict) else {}
        problem = problem or _out_of_place(segment, link, line_number)
        if problem is None and link.event == CHECKPOINT:
            if segment.appliance is None:  # the join compares it with the other segments'
                place = f"{path.name} line {line_number} (seq {link.seq})"
                segment.appliance = (str(details.get("appliance")), line_number, place)
            problem, appliance = _check_checkpoint(link, writer, appliance, chain)
            if problem is None:
                segment.checkpoints.append((link.seq, link.hash))
                segment.signed_to = link.seq
        if problem is not None:
            segment.problem = f"{path.name} line {line_number} (seq {link.seq}): {problem}"
            segment.problem_line = line_number
            break
        _accept(segment, link, details, line_number)
        expected_seq, head = link.seq + 1, link.hash
    if segment.problem is not None:
        rest = lines[segment.problem_line :]
        segment.highest = max([segment.highest, *_seqs(rest)])
        segment.signed_to = max([segment.signed_to, *_signed_seqs(rest, writer, chain)])
    return segment


def _out_of_place(segment: _Segment, link: _Link, line_number: int) -> str | None:
    """An entry the writer never writes where it stands: no chain break accounts for it."""
    problem = None
    if segment.closes == STOP:
        problem = f"an entry after the writer's closing checkpoint (seq {segment.highest}): added"
    elif link.event == CHAIN_BREAK and line_number > 1:
        problem = "a chain break that does not open its segment (the writer's never do)"
    segment.hard = problem is not None
    return problem


def _accept(segment: _Segment, link: _Link, details: dict[str, Any], line_number: int) -> None:
    """Count in an entry that takes its place in the chain, and what the join needs of it."""
    reason = details.get("reason") if link.event == CHECKPOINT else None
    if line_number == 1:
        segment.opens = (
            "break" if link.event == CHAIN_BREAK else START if reason == START else str(link.event)
        )
    segment.closes = reason
    if link.event in _NOTED:
        _note(segment, link, line_number)
    segment.last = (link.seq, link.hash)
    segment.highest = link.seq
    segment.entries += 1


_NOTED = frozenset({EXPIRED, CHAIN_BREAK, WITNESSED})


def _read_prefix(path: Path, size: int) -> tuple[list[bytes], bytes]:
    """The whole lines within the first `size` bytes of a segment, and the bytes after them."""
    lines, tail = read_lines(path)
    kept, used = [], 0
    for line in lines:
        if used + len(line) + 1 > size:
            break
        kept.append(line)
        used += len(line) + 1
    if len(kept) == len(lines):
        return kept, tail[: size - used]
    return kept, b"\n".join(lines[len(kept) :])[: size - used]


def _note(segment: _Segment, link: _Link, line_number: int) -> None:
    """Keep what the join needs of an expiry anchor, a chain break or a witnessed checkpoint."""
    details = link.details if isinstance(link.details, dict) else {}
    if link.event == EXPIRED:
        segment.anchors.append(
            _Anchor(
                link.seq, details.get("through_seq"), details.get("head"), details.get("checkpoint")
            )
        )
    elif link.event == CHAIN_BREAK:
        segment.opening_break = ChainBreak(link.seq, f"{segment.name} line {line_number}", details)
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


def _signed_seqs(
    lines: list[bytes], writer: str, chain: list[epoch_chain.Epoch] | None
) -> list[int]:
    """The seqs of whole checkpoints that verify on lines after a problem: a chain break must
    continue from the last of them, as the writer's start does (broker.audit.recovery)."""
    found = []
    for line in lines:
        with contextlib.suppress(msgspec.DecodeError):
            link = _decode_link(line)
            if (
                link.event == CHECKPOINT
                and link.writer == writer
                and isinstance(link.hash, str)
                and raw_hash(line, link.hash) == link.hash
                and isinstance(link.seq, int)
                and _check_checkpoint(link, writer, None, chain)[0] is None
            ):
                found.append(link.seq)
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
    if details.get("head") != link.prev_hash:
        return "a checkpoint that vouches for another chain", appliance
    if appliance is not None and details.get("appliance") != appliance:
        return (
            f"a checkpoint of appliance {details.get('appliance')!r} in the log of "
            f"{appliance!r} (spliced from another appliance)",
            appliance,
        )
    if chain is not None:
        problem = _signature_problem(chain, link.seq, writer, details)
        if problem is not None:
            return problem, appliance
    elif details.get("covers_seq") != link.seq - 1:
        return "a checkpoint that vouches for another chain", appliance
    return None, str(details.get("appliance"))


def _signature_problem(
    chain: list[epoch_chain.Epoch], seq: int, writer: str, details: dict[str, Any]
) -> str | None:
    """Why checkpoint `seq`, with these details, is not signed by the key of the epoch its
    seq belongs to (over every detail: entry.checkpoint_message), or None."""
    if details.get("covers_seq") != seq - 1:  # a checkpoint signs the seq before its own
        return "a checkpoint that vouches for another chain"
    owner = epoch_chain.key_for(chain, seq)
    epoch = details.get("epoch")
    if owner is None:
        return f"bad checkpoint signature: no certified epoch key signs seq {seq} (epochs.jsonl)"
    if epoch != owner.number:
        return (
            f"bad checkpoint signature: it claims epoch {epoch}, but seq {seq} belongs to epoch "
            f"{owner.number} (epochs.jsonl line {owner.line}); a later key cannot sign the past"
        )
    try:
        raw = base64.b64decode(str(details.get("signature")), validate=True)
    except binascii.Error:
        raw = b""
    if not verifies(owner.key, raw, checkpoint_message(writer, details)):
        return (
            f"bad checkpoint signature (not made with epoch {owner.number}'s key, "
            f"epochs.jsonl line {owner.line})"
        )
    return None


def writers(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
