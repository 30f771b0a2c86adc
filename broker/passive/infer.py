"""What each point of a capture probably is: its type, word order, kind and scale, with how
sure the guess is and the evidence, for the draft policy (docs/discovery.md).

It only reads what readers observed (series.py keeps the running statistics, pairs.py decides
which two registers are one 32-bit value) and proposes: every guess is a `lifecycle: proposed`
signal an engineer confirms. Memory is bounded in bytes (`max_bytes`, counted per answered
range with `Block.cost`: its ring of recent answers full, every statistic at its largest);
beyond it, one warning and the rest of the ranges are ignored. Overlapping ranges do not
multiply what is kept: a range more than half of whose registers are digested in MAX_OVERLAP
ranges already is left out of the guesses, with a warning (the poll log still has it). Cost per
sample, 2 cores at load 1: ~0.1 µs (a still register) to ~0.6 µs (a noisy float32's words),
plus ~2 µs per Values; a pair of registers that never carries stops costing after a batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from operator import ne
from typing import Literal, NamedTuple

from broker.passive.observations import Description, Peer, Protocol, Value, Values, Warnings
from broker.passive.pairs import (
    REGISTER_TABLES,
    Area,
    Candidate,
    Point,
    Where,
    WordOrder,
    choose,
    decoded,
    relative_step,
)
from broker.passive.series import Block, Column, Packing, pack, rough

__all__ = ["REGISTER_TABLES", "Guess", "Inference", "Kind"]

Kind = Literal["measurement", "bool", "constant", "counter", "setpoint", "state"]
MAX_BYTES = 100 * 2**20  # what the inference may hold in all (the readers' state is apart)
MAX_OVERLAP = 4  # ranges a register is digested in before a range mostly of such is left out
COVER_BYTES = 100  # a register's count of the ranges digesting it
DESCRIPTION_BYTES = 500  # a Description, its key and its place in the table, without texts
BOOL_CHANGES = 4  # a register of 0 and 1 only is a bool once it changed this often
_Key = tuple[Protocol, str, int, int, str, int, int, bool]  # area, start, width, written


@dataclass(frozen=True)
class Guess:
    """One point the draft proposes as a signal (a 32-bit pair is one Guess, width 2)."""

    protocol: Protocol
    server: Peer
    unit: int
    table: str
    address: int
    type: str  # a policy DataType; a Modbus register of 0/1 only is a "bool" (its bit 0)
    word_order: WordOrder | None  # 32-bit Modbus types only
    width: int  # registers it takes (1 or 2; 1 for non-Modbus)
    kind: Kind
    confidence: float  # 0..1
    evidence: str  # "float32, words big-endian, 0.2 % noise, 1,204 samples"
    scale: float | None  # suggested (0.1 when an int16 reads like tenths), else None
    minimum: Value | None
    maximum: Value | None
    samples: int
    written: bool  # written by the SCADA
    changes_with: tuple[int, ...]  # addresses (same server, unit, table) changing at once
    name: str | None = None
    units: str | None = None
    description: str | None = None


class Inference:
    """Every value a capture's answers and writes carried, digested into guesses."""

    def __init__(self, warnings: Warnings | None = None, *, max_bytes: int = MAX_BYTES) -> None:
        self._warnings = warnings if warnings is not None else Warnings()
        self._max_bytes = max_bytes
        self._used = 0  # bytes counted against max_bytes
        self._blocks: dict[_Key, Block] = {}
        self._ignored: set[_Key] = set()  # ranges overlapping MAX_OVERLAP others
        self._covered: dict[tuple[Area, bool], dict[int, int]] = defaultdict(dict)
        self._descriptions: dict[Point, Description] = {}

    def add(self, observation: Values | Description) -> None:
        o = observation
        if isinstance(o, Description):
            self._describe(o)
            return
        width = len(o.values)
        if not width:
            return
        key = (o.protocol, o.server.host, o.server.port, o.unit, o.table, o.start, width, o.written)
        if key in self._ignored:
            return
        packing = _packing(o.protocol, o.table)
        try:
            row = pack(o.values, packing)
        except (TypeError, ValueError, OverflowError):  # a reader's bug, not the capture's
            self._warnings.add(
                f"{o.table} values not what the table holds (ignored)", str(o.server)
            )
            return
        block = self._blocks.get(key) or self._block(key, packing, str(o.server))
        if block is not None:
            block.add(row)

    def _block(self, key: _Key, packing: Packing, where: str) -> Block | None:
        """A new range's block, if the budget has room and most of its registers are not
        digested in MAX_OVERLAP ranges already."""
        start, width, written = key[5:]
        cost = Block.cost(width, packing) + COVER_BYTES * width
        if not self._room(cost, where):
            return None
        covered = self._covered[(key[:5], written)]
        span = range(start, start + width)
        if 2 * sum(covered.get(a, 0) >= MAX_OVERLAP for a in span) > width:
            self._warnings.add(
                f"range overlapping {MAX_OVERLAP} others read already (not used for types)", where
            )
            self._ignored.add(key)
            self._used += DESCRIPTION_BYTES  # the key in the ignored set
            return None
        for a in span:
            covered[a] = covered.get(a, 0) + 1
        self._used += cost
        block = self._blocks[key] = Block(width, packing)
        return block

    def _room(self, cost: int, where: str) -> bool:
        if self._used + cost <= self._max_bytes:
            return True
        budget = f"{self._max_bytes / 2**20:,.0f} MiB"
        self._warnings.add(f"inference memory budget of {budget} reached (the rest ignored)", where)
        return False

    def _describe(self, d: Description) -> None:
        key: Point = (d.protocol, d.server.host, d.server.port, d.unit, d.table, d.address)
        if key not in self._descriptions:
            texts = sum(len(t) for t in (d.name, d.units, d.description) if t)
            if not self._room(DESCRIPTION_BYTES + 4 * texts, str(d.server)):
                return
            self._used += DESCRIPTION_BYTES + 4 * texts
        self._descriptions[key] = d

    def guesses(self) -> list[Guess]:
        """One guess per point seen in a Values (a 32-bit pair: one, at its first address)."""
        reads: dict[Point, list[Where]] = defaultdict(list)
        writes: dict[Point, list[Where]] = defaultdict(list)
        for (
            protocol,
            host,
            port,
            unit,
            table,
            start,
            width,
            written,
        ), block in self._blocks.items():
            block.digest()
            for j in range(width):
                (writes if written else reads)[
                    (protocol, host, port, unit, table, start + j)
                ].append((block, j))
        choice = choose(reads, writes)
        peers: dict[tuple[str, int], Peer] = {}
        found: list[Guess] = []
        for point in sorted(reads.keys() | writes.keys()):
            area, address = point[:5], point[5]
            if (area, address - 1) in choice.pairs:
                continue  # the second word of a pair
            server = peers.setdefault(point[1:3], Peer(point[1], point[2]))
            where = reads.get(point) or writes[point]
            candidate = choice.pairs.get((area, address))
            if candidate is not None:
                guess = _guess_pair(point, server, candidate, where)
            else:
                guess = _guess_one(point, server, where, choice.doubts.get(point))
            found.append(self._described(guess, point, point in writes))
        return _with_changes(found, reads)

    def _described(self, guess: Guess, point: Point, written: bool) -> Guess:
        d = self._descriptions.get(point)
        return replace(
            guess,
            kind="setpoint" if written else guess.kind,
            written=written,
            name=d.name if d else None,
            units=d.units if d else None,
            description=d.description if d else None,
        )


