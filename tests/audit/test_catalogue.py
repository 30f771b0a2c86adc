"""Every event in the audit catalogue is written where the catalogue says, both ways.

Read statically from the source of `broker/` (no process needs to run into every event):
- catalogue → code: each event in `broker.audit.catalogue.EVENTS` is logged through structlog
  somewhere in `broker/` (the forwarder then writes it), or written by the audit log itself;
- code → catalogue: each event that `broker/` logs and docs/audit.md calls an audit event is in
  EVENTS (else it would reach the process log only), and the events the code writes into the
  audit log directly are in docs/audit.md;
- docs/audit.md's catalogue table and EVENTS name the same events with the same category and
  outcome.

An event name is found where a logger method gets it as its first argument: a string literal,
either branch of a conditional, a variable or module constant assigned one, or a constructor
argument a class keeps and logs (`Episode(log, "accept_failed", "accept_recovered")`). A log
call whose event the scan cannot resolve fails the test: event names stay visible in the code.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker.audit.catalogue import AGGREGATED, DEVICE_AGGREGATED, EVENTS

REPO = Path(__file__).resolve().parents[2]

LOG_METHODS = frozenset({"debug", "info", "warning", "error", "critical", "exception", "msg"})
_ROW = re.compile(r"^\| (`[^|]+`) \| ([a-z_]+) / ([a-z, ]+) \|")


@dataclass
class Found:
    logged: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # → places
    written: dict[str, set[tuple[str | None, str | None]]] = field(
        default_factory=lambda: defaultdict(set)  # → (category, outcome) as written
    )
    unresolved: list[str] = field(default_factory=list)  # log calls naming no visible event


class _Scan:
    """Resolves the event names logged or written in a set of modules (path → source)."""

    def __init__(self, sources: dict[str, str]) -> None:
        self.trees = {path: ast.parse(text, path) for path, text in sources.items()}
        self.constants: dict[str, set[str]] = defaultdict(set)  # module-level NAME = "..."
        self.classes: dict[str, ast.ClassDef] = {}
        self.calls: list[tuple[str, ast.Call]] = []
        self.parents: dict[ast.AST, ast.AST] = {}
        self._resolving: set[tuple[ast.AST, str]] = set()
        for path, tree in self.trees.items():
            for node in tree.body:
                for target, value in _assignments(node):
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        self.constants[target].add(value.value)
            for node in ast.walk(tree):
                for child in ast.iter_child_nodes(node):
                    self.parents[child] = node
                if isinstance(node, ast.ClassDef):
                    self.classes[node.name] = node
                elif isinstance(node, ast.Call):
                    self.calls.append((path, node))

    def run(self) -> Found:
        found = Found()
        for path, call in self.calls:
            place = f"{path}:{call.lineno}"
            if _is_log_call(call):
                names = self.resolve(call.args[0], call) if call.args else None
                if not names:
                    found.unresolved.append(f"{place}: {ast.unparse(call)[:100]}")
                for name in names or ():
                    found.logged[name].add(place)
            elif _is_audit_record(call) and call.args:
                kinds = {k.arg: _literal(k.value) for k in call.keywords}
                for name in self.resolve(call.args[0], call) or ():
                    found.written[name].add((kinds.get("category"), kinds.get("outcome")))
        for tree in self.trees.values():  # entries the audit log builds itself: {"event": ...}
            for node in ast.walk(tree):
                if isinstance(node, ast.Dict):
                    members = {_literal(k): v for k, v in zip(node.keys, node.values, strict=True)}
                    if "event" in members and "category" in members:
                        kind = (_literal(members["category"]), _literal(members.get("outcome")))
                        for name in self.resolve(members["event"], node) or ():
                            found.written[name].add(kind)
        return found

    def resolve(self, expr: ast.expr | None, where: ast.AST) -> set[str] | None:
        """The event names `expr` can hold, or None if they cannot be known statically."""
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value}
        if isinstance(expr, ast.IfExp):
            body, orelse = self.resolve(expr.body, where), self.resolve(expr.orelse, where)
            return None if body is None or orelse is None else body | orelse
        function = self._enclosing(where, (ast.FunctionDef, ast.AsyncFunctionDef))
        if isinstance(expr, ast.Name):
            assigned = [
                value
                for node in (ast.walk(function) if function else ())
                for target, value in _assignments(node)
                if target == expr.id
            ]
            if assigned:
                return self._union(self.resolve(value, value) for value in assigned)
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef) and (
                expr.id in _parameters(function)
            ):
                return self._argument(function, expr.id)
            return self.constants.get(expr.id) or None
        if (
            isinstance(expr, ast.Attribute)
            and isinstance(expr.value, ast.Name)
            and expr.value.id == "self"
        ):  # kept by the constructor from one of its parameters
            cls = self._enclosing(where, (ast.ClassDef,))
            for init in cls.body if isinstance(cls, ast.ClassDef) else ():
                if isinstance(init, ast.FunctionDef) and init.name == "__init__":
                    for node in ast.walk(init):
                        for target in node.targets if isinstance(node, ast.Assign) else ():
                            if isinstance(target, ast.Attribute) and target.attr == expr.attr:
                                return self.resolve(node.value, node)
        return None

    def _argument(
        self, function: ast.FunctionDef | ast.AsyncFunctionDef, name: str
    ) -> set[str] | None:
        """What every call of `function` passes for its parameter `name` (a constructor's:
        every call of its class)."""
        if (function, name) in self._resolving:
            return None  # a recursive call: unknowable here
        self._resolving.add((function, name))
        method = isinstance(self.parents.get(function), ast.ClassDef)
        positional = [a.arg for a in function.args.args][1 if method else 0 :]
        callee = function.name
        if callee == "__init__":
            cls = self.parents[function]
            assert isinstance(cls, ast.ClassDef)
            callee = cls.name
        found: list[set[str] | None] = []
        for _, call in self.calls:
            called = call.func.id if isinstance(call.func, ast.Name) else (
                call.func.attr if isinstance(call.func, ast.Attribute) else None
            )  # fmt: skip
            if called != callee:
                continue
            given = next((k.value for k in call.keywords if k.arg == name), None)
            if given is None and name in positional and positional.index(name) < len(call.args):
                given = call.args[positional.index(name)]
            found.append(self.resolve(given, call))
        self._resolving.discard((function, name))
        return self._union(found) if found else None

    @staticmethod
    def _union(names: Iterable[set[str] | None]) -> set[str] | None:
        every = list(names)
        return None if None in every else set().union(*(n or set() for n in every))

    def _enclosing(self, node: ast.AST, kinds: tuple[type, ...]) -> ast.AST | None:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, kinds):
                return node
        return None


def _assignments(node: ast.AST) -> list[tuple[str, ast.expr]]:
    if isinstance(node, ast.Assign):
        return [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
        return [(node.target.id, node.value)]
    return []


def _parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    arguments = function.args
    return {a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]}


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _receiver_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):  # structlog.get_logger("x").warning, log.bind(...).info
        return _receiver_name(node.func)
    return ""


def _is_log_call(call: ast.Call) -> bool:
    """A structlog logger's method: `log.info`, `self._log.warning`, `limits_log.error`,
    `structlog.get_logger("x").warning` (never argparse's `parser.error` or stdlib logging,
    which does not reach the audit forwarder)."""
    if not (isinstance(call.func, ast.Attribute) and call.func.attr in LOG_METHODS):
        return False
    receiver = _receiver_name(call.func.value)
    return receiver in ("get_logger", "bind") or re.fullmatch(r"_?(\w+_)?log", receiver) is not None


def _is_audit_record(call: ast.Call) -> bool:
    """`audit.record(...)`, `self._audit.record(...)`: an entry written without structlog."""
    func = call.func
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "record"
        and "audit" in _receiver_name(func.value).lower()
    )


def scan(root: Path) -> Found:
    return _Scan(
        {str(p.relative_to(REPO)): p.read_text() for p in sorted(root.rglob("*.py"))}
    ).run()


def documented() -> dict[str, tuple[str, str]]:
    """docs/audit.md's catalogue table: event → (category, outcome)."""
    text = (REPO / "docs" / "audit.md").read_text()
    section = text.split("\n## Catalogue\n", 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        match = _ROW.match(line)
        if not match:
            continue
        names = re.findall(r"`([a-z0-9_]+)`", match[1])
        outcomes = [o.strip() for o in match[3].split(",")]
        if len(outcomes) == 1:
            outcomes *= len(names)
        assert len(outcomes) == len(names), f"docs/audit.md: {line[:80]}: an outcome per event"
        for name, outcome in zip(names, outcomes, strict=True):
            assert name not in table, f"docs/audit.md: {name} is in the catalogue twice"
            table[name] = (match[2], outcome)
    return table


@pytest.fixture(scope="module")
def found() -> Found:
    return scan(REPO / "broker")


def test_every_log_call_names_an_event_the_scan_can_see(found: Found) -> None:
    assert found.unresolved == []
    assert len(found.logged) > len(EVENTS)  # the scan sees the code's events, not just a few


def test_every_catalogue_event_is_logged_or_written_by_the_audit_log(found: Found) -> None:
    missing = sorted(set(EVENTS) - found.logged.keys() - found.written.keys())
    assert missing == [], "in broker/audit/catalogue.py but never logged in broker/"


def test_every_audit_event_the_code_logs_is_in_the_catalogue(found: Found) -> None:
    """An event docs/audit.md lists and the code only logs, without EVENTS naming it, would
    reach the process log and never the audit log."""
    table = documented()
    forgotten = {
        name: sorted(places)
        for name, places in found.logged.items()
        if name in table and name not in EVENTS and name not in found.written
    }
    assert forgotten == {}


def test_the_docs_catalogue_and_the_code_name_the_same_events(found: Found) -> None:
    table = documented()
    written = {name: kinds for name, kinds in found.written.items() if name not in EVENTS}
    assert sorted(table.keys() - EVENTS.keys() - written.keys()) == [], "documented, not in code"
    assert sorted(EVENTS.keys() - table.keys()) == [], "in EVENTS, not in docs/audit.md"
    assert sorted(written.keys() - table.keys()) == [], "written by the audit log, not documented"
    assert {n: table[n] for n in EVENTS} == EVENTS
    for name, kinds in written.items():  # where the code spells them out
        for category, outcome in kinds:
            assert category in (None, table[name][0]), (name, category, table[name])
            assert outcome in (None, table[name][1]), (name, outcome, table[name])


def test_aggregated_events_are_catalogue_events() -> None:
    assert EVENTS.keys() >= AGGREGATED
    assert EVENTS.keys() >= DEVICE_AGGREGATED


NOT_LOGGED = """
import structlog
log = structlog.get_logger("x")
UNUSED = "audit_mentioned"                      # a constant nobody logs
def f(parser, on):
    parser.error("argparse_error")              # not a logger
    log.info("plain_logged", a=1)
    event = "var_a" if on else "var_b"
    log.warning(event)
    "only_a_string"
class Episode:
    def __init__(self, log, started):
        self._log = log
        self._started = started
    def hit(self):
        self._log.warning(self._started)
E = Episode(log, "episode_started")
def g(audit):
    audit.record(KEPT, category="audit", outcome="success")
KEPT = "kept_directly"
"""


def test_the_scan_finds_exactly_the_logged_events() -> None:
    found = _Scan({"m.py": NOT_LOGGED}).run()
    assert set(found.logged) == {"plain_logged", "var_a", "var_b", "episode_started"}
    assert dict(found.written) == {"kept_directly": {("audit", "success")}}
    assert found.unresolved == []
    unknown = _Scan({"m.py": "log.info(compute())\nlog.error(f'x{y}')"}).run()
    assert len(unknown.unresolved) == 2
