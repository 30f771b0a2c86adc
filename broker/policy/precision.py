"""The precision of the numbers the broker computes (derived signals, assessments, load
statistics, trends): the one the model declares, else the one that follows from the inputs.

A read value is as precise as its decoding makes it (docs/records.md): a scaled integer to
the decimals of its scale and offset, an unscaled integer to the unit, an unscaled float32
to the 9 significant digits its shortest decimal may need, any other float (a scaled
float32 is the exact decimal product of its shortest decimal and the scale) to SIGNIFICANT
digits. From there, `+`, `-` and `%` of decimal numbers keep the most decimals of their
operands, `*` the sum of them, and a constant integer power n times them: rounded to those,
the result is the exact decimal one, never float noise (26.7 - 18.7 is 8.0, not
7.9999999999999964). A quotient by a constant whose inverse is a finite decimal (1000, 4,
0.5) has exact decimals too; any other quotient is rounded to significant digits (those of
its least precise operand, at most SIGNIFICANT, never fewer than its integer digits),
unless the signal declares `decimals`. A baseline's expected value is one decimal finer
than both the measure and the table's own values (it is interpolated between them).

Nothing here reads a value: the precision of every number is decided once, when the policy
is compiled. It must never round a value more coarsely than its inputs are known.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from broker.policy.schema import DerivedSource, ModbusSource, Signal

SIGNIFICANT = 12  # a double's arithmetic noise sits in the last 3 to 5 of its 17 digits
FLOAT32_SIGNIFICANT = 9  # a float32's shortest decimal needs at most 9: each one survives
MAX_DECIMALS = 12  # more than this: rounded to significant digits instead
_INTEGERS = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})


@dataclass(frozen=True, slots=True)
class Precision:
    """To `decimals` digits after the point when it is set, else to `significant` digits."""

    decimals: int | None = None
    significant: int = SIGNIFICANT

    def __post_init__(self) -> None:
        if self.decimals is not None and self.decimals > MAX_DECIMALS:
            object.__setattr__(self, "decimals", None)

    def round(self, x: float) -> float:
        """x to this precision; a number too large or small to round is kept as it is."""
        if not math.isfinite(x):
            return x
        if self.decimals is not None:
            return round(x, self.decimals) + 0.0  # + 0.0: -0.0 is 0.0
        if abs(x) >= 10.0**self.significant:  # an integer digit is never rounded away
            return round(x, 0) + 0.0
        return float(f"{x:.{self.significant}g}") + 0.0

    def finer(self, digits: int) -> Precision:
        """As precise, plus `digits` decimals (a mean, a slope): the same when significant."""
        if self.decimals is None:
            return self
        return Precision(max(0, self.decimals + digits), self.significant)


UNKNOWN = Precision()


def decimals_of(number: float) -> int:
    """Digits after the point of a number as written (0.25 → 2, 1e-07 → 7, 20.0 → 0)."""
    if isinstance(number, int) or number.is_integer():
        return 0
    mantissa, _, exponent = repr(number).partition("e")
    point = mantissa.find(".")
    digits = 0 if point < 0 else len(mantissa) - point - 1
    return max(0, digits - int(exponent)) if exponent else digits


def read_precision(signal: Signal) -> Precision:
    """A read (not derived) signal's values as the decoder gives them (broker/plant/decode.py):
    only an integer times a scale has the scale's decimals; a scaled float has its own digits
    and the scale's, and an OPC UA value may be either."""
    source = signal.source
    if not isinstance(source, ModbusSource):
        return UNKNOWN
    scaled = (signal.scale, signal.offset) != (1.0, 0.0)
    if source.type in _INTEGERS:
        return Precision(max(decimals_of(signal.scale), decimals_of(signal.offset)))
    if source.type == "float32" and not scaled:
        return Precision(None, FLOAT32_SIGNIFICANT)
    return UNKNOWN


def expected_precision(measure: Precision, table: Iterable[float]) -> Precision:
    """A baseline's expected value: interpolated between the table's values, so one decimal
    finer than both them and the measure it is compared with."""
    if measure.decimals is None:
        return measure
    return Precision(max(measure.decimals, *map(decimals_of, table)) + 1, measure.significant)


