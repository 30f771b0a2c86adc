"""Which points of a device a draft proposes as signals, and why each other one is left out
(docs/discovery.md, ADR 0026). Pure: it decides from the guesses and the poll log's envelope.

- A point is a signal only when a range the SCADA read regularly holds it (`polls.Envelope`):
  one read only rarely is left out, as it would set the device's one poll interval to its
  pace; one read once or only written has no interval to keep to.
- Modbus: the broker's planner (`modbus_plan.cover`) never bridges a gap but joins spans that
  touch into one request, up to the protocol's limit, so two SCADA ranges that touch or
  overlap could become one request the PLC never received. `plannable` runs the planner on
  the candidate spans and drops a point only where a planned window is inside no single
  SCADA range: blocks of 125 registers that touch keep every point.
- Runs of Modbus registers that never changed (spares, in a SCADA's 125-register blocks)
  give no evidence of their type: left out unless asked for.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from broker.passive.infer import REGISTER_TABLES, Guess
from broker.passive.polls import Envelope, Polled
from broker.passive.shown import seconds
from broker.plant.connectors.modbus_plan import READ_FUNCTIONS, Window, cover

Span = tuple[int, int]  # [start, end) of addresses

# The tables the broker reads, per protocol, and the word a signal path gives each.
TABLE_WORDS: dict[str, dict[str, str]] = {
    "modbus": {"coil": "coil", "discrete_input": "di", "holding_register": "hr",
               "input_register": "ir"},
    "dnp3": {"1": "bi", "3": "dbi", "10": "bo", "20": "counter", "21": "frozen-counter",
             "30": "ai", "40": "ao"},
    "bacnet": {"analog-input": "ai", "analog-output": "ao", "analog-value": "av",
               "binary-input": "bi", "binary-output": "bo", "binary-value": "bv",
               "multi-state-input": "msi", "multi-state-output": "mso",
               "multi-state-value": "msv", "accumulator": "acc"},
}  # fmt: skip
SPARE_RUN = 4  # registers in a row that never changed: a block's spares, left out by default
JOINS = (
    "the SCADA reads it, but in a range that touches or overlaps another it reads: the "
    "broker would join the two into one request the SCADA never sent"
)


@dataclass(frozen=True)
class Seen:
    """One point before rendering: the SCADA's regular reads that hold it, or why it is not
    a signal."""

    guess: Guess
    covering: tuple[Polled, ...]  # regular reads holding the whole point (read rarely: rare)
    reason: str | None  # None: a signal

    def interval_s(self) -> float | None:
        """The SCADA's interval for the point: its fastest read of `covering`."""
        return min((p.interval_s for p in self.covering if p.interval_s is not None), default=None)


def select(
    guesses: Sequence[Guess], envelope: Envelope, *, redact: bool, include_constant: bool
) -> list[Seen]:
    """One device's points (in address order), each a signal or left out with a reason
    (`redact`: the reason quotes no observed value)."""
    seen = [_seen(g, envelope) for g in guesses]
    if not include_constant:
        _spares(seen, redact)
    tables: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(seen):
        if s.reason is None and s.guess.protocol == "modbus":
            tables[s.guess.table].append(i)
    for table, chosen in tables.items():
        ranges = sorted({(p.start, p.start + p.count) for i in chosen for p in seen[i].covering})
        spans = [(seen[i].guess.address, seen[i].guess.address + seen[i].guess.width)
                 for i in chosen]  # fmt: skip
        limit = READ_FUNCTIONS[table][2]  # type: ignore[index]  # a table the broker reads
        for i, kept in zip(chosen, plannable(spans, ranges, limit), strict=True):
            if not kept:
                seen[i] = Seen(seen[i].guess, seen[i].covering, JOINS)
    return seen