def _packing(protocol: str, table: str) -> Packing:
    if protocol != "modbus":
        return "values"
    return "words" if table in REGISTER_TABLES else "bits"


# --- guesses ---------------------------------------------------------------------------


def _guess_pair(point: Point, server: Peer, c: Candidate, where: list[Where]) -> Guess:
    protocol, _, _, unit, table, address = point
    s = c.stats
    low, high = s.extremes(c.type)
    counter = s.decreases == 0 and s.values_moved > 0 and s.steps >= 3
    block, j = where[0]
    hi, lo = (j, j + 1) if c.order == "big" else (j + 1, j)
    words = [row[hi] << 16 | row[lo] for row in block.ring]  # type: ignore[operator]
    series = decoded(words, c.type)
    moved = "constant" if low == high else _rate(series) if counter else _noise(series)
    return Guess(
        protocol=protocol, server=server, unit=unit, table=table, address=address,
        type=c.type, word_order=c.order, width=2, kind="counter" if counter else "measurement",
        confidence=round(c.confidence, 2),
        evidence=f"{c.type}, words {c.order}-endian, {moved}, {c.hi.count:,} samples; {c.reason}",
        scale=None, minimum=low, maximum=high, samples=c.hi.count, written=False, changes_with=(),
    )  # fmt: skip


