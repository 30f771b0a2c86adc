"""Which outsider-caused audit events are written in full, and the count of the rest.

Events anyone on the IT network can cause at will (catalogue.AGGREGATED) are admitted per
interval: the first `per_source` of each (event, source) in full, at most `overall` in full
across all sources together (so many addresses cannot multiply the budget); the rest are
only counted. Once per interval the counts become one summary — by event, and by (event,
source) for the `top_sources` largest, the others summed — which the forwarder writes as
`events_suppressed`. While the audit log is past its capacity warning (the reserve kept for
security events) nothing is admitted in full and an interval lasts `reserve_interval_s`.

Memory is bounded too: at most `tracked` (event, source) pairs are counted apart per
interval; later sources are only summed. This module never writes or logs anything itself
and never blocks: it only counts and decides.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

SOURCE_CHARS = 128  # a source (identity or address) is counted by its beginning


@dataclass(frozen=True)
class Limits:
    interval_s: float = 60.0
    per_source: int = 10  # entries in full per (event, source) per interval
    overall: int = 200  # entries in full per interval, all sources together
    top_sources: int = 20  # (event, source) pairs named in a summary
    tracked: int = 10_000  # (event, source) pairs counted apart per interval
    reserve_interval_s: float = 3600.0  # an interval while the capacity reserve holds


@dataclass
class _Window:
    start: float
    since: str
    reserved: bool
    written: Counter[tuple[str, str]] = field(default_factory=Counter)
    written_total: int = 0
    held: Counter[tuple[str, str]] = field(default_factory=Counter)
    held_by_event: Counter[str] = field(default_factory=Counter)
    untracked: int = 0  # held events of sources beyond `tracked`


class Throttle:
    def __init__(
        self, limits: Limits = Limits(), clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()  # any thread may log
        self._window: _Window | None = None
        self._suppressed: Counter[str] = Counter()

    @property
    def suppressed(self) -> Mapping[str, int]:
        """Events counted instead of written, by event, since start (for /metrics)."""
        with self._lock:
            return dict(self._suppressed)

    def admit(self, event: str, source: str, *, reserved: bool) -> bool:
        """True: write this event in full. False: it has been counted for the summary."""
        with self._lock:
            window = self._window
            if window is None:
                window = self._window = _Window(self._clock(), _now(), reserved)
            window.reserved = window.reserved or reserved
            key = (event, source[:SOURCE_CHARS])
            limits = self.limits
            if (
                not reserved
                and window.written_total < limits.overall
                and window.written[key] < limits.per_source
            ):
                window.written[key] += 1
                window.written_total += 1
                return True
            if key in window.held or len(window.held) < limits.tracked:
                window.held[key] += 1
            else:
                window.untracked += 1
            window.held_by_event[event] += 1
            self._suppressed[event] += 1
            return False

    def summary(self, *, reserved: bool, final: bool = False) -> dict[str, Any] | None:
        """The details of the `events_suppressed` entry due now, if any; the interval then
        starts afresh. `final`: the log is closing, whatever is counted is due."""
        with self._lock:
            window = self._window
            if window is None:
                return None
            length = self.limits.reserve_interval_s if window.reserved else self.limits.interval_s
            lifted = window.reserved and not reserved  # retention made room again
            if not (final or lifted or self._clock() - window.start >= length):
                return None
            self._window = None
            if not window.held_by_event:
                return None
            return self._details(window)

    def _details(self, window: _Window) -> dict[str, Any]:
        ranked = sorted(window.held.items(), key=lambda item: (-item[1], item[0]))
        top = ranked[: self.limits.top_sources]
        rest = ranked[self.limits.top_sources :]
        return {
            "since": window.since,
            "until": _now(),
            "suppressed": sum(window.held_by_event.values()),
            "written": window.written_total,
            "by_event": dict(sorted(window.held_by_event.items())),
            "by_source": [
                {"event": event, "source": source, "count": count} for (event, source), count in top
            ],
            # pairs beyond `tracked` were not told apart: they are in `count`, not `pairs`
            "other_sources": {
                "pairs": len(rest),
                "count": sum(count for _, count in rest) + window.untracked,
            },
            "capacity_reserve": window.reserved,
            "limits": {
                "interval_s": self.limits.interval_s,
                "per_source": self.limits.per_source,
                "overall": self.limits.overall,
            },
        }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
