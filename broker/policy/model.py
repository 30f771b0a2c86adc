"""The semantic model compiled: per asset, the names its expressions may use and the
expressions themselves, checked once when the policy loads.

Names an asset's expressions read (docs/model.md):
- its measures: the last path segment of each of its signals (`motor_power`), derived ones
  included for baselines and rules;
- its `ambient` names and `load` (the load signal's current value);
- in rules only: `state`, `maintenance` (ok, due, overdue, unknown), `open_work_orders`,
  and the functions `deviation(m)`, `label(m)`, `direction(m)` (for measures with a
  baseline), `trend(m)` (slope per hour), `load_mean(w)`, `load_max(w)` (for the load's
  windows).

A rule comparing `state`, `maintenance`, `label(m)` or `direction(m)` with a word they can
never take (`label('p') == 'below_expected'`) could never fire: it is refused, naming the
words they take. Every signal's precision (broker/policy/precision.py) is decided here too.

A published value's context must not carry what is still proposed: everything an asset's
states, ambient, load, baselines and rules read, and every input of an approved derived
signal, must be an approved signal.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import get_args

from broker.policy.expressions import Expression, ExpressionError, compile_expression
from broker.policy.precision import Precisions
from broker.policy.schema import Asset, Baseline, DerivedSource, Policy, Rule, Signal
from broker.records import AssessmentDirection, AssessmentLabel, MaintenanceStatus

RULE_NAMES = frozenset({"state", "maintenance", "open_work_orders"})
LABELS = frozenset(get_args(AssessmentLabel))
DIRECTIONS = frozenset(get_args(AssessmentDirection))
MAINTENANCE = frozenset(get_args(MaintenanceStatus))


@dataclass
class AssetModel:
    asset: Asset
    signals: dict[str, Signal] = field(default_factory=dict)  # measure → its signal
    inputs: dict[str, str] = field(default_factory=dict)  # name → the signal it reads
    states: list[tuple[str, Expression]] = field(default_factory=list)
    derived: list[tuple[Signal, Expression]] = field(default_factory=list)
    baselines: dict[str, Baseline] = field(default_factory=dict)  # measure → its baseline
    rules: list[tuple[Rule, Expression]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return self.asset.path


class SemanticModel:
    """Compiles every asset of a policy; `problems` lists what is wrong, each with its place."""

    def __init__(self, policy: Policy) -> None:
        self.problems: list[str] = []
        self._signals = {s.path: s for s in policy.signals}
        self.assets: dict[str, AssetModel] = {}
        assets = self.assets  # not `self`: a model that refers to itself waits for a collection
        self.precisions = Precisions(self._signals, lambda s: assets[s.asset].inputs)
        declared = {a.path: (i, a) for i, a in enumerate(policy.assets)}
        for signal in policy.signals:  # 100,000 at a site: each path split once
            asset_path, _, measure = signal.path.rpartition("/")
            model = self.assets.get(asset_path)
            if model is None:
                found = declared.get(asset_path)
                model = AssetModel(found[1] if found else Asset(path=asset_path))
                self.assets[asset_path] = model
            model.signals[measure] = signal
            if not isinstance(signal.source, DerivedSource):
                model.inputs[measure] = signal.path
        for path, (i, asset) in declared.items():
            model = self.assets.setdefault(path, AssetModel(asset))
            self._compile_asset(f"assets[{i}]", model)
        for i, signal in enumerate(policy.signals):
            if isinstance(signal.source, DerivedSource):
                self._compile_derived(f"signals[{i}].source.expression", signal)

    def _compile_asset(self, where: str, model: AssetModel) -> None:
        asset = model.asset
        reserved = {"load"} | RULE_NAMES
        taken = set(model.signals) | reserved
        for name in sorted(set(model.signals) & reserved):
            self.problems.append(
                f"{where}: the measure {name!r} has a name expressions reserve: rename the signal"
            )
        for name, path in sorted(asset.ambient.items()):
            if name in taken:
                self.problems.append(
                    f"{where}.ambient.{name}: already a name of this asset's measures or "
                    "expressions: choose another"
                )
            elif self._needs_approved(f"{where}.ambient.{name}", path):
                model.inputs[name] = path
        if asset.load is not None and self._needs_approved(
            f"{where}.load.signal", asset.load.signal
        ):
            model.inputs["load"] = asset.load.signal
        values = set(model.inputs)
        for j, state in enumerate(asset.states):
            compiled = self._expression(f"{where}.states[{j}].when", state.when, values)
            if compiled is not None and self._reads_approved(
                f"{where}.states[{j}].when", model, compiled
            ):
                model.states.append((state.state, compiled))
        measures = values | set(model.signals)
        states = {rule.state for rule in asset.states} | {asset.otherwise, "unknown"}
        for j, baseline in enumerate(asset.baselines):
            self._check_baseline(f"{where}.baselines[{j}]", model, baseline, states)
        windows = set(asset.load.windows) if asset.load is not None else set()
        functions = {
            "deviation": set(model.baselines),
            "label": set(model.baselines),
            "direction": set(model.baselines),
            "trend": set(model.signals),
            "load_mean": windows,
            "load_max": windows,
        }
        words = {
            "state": frozenset(states),
            "maintenance": MAINTENANCE,
            "label": LABELS,
            "direction": DIRECTIONS,
        }
        for j, rule in enumerate(asset.rules):
            compiled = self._expression(
                f"{where}.rules[{j}].when", rule.when, measures | RULE_NAMES, functions, words
            )
            if compiled is not None and self._reads_approved(
                f"{where}.rules[{j}].when", model, compiled
            ):
                model.rules.append((rule, compiled))

    def _check_baseline(
        self, where: str, model: AssetModel, baseline: Baseline, states: set[str]
    ) -> None:
        if baseline.measure not in model.signals:
            self.problems.append(
                f"{where}.measure: {model.path} has no measure {baseline.measure!r}"
            )
        elif not self._needs_approved(f"{where}.measure", model.signals[baseline.measure].path):
            return
        elif baseline.ambient not in model.asset.ambient:
            self.problems.append(
                f"{where}.ambient: {model.path} has no ambient {baseline.ambient!r}"
            )
        elif baseline.load_points and model.asset.load is None:
            self.problems.append(f"{where}.load_points: {model.path} names no load signal")
        elif unknown := sorted(set(baseline.states) - states):
            self.problems.append(f"{where}.states: {model.path} has no state {unknown[0]!r}")
        else:
            model.baselines[baseline.measure] = baseline

    def _compile_derived(self, where: str, signal: Signal) -> None:
        assert isinstance(signal.source, DerivedSource)
        model = self.assets[signal.asset]
        compiled = self._expression(where, signal.source.expression, set(model.inputs))
        if compiled is None:
            return
        if signal.lifecycle == "proposed" or self._reads_approved(where, model, compiled):
            model.derived.append((signal, compiled))

    def _reads_approved(self, where: str, model: AssetModel, compiled: Expression) -> bool:
        measures = {name for name in compiled.names if name not in RULE_NAMES} | {
            argument for _, argument in compiled.calls if argument in model.signals
        }  # `trend('m')` reads m as surely as `m` does (a load window is not a measure)
        paths = {model.inputs.get(name) or model.signals[name].path for name in measures}
        return all([self._needs_approved(where, path) for path in sorted(paths)])

    def _expression(
        self,
        where: str,
        text: str,
        names: set[str],
        functions: dict[str, set[str]] | None = None,
        words: Mapping[str, frozenset[str]] | None = None,
    ) -> Expression | None:
        try:
            return compile_expression(text, names, functions, words)
        except ExpressionError as e:
            self.problems.append(f"{where}: {e}")
            return None

    def _needs_approved(self, where: str, path: str) -> bool:
        """True if `path` is an approved signal; records the problem otherwise."""
        signal = self._signals.get(path)
        if signal is None:
            self.problems.append(f"{where}: no signal {path!r}")
            return False
        if signal.lifecycle != "approved":
            self.problems.append(
                f"{where}: {path!r} is still proposed: approve it before published context reads it"
            )
            return False
        return True

    def __iter__(self) -> Iterator[AssetModel]:
        return iter(self.assets.values())
