"""Which two registers are one 32-bit value (float32, int32 or uint32, in big or little word
order), from the evidence series.py keeps for every adjacent pair of registers.

Two registers become one value only with positive evidence that they are one: always answered
together, and either the low word cancels the high word's steps (carries and borrows: a
counter crossing a 16-bit boundary, a float drifting across a mantissa step), or the low word
is near-random noise beside a steady high word (a float32's low mantissa) and the carries seen
match what such noise would give, or the pair read as a float32 is smooth where its low word
alone is near-random (a float32's low mantissa, with too few samples or too quantised a value
to show carries, or a value crossing zero). Without any of these, only layouts that are rarely
anything else are taken, at low confidence: a float32 too steady to move its high word, a
counter beside a still high word (a uint32 below 65,536, an int32's 0xFFFF sign). Overlapping
candidates go to the strongest; at equal evidence, to the device's usual word order (not
forced: one PLC may hold little-endian counters and big-endian floats). A register that may
be half of a value not taken gets a doubt: its 16-bit guess is capped and says why.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import sub
from typing import Literal, NamedTuple

from broker.passive.observations import Protocol
from broker.passive.series import ROUGH_STEP, Block, Column, Pair, rough

WordOrder = Literal["big", "little"]
REGISTER_TABLES = frozenset({"holding_register", "input_register"})
ORDER_BONUS = 0.05  # a device mostly lays its 32-bit values out one way: a tie-break only
STEADY_HIGH = 1024  # mean step (in units of the high word) of a 32-bit value's high word
FLOAT_SAMPLES = 8  # recent samples a smooth float32 needs
SMOOTHER = 4  # a float32's relative step is at most 1/SMOOTHER of its low word's alone
WEAK = 0.4  # confidence of a layout taken without a carry
FLOAT_DOUBT = (0.3, "half of a float32?")
PAIR_DOUBT = (0.5, "or half of a 32-bit value?")

Area = tuple[Protocol, str, int, int, str]  # protocol, server host, server port, unit, table
Point = tuple[Protocol, str, int, int, str, int]  # an area's address
Where = tuple[Block, int]  # a block and the point's column in it


@dataclass(frozen=True, slots=True)
class Candidate:
    address: int  # the pair's first register
    order: WordOrder
    type: str
    confidence: float
    reason: str
    stats: Pair
    hi: Column
    lo: Column


class Choice(NamedTuple):
    pairs: dict[tuple[Area, int], Candidate]  # by (area, first address)
    doubts: dict[Point, tuple[float, str]]  # a 16-bit guess's confidence cap, and why


def choose(reads: Mapping[Point, list[Where]], writes: Mapping[Point, list[Where]]) -> Choice:
    """The register pairs taken as one 32-bit value, and the doubts about the rest."""
    doubts: dict[Point, tuple[float, str]] = {}
    candidates: dict[tuple[Protocol, str, int, int], list[tuple[Area, Candidate]]] = {}
    for area, c in _candidates(reads, writes, doubts):
        candidates.setdefault(area[:4], []).append((area, c))
    chosen: dict[tuple[Area, int], Candidate] = {}
    for found in candidates.values():
        taken = _strongest(found)
        for area, c in found:
            if (area, c.address) in taken:
                chosen[(area, c.address)] = c
            else:
                doubts.setdefault(_at(area, c.address), PAIR_DOUBT)
                doubts.setdefault(_at(area, c.address + 1), PAIR_DOUBT)
    return Choice(chosen, doubts)


def _candidates(
    reads: Mapping[Point, list[Where]],
    writes: Mapping[Point, list[Where]],
    doubts: dict[Point, tuple[float, str]],
) -> Iterator[tuple[Area, Candidate]]:
    """Every pair of registers always answered together that may be one value, in either
    word order; the two halves of what looks like a float32 not taken go into `doubts`."""
    for points in (reads, writes):
        for point, where in points.items():
            area, address = point[:5], point[5]
            if area[0] != "modbus" or area[4] not in REGISTER_TABLES:
                continue
            if points is writes and point in reads:
                continue
            after = points.get(_at(area, address + 1))
            if after is None or {id(b) for b, _ in where} != {id(b) for b, _ in after}:
                continue  # not always answered together
            for order in ("big", "little"):
                c, halves = _candidate(address, order, where)
                if c is not None:
                    yield area, c
                elif halves:
                    doubts[point] = doubts[_at(area, address + 1)] = FLOAT_DOUBT


def _at(area: Area, address: int) -> Point:
    return (area[0], area[1], area[2], area[3], area[4], address)


def _strongest(found: list[tuple[Area, Candidate]]) -> set[tuple[Area, int]]:
    """(area, first address) of one device's candidates taken: strongest first, none
    overlapping."""
    votes = {"big": 0.0, "little": 0.0}
    for _, c in found:
        votes[c.order] += c.confidence
    usual = "little" if votes["little"] > votes["big"] else "big"

    def first(tc: tuple[Area, Candidate]) -> tuple[float, int]:
        return -tc[1].confidence - ORDER_BONUS * (tc[1].order == usual), tc[1].address

    used: set[tuple[Area, int]] = set()
    taken: set[tuple[Area, int]] = set()
    for area, c in sorted(found, key=first):
        if (area, c.address) in used or (area, c.address + 1) in used:
            continue
        used |= {(area, c.address), (area, c.address + 1)}
        taken.add((area, c.address))
    return taken


def _candidate(address: int, order: WordOrder, where: list[Where]) -> tuple[Candidate | None, bool]:
    """The evidence that (address, address + 1) is one 32-bit value in `order`, or None; and
    whether the two words look like a float32's halves all the same."""
    stats, hi, lo = Pair(), Column(), Column()
    for block, j in where:
        pair = block.pairs[2 * j + (order == "little")]
        if pair.dead:
            return None, False
        stats.merge(pair)
        first, second = (j, j + 1) if order == "big" else (j + 1, j)
        hi.merge(block.columns[first])
        lo.merge(block.columns[second])
    q = stats.coherence
    carries = (stats.events >= 2 and q >= 0.5) or (stats.events >= 1 and q >= 0.9)
    noise_low = rough(lo) and hi.steps > 0 and hi.signed_absdiff / hi.steps < STEADY_HIGH
    halves = _float_halves(hi, lo)
    if carries or noise_low:
        found = _carried(address, order, (stats, hi, lo), carries, noise_low)
    else:
        found = _smooth_float(address, order, where, (stats, hi, lo)) if halves else None
        found = found or _weak(address, order, stats, hi, lo)
    return found, halves


