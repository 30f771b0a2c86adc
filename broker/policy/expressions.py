"""The model's expression language: simpleeval's safe subset, narrowed further and checked
when the policy is compiled.

An expression is one line such as `motor_power > 2`, `cooling_kw / motor_power` or
`label('discharge_pressure') == 'abnormal' and state == 'running'`. Allowed: numbers,
quoted words, names the policy defines, arithmetic, comparisons, `and`/`or`/`not`,
`x if c else y`, and the functions the context offers (called with a quoted name).
Refused when compiled, with the reason: attribute access, subscripts, imports, lambdas,
comprehensions, unknown names or functions, and any power but a small constant one.
Nothing is ever passed to `eval`: simpleeval walks the parsed tree itself.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import simpleeval

MAX_LENGTH = 500
MAX_EXPONENT = 8

_OPERATORS = (
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not,
    ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
)  # fmt: skip
_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Name,
    ast.Constant, ast.Call, ast.Load, *_OPERATORS,
)  # fmt: skip


class ExpressionError(ValueError):
    """An expression the policy may not hold; the message says why."""


@dataclass(frozen=True)
class Expression:
    text: str
    tree: ast.AST
    names: frozenset[str]  # the names it reads


class Evaluator:
    """Evaluates compiled expressions against live mappings of names and functions."""

    def __init__(
        self, names: dict[str, object], functions: dict[str, Callable[[str], object]]
    ) -> None:
        self._engine = simpleeval.SimpleEval(names=names, functions=functions)

    def evaluate(self, expression: Expression) -> object:
        """The value, or None when an input is missing or the arithmetic fails."""
        try:
            return self._engine.eval(expression.text, previously_parsed=expression.tree)
        except (ArithmeticError, TypeError, ValueError, simpleeval.InvalidExpression):
            return None


def compile_expression(
    text: str, names: set[str], functions: Mapping[str, set[str]] | None = None
) -> Expression:
    """Parse and check; `functions` maps each callable name to the arguments it accepts."""
    functions = functions or {}
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"longer than {MAX_LENGTH} characters")
    try:
        module = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"not a valid expression: {e.msg}") from e
    used: set[str] = set()
    callees = {id(n.func) for n in ast.walk(module) if isinstance(n, ast.Call)}
    for node in ast.walk(module):
        if id(node) not in callees:  # a called name is checked with its call
            _check(node, names, functions, used)
    return Expression(text.strip(), module.body, frozenset(used))


def _check(
    node: ast.AST, names: set[str], functions: Mapping[str, set[str]], used: set[str]
) -> None:
    if isinstance(node, ast.Attribute):
        raise ExpressionError(f"attribute access ('.{node.attr}') is not allowed")
    if isinstance(node, ast.Subscript):
        raise ExpressionError("subscripts ('[...]') are not allowed")
    if not isinstance(node, _NODES):
        raise ExpressionError(f"{type(node).__name__} is not allowed in an expression")
    if isinstance(node, ast.Constant) and not isinstance(node.value, int | float | str):
        raise ExpressionError(f"the constant {node.value!r} is not allowed")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        exponent = node.right
        if not (
            isinstance(exponent, ast.Constant)
            and isinstance(exponent.value, int | float)
            and abs(exponent.value) <= MAX_EXPONENT
        ):
            raise ExpressionError(
                f"a power must have a constant exponent of at most {MAX_EXPONENT}"
            )
    if isinstance(node, ast.Call):
        _check_call(node, functions)
    elif isinstance(node, ast.Name):
        if node.id not in names:
            known = ", ".join(sorted(names)) or "none"
            raise ExpressionError(f"unknown name {node.id!r} (known here: {known})")
        used.add(node.id)


def _check_call(node: ast.Call, functions: Mapping[str, set[str]]) -> None:
    if not isinstance(node.func, ast.Name) or node.func.id not in functions:
        offered = ", ".join(sorted(functions)) or "none"
        raise ExpressionError(f"only these functions may be called: {offered}")
    name = node.func.id
    argument = node.args[0] if len(node.args) == 1 and not node.keywords else None
    if not (isinstance(argument, ast.Constant) and isinstance(argument.value, str)):
        raise ExpressionError(f"{name}() takes one quoted measure name, e.g. {name}('pressure')")
    if argument.value not in functions[name]:
        accepted = ", ".join(sorted(functions[name])) or "none"
        raise ExpressionError(f"{name}({argument.value!r}): not one of {accepted}")
