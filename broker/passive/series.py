"""Running statistics of what a capture's answers carried, block by block, for infer.py.

A block is every answer (or write) of one range: same device, table, start and length. Its
rows are digested `BATCH` at a time, column by column, with C-level builtins (map, sum, min,
max over a batch's column): per sample the work is a few of those, not a Python loop. Each
column (one point) keeps count/min/max/changes/steps/monotonicity/capped distinct values;
each adjacent pair of registers, in both word orders, keeps the evidence that its two words
are one 32-bit value: how much of the high word's moves the low word cancels (a carry or
borrow: the low word wraps as the high word steps) and the combined value's extremes. The
last `RING` rows are kept (packed) for what only recent samples can tell: noise, and which
points change at the same moments. Memory per block is bounded by RING + BATCH rows.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from functools import partial
from itertools import compress, repeat
from operator import add, and_, ge, gt, lshift, or_, sub
from typing import Any

from broker.passive.observations import Value

BATCH = 128  # rows digested at once
RING = 256  # last rows kept per block
CARRY_STEPS = 2  # high-word steps of a pair's step that still tell about carries
SETTLED = 32_768  # steps after which a pair's carry evidence is complete enough
DISTINCT = 64  # distinct values kept per point; beyond: "many"
FLOAT_HI = (0x3400, 0x5400)  # high word (sign masked) of a float32 of 1.2e-7 ≤ |v| < 2.2e12
ROUGH_STEP = 4096  # mean step of a low word that is noise (a random word's is 21,845)
_is_negative = partial(gt, 0)  # 0 > x (int.__gt__ would refuse a float)
_small = partial(ge, CARRY_STEPS)  # |Δhigh| ≤ CARRY_STEPS
_wrapped = partial(ge, -0x8000)  # a 16-bit register's drop of half its range or more


class Column:
    """One point's running statistics within one block."""

    __slots__ = (
        "absdiff", "batch_high", "batch_low", "changes", "count", "decreases", "distinct",
        "float_hi", "kinds", "maximum", "minimum", "moved", "numeric", "rises",
        "signed_absdiff", "smax", "smin", "steps", "wraps",
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
        self.distinct: set[Value] | None = set()  # None: more than DISTINCT
        self.kinds: set[type] = set()
        self.numeric = True
        self.float_hi = True  # every word could be a float32's high word (registers)
        self.batch_low: Any = None  # the last batch's extremes, and whether it moved
        self.batch_high: Any = None
        self.moved = 0  # Σ|Δ| of the last batch

    def digest(self, col: Sequence[Any], new: int, register: bool) -> list[Any] | None:
        """Take the last `new` samples of `col` (which may start with the one before them);
        return its steps (None for non-numeric values)."""
        fresh = col[len(col) - new :]
        self.count += new
        if self.distinct is not None:
            self.distinct.update(fresh)
            if len(self.distinct) > DISTINCT:
                self.distinct = None
        if not register:
            self.kinds.update(map(type, fresh))
        if self.numeric:
            try:
                return self._numeric(col, fresh, register)
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
        self.smin = slow if first else min(self.smin, slow)
        self.smax = shigh if first else max(self.smax, shigh)
        if self.float_hi:
            self.float_hi = _float_hi(fresh, low, high)


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
        "cancelled", "dead", "decreases", "events", "hi_moves", "nmax", "nmin", "pmax", "pmin",
        "steps", "values_moved",
    )  # fmt: skip

    def __init__(self) -> None:
        self.hi_moves = 0  # 65536 × Σ|Δhigh| (modulo 2^16): what the high word alone moved
        self.cancelled = 0.0  # how much of that the low word's opposite moves cancelled
        self.events = 0  # steps where the high word moved
        self.values_moved = 0  # Σ|Δ combined| (modulo 2^32)
        self.steps = 0
        self.decreases = 0  # steps where the combined value (modulo 2^32) went down
        self.pmin = self.pmax = self.nmin = self.nmax = -1  # words < 2^31, ≥ 2^31 (-1: none)
        self.dead = False  # ruled out: no longer tracked

    @property
    def coherence(self) -> float:
        return self.cancelled / self.hi_moves if self.hi_moves else 0.0

    def digest(self, hi: Column, lo: Column, words: tuple[Sequence[int], Sequence[int]],
               steps: tuple[list[int], list[int]], new: int) -> None:  # fmt: skip
        dhi, dlo = steps
        settled = self.steps > SETTLED  # enough evidence: only the extremes still move
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
        self.hi_moves += hi_moves
        self.cancelled += (hi_moves + sum(compress(map(abs, dlo), small)) - moved) / 2
        self.events += sum(compress(map(bool, hi_steps), small))
        self.values_moved += moved
        self.steps += sum(small)

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


def _float(word: int) -> float:
    value: float = struct.unpack("<f", struct.pack("<I", word))[0]
    return value


class Block:
    """Every answer (or write) to one range of one device."""

    __slots__ = ("columns", "pairs", "pending", "previous", "register", "ring", "rows")

    def __init__(self, width: int, register: bool) -> None:
        self.register = register  # 16-bit Modbus registers: words, pairs tracked
        self.columns = [Column() for _ in range(width)]
        # pairs[2 * j] : (j, j + 1) high word first; pairs[2 * j + 1]: (j + 1, j) high first
        self.pairs = [Pair() for _ in range(2 * (width - 1))] if register else []
        self.pending: list[Sequence[Value]] = []
        self.previous: Sequence[Value] | None = None
        self.ring: deque[Sequence[Value]] = deque(maxlen=RING)
        self.rows = 0

    def add(self, values: Sequence[Value]) -> None:
        """One answer's values (registers: as an array("H"), which holds them in 2 bytes)."""
        self.pending.append(values)
        if len(self.pending) >= BATCH:
            self.digest()

    def digest(self) -> None:
        if not self.pending:
            return
        new = len(self.pending)
        rows = self.pending if self.previous is None else [self.previous, *self.pending]
        columns = list(zip(*rows, strict=True))
        steps = [
            c.digest(col, new, self.register) for c, col in zip(self.columns, columns, strict=True)
        ]
        self._pairs(columns, steps, new)
        self.rows += new
        self.previous = self.pending[-1]
        self.ring.extend(self.pending)
        self.pending = []

    def _pairs(
        self, columns: list[tuple[Any, ...]], steps: list[list[Any] | None], new: int
    ) -> None:
        for j, pair in enumerate(self.pairs):
            if pair.dead:
                continue
            hi, lo = (j // 2, j // 2 + 1) if j % 2 == 0 else (j // 2 + 1, j // 2)
            dhi, dlo = steps[hi], steps[lo]
            if dhi is None or dlo is None:
                pair.dead = True
                continue
            high, low = self.columns[hi], self.columns[lo]
            if not (high.moved or low.moved or pair.steps == 0):
                pair.steps += len(dlo)  # nothing moved: nothing new
                continue
            pair.digest(high, low, (columns[hi], columns[lo]), (dhi, dlo), new)
            if rough(high) or (pair.events >= 64 and pair.coherence < 0.05 and not rough(low)):
                pair.dead = True  # a near-random high word, or two independent words


def rough(column: Column) -> bool:
    """Near-random from sample to sample, with many values: the low word of something wider
    (a float32's low mantissa), never a 16-bit quantity of its own."""
    return (
        column.distinct is None and column.steps > 0 and column.absdiff / column.steps > ROUGH_STEP
    )
