"""Which ranges the pollers in a capture asked for, and how often: the SCADA's poll log.

A draft must never ask a device for more than the SCADA already did, nor more often: this
module gives, per device, the ranges a draft may repeat and the interval it may not go below
(`envelopes`). It only counts requests the readers saw; it sends nothing and never suggests a
write. Memory is bounded: at most `max_ranges` distinct ranges (then a warning), each holding
its last `GAPS` gaps between requests.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import median

from broker.passive.observations import Peer, Protocol, Request, Warnings

GAPS = 256  # gaps kept per range: the median of the latest is the SCADA's interval
# A range asked this many times less than its device's most-asked range is read rarely: drafted,
# it would set the whole device's pace (one poll_interval_s per device) to its own.
RARE_FACTOR = 10


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


Device = tuple[Protocol, Peer, int]  # protocol, server, unit


@dataclass(frozen=True)
class Envelope:
    """What a draft may ask of one device, from what the pollers read of it."""

    regular: tuple[Polled, ...]  # read twice or more: the ranges a draft may read
    rare: tuple[Polled, ...]  # read RARE_FACTOR times less than the device's most-read range
    once: tuple[Polled, ...]  # read once: how often is unknown
    most_requests: int  # of the device's most-read range (every poller's requests together)

    def interval_s(self) -> float | None:
        """The slowest of the regular ranges' intervals, each at its fastest poller."""
        fastest: dict[tuple[str, int, int, str], float] = {}
        for p in self.regular:
            if p.interval_s is not None:
                where = (p.table, p.start, p.count, p.function)
                fastest[where] = min(fastest.get(where, p.interval_s), p.interval_s)
        return max(fastest.values(), default=None)


def envelopes(polled: Iterable[Polled]) -> dict[Device, Envelope]:
    """Per device, in one pass over `polled`, its read ranges: regular, rare or read once."""
    ranges: dict[Device, dict[tuple[str, int, int, str], list[Polled]]] = defaultdict(
        lambda: defaultdict(list)
    )
    once: dict[Device, list[Polled]] = defaultdict(list)
    for p in polled:
        if p.write:
            continue
        device = (p.protocol, p.server, p.unit)
        if p.interval_s is None:
            once[device].append(p)
        else:
            ranges[device][p.table, p.start, p.count, p.function].append(p)
    found = {}
    for device in ranges.keys() | once.keys():
        by_range = ranges.get(device, {})
        asked = {where: sum(p.requests for p in ps) for where, ps in by_range.items()}
        most = max(asked.values(), default=0)
        found[device] = Envelope(
            regular=tuple(p for w, ps in by_range.items() if asked[w] * RARE_FACTOR >= most
                          for p in ps),
            rare=tuple(p for w, ps in by_range.items() if asked[w] * RARE_FACTOR < most
                       for p in ps),
            once=tuple(once.get(device, ())),
            most_requests=most,
        )  # fmt: skip
    return found


# (protocol, client, server host, server port, unit, table, start, count, function, write):
# plain values, hashed in C (a Peer's hash and equality run in Python, on every request)
_Key = tuple[Protocol, str, str, int, int, str, int, int, str, bool]


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
        self._intervals: dict[tuple[Peer, int], float] | None = None  # until the next request

    def add(self, request: Request) -> None:
        r = request
        key = (r.protocol, r.client, r.server.host, r.server.port, r.unit, r.table, r.start,
               r.count, r.function, r.write)  # fmt: skip
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
        self._intervals = None

    def polled(self) -> list[Polled]:
        """Every range, sorted by server, unit, table, start (then count, client, function)."""
        found = [
            Polled(
                protocol=k[0],
                client=k[1],
                server=Peer(k[2], k[3]),
                unit=k[4],
                table=k[5],
                start=k[6],
                count=k[7],
                function=k[8],
                requests=r.requests,
                interval_s=median(r.gaps) if r.gaps else None,
                write=k[9],
            )
            for k, r in self._ranges.items()
        ]
        return sorted(found, key=lambda p: (p.server, p.unit, p.table, p.start, p.count,
                                            p.client, p.function, p.write))  # fmt: skip

    def interval_s(self, server: Peer, unit: int) -> float | None:
        """The shortest interval a draft may poll this device at: the LONGEST of its regular
        ranges' intervals, where a range's interval is the shortest among the clients that
        read it. So no range a draft reads is asked for more often than the SCADA did. None:
        nothing read twice. (`envelopes` gives what the draft uses, every device's at once.)"""
        if self._intervals is None:
            self._intervals = {}
            for (_, s, u), envelope in envelopes(self.polled()).items():
                found = envelope.interval_s()
                if found is not None:
                    self._intervals[s, u] = max(self._intervals.get((s, u), found), found)
        return self._intervals.get((server, unit))
