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


@dataclass
class SignalStats:
    samples: int = 0
    by_quality: Counter[str] = field(default_factory=Counter)
    failed_checks: Counter[str] = field(default_factory=Counter)
    last_s: float | None = None
    longest_gap_s: float = 0.0


@dataclass
class _Memory:
    previous: float | None = None
    previous_s: float = 0.0
    unchanged_since_s: float = 0.0
    changes: deque[float] = field(default_factory=lambda: deque(maxlen=NOISE_SAMPLES))


class QualityChecks:
    def __init__(self, signals: list[Signal]) -> None:
        self._signals = {s.path: s for s in signals}
        self._flatline_s = {
            s.path: duration_s(s.checks.flatline) for s in signals if s.checks.flatline
        }
        self._checked = frozenset(
            s.path
            for s in signals
            if s.range is not None
            or s.checks.flatline
            or s.checks.max_rate_per_s is not None
            or s.checks.max_noise is not None
        )  # the hot path skips the others at once
        self._memory: dict[str, _Memory] = {}
        self.stats: dict[str, SignalStats] = {s.path: SignalStats() for s in signals}

    def check(self, path: str, value: Value, t: float) -> list[QualityIssue]:
        """The checks a good numeric value fails; other values are not judged."""
        if (
            path not in self._checked
            or isinstance(value, bool)
            or not isinstance(value, int | float)
        ):
            return []
        signal = self._signals[path]
        issues: list[QualityIssue] = []
        valid = signal.range
        if valid is not None and not valid.min <= value <= valid.max:
            issues.append(
                QualityIssue(
                    check="out_of_range",
                    detail=f"{value:g} outside the valid range {valid.min:g} to {valid.max:g}",
                )
            )
        memory = self._memory.get(path)
        if memory is None:
            memory = self._memory[path] = _Memory(unchanged_since_s=t)
        if memory.previous is not None:
            issues.extend(self._against_previous(signal, memory, value, t))
        memory.previous, memory.previous_s = value, t
        return issues or NO_ISSUES

    def _against_previous(
        self, signal: Signal, memory: _Memory, value: float, t: float
    ) -> list[QualityIssue]:
        assert memory.previous is not None
        issues: list[QualityIssue] = []
        change = value - memory.previous
        elapsed = t - memory.previous_s
        limit = signal.checks.max_rate_per_s
        if limit is not None and elapsed > 0 and abs(change) / elapsed > limit:
            issues.append(
                QualityIssue(
                    check="spike",
                    detail=f"changed {abs(change) / elapsed:g}/s, above the limit {limit:g}/s",
                )
            )
        if change != 0:
            memory.unchanged_since_s = t
        flatline = self._flatline_s.get(signal.path)
        if flatline is not None and t - memory.unchanged_since_s >= flatline:
            issues.append(
                QualityIssue(
                    check="flatline",
                    detail=f"unchanged for {t - memory.unchanged_since_s:.0f} s "
                    f"(limit {signal.checks.flatline})",
                )
            )
        memory.changes.append(change)
        noise = signal.checks.max_noise
        if noise is not None and len(memory.changes) == NOISE_SAMPLES:
            spread = statistics.pstdev(memory.changes)
            if spread > noise:
                issues.append(
                    QualityIssue(
                        check="noise",
                        detail=f"successive changes spread {spread:g}, above {noise:g}",
                    )
                )
        return issues

    def tally(self, path: str, quality: Quality, issues: list[QualityIssue], t: float) -> None:
        stats = self.stats[path]
        stats.samples += 1
        stats.by_quality[quality] += 1
        if issues:
            stats.failed_checks.update(issue.check for issue in issues)
        if stats.last_s is not None and t - stats.last_s > stats.longest_gap_s:
            stats.longest_gap_s = t - stats.last_s
        stats.last_s = t
