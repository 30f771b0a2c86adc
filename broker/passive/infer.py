"""What each point of a capture probably is: its type, word order, kind and scale, with how
sure the guess is and the evidence, for the draft policy (docs/discovery.md).

It only reads what readers observed (series.py keeps the running statistics) and proposes:
every guess is a `lifecycle: proposed` signal an engineer confirms. Two registers become one
32-bit value only with positive evidence that they are one: always answered together, and
either the low word cancels the high word's steps (carries and borrows: a counter crossing
a 16-bit boundary, a float drifting across a mantissa step) or the low word is near-random
noise beside a steady high word (a float32's low mantissa) and the carries seen match what
such noise would give. Without a carry, only two layouts are taken, at low confidence: a
float32 too steady to move its high word, a uint32 counter below 65,536. Overlapping
candidates go to the strongest; at equal evidence, to the device's usual word order (the
order is not forced: one PLC may hold little-endian counters and big-endian floats).
Memory is bounded by `max_points` (columns of distinct answered ranges; beyond: one
warning, the rest dropped). Cost per sample, 2 cores at load 1: ~0.1 µs (a still register)
to ~0.6 µs (a noisy float32's words), plus ~2 µs per Values.
"""

from __future__ import annotations

import struct
from array import array
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Literal, NamedTuple

from broker.passive.observations import Description, Peer, Protocol, Value, Values, Warnings
from broker.passive.series import Block, Column, Pair, rough

Kind = Literal["measurement", "bool", "constant", "counter", "setpoint", "state"]
WordOrder = Literal["big", "little"]
REGISTER_TABLES = frozenset({"holding_register", "input_register"})
ORDER_BONUS = 0.05  # a device mostly lays its 32-bit values out one way: a tie-break only
STEADY_HIGH = 1024  # mean step (in units of the high word) of a 32-bit value's high word


@dataclass(frozen=True)
class Guess:
    """One point the draft proposes as a signal (a 32-bit pair is one Guess, width 2)."""

    protocol: Protocol
    server: Peer
    unit: int
    table: str
    address: int
    type: str  # a policy DataType; a Modbus register of 0/1 only is a uint16 of kind "bool"
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


_Point = tuple[Protocol, Peer, int, str, int]  # protocol, server, unit, table, address
_Where = tuple[Block, int]  # a block and the point's column in it


@dataclass(frozen=True)
class _Candidate:
    address: int  # the pair's first register
    order: WordOrder
    type: str
    confidence: float
    reason: str
    stats: Pair
    hi: Column
    lo: Column


class Inference:
    """Every value a capture's answers and writes carried, digested into guesses."""

    def __init__(self, warnings: Warnings | None = None, *, max_points: int = 200_000) -> None:
        self._warnings = warnings if warnings is not None else Warnings()
        self._max_points = max_points
        self._points = 0
        self._blocks: dict[tuple[Protocol, Peer, int, str, int, int, bool], Block] = {}
        self._descriptions: dict[_Point, Description] = {}

    def add(self, observation: Values | Description) -> None:
        o = observation
        if isinstance(o, Description):
            key: _Point = (o.protocol, o.server, o.unit, o.table, o.address)
            if key in self._descriptions or len(self._descriptions) < self._max_points:
                self._descriptions[key] = o
            return
        width = len(o.values)
        if not width:
            return
        row: Sequence[Value] = o.values
        if o.protocol == "modbus" and o.table in REGISTER_TABLES:
            try:
                row = array("H", o.values)  # type: ignore[type-var]
            except (TypeError, OverflowError):  # a reader's bug, not the capture's
                self._warnings.add("register values not 16-bit words (ignored)", str(o.server))
                return
        block = self._blocks.get((o.protocol, o.server, o.unit, o.table, o.start, width, o.written))
        if block is None:
            if self._points + width > self._max_points:
                self._warnings.add(
                    f"more than {self._max_points:,} points (the rest ignored)", str(o.server)
                )
                return
            self._points += width
            register = o.protocol == "modbus" and o.table in REGISTER_TABLES
            block = Block(width, register)
            self._blocks[(o.protocol, o.server, o.unit, o.table, o.start, width, o.written)] = block
        block.add(row)

    def guesses(self) -> list[Guess]:
        """One guess per point seen in a Values (a 32-bit pair: one, at its first address)."""
        reads: dict[_Point, list[_Where]] = defaultdict(list)
        writes: dict[_Point, list[_Where]] = defaultdict(list)
        for (protocol, server, unit, table, start, width, written), block in self._blocks.items():
            block.digest()
            for j in range(width):
                (writes if written else reads)[(protocol, server, unit, table, start + j)].append(
                    (block, j)
                )
        pairs = _pairs(reads, writes)
        found: list[Guess] = []
        for point in sorted(reads.keys() | writes.keys()):
            if (point[:4], point[4] - 1) in pairs:
                continue  # the second word of a pair
            where = reads.get(point) or writes[point]
            candidate = pairs.get((point[:4], point[4]))
            guess = _guess_pair(point, candidate, where) if candidate else _guess_one(point, where)
            found.append(self._described(guess, point in writes))
        return _with_changes(found, reads, pairs)

    def _described(self, guess: Guess, written: bool) -> Guess:
        point = (guess.protocol, guess.server, guess.unit, guess.table, guess.address)
        d = self._descriptions.get(point)
        return replace(
            guess,
            kind="setpoint" if written else guess.kind,
            written=written,
            name=d.name if d else None,
            units=d.units if d else None,
            description=d.description if d else None,
        )


