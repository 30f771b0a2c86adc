"""The diode receiver's view of one sender session: duplicates, reordering, gaps, in order.

Sans-io, the clock passed in. Datagrams are released in seq order, so the records they carry
reach the spool in the plant's seq order. A seq seen before is a duplicate (k copies, or the
wire repeating one). A seq skipped over is *missing*, not yet lost: reordering may still bring
it, and what follows it waits. It is declared lost — one gap with its exact range, reported
once — when the reordering window has passed: `REORDER_S` since it went missing, or
`REORDER_DATAGRAMS` seqs later, or when what is held exceeds `HELD_BYTES`, whichever
comes first (ADR 0019). This module never touches a socket or a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

REORDER_S = 0.5  # a missing datagram is lost this long after a later one arrived
REORDER_DATAGRAMS = 8192  # or after this many later datagrams (bounds memory at high rates)
HELD_BYTES = 64 * 1024 * 1024  # or when the datagrams held behind it exceed this many bytes

T = TypeVar("T")


class Lost(NamedTuple):
    first: int
    last: int

    @property
    def datagrams(self) -> int:
        return self.last - self.first + 1


@dataclass
class _Missing:
    first: int
    last: int
    since: float


@dataclass
class Reorder(Generic[T]):
    """One session's datagrams: offered as they arrive, released in seq order."""

    next: int = 1  # the seq released next
    duplicates: int = 0  # seen before, or arriving after their seq was declared lost
    _highest: int = 0
    held_bytes: int = 0  # the sizes given to `offer` of what is held
    _held: dict[int, tuple[T, int]] = field(default_factory=dict)
    _missing: list[_Missing] = field(default_factory=list)  # sorted, disjoint, >= next

    def __post_init__(self) -> None:
        self._highest = self.next - 1

    @property
    def highest(self) -> int:
        return self._highest

    def offer(self, seq: int, item: T, now: float, size: int = 0) -> bool:
        """False for a duplicate (dropped), True when held for release; `size` counts
        towards HELD_BYTES."""
        if seq < self.next or seq in self._held:
            self.duplicates += 1
            return False
        if seq > self._highest:
            if seq > self._highest + 1:
                self._missing.append(_Missing(self._highest + 1, seq - 1, now))
            self._highest = seq
        else:  # it fills (part of) a missing range
            for i, gap in enumerate(self._missing):
                if gap.first <= seq <= gap.last:
                    parts = (
                        _Missing(gap.first, seq - 1, gap.since),
                        _Missing(seq + 1, gap.last, gap.since),
                    )
                    self._missing[i : i + 1] = [p for p in parts if p.first <= p.last]
                    break
        self._held[seq] = (item, size)
        self.held_bytes += size
        return True

    def release(self, now: float) -> list[T | Lost]:
        """What can go on, in order: held items, and gaps whose window has passed."""
        out: list[T | Lost] = []
        while True:
            held = self._held.pop(self.next, None)
            if held is not None:
                out.append(held[0])
                self.held_bytes -= held[1]
                self.next += 1
                continue
            if self.next > self._highest or not self._missing:
                return out
            gap = self._missing[0]
            if (
                now - gap.since < REORDER_S
                and self._highest - gap.first <= REORDER_DATAGRAMS
                and self.held_bytes <= HELD_BYTES
            ):
                return out
            self._missing.pop(0)
            out.append(Lost(gap.first, gap.last))
            self.next = gap.last + 1

    def end(self) -> list[T | Lost]:
        """The session is over: everything held, every missing range lost, in order."""
        return self.release(float("inf"))

    def pending(self) -> int:
        """Datagrams missing and not yet declared lost."""
        return sum(g.last - g.first + 1 for g in self._missing)
