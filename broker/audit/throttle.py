"""Which repeatable audit events are written in full, and the count of the rest.

Events a source can cause over and over (catalogue.AGGREGATED on the IT side,
catalogue.DEVICE_AGGREGATED on the plant side) are admitted per interval: the first
`per_source` of each (event, source) in full, the rest only counted. Sources are of three
kinds, and each kind has its own overall budget of `overall` entries in full per interval,
so that no kind can use up another's:

- `address`: only a remote address (failed handshakes; anyone on the IT network, from as
  many addresses as he likes — the overall budget is what stops him multiplying his own);
- `identity`: a certificate of the site CA (a consumer identity, or the serial of a
  certificate that names none); as many as the CA issued, so a summary names every one;
- `device`: a device of the appliance config (a flapping signal, a session going up and
  down, scans overrunning under jitter).

The first entry of each (event, device) in an interval is written in full whatever the
devices' overall budget says: two or three hostile devices (an outstation toggling its
indications, a device refusing every other request) use that budget up, and a good device's
`device_session_down` must still be read in the log, not only counted in a summary — no
device may hide another's record. Devices, unlike addresses, are a set the config bounds and
an attacker cannot multiply; at most `tracked` pairs per interval get this first entry.
Their repeats compete for the overall budget as before, and the capacity reserve still holds
back even a first entry.

A `trust` event (a refusal because of the certificate itself: revoked, no usable identity)
is never crowded out: the first `per_source` per (event, source) and interval are written
whatever the overall budgets and the capacity reserve say. Only its own source's repeats
beyond that are counted, which keeps a revoked certificate from flooding the log.

Once per interval the counts become one summary, which the forwarder writes as
`events_suppressed`: by event, by kind, and by (event, source) — every identity and device
pair up to `named` per kind, the `top_sources` largest address pairs, the others summed per
kind under `other_sources`. While the audit log is in its capacity reserve nothing but
trust events is admitted in full and an interval lasts `reserve_interval_s`.

Memory is bounded: at most `tracked` (event, source) pairs per kind are counted apart per
interval, later ones only summed; and a device pair's first entry is written beyond the
budget only while fewer than `tracked` pairs were. This module never writes or logs anything itself and
never blocks: it only counts and decides.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from broker.audit.entry import timestamp

SOURCE_CHARS = 128  # a source (identity, address or device) is counted by its beginning


class Kind(StrEnum):
    ADDRESS = "address"
    IDENTITY = "identity"
    DEVICE = "device"


_NAMED_IN_FULL = (Kind.IDENTITY, Kind.DEVICE)  # bounded by the CA and by the config
# Kinds whose sources the config bounds: each pair's first entry per interval is written
# beyond the overall budget, so no source can hide another's event.
_FIRST_IN_FULL = (Kind.DEVICE,)


@dataclass(frozen=True)
class Limits:
    interval_s: float = 60.0
    per_source: int = 10  # entries in full per (event, source) per interval
    overall: int = 200  # entries in full per interval, per kind of source
    top_sources: int = 20  # address pairs named in a summary
    named: int = 200  # identity pairs, and device pairs, named in a summary
    tracked: int = 10_000  # (event, source) pairs counted apart per interval and kind
    reserve_interval_s: float = 3600.0  # an interval while the capacity reserve holds


_Pair = tuple[str, str]  # (event, source)


@dataclass
class _Window:
    start: float
    since: str
    reserved: bool
    written: Counter[tuple[str, Kind, str, bool]] = field(default_factory=Counter)
    written_by_kind: Counter[Kind] = field(default_factory=Counter)
    pairs_written: Counter[Kind] = field(default_factory=Counter)  # pairs with one in full
    held: dict[Kind, Counter[_Pair]] = field(default_factory=dict)
    held_by_event: Counter[str] = field(default_factory=Counter)
    untracked: Counter[Kind] = field(default_factory=Counter)  # held beyond `tracked`


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

    def admit(
        self, event: str, source: str, kind: Kind, *, reserved: bool, trust: bool = False
    ) -> bool:
        """True: write this event in full. False: it has been counted for the summary."""
        with self._lock:
            window = self._window
            if window is None:
                window = self._window = _Window(self._clock(), timestamp(), reserved)
            window.reserved = window.reserved or reserved
            source = source[:SOURCE_CHARS]
            limits = self.limits
            key = (event, kind, source, trust)
            first = window.written[key] == 0
            if window.written[key] < limits.per_source and (
                trust or (not reserved and self._within_budget(window, kind, first=first))
            ):
                window.written[key] += 1
                window.written_by_kind[kind] += 1
                window.pairs_written[kind] += first
                return True
            held = window.held.setdefault(kind, Counter())
            if (event, source) in held or len(held) < limits.tracked:
                held[(event, source)] += 1
            else:
                window.untracked[kind] += 1
            window.held_by_event[event] += 1
            self._suppressed[event] += 1
            return False

    def _within_budget(self, window: _Window, kind: Kind, *, first: bool) -> bool:
        """The kind's overall budget admits it, or it is a device pair's first entry (while
        fewer than `tracked` pairs were written, which bounds the memory it takes)."""
        limits = self.limits
        if window.written_by_kind[kind] < limits.overall:
            return True
        return first and kind in _FIRST_IN_FULL and window.pairs_written[kind] < limits.tracked

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
        named: list[dict[str, Any]] = []
        others: dict[str, dict[str, int]] = {}
        by_kind: dict[str, int] = {}
        for kind in Kind:
            held = window.held.get(kind, Counter())
            ranked = sorted(held.items(), key=lambda item: (-item[1], item[0]))
            cap = self.limits.named if kind in _NAMED_IN_FULL else self.limits.top_sources
            named += [
                {"event": event, "kind": str(kind), "source": source, "count": count}
                for (event, source), count in ranked[:cap]
            ]
            rest = ranked[cap:]
            # pairs beyond `tracked` were not told apart: they are in `count`, not `pairs`
            if rest or window.untracked[kind]:
                others[str(kind)] = {
                    "pairs": len(rest),
                    "count": sum(count for _, count in rest) + window.untracked[kind],
                }
            total = sum(held.values()) + window.untracked[kind]
            if total:
                by_kind[str(kind)] = total
        return {
            "since": window.since,
            "until": timestamp(),
            "suppressed": sum(window.held_by_event.values()),
            "written": sum(window.written_by_kind.values()),
            "by_event": dict(sorted(window.held_by_event.items())),
            "by_kind": by_kind,
            "by_source": named,
            "other_sources": others,
            "capacity_reserve": window.reserved,
            "limits": {
                "interval_s": self.limits.interval_s,
                "per_source": self.limits.per_source,
                "overall": self.limits.overall,
            },
        }