# --- 32-bit pairs ------------------------------------------------------------------------


def _pairs(
    reads: dict[_Point, list[_Where]], writes: dict[_Point, list[_Where]]
) -> dict[tuple[tuple[Protocol, Peer, int, str], int], _Candidate]:
    """The register pairs taken as one 32-bit value, by (device and table, first address)."""
    candidates: dict[tuple[Protocol, Peer, int], list[tuple[str, _Candidate]]] = defaultdict(list)
    for points in (reads, writes):
        for point, where in points.items():
            if (
                point[0] != "modbus"
                or point[3] not in REGISTER_TABLES
                or (point in reads and points is writes)
            ):
                continue
            after = points.get((*point[:4], point[4] + 1))
            if after is None or {id(b) for b, _ in where} != {id(b) for b, _ in after}:
                continue  # not always answered together
            for order in ("big", "little"):
                c = _candidate(point[4], order, where)
                if c is not None:
                    candidates[point[:3]].append((point[3], c))
    chosen: dict[tuple[tuple[Protocol, Peer, int, str], int], _Candidate] = {}
    for device, found in candidates.items():
        votes = {"big": 0.0, "little": 0.0}
        for _, c in found:
            votes[c.order] += c.confidence
        usual = "little" if votes["little"] > votes["big"] else "big"

        def first(tc: tuple[str, _Candidate], usual: str = usual) -> tuple[float, int]:
            """Strongest first; at equal evidence, the device's usual word order."""
            return -tc[1].confidence - ORDER_BONUS * (tc[1].order == usual), tc[1].address

        taken: set[tuple[str, int]] = set()
        for table, c in sorted(found, key=first):
            if (table, c.address) in taken or (table, c.address + 1) in taken:
                continue
            taken |= {(table, c.address), (table, c.address + 1)}
            chosen[((*device, table), c.address)] = c
    return chosen


def _candidate(address: int, order: WordOrder, where: list[_Where]) -> _Candidate | None:
    """The evidence that (address, address + 1) is one 32-bit value in `order`, or None."""
    stats = Pair()
    his, los = [], []
    for block, j in where:
        pair = block.pairs[2 * j + (order == "little")]
        if pair.dead:
            return None
        _merge_pair(stats, pair)
        first, second = (j, j + 1) if order == "big" else (j + 1, j)
        his.append(block.columns[first])
        los.append(block.columns[second])
    hi, lo = _merge(his), _merge(los)
    q = stats.coherence
    carries = (stats.events >= 2 and q >= 0.5) or (stats.events >= 1 and q >= 0.9)
    noise_low = rough(lo) and hi.steps > 0 and hi.signed_absdiff / hi.steps < STEADY_HIGH
    if not (carries or noise_low):
        return _weak(address, order, stats, hi, lo)
    # What carries noise would give: near all when the value moves much less than one
    # high-word step per sample, fewer as it moves more; from about one step on, any noisy
    # low word gives as many, which tells nothing. Fewer than half of that: two words.
    moves = stats.values_moved / stats.steps / 0x10000 if stats.steps else 0.0
    telling = stats.events >= 5 and moves < 0.5
    fit = q * (1 + 3 * moves) if telling else 0.5
    floating = hi.float_hi and bool(hi.maximum & 0x7FFF)
    if noise_low and not carries and (fit < 0.45 if telling else not floating):
        return None  # an integer's noise exactly filling its low word, high word still: no
    confidence = 0.55 + 0.3 * min(1.0, fit) if noise_low else 0.0
    if carries:
        confidence = max(confidence, 0.5 + 0.45 * q * stats.events / (stats.events + 4))
    if floating:
        confidence += 0.05
    type_ = "float32" if floating else _int32(stats)
    times = "once" if stats.events == 1 else f"{stats.events:,} times"
    reason = (
        f"carries between the words seen {times} ({q:.0%} of the high word's moves)"
        if carries
        else "low word near-random beside a steady high word"
    )
    return _Candidate(address, order, type_, min(0.97, confidence), reason, stats, hi, lo)


