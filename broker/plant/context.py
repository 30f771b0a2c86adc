"""Operational context added at the edge, from the semantic model of the co-signed policy.

Per asset, at each sample time: its state (the first true state rule), its ambient
snapshot, its load history, its maintenance status, its derived signals, the assessment of
measures against their baselines, the trend of each measure, and the rules that are true,
with their recommended actions. Context comes only from plant-side knowledge (the devices
and the provisioned maintenance file), never from the enterprise side. Every number it
computes is rounded to the precision the policy compiler decided for it
(broker/policy/precision.py): float noise never leaves the plant half.

The pipeline observes a scan's values first, then refreshes each asset the scan touched
once, then asks for each record's context: every record of a scan carries the state and
alerts of that same scan.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from broker.plant.history import TrendLine, Window
from broker.plant.maintenance import MaintenanceBook
from broker.policy import Policy, Signal
from broker.policy.expressions import Evaluator
from broker.policy.model import AssetModel, SemanticModel
from broker.policy.precision import Precision, Precisions, expected_precision
from broker.policy.schema import Baseline, duration_s
from broker.records import (
    Alert,
    Assessment,
    AssessmentLabel,
    Context,
    Load,
    Quality,
    QualityIssue,
    Trend,
    Value,
    WindowStats,
)

STEADY_FRACTION = 0.01  # a change over the trend window under 1 % of the value is "steady"
_SMALLEST_INT, _LARGEST_INT = -(2**63), 2**64 - 1  # what a record's integer can hold
_EXACT = 2.0**53  # beyond it a float has no decimals left to round


def _value(value: object) -> Value:
    """An expression's result as a value: None unless a bool, text, finite number or an
    integer a record can hold (arithmetic on 64-bit meters can go beyond)."""
    if type(value) is float:
        return value if math.isfinite(value) else None
    if type(value) is int:
        return value if _SMALLEST_INT <= value <= _LARGEST_INT else None
    return value if isinstance(value, bool | str) else None


def _rounded(x: float, factor: float) -> float:
    """round(x * factor) / factor: as round(x, n) but on rare ties in the last digit, and 6x
    faster; a number too large for decimals is kept as it is (x * factor could overflow)."""
    return round(x * factor) / factor if -_EXACT < x < _EXACT else x


def _number(value: object) -> float | None:
    """The value if it is a number (a bool is not)."""
    return value if type(value) is float or type(value) is int else None


class _AssetRuntime:
    """What the engine remembers of one asset between scans."""

    def __init__(
        self, model: AssetModel, maintenance: MaintenanceBook, precisions: Precisions
    ) -> None:
        asset = model.asset
        self.model = model
        precision = {m: precisions[s.path] for m, s in model.signals.items()}
        # A slope to one decimal finer than a change of the values' last digit over the window.
        window_h = duration_s(asset.trend_window) / 3600
        finer = 1 + math.ceil(math.log10(window_h))
        self._slope_precision = {m: p.finer(finer) for m, p in precision.items()}
        self._expected_precision = {
            m: expected_precision(precision[m], [v for row in baseline.expected for v in row])
            for m, baseline in model.baselines.items()
        }
        self._derived = [
            (signal, expression, precisions[signal.path].round)
            for signal, expression in model.derived
        ]
        # Every name the asset's expressions read → its latest value (None if bad): its
        # measures (derived ones too), its ambient names, `load`, and the rules' `state`,
        # `maintenance` and `open_work_orders`. One mapping, because the policy compiler
        # keeps these names apart (docs/model.md) and each expression reads only its own.
        self.names: dict[str, Value] = {}
        self.state = "unknown"
        self._maintenance = maintenance
        window_s = duration_s(asset.trend_window)
        self._trend_window_h = window_s / 3600
        self.trends = {measure: TrendLine(window_s) for measure in model.signals}
        # A mean to one decimal finer than the load's values; a max is one of them.
        mean = precisions[asset.load.signal].finer(1) if asset.load else Precision()
        self.load_windows = (
            {w: Window(duration_s(w), mean) for w in asset.load.windows} if asset.load else {}
        )
        self.assessments: dict[str, Assessment] = {}
        self.base = Context(asset=asset.path, asset_type=asset.type)
        # Bound methods, not lambdas: half the memory, for every asset
        functions: dict[str, Callable[[str], object]] = {
            "deviation": self._deviation,
            "label": self._label,
            "direction": self._direction,
            "trend": self._slope,
            "load_mean": self._load_mean,
            "load_max": self._load_max,
        }
        self._now = 0.0  # the time of the latest refresh: what trends are as of
        self._load: dict[str, WindowStats] = {}  # as of the refresh; never changed after
        # measure → (generation, valid until, trend): made once per bucket, not per record
        # (the line too, so that a trend still valid costs one lookup)
        self._trend_of: dict[str, tuple[TrendLine, int, float, Trend | None]] = {}
        self._alerts = [  # each rule's alert, made once: only whether it is active changes
            (
                Alert(
                    rule=rule.name,
                    severity=rule.severity,
                    message=rule.alert,
                    action=rule.action,
                    outcome=rule.outcome,
                ),
                expression,
            )
            for rule, expression in model.rules
        ]
        self._expressions = Evaluator(self.names, functions)

    # The expressions' functions of a measure `m` or a load window `w`

    # (each reads its field itself: rules call them for every asset at every scan)

    def _deviation(self, m: str) -> object:
        found = self.assessments.get(m)
        return None if found is None else found.deviation_pct

    def _label(self, m: str) -> object:
        found = self.assessments.get(m)
        return None if found is None else found.label

    def _direction(self, m: str) -> object:
        found = self.assessments.get(m)
        return None if found is None else found.direction

    def _slope(self, m: str) -> object:
        found = self.trend(m)
        return None if found is None else found.slope_per_h  # as records show it

    def _load_mean(self, w: str) -> object:
        return self._load[w].mean

    def _load_max(self, w: str) -> object:
        return self._load[w].max

    def refresh(self, now: float) -> list[tuple[Signal, Value]]:
        """Evaluate state, derived signals, assessments and rules; the derived values."""
        model, names, evaluate = self.model, self.names, self._expressions.evaluate
        self._now = now
        self._load = {w: window.stats(now) for w, window in self.load_windows.items()}  # shared
        self.state = self._evaluate_state()
        derived: list[tuple[Signal, Value]] = []
        for signal, expression, rounded in self._derived:
            result = _value(evaluate(expression))
            if type(result) is float:
                result = rounded(result)
            names[signal.measure] = result
            derived.append((signal, result))
        for measure, baseline in model.baselines.items():
            current = _number(names.get(measure))
            found = self.assess(baseline, current) if current is not None else None
            if found is None:
                self.assessments.pop(measure, None)
            else:
                self.assessments[measure] = found
        maintenance = self._maintenance.status(model.path)
        names["state"] = self.state
        names["maintenance"] = maintenance.status
        names["open_work_orders"] = len(maintenance.open_work_orders)
        load = model.asset.load
        self.base = Context(
            asset=model.path,
            asset_type=model.asset.type,
            asset_state=self.state,
            ambient={name: names.get(name) for name in model.asset.ambient},
            load=Load(signal=load.signal, windows=self._load) if load is not None else None,
            maintenance=maintenance,
            alerts=[alert for alert, expression in self._alerts if evaluate(expression) is True],
        )
        return derived

    def _evaluate_state(self) -> str:
        for state, expression in self.model.states:
            result = self._expressions.evaluate(expression)
            if result is None:
                return "unknown"  # an input is missing or bad: do not guess
            if result:
                return state
        return self.model.asset.otherwise if self.model.states else "unknown"

    def assessment_of(self, measure: str, value: float) -> Assessment | None:
        """The refresh's assessment when `value` is the one it assessed, else a new one."""
        baseline = self.model.baselines.get(measure)
        if baseline is None:
            return None
        if value is self.names.get(measure):
            return self.assessments.get(measure)
        return self.assess(baseline, value)

    def assess(self, baseline: Baseline, value: float) -> Assessment | None:
        if baseline.states and self.state not in baseline.states:
            return None
        ambient = _number(self.names.get(baseline.ambient))
        load = _number(self.names.get("load")) if baseline.load_points else 0.0
        if ambient is None or load is None:
            return None
        exact = _expected(baseline, ambient, load)
        expected = self._expected_precision[baseline.measure].round(exact)
        # From `expected` as shown, so that the deviation is the one a reader works out;
        # from the exact value when that rounds to 0 (only an exact 0 has no deviation).
        against = expected or exact
        if against == 0:
            return None
        deviation = (value - against) / abs(against) * 100
        if not math.isfinite(deviation):  # a table or value near the float limits
            return None
        # The label from the deviation as shown: 10.0 % is drifting when drifting_pct is 10,
        # though the float division said 9.999999999999996.
        shown = _rounded(deviation, 100)
        worse = (
            shown
            if baseline.worse == "higher"
            else -shown
            if baseline.worse == "lower"
            else abs(shown)
        )
        label: AssessmentLabel
        if worse >= baseline.abnormal_pct:
            label = "abnormal"
        elif worse >= baseline.drifting_pct:
            label = "drifting"
        else:
            label = "expected"
        return Assessment(
            expected=expected,
            deviation_pct=shown,
            label=label,
            direction="above" if shown > 0 else "below" if shown < 0 else None,
        )

    def trend(self, measure: str) -> Trend | None:
        """The measure's trend, made once per trend bucket and shared by its records."""
        cached = self._trend_of.get(measure)
        if cached is not None and cached[1] == cached[0].generation and self._now < cached[2]:
            return cached[3]
        line = self.trends[measure]
        slope = line.slope_per_h(self._now)  # drops what the window has left behind
        found = None
        if slope is not None:
            shown = self._slope_precision[measure].round(slope)
            change = shown * self._trend_window_h  # the direction of the slope as shown
            direction: Literal["rising", "falling", "steady"]
            if change == 0 or abs(change) < STEADY_FRACTION * abs(line.level()):
                direction = "steady"
            else:
                direction = "rising" if change > 0 else "falling"
            found = Trend(
                slope_per_h=shown,
                direction=direction,
                window=self.model.asset.trend_window,
            )
        self._trend_of[measure] = (line, line.generation, line.changes_at(), found)
        return found


