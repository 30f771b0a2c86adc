"""Running statistics of what a capture's answers carried, block by block, for infer.py.

A block is every answer (or write) of one range: same device, table, start and length. Its
rows are digested `BATCH` at a time, column by column, with C-level builtins (map, sum, min,
max over a batch's column): per sample the work is a few of those, not a Python loop. Each
column (one point) keeps count/min/max/changes/steps/monotonicity/a few distinct values;
each adjacent pair of registers, in both word orders, keeps the evidence that its two words
are one 32-bit value: how much of the high word's moves the low word cancels (a carry or
borrow: the low word wraps as the high word steps) and the combined value's extremes. A pair
settles (after SETTLED steps only its extremes move) or dies: a near-random high word, two
independent words, or a high word that jumped JUMPS times and never by a carry's step. The
last `RING` rows are kept, packed (registers 2 bytes, bits 1 byte a value), for what only
recent samples can tell: noise, float32 smoothness, which points change at the same moments;
the rows not yet digested are the newest of them. `Block.cost` is what a block may hold, in
bytes, for the caller's memory budget.
"""

from __future__ import annotations

import struct
from array import array
from collections import deque
from collections.abc import Sequence
from functools import partial
from itertools import compress, islice, repeat
from operator import add, and_, ge, gt, lshift, or_, sub
from typing import Any, Literal

from broker.passive.observations import Value

BATCH = 128  # rows digested at once
RING = 256  # last rows kept per block (the undigested ones among them: BATCH ≤ RING)
CARRY_STEPS = 2  # high-word steps of a pair's step that still tell about carries
SETTLED = 32_768  # steps after which a pair's carry evidence is complete enough
JUMPS = 64  # high-word jumps (> CARRY_STEPS) without any carry after which a pair is dropped
DISTINCT = 8  # distinct values kept per point; beyond: "many"
FLOAT_HI = (0x3400, 0x5400)  # high word (sign masked) of a float32 of 1.2e-7 ≤ |v| < 2.2e12
ROUGH_STEP = 4096  # mean step of a low word that is noise (a random word's is 21,845)
_is_negative = partial(gt, 0)  # 0 > x (int.__gt__ would refuse a float)
_small = partial(ge, CARRY_STEPS)  # |Δhigh| ≤ CARRY_STEPS
_wrapped = partial(ge, -0x8000)  # a 16-bit register's drop of half its range or more

Packing = Literal["words", "bits", "values"]  # registers, Modbus bits, anything else
TEXT = 8  # characters of a text value kept (a DNP3 double-bit state's name; never parsed)
# Bytes, at most, for the block's cost (tests/passive/test_infer.py measures them):
COLUMN_BYTES = 1_100  # a Column, its distinct values and its numbers at their largest
PAIR_BYTES = 550  # a Pair and its numbers
VALUE_BYTES = 48  # a DNP3/BACnet value in a row: a float, an int, TEXT characters, a pointer
BLOCK_BYTES = 2_000  # the block, its ring, its lists, its key in the caller's table


