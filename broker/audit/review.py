"""The one pass over an audit directory behind `dmzbroker audit report`: what a security
team reads, gathered as counters and capped lists.

Memory is bounded by those caps (KEYS distinct keys per tally, LISTED rows per list), never
by the log's size: a flood of distinct addresses or paths is folded into a count. This
module only reads; it never writes to the log, and it renders nothing (broker.audit.report).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from broker.audit.catalogue import SUPPRESSED
from broker.audit.segments import segment_numbers, segment_path

KEYS = 10_000  # distinct keys a tally keeps exactly; past it the smallest half is folded
TOP = 20  # rows shown per table and chart
LISTED = 200  # periods, breaks, trust root changes and policy versions kept in full
PROGRESS_EVERY = 100_000  # entries between calls of the progress callback

K = TypeVar("K", bound=Hashable)


class Tally(Generic[K]):
    """Counts per key, bounded: past KEYS keys the smallest half is folded into `folded`, so
    a flood of distinct keys (addresses, paths) costs bounded memory; the top stays exact for
    keys that were never folded."""

    def __init__(self) -> None:
        self.counts: dict[K, int] = {}
        self.folded = 0  # count in keys no longer kept
        self.folded_keys = 0

    def add(self, key: K, count: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + count
        if len(self.counts) > KEYS:
            kept = sorted(self.counts.items(), key=lambda item: -item[1])
            for _, dropped in kept[KEYS // 2 :]:
                self.folded += dropped
            self.folded_keys += len(kept) - KEYS // 2
            self.counts = dict(kept[: KEYS // 2])

    def top(self, n: int = TOP) -> list[tuple[K, int]]:
        return sorted(self.counts.items(), key=lambda item: (-item[1], str(item[0])))[:n]

    @property
    def total(self) -> int:
        return sum(self.counts.values()) + self.folded


@dataclass
class Period:
    writer: str
    start: str | None  # entry time; None: began before the log's first entry
    end: str | None = None  # None: still going at the end of the log
    detail: str = ""


@dataclass
class PolicyVersion:
    version: object
    sha256: str
    first_time: str
    writers: set[str] = field(default_factory=set)
    signers: list[str] = field(default_factory=list)
    widened: list[str] | None = None  # None: no previous policy known where it was accepted
    previous: object = None


@dataclass
class Noted:
    """One entry shown in a table as it is (chain breaks, trust root changes)."""

    writer: str
    seq: object
    time: str
    event: str
    details: dict[str, Any]


class _Entry(msgspec.Struct):
    seq: Any = None
    time: Any = None
    event: Any = None
    actor: Any = None
    object: Any = None
    policy_version: Any = None
    details: Any = None


_decode = msgspec.json.Decoder(_Entry).decode

# event → (kind of period, whether it starts one)
PERIODS = {
    "island_mode_on": ("island", True),
    "island_mode_off": ("island", False),
    "audit_write_failed": ("audit failure", True),
    "audit_write_recovered": ("audit failure", False),
}
NOTED = {
    "audit_chain_break": "breaks",
    "trust_root_accepted": "trust",
    "trust_root_refused": "trust",
}


@dataclass
class Review:
    """What the security team reads, gathered in one pass over every writer's entries."""

    entries: Tally[str] = field(default_factory=Tally)  # per writer
    events: Tally[str] = field(default_factory=Tally)
    unreadable: int = 0  # lines that are not audit entries (e.g. a torn last line)
    first: str | None = None
    last: str | None = None
    policies: dict[tuple[str, str], PolicyVersion] = field(default_factory=dict)
    denied_by_consumer: Tally[str] = field(default_factory=Tally)
    denied_suppressed: Tally[str] = field(default_factory=Tally)  # counted in summaries
    denied_by_reason: Tally[str] = field(default_factory=Tally)
    denied_by_signal: Tally[tuple[str, str]] = field(default_factory=Tally)  # (event, object)
    tls_by_reason: Tally[str] = field(default_factory=Tally)
    suppressed_by_event: Tally[str] = field(default_factory=Tally)
    summaries: int = 0
    reserve_summaries: int = 0
    periods: dict[str, list[Period]] = field(default_factory=dict)  # per kind
    dropped_periods: int = 0
    breaks: list[Noted] = field(default_factory=list)
    trust: list[Noted] = field(default_factory=list)
    dropped_notes: int = 0

    def add(self, writer: str, entry: _Entry) -> None:
        event, moment = str(entry.event), str(entry.time)
        details = entry.details if isinstance(entry.details, dict) else {}
        self.entries.add(writer)
        self.events.add(event)
        if self.first is None or moment < self.first:
            self.first = moment
        if self.last is None or moment > self.last:
            self.last = moment
        if event == "policy_accepted":
            self._policy(writer, moment, entry, details)
        elif event == "consumer_denied":
            self.denied_by_consumer.add(_source(entry.actor, details))
            self.denied_by_reason.add(str(details.get("reason")))
            self.denied_by_signal.add((event, str(entry.object)))
        elif event == "point_denied":
            self.denied_by_signal.add((event, str(entry.object)))
        elif event == "tls_handshake_failed":
            self.tls_by_reason.add(str(details.get("reason")))
        elif event == SUPPRESSED:
            self._suppressed(details)
        elif event in PERIODS:
            self._period(writer, moment, event, details)
        elif event in NOTED:
            noted = self.breaks if NOTED[event] == "breaks" else self.trust
            if len(noted) < LISTED:
                noted.append(Noted(writer, entry.seq, moment, event, details))
            else:
                self.dropped_notes += 1

    def _policy(self, writer: str, moment: str, entry: _Entry, details: dict[str, Any]) -> None:
        version = (
            entry.policy_version if entry.policy_version is not None else details.get("version")
        )
        key = (str(version), str(details.get("sha256")))
        found = self.policies.get(key)
        if found is None:
            if len(self.policies) >= LISTED:
                self.dropped_notes += 1
                return
            found = PolicyVersion(version, key[1], moment)
            self.policies[key] = found
        found.writers.add(writer)
        signers = details.get("signers")
        if isinstance(signers, list) and not found.signers:
            found.signers = [str(s) for s in signers]
        widened = details.get("widened")
        if isinstance(widened, list) and found.widened is None:
            found.widened = [str(w) for w in widened]
            found.previous = details.get("previous_version")

    def _suppressed(self, details: dict[str, Any]) -> None:
        self.summaries += 1
        self.reserve_summaries += bool(details.get("capacity_reserve"))
        by_event = details.get("by_event")
        for event, count in by_event.items() if isinstance(by_event, dict) else ():
            if isinstance(count, int):
                self.suppressed_by_event.add(str(event), count)
        by_source = details.get("by_source")
        for named in by_source if isinstance(by_source, list) else ():
            if isinstance(named, dict) and named.get("event") == "consumer_denied":
                count = named.get("count")
                if isinstance(count, int):
                    self.denied_suppressed.add(str(named.get("source")), count)

    def _period(self, writer: str, moment: str, event: str, details: dict[str, Any]) -> None:
        kind, starts = PERIODS[event]
        periods = self.periods.setdefault(kind, [])
        open_one = next((p for p in periods if p.writer == writer and p.end is None), None)
        if starts and open_one is None:
            if len(periods) >= LISTED:
                self.dropped_periods += 1
                return
            reason = details.get("reason") or details.get("consequence") or ""
            periods.append(Period(writer, moment, detail=str(reason)))
        elif not starts:
            if open_one is not None:
                open_one.end = moment
            elif len(periods) < LISTED:  # it began before the oldest entry kept
                periods.append(Period(writer, None, moment))


def _source(actor: object, details: dict[str, Any]) -> str:
    """Who was denied, named as the audit throttle names sources, so that the counts of
    `events_suppressed` summaries add to the same rows."""
    if actor:
        return str(actor)
    if details.get("serial"):
        return f"serial:{details['serial']}"
    return str(details.get("remote") or "unknown")


def read(writers: Iterable[Path], progress: Callable[[int], None] | None) -> Review:
    """One pass over every segment of every writer, line by line."""
    review = Review()
    seen = 0
    for directory in writers:
        for number in segment_numbers(directory):
            with open(segment_path(directory, number), "rb") as lines:
                for line in lines:
                    try:
                        review.add(directory.name, _decode(line))
                    except msgspec.DecodeError:
                        review.unreadable += 1
                    seen += 1
                    if progress is not None and seen % PROGRESS_EVERY == 0:
                        progress(seen)
    return review
