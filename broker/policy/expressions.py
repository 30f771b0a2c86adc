"""The model's expression language: simpleeval's safe subset, narrowed further, checked
when the policy is compiled, and turned into closures over simpleeval's safe operators.

An expression is one line such as `motor_power > 2`, `cooling_kw / motor_power` or
`label('discharge_pressure') == 'abnormal' and state == 'running'`. Allowed: numbers,
quoted words, names the policy defines, arithmetic, comparisons, `and`/`or`/`not`,
`x if c else y`, and the functions the context offers (called with a quoted name).
Refused when compiled, with the reason: attribute access, subscripts, imports, lambdas,
comprehensions, unknown names or functions, any power but a small constant one, and a
comparison of a name or function that takes only certain words with one it never takes
(`label('p') == 'below_expected'`: a rule that could never fire). At run
time, reading a name or function without a value (missing, bad, not yet known) makes the
expression yield nothing, as failing arithmetic does: a bad input is never taken for a falsy
value (`not power` must not be true because power could not be read).

Nothing is ever passed to `eval`. The checked tree is compiled once into nested closures
whose operators are simpleeval's (`safe_power`, `safe_mult`, `safe_add`: bounded results;
`%` on numbers only), because walking the tree with simpleeval per evaluation costs 8x
more, which a plant of 1,000 assets cannot afford at every scan (ADR 0010).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import simpleeval

MAX_LENGTH = 500
MAX_EXPONENT = 8


def _modulo(left: object, right: object) -> object:
    """`%` on numbers only: on text it would be printf formatting, whose width has no bound
    (`'%0999999999d' % x`)."""
    if isinstance(left, str):
        raise TypeError("'%' is the remainder of numbers here, not text formatting")
    return left % right  # type: ignore[operator]


_OPERATORS: dict[type, Callable[..., object]] = {
    **{
        op: simpleeval.DEFAULT_OPERATORS[op]
        for op in (
            ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd, ast.Not,
            ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
        )
    },
    ast.Mod: _modulo,
}  # fmt: skip
_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Name,
    ast.Constant, ast.Call, ast.Load, ast.And, ast.Or, *_OPERATORS,
)  # fmt: skip

Names = Mapping[str, object]
Functions = Mapping[str, Callable[[str], object]]
_Closure = Callable[[Names, Functions], object]


class ExpressionError(ValueError):
    """An expression the policy may not hold; the message says why."""


class _NoValue(LookupError):
    """A name or function has no value now (missing, or None: bad or not yet known)."""


@dataclass(frozen=True)
class Expression:
    text: str
    run: _Closure
    names: frozenset[str]  # the names it reads
    calls: frozenset[tuple[str, str]]  # the (function, quoted argument) pairs it calls


class Evaluator:
    """Evaluates compiled expressions against live mappings of names and functions."""

    def __init__(self, names: Names, functions: Functions) -> None:
        self._names = names
        self._functions = functions

    def evaluate(self, expression: Expression) -> object:
        """The value, or None when an input is missing or the arithmetic fails."""
        try:
            return expression.run(self._names, self._functions)
        except (ArithmeticError, LookupError, TypeError, ValueError, simpleeval.InvalidExpression):
            return None


def compile_expression(
    text: str,
    names: set[str],
    functions: Mapping[str, set[str]] | None = None,
    words: Mapping[str, frozenset[str]] | None = None,
) -> Expression:
    """Parse and check; `functions` maps each callable name to the arguments it accepts,
    `words` a name or function to the only words it ever is."""
    return _compiled(
        text,
        frozenset(names),
        frozenset((name, frozenset(taken)) for name, taken in (functions or {}).items()),
        frozenset((words or {}).items()),
    )


# A site's assets of one type repeat the same expressions over the same names: 10,000 assets
# compile a handful of distinct ones. The result depends only on these arguments, and its
# closures hold no state, so one compiled expression serves them all.
@functools.lru_cache(maxsize=4096)
def _compiled(
    text: str,
    names: frozenset[str],
    function_args: frozenset[tuple[str, frozenset[str]]],
    word_items: frozenset[tuple[str, frozenset[str]]],
) -> Expression:
    functions = {name: set(taken) for name, taken in function_args}
    words = dict(word_items)
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"longer than {MAX_LENGTH} characters")
    try:
        module = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"not a valid expression: {e.msg}") from e
    used: set[str] = set()
    calls: set[tuple[str, str]] = set()
    callees = {id(n.func) for n in ast.walk(module) if isinstance(n, ast.Call)}
    for node in ast.walk(module):
        if id(node) not in callees:  # a called name is checked with its call
            _check(node, names, functions, used, calls)
        if words and isinstance(node, ast.Compare):
            _check_words(node, words)
    return Expression(text.strip(), _closure(module.body), frozenset(used), frozenset(calls))


def _check(
    node: ast.AST,
    names: frozenset[str],
    functions: Mapping[str, set[str]],
    used: set[str],
    calls: set[tuple[str, str]],
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
        calls.add(_check_call(node, functions))
    elif isinstance(node, ast.Name):
        if node.id not in names:
            known = ", ".join(sorted(names)) or "none"
            raise ExpressionError(f"unknown name {node.id!r} (known here: {known})")
        used.add(node.id)


def _check_call(node: ast.Call, functions: Mapping[str, set[str]]) -> tuple[str, str]:
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
    return name, argument.value


def _check_words(node: ast.Compare, words: Mapping[str, frozenset[str]]) -> None:
    """`x == 'w'` and `x != 'w'` (either way round) where x only ever is one of some words."""
    operands = [node.left, *node.comparators]
    for op, left, right in zip(node.ops, operands, operands[1:], strict=False):
        if not isinstance(op, ast.Eq | ast.NotEq):
            continue
        for subject, other in ((left, right), (right, left)):
            taken = words.get(_word_source(subject) or "")
            if taken is not None and isinstance(other, ast.Constant) and other.value not in taken:
                always = "false" if isinstance(op, ast.Eq) else "true"
                raise ExpressionError(
                    f"{ast.unparse(subject)} is one of {', '.join(sorted(taken))}, never "
                    f"{other.value!r}: this comparison would always be {always}"
                )


def _word_source(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id
    return None


def _closure(node: ast.expr) -> _Closure:  # noqa: PLR0911 - one branch per allowed node
    """The checked tree as nested closures; each node type was allowed by `_check`."""
    if isinstance(node, ast.Constant):
        constant = node.value
        return lambda names, functions: constant
    if isinstance(node, ast.Name):
        name = node.id

        def read(names: Names, functions: Functions) -> object:
            value = names[name]
            if value is None:  # a bad input: as missing, never a falsy value to compare
                raise _NoValue(name)
            return value

        return read
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name) and isinstance(node.args[0], ast.Constant)
        function, argument = node.func.id, str(node.args[0].value)

        def call(names: Names, functions: Functions) -> object:
            value = functions[function](argument)
            if value is None:  # no assessment, trend or load yet
                raise _NoValue(f"{function}({argument!r})")
            return value

        return call
    if isinstance(node, ast.UnaryOp):
        unary, operand = _OPERATORS[type(node.op)], _closure(node.operand)
        return lambda names, functions: unary(operand(names, functions))
    if isinstance(node, ast.BinOp):
        binary = _OPERATORS[type(node.op)]
        left, right = _closure(node.left), _closure(node.right)
        return lambda names, functions: binary(left(names, functions), right(names, functions))
    if isinstance(node, ast.IfExp):
        test, body, orelse = _closure(node.test), _closure(node.body), _closure(node.orelse)
        return lambda names, functions: (
            body(names, functions) if test(names, functions) else orelse(names, functions)
        )
    if isinstance(node, ast.BoolOp):
        return _boolean(isinstance(node.op, ast.And), [_closure(v) for v in node.values])
    assert isinstance(node, ast.Compare)
    return _comparison(node)


def _boolean(conjunction: bool, parts: list[_Closure]) -> _Closure:
    """`a and b and c` as Python does it (short-circuit, the deciding value): Python's own
    `and`/`or`, nested from the right."""
    left, rest = parts[0], parts[1:]
    if not rest:
        return left
    right = _boolean(conjunction, rest)
    if conjunction:
        return lambda names, functions: left(names, functions) and right(names, functions)
    return lambda names, functions: left(names, functions) or right(names, functions)


def _comparison(node: ast.Compare) -> _Closure:
    """`a < b <= c` as Python does it: each pair in turn, stopping at the first false one.
    The usual single comparison with a constant (`state == 'running'`) gets a closure of
    its own: rules and states are mostly that, at every scan of every asset."""
    first = _closure(node.left)
    if len(node.ops) == 1:
        compare = _OPERATORS[type(node.ops[0])]
        if isinstance(node.comparators[0], ast.Constant):
            constant = node.comparators[0].value
            return lambda names, functions: compare(first(names, functions), constant)
        second = _closure(node.comparators[0])
        return lambda names, functions: compare(first(names, functions), second(names, functions))
    steps = [
        (_OPERATORS[type(op)], _closure(operand))
        for op, operand in zip(node.ops, node.comparators, strict=True)
    ]

    def run(names: Names, functions: Functions) -> object:
        left = first(names, functions)
        for compare, operand in steps:
            right = operand(names, functions)
            if not compare(left, right):
                return False
            left = right
        return True

    return run