def _segment(points: Sequence[float], x: float) -> tuple[int, int, float]:
    """The points either side of x and x's share of the way between them; clamped at both
    ends (the same point twice)."""
    last = len(points) - 1
    if x <= points[0]:
        return 0, 0, 0.0
    if x >= points[last]:
        return last, last, 0.0
    above = bisect_right(points, x)
    below = above - 1
    return below, above, (x - points[below]) / (points[above] - points[below])


def _expected(baseline: Baseline, ambient: float, load: float) -> float:
    """Piecewise-linear over ambient, and over load when the table has a load axis."""
    rows = baseline.expected  # rows[i][j]: at ambient_points[i] and load_points[j]
    below, above, share = _segment(baseline.ambient_points, ambient)
    if baseline.load_points:
        left, right, load_share = _segment(baseline.load_points, load)
        low, high = rows[below], rows[above]
        at_low = low[left] + load_share * (low[right] - low[left])
        at_high = high[left] + load_share * (high[right] - high[left])
    else:
        at_low, at_high = rows[below][0], rows[above][0]
    return at_low + share * (at_high - at_low)


@dataclass(slots=True)
class _Observer:
    """Where one signal's values go, worked out once: the names of the assets that read it
    (its own, or as ambient or load), the histories it feeds (the load windows, its own
    asset's trend). Tuples, the empty one shared: there is one observer per modelled signal."""

    writes: tuple[tuple[dict[str, Value], str], ...]
    histories: tuple[Window | TrendLine, ...] = ()
    asset: str | None = None  # its own asset when modelled: refreshed after the scan