def plannable(spans: Sequence[Span], ranges: Sequence[Span], limit: int) -> list[bool]:
    """For each of `spans` (disjoint, each inside one of `ranges`), whether a draft keeps it.

    Window by window from the lowest address, as the planner's greedy cover goes: where a
    window is inside no single range, the range that holds the window's first span and
    reaches furthest is the one the window may fill, the first span past it is dropped, and
    the window is planned again. A window depends only on the spans that start within
    `limit` of its first one, so each step plans those alone."""
    live = sorted(range(len(spans)), key=lambda i: spans[i])
    kept = [True] * len(spans)
    at = 0
    while at < len(live):
        first = spans[live[at]]
        near = at
        while near < len(live) and spans[live[near]][0] < first[0] + limit:
            near += 1
        window = cover([spans[i] for i in live[at:near]], limit)[0]
        members = live[at : at + len(window.members)]  # disjoint spans: a prefix
        if _inside(window, ranges):
            at += len(members)
            continue
        host = max((r for r in ranges if r[0] <= first[0] and first[1] <= r[1]), key=lambda r: r[1])
        victim = next(i for i in members if not host[0] <= spans[i][0] <= spans[i][1] <= host[1])
        kept[victim] = False
        live.remove(victim)
    return kept


def _inside(window: Window, ranges: Sequence[Span]) -> bool:
    return any(s <= window.start and window.end <= e for s, e in ranges)


def _seen(guess: Guess, envelope: Envelope) -> Seen:
    def holds(p: Polled) -> bool:
        return p.table == guess.table and p.start <= guess.address and (
            guess.address + guess.width <= p.start + p.count)  # fmt: skip

    covering = [p for p in envelope.regular if holds(p)]
    if guess.protocol == "dnp3":  # a class poll reads every point of the outstation
        covering += [p for p in envelope.regular if p.table == ""]
    if guess.table not in TABLE_WORDS[guess.protocol]:
        reason = f"the broker does not read {guess.protocol} table {guess.table!r}"
    elif not covering and (rare := [p for p in envelope.rare if holds(p)]):
        reason, covering = _rarely(rare, envelope), rare
    elif not covering and (guess.protocol == "modbus" or guess.written):
        reason = _why_not_read(guess, envelope)
    else:
        reason = None
    return Seen(guess, tuple(covering), reason)


def _spares(seen: list[Seen], redact: bool) -> None:
    """Leaves out each run of at least SPARE_RUN Modbus registers that never changed (a lone
    still register is as likely a quiet status word as a spare, and is kept)."""

    def still(s: Seen) -> bool:
        g = s.guess
        return s.reason is None and g.kind == "constant" and g.table in REGISTER_TABLES

    runs: list[list[int]] = []
    for i, s in enumerate(seen):
        if not still(s):
            continue
        last = seen[runs[-1][-1]].guess if runs else None
        if last and (last.table, last.address + last.width) == (s.guess.table, s.guess.address):
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in (r for r in runs if len(r) >= SPARE_RUN):
        for i in run:
            g = seen[i].guess
            value = "" if redact else f" ({g.minimum})"
            why = f"never changed in the capture{value}: a spare? (--include-constant proposes it)"
            seen[i] = Seen(g, seen[i].covering, why)


def _rarely(rare: Sequence[Polled], envelope: Envelope) -> str:
    every = min(p.interval_s for p in rare if p.interval_s is not None)
    asked = sum(p.requests for p in rare)
    return (
        f"read rarely: every {seconds(every)} s, {asked:,} request(s) against "
        f"{envelope.most_requests:,} of the device's most-read range; drafted, it would slow "
        "the whole device to its pace"
    )


def _why_not_read(guess: Guess, envelope: Envelope) -> str:
    def reads(p: Polled) -> bool:
        return p.table == guess.table and p.start <= guess.address < p.start + p.count

    if guess.written:
        return (
            "written by the SCADA, never read: a read of it would be a request the SCADA never sent"
        )
    if any(reads(p) for p in envelope.regular):  # a 32-bit value whose words two requests read
        return JOINS
    if any(reads(p) for p in envelope.once):
        return "read once in the capture, not polled: how often the SCADA reads it is unknown"
    return "not read by any request the capture holds"