def _weak(address: int, order: WordOrder, stats: Pair, hi: Column, lo: Column) -> _Candidate | None:
    """No carry seen, but a layout that is rarely anything else: a float32 too steady to move
    its high word (a still word in a float's exponent range beside a word of many values), or
    a uint32 counter below 65,536 (a counter that never wrapped beside a still zero word)."""
    if hi.changes or not lo.changes:
        return None
    if hi.float_hi and hi.maximum & 0x7FFF and lo.distinct is None:
        reason = (
            "high word still in a float32's exponent range, low word of many values (no carry seen)"
        )
        return _Candidate(address, order, "float32", 0.4, reason, stats, hi, lo)
    if hi.maximum == 0 and lo.decreases == 0 and not lo.wraps and lo.rises >= 3:
        reason = "a counter beside a still zero word (no carry seen)"
        return _Candidate(address, order, "uint32", 0.4, reason, stats, hi, lo)
    return None


def _int32(stats: Pair) -> str:
    if stats.nmin >= 0:  # a negative value near zero, or a large unsigned one
        return "int32" if stats.nmin >= 0xC000_0000 else "uint32"
    return "uint32" if stats.decreases == 0 and stats.values_moved else "int32"


def _merge_pair(into: Pair, pair: Pair) -> None:
    for name in ("hi_moves", "cancelled", "events", "values_moved", "steps", "decreases"):
        setattr(into, name, getattr(into, name) + getattr(pair, name))
    if pair.pmin >= 0:
        into.take(pair.pmin, pair.pmax)
    if pair.nmin >= 0:
        into.take(pair.nmin, pair.nmax)


def _merge(columns: Sequence[Column]) -> Column:
    if len(columns) == 1:
        return columns[0]
    merged = Column()
    for c in columns:
        for name in (
            "count",
            "steps",
            "changes",
            "absdiff",
            "signed_absdiff",
            "rises",
            "decreases",
            "wraps",
        ):
            setattr(merged, name, getattr(merged, name) + getattr(c, name))
        if c.minimum is not None:
            first = merged.minimum is None
            merged.minimum = c.minimum if first else min(merged.minimum, c.minimum)
            merged.maximum = c.maximum if first else max(merged.maximum, c.maximum)
            merged.smin = c.smin if first else min(merged.smin, c.smin)
            merged.smax = c.smax if first else max(merged.smax, c.smax)
        if merged.distinct is not None:
            merged.distinct = None if c.distinct is None else merged.distinct | c.distinct
        merged.kinds |= c.kinds
        merged.numeric &= c.numeric
        merged.float_hi &= c.float_hi
    return merged


# --- guesses ---------------------------------------------------------------------------


def _guess_pair(point: _Point, c: _Candidate, where: list[_Where]) -> Guess:
    protocol, server, unit, table, address = point
    s = c.stats
    low, high = s.extremes(c.type)
    counter = s.decreases == 0 and s.values_moved > 0 and s.steps >= 3
    block, j = where[0]
    hi, lo = (j, j + 1) if c.order == "big" else (j + 1, j)
    words = [row[hi] << 16 | row[lo] for row in block.ring]  # type: ignore[operator]
    series = _decoded(words, c.type)
    moved = "constant" if low == high else _rate(series) if counter else _noise(series)
    order = "big" if c.order == "big" else "little"
    return Guess(
        protocol=protocol, server=server, unit=unit, table=table, address=address,
        type=c.type, word_order=c.order, width=2, kind="counter" if counter else "measurement",
        confidence=round(c.confidence, 2),
        evidence=f"{c.type}, words {order}-endian, {moved}, {c.hi.count:,} samples; {c.reason}",
        scale=None, minimum=low, maximum=high, samples=c.hi.count, written=False, changes_with=(),
    )  # fmt: skip


class _Verdict(NamedTuple):
    type: str
    kind: Kind
    confidence: float
    evidence: str
    scale: float | None = None