def expression_precision(text: str, of_name: Callable[[str], Precision]) -> Precision:
    """What follows from the inputs of a checked expression (docs/model.md)."""
    return _of(ast.parse(text.strip(), mode="eval").body, of_name)


def _of(node: ast.expr, of_name: Callable[[str], Precision]) -> Precision:  # noqa: PLR0911
    if isinstance(node, ast.Constant):
        value = node.value
        return Precision(decimals_of(value)) if isinstance(value, int | float) else UNKNOWN
    if isinstance(node, ast.Name):
        return of_name(node.id)
    if isinstance(node, ast.UnaryOp):
        return _of(node.operand, of_name)
    if isinstance(node, ast.IfExp):
        return _joined(_of(node.body, of_name), _of(node.orelse, of_name), max)
    if not isinstance(node, ast.BinOp):
        return UNKNOWN  # a comparison or a boolean: not a number to round
    left = _of(node.left, of_name)
    if isinstance(node.op, ast.Pow):
        exponent = node.right.value if isinstance(node.right, ast.Constant) else None
        if isinstance(exponent, int) and exponent >= 0 and left.decimals is not None:
            return Precision(left.decimals * exponent, left.significant)
        return Precision(None, left.significant)
    right = _of(node.right, of_name)
    if isinstance(node.op, ast.Add | ast.Sub | ast.Mod):
        return _joined(left, right, max)
    if isinstance(node.op, ast.Mult):
        return _joined(left, right, lambda a, b: a + b)
    shift = _inverse_decimals(node.right) if isinstance(node.op, ast.Div) else None
    if shift is not None and left.decimals is not None:  # x / 1000: x × 0.001, exactly
        return Precision(max(0, left.decimals + shift), left.significant)
    return Precision(None, min(left.significant, right.significant))  # a quotient


def _inverse_decimals(node: ast.expr) -> int | None:
    """The decimals that dividing by this constant adds (1000 → 3, 4 → 2, 0.1 → -1), when its
    inverse is a finite decimal (its digits are a product of 2s and 5s); else None."""
    value = node.value if isinstance(node, ast.Constant) else None
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    if not value or not math.isfinite(value):
        return None
    _, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)  # finite
    whole, twos, fives = int("".join(map(str, digits))), 0, 0
    while whole % 2 == 0:
        whole, twos = whole // 2, twos + 1
    while whole % 5 == 0:
        whole, fives = whole // 5, fives + 1
    return max(twos, fives) + exponent if whole == 1 else None


def _joined(left: Precision, right: Precision, decimals: Callable[[int, int], int]) -> Precision:
    known = left.decimals is not None and right.decimals is not None
    return Precision(
        decimals(left.decimals, right.decimals) if known else None,  # type: ignore[arg-type]
        min(left.significant, right.significant),
    )


class Precisions:
    """Every signal's precision in a policy: read ones from their decoding, derived ones
    declared or following from their inputs (names as their asset's expressions use them)."""

    def __init__(
        self, signals: Mapping[str, Signal], inputs_of: Callable[[Signal], Mapping[str, str]]
    ) -> None:
        self._signals = signals
        self._inputs_of = inputs_of
        self._known: dict[str, Precision] = {}
        self._pending: set[str] = set()  # a derived signal read, through ambient, by its own input

    def __getitem__(self, path: str) -> Precision:
        found = self._known.get(path)
        if found is not None:
            return found
        signal = self._signals.get(path)
        if signal is None or path in self._pending:
            return UNKNOWN
        source = signal.source
        if not isinstance(source, DerivedSource):
            found = read_precision(signal)
        elif source.decimals is not None:
            found = Precision(source.decimals)
        else:
            self._pending.add(path)
            inputs = self._inputs_of(signal)
            found = expression_precision(
                source.expression, lambda name: self[inputs[name]] if name in inputs else UNKNOWN
            )
            self._pending.discard(path)
        self._known[path] = found
        return found