class _Verdict(NamedTuple):
    type: str
    kind: Kind
    confidence: float
    evidence: str
    scale: float | None = None


def _guess_one(
    point: Point, server: Peer, where: list[Where], doubt: tuple[float, str] | None
) -> Guess:
    protocol, _, _, unit, table, address = point
    col = Column()
    for block, j in where:
        col.merge(block.columns[j])
    block, j = where[0]
    series = [row[j] for row in block.ring]
    low, high = col.minimum, col.maximum
    if protocol != "modbus":
        verdict = _typed(col, series)
    elif table not in REGISTER_TABLES:
        flips = f"changed {col.changes:,} times" if col.changes else "never changed"
        verdict = _Verdict("bool", "bool", 1.0, f"bool (a {table}), {flips}")
        low, high = bool(low), bool(high)
    else:
        verdict = _register(col, series)  # type: ignore[arg-type]  # words: ints
        if verdict.type == "int16":
            low, high = col.smin, col.smax
    if doubt is not None and verdict.confidence > doubt[0]:  # may be half of a 32-bit value
        verdict = verdict._replace(confidence=doubt[0], evidence=f"{verdict.evidence}; {doubt[1]}")
    return Guess(
        protocol=protocol, server=server, unit=unit, table=table, address=address,
        type=verdict.type, word_order=None, width=1, kind=verdict.kind,
        confidence=round(verdict.confidence, 2), evidence=verdict.evidence, scale=verdict.scale,
        minimum=low, maximum=high, samples=col.count, written=False, changes_with=(),
    )  # fmt: skip


def _register(col: Column, words: list[int]) -> _Verdict:
    """One 16-bit register on its own: signed when its words straddle 0x8000 from near
    0xFFFF (they move less read as int16) or all sit high; then what its values look like."""
    signed = col.maximum >= 0x8000 and (col.signed_absdiff < col.absdiff or col.minimum >= 0xC000)
    type_ = "int16" if signed else "uint16"
    low, high = (col.smin, col.smax) if signed else (col.minimum, col.maximum)
    series = [w - 0x10000 if w >= 0x8000 else w for w in words] if signed else words
    seen = f"{col.count:,} samples"
    if not col.changes:
        verdict = _Verdict(type_, "constant", 0.2, f"{type_}? never changed ({low}), {seen}")
    elif col.distinct is not None and set(col.distinct) <= {0, 1}:
        flag = f"only 0 and 1 seen, changed {col.changes:,} times, {seen}"
        if col.changes >= BOOL_CHANGES:  # a flag seen to go both ways, twice
            sure = 0.5 + 0.4 * min(1.0, col.changes / 10)
            verdict = _Verdict("bool", "bool", sure, f"bool (bit 0), {flag}")
        else:
            verdict = _Verdict("uint16", "bool", 0.4, f"uint16, a flag? (bit 0), {flag}")
    elif col.decreases == 0 and col.rises >= 3:  # a wrap is no sign of a sign
        wrapped = f", wrapped {col.wraps:,} times" if col.wraps else ""
        sure = 0.5 + 0.4 * min(1.0, col.rises / 20)
        verdict = _Verdict(
            "uint16", "counter", sure, f"uint16 counter, never went down{wrapped}, {seen}"
        )
    elif col.distinct is not None and len(col.distinct) <= 8 and low >= 0 and high < 64:
        states = ", ".join(str(v) for v in sorted(set(series)))
        verdict = _Verdict(type_, "state", 0.5, f"{type_}, a state? values {states}, {seen}")
    elif rough(col):
        near = f"{type_}? near-random from sample to sample (half of a wider value?), {seen}"
        verdict = _Verdict(type_, "measurement", 0.3, near)
    else:
        scale = _scale(col, max(abs(low), abs(high)))
        size = "tenths" if scale == 0.1 else "hundredths"
        tenths = f"; reads like {size}: scale {scale}? (a guess)" if scale else ""
        sure = 0.7 if signed or col.maximum < 0x8000 else 0.5
        verdict = _Verdict(
            type_, "measurement", sure, f"{type_}, {_noise(series)}, {seen}{tenths}", scale
        )
    return verdict