def _carried(address: int, order: WordOrder, evidence: tuple[Pair, Column, Column],
             carries: bool, noise_low: bool) -> Candidate | None:  # fmt: skip
    stats, hi, lo = evidence
    q = stats.coherence
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
    return Candidate(address, order, type_, min(0.97, confidence), reason, stats, hi, lo)


def _float_halves(hi: Column, lo: Column) -> bool:
    """A high word only ever in a float32's exponent range (or 0) beside a low word that
    jumps across its range with several values: what a moving float32's words look like."""
    many = lo.distinct is None or len(lo.distinct) > 2
    return hi.float_hi and bool(hi.maximum & 0x7FFF) and lo.mean_step > ROUGH_STEP and many


def _smooth_float(address: int, order: WordOrder, where: list[Where],
                  evidence: tuple[Pair, Column, Column]) -> Candidate | None:  # fmt: skip
    """A float32 whose recent values step little for their size, where its low word alone
    jumps across its range: the carries may be too few to count (a short capture, a value
    quantised to tenths, a value crossing zero flips the sign bit), the smoothness is not."""
    stats, hi, lo = evidence
    if not hi.changes:
        return None
    block, j = where[0]
    a, b = (j, j + 1) if order == "big" else (j + 1, j)
    words = [row[a] << 16 | row[b] for row in block.ring]  # type: ignore[operator]
    values = decoded(words, "float32")
    if len(values) < FLOAT_SAMPLES or not all(map(math.isfinite, values)):
        return None
    step = relative_step(values)
    alone = lo.mean_step / (lo.maximum - lo.minimum)
    if step is None or step * SMOOTHER > alone:
        return None
    sure = 0.5 + 0.3 * min(1.0, len(values) / 128) * (1 - SMOOTHER * step / alone)
    reason = f"smooth as a float32 ({step:.2%} a step) where its low word alone is not"
    return Candidate(address, order, "float32", sure, reason, stats, hi, lo)


def _weak(address: int, order: WordOrder, stats: Pair, hi: Column, lo: Column) -> Candidate | None:
    """No carry seen, but a layout that is rarely anything else: a float32 too steady to move
    its high word (a still word in a float's exponent range beside a word of many values), or
    a counter beside a still high word that never wrapped (a uint32 counter below 65,536, an
    int32 counter below zero), or a moving word beside a still 0xFFFF (an int32's sign)."""
    if hi.changes or not lo.changes:
        return None
    if hi.float_hi and hi.maximum & 0x7FFF and lo.distinct is None:
        reason = "high word still in a float32's exponent range, low word of many values"
        return Candidate(
            address, order, "float32", WEAK, f"{reason} (no carry seen)", stats, hi, lo
        )
    if lo.decreases == 0 and not lo.wraps and lo.rises >= 3:
        type_ = "int32" if hi.maximum >= 0x8000 else "uint32"
        still = "zero word" if not hi.maximum else f"high word {hi.maximum:#06x}"
        reason = f"a counter beside a still {still} (no carry seen)"
        return Candidate(address, order, type_, WEAK, reason, stats, hi, lo)
    if hi.maximum == 0xFFFF and lo.changes >= 3:
        reason = "beside a still 0xFFFF: a negative int32's sign? (no carry seen)"
        return Candidate(address, order, "int32", WEAK - 0.05, reason, stats, hi, lo)
    return None


def _int32(stats: Pair) -> str:
    if stats.nmin >= 0:  # a negative value near zero, or a large unsigned one
        return "int32" if stats.nmin >= 0xC000_0000 else "uint32"
    return "uint32" if stats.decreases == 0 and stats.values_moved else "int32"


def decoded(words: list[int], type_: str) -> list[float]:
    """32-bit words as `type_` (float32, int32, else uint32)."""
    packed = struct.pack(f"{len(words)}I", *words)
    code = {"float32": "f", "int32": "i"}.get(type_, "I")
    return list(struct.unpack(f"{len(words)}{code}", packed))


def relative_step(series: Sequence[float]) -> float | None:
    """The mean step from sample to sample against the value's size (its mean or range,
    the larger), or None for fewer than two samples; 0 when it never moved."""
    if len(series) < 2:
        return None
    steps = sum(map(abs, map(sub, series[1:], series))) / (len(series) - 1)
    size = max(abs(sum(series) / len(series)), max(series) - min(series))
    return steps / size if steps and size else 0.0