class Column:
    """One point's running statistics within one block."""

    __slots__ = (
        "absdiff", "batch_high", "batch_low", "changes", "count", "decreases", "distinct",
        "float_hi", "kinds", "maximum", "minimum", "moved", "numeric", "rises",
        "signed_absdiff", "smax", "smin", "smoved", "steps", "wraps",
    )  # fmt: skip

    def __init__(self) -> None:
        self.count = 0
        self.steps = 0  # successive pairs of samples
        self.changes = 0
        self.absdiff = 0  # Σ|Δ|
        self.signed_absdiff = 0  # Σ|Δ| of the words read as int16 (registers): smaller if signed
        self.rises = 0  # counted while the point may be a counter (no decrease yet)
        self.decreases = 0  # drops that are not a 16-bit wrap-around (at least; 0 is exact)
        self.wraps = 0
        self.minimum: Any = None
        self.maximum: Any = None
        self.smin = self.smax = 0  # extremes of the words read as int16 (registers)
        self.distinct: tuple[Value, ...] | None = ()  # None: more than DISTINCT
        self.kinds: frozenset[type] = frozenset()  # value types seen (not for packed rows)
        self.numeric = True
        self.float_hi = True  # every word could be a float32's high word (registers)
        self.batch_low: Any = None  # the last batch's extremes, and whether it moved
        self.batch_high: Any = None
        self.moved = 0  # Σ|Δ| of the last batch
        self.smoved = 0  # the same, of the words read as int16 (registers)

    @property
    def mean_step(self) -> float:
        return self.absdiff / self.steps if self.steps else 0.0

    def merge(self, other: Column) -> None:
        """Add the statistics another block holds of the same point (read by two ranges)."""
        self.count += other.count
        self.steps += other.steps
        self.changes += other.changes
        self.absdiff += other.absdiff
        self.signed_absdiff += other.signed_absdiff
        self.rises += other.rises
        self.decreases += other.decreases
        self.wraps += other.wraps
        if other.minimum is not None:
            first = self.minimum is None
            self.minimum = other.minimum if first else min(self.minimum, other.minimum)
            self.maximum = other.maximum if first else max(self.maximum, other.maximum)
            self.smin = other.smin if first else min(self.smin, other.smin)
            self.smax = other.smax if first else max(self.smax, other.smax)
        if self.distinct is not None:
            self.distinct = None if other.distinct is None else _few(self.distinct, other.distinct)
        self.kinds |= other.kinds
        self.numeric &= other.numeric
        self.float_hi &= other.float_hi

    def digest(self, col: Sequence[Any], new: int, packing: Packing) -> list[Any] | None:
        """Take the last `new` samples of `col` (which may start with the one before them);
        return its steps (None for non-numeric values)."""
        fresh = col[len(col) - new :]
        self.count += new
        if self.distinct is not None:
            self.distinct = _few(self.distinct, fresh)
        if packing == "values":
            self.kinds |= frozenset(map(type, fresh))
        if self.numeric:
            try:
                return self._numeric(col, fresh, packing == "words")
            except TypeError:  # a string among the values: counted, not measured
                self.numeric = False
        self.steps += len(col) - 1
        self.changes += sum(map(_ne, col[1:], col))
        return None

    def _numeric(self, col: Sequence[Any], fresh: Sequence[Any], register: bool) -> list[Any]:
        first = self.minimum is None
        if col.count(col[0]) == len(col):  # steady: nothing but the count changes
            self.steps += len(col) - 1
            self.moved = 0
            self.batch_low = self.batch_high = low = high = col[0]
            d = [0] * (len(col) - 1)
        else:
            low, high = min(fresh), max(fresh)
            self.batch_low, self.batch_high = low, high
            d = list(map(sub, col[1:], col))
            self.moved = moved = sum(map(abs, d))
            self.steps += len(d)
            self.changes += len(d) - d.count(0)
            self.absdiff += moved
            if not self.decreases:  # may still be a counter: count rises and wraps
                self._monotonic(d, register)
        self.minimum = low if first else min(self.minimum, low)
        self.maximum = high if first else max(self.maximum, high)
        if register:
            self._register(col, fresh, first, low, high)
        return d

    def _monotonic(self, d: list[Any], register: bool) -> None:
        negative = sum(map(_is_negative, d))
        self.rises += len(d) - d.count(0) - negative
        wraps = sum(map(_wrapped, d)) if negative and register else 0
        self.wraps += wraps
        self.decreases += negative - wraps

    def _register(
        self, col: Sequence[int], fresh: Sequence[int], first: bool, low: int, high: int
    ) -> None:
        slow, shigh, moved = low, high, self.moved
        if high >= 0x8000:
            signed = _modular(col, 0x8000, 0xFFFF) if self.moved else [col[0] - 0x10000]
            if self.moved:
                moved = sum(map(abs, map(sub, signed[1:], signed)))
                fresh_signed = signed[len(col) - len(fresh) :]
                slow, shigh = min(fresh_signed), max(fresh_signed)
            else:
                slow = shigh = signed[0]
        self.signed_absdiff += moved
        self.smoved = moved
        self.smin = slow if first else min(self.smin, slow)
        self.smax = shigh if first else max(self.smax, shigh)
        if self.float_hi:
            self.float_hi = _float_hi(fresh, low, high)