def _typed(col: Column, series: list[Value]) -> _Verdict:
    """A DNP3 or BACnet point: the type its values were decoded as."""
    kinds = col.kinds
    counter = col.numeric and col.decreases == 0 and col.rises >= 3
    kind: Kind
    if not col.numeric or str in kinds:
        type_, kind = "string", "state"
    elif kinds <= {bool}:
        type_, kind = "bool", "bool"
    elif float in kinds:
        type_, kind = "float32", "counter" if counter else "measurement"
    else:
        type_ = "uint32" if counter and col.minimum >= 0 else "int32"
        few = col.distinct is not None and len(col.distinct) <= 8
        kind = "counter" if counter else "state" if few else "measurement"
    if col.numeric and not col.changes:
        kind = "constant"
    if not col.numeric or type_ == "bool":
        moved = f"changed {col.changes:,} times"
    else:
        numbers = [float(v) for v in series if isinstance(v, int | float)]
        moved = _rate(numbers) if kind == "counter" else _noise(numbers)
    sure = 0.9 if kind != "constant" else 0.6  # the protocol says the type
    return _Verdict(type_, kind, sure, f"{type_}, {moved}, {col.count:,} samples")


def _scale(col: Column, magnitude: int) -> float | None:
    """0.1 or 0.01 when an integer moves in single counts over a range typical of tenths or
    hundredths of an engineering value: a low-confidence suggestion, stated as such."""
    if (col.distinct is not None and len(col.distinct) < 8) or col.absdiff / col.changes > 5:
        return None
    return 0.1 if 100 <= magnitude < 1000 else 0.01 if 1000 <= magnitude < 10000 else None


def _noise(series: Sequence[float]) -> str:
    """How much a value moves from sample to sample, against its size (recent samples)."""
    step = relative_step(series)
    if step is None:
        return "one sample"
    return f"{100 * step:.2g} % noise" if step else "steady"


def _rate(series: Sequence[float]) -> str:
    if len(series) < 2:
        return "one sample"
    return f"+{(series[-1] - series[0]) / (len(series) - 1):.3g} a sample"


def _with_changes(found: list[Guess], reads: dict[Point, list[Where]]) -> list[Guess]:
    """Each guess with the addresses whose recent changes coincide with its own (same block:
    changed at the same answers, and not at every answer, which says nothing)."""
    masks: dict[int, list[int]] = {}
    groups: dict[int, list[tuple[int, int]]] = defaultdict(list)  # block → (guess index, mask)
    for i, g in enumerate(found):
        where = reads.get((g.protocol, g.server.host, g.server.port, g.unit, g.table, g.address))
        if not where:
            continue
        block, j = where[0]
        if id(block) not in masks:
            masks[id(block)] = _change_masks(block)
        mask = 0
        for k in range(j, min(j + g.width, len(block.columns))):
            mask |= masks[id(block)][k]
        changes = mask.bit_count()
        if 2 <= changes <= 0.9 * (len(block.ring) - 1):
            groups[id(block)].append((i, mask))
    result = list(found)
    for members in groups.values():
        for i, a in members:
            with_ = tuple(
                found[k].address
                for k, b in members
                if k != i and (a & b).bit_count() >= 0.8 * (a | b).bit_count()
            )
            if with_:
                result[i] = replace(result[i], changes_with=with_)
    return result


def _change_masks(block: Block) -> list[int]:
    """Per column, bit k set when recent row k differs from row k - 1."""
    masks = []
    for column in zip(*block.ring, strict=True):
        changed = bytes(map(ne, column[1:], column)).translate(_BITS)  # b"0110..."
        masks.append(int(changed[::-1], 2) << 1 if changed else 0)
    return masks


_BITS = bytes.maketrans(b"\x00\x01", b"01")
