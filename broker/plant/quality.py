"""Continuous data-quality checks per signal, and the tallies `validate` and /metrics read.

Per value: out of the model's valid range, a spike (faster than `max_rate_per_s`), a
flatline (unchanged for `flatline`), noise (the spread of successive changes above
`max_noise`). A failed check turns a `good` value `uncertain` and says why in the record.
Per signal over time: how many values arrived and of what quality, which checks failed,
and the longest silence (completeness and staleness).
"""

from __future__ import annotations

import statistics
from collections import Counter, deque
from dataclasses import dataclass, field

from broker.policy import Signal
from broker.policy.schema import duration_s
from broker.records import Quality, QualityIssue, Value

NOISE_SAMPLES = 20
NO_ISSUES: list[QualityIssue] = []  # shared, never changed: most values pass every check
# Shared, never changed: a signal's own Counter comes with its first failed check (most
# signals never fail one, and 100,000 empty Counters are 9 MB).
_NOTHING_FAILED: Counter[str] = Counter()


@dataclass(slots=True)
class SignalStats:
    by_quality: dict[str, int] = field(default_factory=dict)  # a plain dict: tallied per value
    failed_checks: Counter[str] = field(default_factory=Counter)
    last_s: float | None = None
    longest_gap_s: float = 0.0

    @property
    def samples(self) -> int:
        return sum(self.by_quality.values())


class _SignalChecks:
    """One signal's checks, and what they remember of its previous value."""

    __slots__ = (
        "changes",
        "flatline",
        "flatline_s",
        "max_noise",
        "max_rate",
        "previous",
        "previous_s",
        "range",
        "remembers",
        "unchanged_since_s",
    )

    def __init__(self, signal: Signal) -> None:
        checks = signal.checks
        self.range = signal.range
        self.max_rate = checks.max_rate_per_s
        self.flatline = checks.flatline
        self.flatline_s = duration_s(checks.flatline) if checks.flatline else None
        self.max_noise = checks.max_noise
        # a range needs only the value itself; the other checks compare it with the last one
        self.remembers = bool(checks.flatline) or (
            self.max_rate is not None or self.max_noise is not None
        )
        self.previous: float | None = None
        self.previous_s = 0.0
        self.unchanged_since_s = 0.0
        # the last changes, for the noise check alone: most signals have none to keep
        self.changes: deque[float] | None = (
            None if self.max_noise is None else deque(maxlen=NOISE_SAMPLES)
        )

    def check(self, value: float, t: float) -> list[QualityIssue]:
        valid = self.range
        if valid is not None and not valid.min <= value <= valid.max:
            issues = [
                QualityIssue(
                    check="out_of_range",
                    detail=f"{value:g} outside the valid range {valid.min:g} to {valid.max:g}",
                )
            ]
        elif not self.remembers:
            return NO_ISSUES  # in range, and nothing to compare: no list made per value
        else:
            issues = []
        if self.remembers:
            if self.previous is None:
                self.unchanged_since_s = t
            else:
                self._against_previous(value, t, issues)
            self.previous, self.previous_s = value, t
        return issues or NO_ISSUES

    def _against_previous(self, value: float, t: float, issues: list[QualityIssue]) -> None:
        assert self.previous is not None
        change = value - self.previous
        elapsed = t - self.previous_s
        limit = self.max_rate
        if limit is not None and elapsed > 0 and abs(change) / elapsed > limit:
            issues.append(
                QualityIssue(
                    check="spike",
                    detail=f"changed {abs(change) / elapsed:g}/s, above the limit {limit:g}/s",
                )
            )
        if change != 0:
            self.unchanged_since_s = t
        if self.flatline_s is not None and t - self.unchanged_since_s >= self.flatline_s:
            issues.append(
                QualityIssue(
                    check="flatline",
                    detail=f"unchanged for {t - self.unchanged_since_s:.0f} s "
                    f"(limit {self.flatline})",
                )
            )
        changes, noise = self.changes, self.max_noise
        if changes is None or noise is None:
            return
        changes.append(change)
        if len(changes) == NOISE_SAMPLES:
            spread = statistics.pstdev(changes)
            if spread > noise:
                issues.append(
                    QualityIssue(
                        check="noise",
                        detail=f"successive changes spread {spread:g}, above {noise:g}",
                    )
                )


class QualityChecks:
    def __init__(self, signals: list[Signal]) -> None:
        self._checks = {  # only the signals with checks: the hot path skips the others at once
            s.path: _SignalChecks(s)
            for s in signals
            if s.range is not None
            or s.checks.flatline
            or s.checks.max_rate_per_s is not None
            or s.checks.max_noise is not None
        }
        # the signals `check` judges (a view: no copy): a caller may skip it for the others
        self.checked = self._checks.keys()
        self.stats: dict[str, SignalStats] = {
            s.path: SignalStats(failed_checks=_NOTHING_FAILED) for s in signals
        }

    def check(self, path: str, value: Value, t: float) -> list[QualityIssue]:
        """The checks a good numeric value fails; other values are not judged."""
        checks = self._checks.get(path)
        if checks is None or not (type(value) is float or type(value) is int):  # bool is not
            return NO_ISSUES
        return checks.check(value, t)

    def tally(self, path: str, quality: Quality, issues: list[QualityIssue], t: float) -> None:
        stats = self.stats[path]
        counts = stats.by_quality
        counts[quality] = counts.get(quality, 0) + 1
        if issues:
            if stats.failed_checks is _NOTHING_FAILED:
                stats.failed_checks = Counter()
            stats.failed_checks.update(issue.check for issue in issues)
        last = stats.last_s
        if last is not None and t - last > stats.longest_gap_s:
            stats.longest_gap_s = t - last
        stats.last_s = t
