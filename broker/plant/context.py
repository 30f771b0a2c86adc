"""Operational context added at the edge, from the semantic model of the co-signed policy.

Per asset, at each sample time: its state (the first true state rule), its ambient
snapshot, its load history, its maintenance status, its derived signals, the assessment of
measures against their baselines, the trend of each measure, and the rules that are true,
with their recommended actions. Context comes only from plant-side knowledge (the devices
and the provisioned maintenance file), never from the enterprise side.

The pipeline observes a scan's values first, then refreshes each asset the scan touched
once, then asks for each record's context: every record of a scan carries the state and
alerts of that same scan.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec

from broker.plant.history import TrendLine, Window
from broker.plant.maintenance import MaintenanceBook
from broker.policy import Policy, Signal
from broker.policy.expressions import Evaluator
from broker.policy.model import AssetModel, SemanticModel
from broker.policy.schema import Baseline, duration_s
from broker.records import (
    Alert,
    Assessment,
    Context,
    Load,
    QualityIssue,
    Trend,
    Value,
    WindowStats,
)

STEADY_FRACTION = 0.01  # a change over the trend window under 1 % of the value is "steady"


def _value(value: object) -> Value:
    return value if isinstance(value, bool | int | float | str) else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class _AssetRuntime:
    """What the engine remembers of one asset between scans."""

    def __init__(self, model: AssetModel, maintenance: MaintenanceBook) -> None:
        asset = model.asset
        self.model = model
        self.values: dict[str, object] = {}  # expression name → latest value (None if bad)
        self.measures: dict[str, object] = {}  # own measure → latest value (None if bad)
        self.state = "unknown"
        self._maintenance = maintenance
        window_s = duration_s(asset.trend_window)
        self.trends = {measure: TrendLine(window_s) for measure in model.signals}
        self.load_windows = (
            {w: Window(duration_s(w)) for w in asset.load.windows} if asset.load else {}
        )
        self.assessments: dict[str, Assessment] = {}
        self.base = Context(asset=asset.path, asset_type=asset.type)
        functions: dict[str, Callable[[str], object]] = {
            "deviation": lambda m: _field(self.assessments.get(m), "deviation_pct"),
            "label": lambda m: _field(self.assessments.get(m), "label"),
            "trend": lambda m: self.trends[m].slope_per_h(),
            "load_mean": lambda w: self._load_stats(w)[0],
            "load_max": lambda w: self._load_stats(w)[1],
        }
        self._rule_names: dict[str, object] = {}
        self._states = Evaluator(self.values, {})
        self._rules = Evaluator(self._rule_names, functions)
        self._now = 0.0

    def _load_stats(self, window: str) -> tuple[float | None, float | None]:
        return self.load_windows[window].stats(self._now)

    def refresh(self, now: float) -> list[tuple[Signal, Value]]:
        """Evaluate state, derived signals, assessments and rules; the derived values."""
        self._now = now
        model = self.model
        self.state = self._evaluate_state()
        derived: list[tuple[Signal, Value]] = []
        for signal, expression in model.derived:
            result = _value(self._states.evaluate(expression))
            self.measures[signal.measure] = result
            derived.append((signal, result))
        for measure, baseline in model.baselines.items():
            current = _number(self.measures.get(measure))
            found = self.assess(baseline, current) if current is not None else None
            if found is None:
                self.assessments.pop(measure, None)
            else:
                self.assessments[measure] = found
        maintenance = self._maintenance.status(model.path)
        self._rule_names.clear()
        self._rule_names.update(self.values)
        self._rule_names.update(self.measures)
        self._rule_names.update(
            state=self.state,
            maintenance=maintenance.status,
            open_work_orders=len(maintenance.open_work_orders),
        )
        alerts = [
            Alert(
                rule=rule.name,
                severity=rule.severity,
                message=rule.alert,
                action=rule.action,
                outcome=rule.outcome,
            )
            for rule, expression in model.rules
            if self._rules.evaluate(expression) is True
        ]
        load = model.asset.load
        self.base = msgspec.structs.replace(
            self.base,
            asset_state=self.state,
            ambient={name: _value(self.values.get(name)) for name in model.asset.ambient},
            load=Load(
                signal=load.signal,
                windows={
                    w: WindowStats(mean=mean, max=peak)
                    for w, (mean, peak) in ((w, self._load_stats(w)) for w in load.windows)
                },
            )
            if load is not None
            else None,
            maintenance=maintenance,
            alerts=alerts,
        )
        return derived

    def _evaluate_state(self) -> str:
        for state, expression in self.model.states:
            result = self._states.evaluate(expression)
            if result is None:
                return "unknown"  # an input is missing or bad: do not guess
            if result:
                return state
        return self.model.asset.otherwise if self.model.states else "unknown"

    def assess(self, baseline: Baseline, value: float) -> Assessment | None:
        if baseline.states and self.state not in baseline.states:
            return None
        ambient = _number(self.values.get(baseline.ambient))
        load = _number(self.values.get("load")) if baseline.load_points else 0.0
        if ambient is None or load is None:
            return None
        expected = _expected(baseline, ambient, load)
        if expected == 0:
            return None
        deviation = (value - expected) / abs(expected) * 100
        worse = {"higher": deviation, "lower": -deviation, "both": abs(deviation)}[baseline.worse]
        label: Literal["expected", "below_expected", "abnormal"]
        if worse >= baseline.abnormal_pct:
            label = "abnormal"
        elif worse >= baseline.below_expected_pct:
            label = "below_expected"
        else:
            label = "expected"
        return Assessment(
            expected=round(expected, 6), deviation_pct=round(deviation, 2), label=label
        )

    def trend(self, measure: str, value: float) -> Trend | None:
        slope = self.trends[measure].slope_per_h()
        if slope is None:
            return None
        window = self.model.asset.trend_window
        change = slope * duration_s(window) / 3600
        direction: Literal["rising", "falling", "steady"]
        if abs(change) < STEADY_FRACTION * abs(value):
            direction = "steady"
        else:
            direction = "rising" if change > 0 else "falling"
        return Trend(slope_per_h=round(slope, 6), direction=direction, window=window)


def _field(assessment: Assessment | None, name: str) -> object:
    return None if assessment is None else getattr(assessment, name)


def _interpolate(points: Sequence[float], values: Sequence[float], x: float) -> float:
    """Piecewise-linear through (points, values), clamped at both ends."""
    if x <= points[0]:
        return values[0]
    if x >= points[-1]:
        return values[-1]
    i = bisect_right(points, x) - 1
    share = (x - points[i]) / (points[i + 1] - points[i])
    return values[i] + share * (values[i + 1] - values[i])


def _expected(baseline: Baseline, ambient: float, load: float) -> float:
    by_ambient = [
        _interpolate(baseline.ambient_points, [row[j] for row in baseline.expected], ambient)
        for j in range(len(baseline.expected[0]))
    ]
    if not baseline.load_points:
        return by_ambient[0]
    return _interpolate(baseline.load_points, by_ambient, load)


class ContextEngine:
    def __init__(self, policy: Policy, maintenance: MaintenanceBook) -> None:
        self._assets = {
            model.path: _AssetRuntime(model, maintenance) for model in SemanticModel(policy)
        }
        # signal path → (asset, name) pairs that read it: its own asset, ambient, load
        self._readers: dict[str, list[tuple[_AssetRuntime, str]]] = {}
        for runtime in self._assets.values():
            for name, path in runtime.model.inputs.items():
                self._readers.setdefault(path, []).append((runtime, name))
        self._own = {
            signal.path: (runtime, measure)
            for runtime in self._assets.values()
            for measure, signal in runtime.model.signals.items()
        }

    def observe(self, path: str, value: Value, t: float) -> None:
        """Take note of a value (None when bad) at time `t` (seconds)."""
        number = _number(value)
        for runtime, name in self._readers.get(path, ()):
            runtime.values[name] = value
            if name == "load" and number is not None:
                for window in runtime.load_windows.values():
                    window.add(t, number)
        own = self._own.get(path)
        if own is not None:
            runtime, measure = own
            runtime.measures[measure] = value
            if number is not None:
                runtime.trends[measure].add(t, number)

    def refresh(self, assets: set[str], now: float) -> list[tuple[Signal, Value]]:
        """Re-evaluate these assets; the derived signals' new values, observed already."""
        derived: list[tuple[Signal, Value]] = []
        for path in assets:
            for signal, value in self._assets[path].refresh(now):
                self.observe(signal.path, value, now)
                derived.append((signal, value))
        return derived

    def context_for(self, path: str, value: Value, issues: list[QualityIssue]) -> Context:
        runtime, measure = self._own[path]
        number = _number(value)
        baseline = runtime.model.baselines.get(measure)
        assessment = runtime.assess(baseline, number) if baseline and number is not None else None
        trend = runtime.trend(measure, number) if number is not None else None
        if assessment is None and trend is None and not issues:
            return runtime.base
        return msgspec.structs.replace(
            runtime.base, assessment=assessment, trend=trend, quality_issues=issues
        )

    def asset_of(self, path: str) -> str:
        return self._own[path][0].model.path