def _histories(
    windows: tuple[Window, ...], own: tuple[TrendLine, str] | None
) -> tuple[tuple[Window | TrendLine, ...], str | None]:
    """A signal's histories (load windows, then its trend when modelled) and its asset."""
    if own is None:
        return windows, None
    trend, asset = own
    return (*windows, trend), asset


class ContextEngine:
    """Keeps the modelled assets (declared in `assets`, or with derived signals); a signal
    of any other asset carries only its asset's path, and costs no more than that."""

    def __init__(self, policy: Policy, maintenance: MaintenanceBook) -> None:
        declared = {a.path for a in policy.assets}
        semantic = SemanticModel(policy)
        self._assets = {
            model.path: _AssetRuntime(model, maintenance, semantic.precisions)
            for model in semantic
            if model.path in declared or model.derived
        }
        self._plain = {
            s.path: Context(asset=s.asset) for s in policy.signals if s.asset not in self._assets
        }
        writes: dict[str, list[tuple[dict[str, Value], str]]] = {}
        windows: dict[str, tuple[Window, ...]] = {}
        own: dict[str, tuple[TrendLine, str]] = {}  # path → its trend and asset
        for runtime in self._assets.values():
            model = runtime.model
            for name, path in model.inputs.items():  # its own measures, ambient, load
                writes.setdefault(path, []).append((runtime.names, name))
                if name == "load":
                    windows[path] = (*windows.get(path, ()), *runtime.load_windows.values())
            for measure, signal in model.signals.items():
                observed = writes.setdefault(signal.path, [])
                if model.inputs.get(measure) != signal.path:  # derived: not an input
                    observed.append((runtime.names, measure))
                own[signal.path] = runtime.trends[measure], model.path
        self._observers = {
            path: _Observer(tuple(written), *_histories(windows.get(path, ()), own.get(path)))
            for path, written in writes.items()
        }
        # path → its asset, its measure, and whether that has a baseline to be assessed by
        self._own = {
            signal.path: (runtime, measure, measure in runtime.model.baselines)
            for runtime in self._assets.values()
            for measure, signal in runtime.model.signals.items()
        }

    def observe(self, path: str, value: Value, quality: Quality, t: float) -> str | None:
        """Take note of a value (None when bad) at time `t` (seconds): expressions read it
        unless bad, history (load windows, trends) keeps it only when good. The path of its
        asset, None when that asset is not modelled (nothing to refresh)."""
        observer = self._observers.get(path)
        if observer is None:
            return None
        for names, name in observer.writes:
            names[name] = value
        if quality == "good" and (type(value) is float or type(value) is int):  # not bool
            for history in observer.histories:
                history.add(t, value)
        return observer.asset

    def refresh(self, assets: set[str], now: float) -> list[tuple[Signal, Value]]:
        """Re-evaluate these assets; the derived signals' new values, for the caller to
        check and observe."""
        return [derived for path in assets for derived in self._assets[path].refresh(now)]

    def context_for(self, path: str, value: Value, issues: list[QualityIssue]) -> Context:
        own = self._own.get(path)
        if own is None:
            plain = self._plain[path]
            return msgspec.structs.replace(plain, quality_issues=issues) if issues else plain
        runtime, measure, assessed = own
        if type(value) is float or type(value) is int:  # bool is not a number here
            assessment = runtime.assessment_of(measure, value) if assessed else None
            trend = runtime.trend(measure)
            if assessment is None and trend is None and not issues:
                return runtime.base
        elif not issues:
            return runtime.base
        else:
            assessment = trend = None
        return msgspec.structs.replace(
            runtime.base, assessment=assessment, trend=trend, quality_issues=issues
        )