def _guess_one(point: _Point, where: list[_Where]) -> Guess:
    protocol, server, unit, table, address = point
    col = _merge([block.columns[j] for block, j in where])
    block, j = where[0]
    series = [row[j] for row in block.ring]
    low, high = col.minimum, col.maximum
    if protocol != "modbus":
        verdict = _typed(col, series)
    elif table not in REGISTER_TABLES:
        flips = f"changed {col.changes:,} times" if col.changes else "never changed"
        verdict = _Verdict("bool", "bool", 1.0, f"bool (a {table}), {flips}")
    else:
        verdict = _register(col, series)
        if verdict.type == "int16":
            low, high = col.smin, col.smax
    return Guess(
        protocol=protocol, server=server, unit=unit, table=table, address=address,
        type=verdict.type, word_order=None, width=1, kind=verdict.kind,
        confidence=round(verdict.confidence, 2), evidence=verdict.evidence, scale=verdict.scale,
        minimum=low, maximum=high, samples=col.count, written=False, changes_with=(),
    )  # fmt: skip


def _register(col: Column, words: list[Value]) -> _Verdict:
    """One 16-bit register on its own: signed when its words straddle 0x8000 from near
    0xFFFF (they move less read as int16) or all sit high; then what its values look like."""
    signed = col.maximum >= 0x8000 and (col.signed_absdiff < col.absdiff or col.minimum >= 0xC000)
    type_ = "int16" if signed else "uint16"
    low, high = (col.smin, col.smax) if signed else (col.minimum, col.maximum)
    series = [w - 0x10000 if signed and w >= 0x8000 else w for w in words if isinstance(w, int)]
    seen = f"{col.count:,} samples"
    if not col.changes:
        verdict = _Verdict(type_, "constant", 0.2, f"{type_}? never changed ({low}), {seen}")
    elif col.distinct is not None and col.distinct <= {0, 1}:
        sure = 0.5 + 0.4 * min(1.0, col.changes / 10)
        flag = f"only 0 and 1 seen (a flag: bit 0?), changed {col.changes:,} times, {seen}"
        verdict = _Verdict("uint16", "bool", sure, flag)
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
    moved = _noise(series) if col.numeric and type_ != "bool" else f"changed {col.changes:,} times"
    sure = 0.9 if kind != "constant" else 0.6  # the protocol says the type
    return _Verdict(type_, kind, sure, f"{type_}, {moved}, {col.count:,} samples")


def _scale(col: Column, magnitude: int) -> float | None:
    """0.1 or 0.01 when an integer moves in single counts over a range typical of tenths or
    hundredths of an engineering value: a low-confidence suggestion, stated as such."""
    if (col.distinct is not None and len(col.distinct) < 8) or col.absdiff / col.changes > 5:
        return None
    return 0.1 if 100 <= magnitude < 1000 else 0.01 if 1000 <= magnitude < 10000 else None


def _decoded(words: list[int], type_: str) -> list[float]:
    packed = struct.pack(f"{len(words)}I", *words)
    code = {"float32": "f", "int32": "i"}.get(type_, "I")
    return list(struct.unpack(f"{len(words)}{code}", packed))


def _noise(series: Sequence[Value]) -> str:
    """How much a value moves from sample to sample, against its size (recent samples)."""
    numbers = [float(v) for v in series if isinstance(v, int | float)]
    if len(numbers) < 2:
        return "one sample"
    steps = sum(abs(b - a) for a, b in pairwise(numbers)) / (len(numbers) - 1)
    size = max(abs(sum(numbers) / len(numbers)), max(numbers) - min(numbers))
    if not steps or not size:
        return "steady"
    return f"{100 * steps / size:.2g} % noise"


def _rate(series: Sequence[float]) -> str:
    if len(series) < 2:
        return "one sample"
    return f"+{(series[-1] - series[0]) / (len(series) - 1):.3g} a sample"


def _with_changes(found: list[Guess], reads: dict[_Point, list[_Where]],
                  pairs: dict[tuple[tuple[Protocol, Peer, int, str], int], _Candidate]) -> list[Guess]:  # fmt: skip
    """Each guess with the addresses whose recent changes coincide with its own (same block:
    changed at the same answers, and not at every answer, which says nothing)."""
    masks: dict[int, list[int]] = {}
    groups: dict[int, list[tuple[int, int]]] = defaultdict(list)  # block → (guess index, mask)
    for i, g in enumerate(found):
        where = reads.get((g.protocol, g.server, g.unit, g.table, g.address))
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
    rows = list(block.ring)
    masks = []
    for column in zip(*rows, strict=True):
        mask = 0
        for k in range(1, len(column)):
            if column[k] != column[k - 1]:
                mask |= 1 << k
        masks.append(mask)
    return masks