def _few(kept: Sequence[Value], more: Sequence[Value]) -> tuple[Value, ...] | None:
    """The distinct values of both, or None when there are more than DISTINCT."""
    seen = set(more)
    if len(seen) > DISTINCT:
        return None
    seen.update(kept)
    return None if len(seen) > DISTINCT else tuple(seen)


def _modular(numbers: Sequence[int], half: int, mask: int) -> list[int]:
    """Each number read as a two's complement of mask's width: (x + half) & mask - half."""
    shifted = map(and_, map(add, numbers, repeat(half)), repeat(mask))
    return list(map(sub, shifted, repeat(half)))


def _ne(a: Any, b: Any) -> bool:
    return bool(a != b)


def _float_hi(words: Sequence[int], low: int, high: int) -> bool:
    lo, hi = FLOAT_HI
    if (lo <= low and high < hi) or (lo | 0x8000 <= low and high < hi | 0x8000):
        return True
    return all(lo <= w & 0x7FFF < hi or not w & 0x7FFF for w in words)


class Pair:
    """Evidence that registers (hi, lo) are one 32-bit value, high word first at `hi`.

    Extremes are kept as uint32 words split by the top bit, from which the int32 and float32
    extremes follow (both are monotonic in the word within each half)."""

    __slots__ = (
        "cancelled", "dead", "decreases", "events", "hi_moves", "jumps", "looked", "nmax",
        "nmin", "pmax", "pmin", "steps", "values_moved",
    )  # fmt: skip

    def __init__(self) -> None:
        self.hi_moves = 0  # 65536 × Σ|Δhigh| (modulo 2^16): what the high word alone moved
        self.cancelled = 0.0  # how much of that the low word's opposite moves cancelled
        self.events = 0  # steps where the high word moved
        self.jumps = 0  # steps where it moved by more than CARRY_STEPS (telling nothing)
        self.values_moved = 0  # Σ|Δ combined| (modulo 2^32)
        self.steps = 0  # steps accounted (those with a jump are not)
        self.looked = 0  # every step digested: the pair settles after SETTLED
        self.decreases = 0  # steps where the combined value (modulo 2^32) went down
        self.pmin = self.pmax = self.nmin = self.nmax = -1  # words < 2^31, ≥ 2^31 (-1: none)
        self.dead = False  # ruled out: no longer tracked

    @property
    def coherence(self) -> float:
        return self.cancelled / self.hi_moves if self.hi_moves else 0.0

    def merge(self, other: Pair) -> None:
        """Add the evidence another block holds of the same two registers."""
        self.hi_moves += other.hi_moves
        self.cancelled += other.cancelled
        self.events += other.events
        self.jumps += other.jumps
        self.values_moved += other.values_moved
        self.steps += other.steps
        self.looked += other.looked
        self.decreases += other.decreases
        self.dead |= other.dead
        if other.pmin >= 0:
            self.take(other.pmin, other.pmax)
        if other.nmin >= 0:
            self.take(other.nmin, other.nmax)

    def digest(self, hi: Column, lo: Column, words: tuple[Sequence[int], Sequence[int]],
               steps: tuple[list[int], list[int]], new: int) -> None:  # fmt: skip
        dhi, dlo = steps
        settled = self.looked > SETTLED  # enough evidence: only the extremes still move
        self.looked += len(dlo)
        if not hi.moved:  # high word steady: the combined value moves as the low word does
            h = words[0][0] << 16
            if not settled:
                self.steps += len(dlo)
                self.values_moved += lo.moved
                if lo.moved:
                    self.decreases += sum(map(_is_negative, dlo))
            self.take(h | lo.batch_low, h | lo.batch_high)
            return
        combined = list(map(or_, map(lshift, words[0], repeat(16)), words[1]))
        if not settled:
            self._carries(combined, dhi, dlo)
        self._fresh(combined[len(combined) - new :])

    def _carries(self, combined: list[int], dhi: list[int], dlo: list[int]) -> None:
        """Account the steps where the high word moved by at most CARRY_STEPS: a carry can
        cancel at most one high-word step, so a jump (a motor starting) tells nothing."""
        dc = list(map(sub, combined[1:], combined))
        if min(dc) < -0x8000_0000 or max(dc) >= 0x8000_0000:
            dc = _modular(dc, 0x8000_0000, 0xFFFF_FFFF)
        self.decreases += sum(map(_is_negative, dc))
        if min(dhi) <= -0x8000 or max(dhi) >= 0x8000:
            dhi = _modular(dhi, 0x8000, 0xFFFF)
        hi_steps = list(map(abs, dhi))
        small = list(map(_small, hi_steps))
        hi_moves = 0x10000 * sum(compress(hi_steps, small))
        moved = sum(compress(map(abs, dc), small))
        accounted = sum(small)
        self.hi_moves += hi_moves
        self.cancelled += (hi_moves + sum(compress(map(abs, dlo), small)) - moved) / 2
        self.events += sum(compress(map(bool, hi_steps), small))
        self.jumps += len(small) - accounted
        self.values_moved += moved
        self.steps += accounted

    def _fresh(self, fresh: list[int]) -> None:
        low, high = min(fresh), max(fresh)
        if low < 0x8000_0000 <= high:  # both signs: split
            self.take(low, max(w for w in fresh if w < 0x8000_0000))
            self.take(min(w for w in fresh if w >= 0x8000_0000), high)
        else:
            self.take(low, high)

    def take(self, low: int, high: int) -> None:
        """Take words low..high, both on the same side of 2^31."""
        if high < 0x8000_0000:
            self.pmin = low if self.pmin < 0 else min(self.pmin, low)
            self.pmax = max(self.pmax, high)
        else:
            self.nmin = low if self.nmin < 0 else min(self.nmin, low)
            self.nmax = max(self.nmax, high)

    def extremes(self, type_: str) -> tuple[float, float] | tuple[None, None]:
        """The smallest and largest value seen, read as `type_` (uint32, int32, float32)."""
        p, n = self.pmin >= 0, self.nmin >= 0
        if not (p or n):
            return None, None
        if type_ == "uint32":
            return (self.pmin if p else self.nmin), (self.nmax if n else self.pmax)
        if type_ == "int32":
            return (self.nmin - 2**32 if n else self.pmin), (self.pmax if p else self.nmax - 2**32)
        low = _float(self.nmax) if n else _float(self.pmin)  # a sign bit set: larger is lower
        high = _float(self.pmax) if p else _float(self.nmin)
        return low, high

    def dies(self, hi: Column, lo: Column) -> bool:
        """Whether these two words cannot be one value, or will never tell: a near-random high
        word; two independent words (their moves never cancel); a high word that keeps
        jumping and never stepped as a carry would, unless the words may be a float32's."""
        if rough(hi):
            return True
        if self.events >= 64 and self.coherence < 0.05 and not rough(lo):
            return True
        return self.may_die(hi, lo) and self.jumps >= JUMPS

    def may_die(self, hi: Column, lo: Column) -> bool:
        """No carry seen, and not words a float32's may be (nor a noisy low word's): only a
        carry can still make them one value, and a jumping high word never shows one."""
        return not self.events and lo.mean_step <= ROUGH_STEP and not hi.float_hi


