"""Which ranges the pollers in a capture asked for, and how often: the SCADA's poll log.

A draft must never ask a device for more than the SCADA already did, nor more often: this
module gives, per device, the interval the draft may not go below (`PollLog.interval_s`).
It only counts requests the readers saw; it sends nothing and never suggests a write.
Memory is bounded: at most `max_ranges` distinct ranges (then a warning), each holding its
last `GAPS` gaps between requests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import median

from broker.passive.observations import Peer, Protocol, Request, Warnings

GAPS = 256  # gaps kept per range: the median of the latest is the SCADA's interval


@dataclass(frozen=True)
class Polled:
    """One range a poller asked for again and again."""

    protocol: Protocol
    client: str
    server: Peer
    unit: int
    table: str
    start: int
    count: int
    function: str
    requests: int
    interval_s: float | None  # median gap between its requests (None: asked once)
    write: bool


# (protocol, client, server, unit, table, start, count, function, write)
_Key = tuple[Protocol, str, Peer, int, str, int, int, str, bool]


@dataclass(slots=True)
class _Range:
    requests: int = 0
    last: float = 0.0
    gaps: deque[float] = field(default_factory=lambda: deque(maxlen=GAPS))


class PollLog:
    """Every request of a capture, grouped by who asked what of whom."""

    def __init__(self, warnings: Warnings | None = None, *, max_ranges: int = 100_000) -> None:
        self._warnings = warnings if warnings is not None else Warnings()
        self._max_ranges = max_ranges
        self._ranges: dict[_Key, _Range] = {}

    def add(self, request: Request) -> None:
        r = request
        key = (
            r.protocol,
            r.client,
            r.server,
            r.unit,
            r.table,
            r.start,
            r.count,
            r.function,
            r.write,
        )
        seen = self._ranges.get(key)
        if seen is None:
            if len(self._ranges) >= self._max_ranges:
                self._warnings.add("too many polled ranges (the rest not counted)", str(r.server))
                return
            seen = self._ranges[key] = _Range()
        elif r.time >= seen.last:  # a capture's clock can step back: no negative gaps
            seen.gaps.append(r.time - seen.last)
        seen.requests += 1
        seen.last = max(seen.last, r.time)

    def polled(self) -> list[Polled]:
        """Every range, sorted by server, unit, table, start (then count, client, function)."""
        found = [
            Polled(
                protocol=k[0],
                client=k[1],
                server=k[2],
                unit=k[3],
                table=k[4],
                start=k[5],
                count=k[6],
                function=k[7],
                requests=r.requests,
                interval_s=median(r.gaps) if r.gaps else None,
                write=k[8],
            )
            for k, r in self._ranges.items()
        ]
        return sorted(
            found,
            key=lambda p: (
                p.server,
                p.unit,
                p.table,
                p.start,
                p.count,
                p.client,
                p.function,
                p.write,
            ),
        )

    def interval_s(self, server: Peer, unit: int) -> float | None:
        """The shortest interval a draft may poll this device at: the LONGEST of its ranges'
        intervals, where a range's interval is the shortest among the clients that read it.
        So no range is asked for more often than the SCADA did. None: nothing read twice."""
        per_range: dict[tuple[str, int, int], float] = {}
        for p in self.polled():
            if p.server != server or p.unit != unit or p.write or p.interval_s is None:
                continue
            where = (p.table, p.start, p.count)
            per_range[where] = min(per_range.get(where, p.interval_s), p.interval_s)
        return max(per_range.values(), default=None)