def _float(word: int) -> float:
    value: float = struct.unpack("<f", struct.pack("<I", word))[0]
    return value


def pack(values: Sequence[Value], packing: Packing) -> Sequence[Value]:
    """One answer's values as a block keeps them (registers 2 bytes each, bits 1 byte);
    TypeError, ValueError or OverflowError when they are not what the table holds."""
    if packing == "words":
        return array("H", values)  # type: ignore[type-var]
    if packing == "bits":
        if not all(isinstance(v, bool) for v in values):
            raise TypeError("not bits")
        return bytes(values)  # type: ignore[arg-type]
    return tuple(v[:TEXT] if isinstance(v, str) else v for v in values)


class Block:
    """Every answer (or write) to one range of one device."""

    __slots__ = ("columns", "live", "new", "packing", "pairs", "previous", "ring", "rows")

    def __init__(self, width: int, packing: Packing) -> None:
        self.packing = packing
        self.columns = [Column() for _ in range(width)]
        # pairs[2 * j] : (j, j + 1) high word first; pairs[2 * j + 1]: (j + 1, j) high first
        register = packing == "words"
        self.pairs = [Pair() for _ in range(2 * (width - 1))] if register else []
        self.live = list(range(len(self.pairs)))  # the pairs still tracked
        self.ring: deque[Sequence[Value]] = deque(maxlen=RING)
        self.new = 0  # the ring's newest rows not digested yet
        self.previous: Sequence[Value] | None = None  # the last row digested
        self.rows = 0

    @staticmethod
    def cost(width: int, packing: Packing) -> int:
        """Bytes a block of `width` points may come to hold (its ring full, and its columns'
        values at their largest): what a caller counts against its memory budget."""
        row = {"words": 64 + 2 * width, "bits": 33 + width, "values": 56 + VALUE_BYTES * width}
        pairs = 2 * PAIR_BYTES if packing == "words" else 0
        return BLOCK_BYTES + (RING + 1) * row[packing] + width * (COLUMN_BYTES + pairs)

    def add(self, values: Sequence[Value]) -> None:
        """One answer's values, as `pack` gave them."""
        self.ring.append(values)
        self.new += 1
        if self.new >= BATCH:
            self.digest()

    def digest(self) -> None:
        new = self.new
        if not new:
            return
        rows = list(islice(self.ring, len(self.ring) - new, None))
        last = rows[-1]
        if self.previous is not None:
            rows.insert(0, self.previous)
        columns = list(zip(*rows, strict=True))
        steps = [
            c.digest(col, new, self.packing) for c, col in zip(self.columns, columns, strict=True)
        ]
        if self.live:
            self._pairs(columns, steps, new)
        self.rows += new
        self.previous = last
        self.new = 0

    def _pairs(
        self, columns: list[tuple[Any, ...]], steps: list[list[Any] | None], new: int
    ) -> None:
        live = []
        for j in self.live:
            pair = self.pairs[j]
            hi, lo = (j // 2, j // 2 + 1) if j % 2 == 0 else (j // 2 + 1, j // 2)
            dhi, dlo = steps[hi], steps[lo]
            if dhi is None or dlo is None:
                pair.dead = True
                continue
            high, low = self.columns[hi], self.columns[lo]
            if not (high.moved or low.moved or pair.steps == 0):
                pair.steps += len(dlo)  # nothing moved: nothing new
                pair.looked += len(dlo)
            elif min(high.moved, high.smoved) > 2 * CARRY_STEPS * len(dhi) and pair.may_die(
                high, low
            ):
                pair.jumps += len(dhi)  # jumping all the batch through: no carry shows
                pair.looked += len(dhi)
            else:
                pair.digest(high, low, (columns[hi], columns[lo]), (dhi, dlo), new)
            if pair.dies(high, low):
                pair.dead = True
            else:
                live.append(j)
        self.live = live


def rough(column: Column) -> bool:
    """Near-random from sample to sample, with many values: the low word of something wider
    (a float32's low mantissa), never a 16-bit quantity of its own."""
    return column.distinct is None and column.mean_step > ROUGH_STEP
