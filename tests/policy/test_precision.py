"""The precision of computed numbers: decided when the policy is compiled, from what the
model declares or from the inputs; float noise never survives it, real digits always do."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import policy
from broker.errors import ConfigError
from broker.policy.model import SemanticModel
from broker.policy.precision import Precision, decimals_of, expression_precision
from broker.policy.report import show
from tests.harness import demo_policy, write_policy_yaml

APPROACH = "coldstore/machine-room/condenser-1/approach_temperature"
PRESSURE = "coldstore/machine-room/compressor-1/discharge_pressure"
POWER = "coldstore/machine-room/compressor-1/motor_power"


@pytest.mark.parametrize(
    ("number", "decimals"),
    [(0.1, 1), (0.25, 2), (0.01, 2), (26.7, 1), (20.0, 0), (3, 0), (1e-07, 7), (1.5e-07, 8)],
)
def test_decimals_of_a_number_as_written(number: float, decimals: int) -> None:
    assert decimals_of(number) == decimals


@pytest.mark.parametrize(
    ("text", "decimals", "significant"),
    [
        ("a - b", 2, 12),  # a: 2 decimals, b: 1
        ("a * b", 3, 12),
        ("a ** 2", 4, 12),
        ("-a + 1", 2, 12),
        ("a if a > b else b", 2, 12),
        ("a / b", None, 12),  # a quotient: significant digits
        ("a + f", None, 9),  # a float32 input: its 9 significant digits
        ("a / 1000", 5, 12),  # x / 1000 is x × 0.001: exact decimals
        ("a / 4", 4, 12),
        ("a / 0.1", 1, 12),
        ("a / 3", None, 12),  # no finite decimal
        ("a / 0", None, 12),
        ("a ** 0.5", None, 12),
    ],
)
def test_what_follows_from_the_inputs(text: str, decimals: int | None, significant: int) -> None:
    inputs = {"a": Precision(2), "b": Precision(1), "f": Precision(None, 9)}
    assert expression_precision(text, inputs.__getitem__) == Precision(decimals, significant)


@given(
    st.integers(-(10**6), 10**6), st.integers(-(10**6), 10**6), st.integers(0, 4), st.integers(0, 4)
)
def test_sums_and_products_of_decimals_come_out_exact(x: int, y: int, dx: int, dy: int) -> None:
    """The rounded float is the exact decimal result, whatever noise the float had."""
    a, b = x / 10**dx, y / 10**dy
    inputs = {"a": Precision(dx), "b": Precision(dy)}.__getitem__
    total = expression_precision("a - b", inputs).round(a - b)
    product = expression_precision("a * b", inputs).round(a * b)
    assert total == (x * 10**dy - y * 10**dx) / 10 ** (dx + dy)
    assert product == x * y / 10 ** (dx + dy)


def test_rounding_never_gives_minus_zero_or_touches_what_is_not_finite() -> None:
    assert repr(Precision(1).round(-0.04)) == "0.0"
    assert repr(Precision(None, 7).round(-1e-30 * 0)) == "0.0"
    assert Precision(2).round(float("inf")) == float("inf")
    assert Precision(2).round(1e300) == 1e300


def test_more_decimals_than_a_double_holds_are_significant_digits() -> None:
    assert Precision(13) == Precision(None)  # a product of two 9-decimal float32 values


def edited_demo(tmp_path: Path, change: Any) -> policy.Policy:
    document = demo_policy(5020)
    change(document)
    return policy.load(write_policy_yaml(tmp_path, document, "p"))


def test_every_signal_of_the_demo_has_the_precision_of_its_decoding(tmp_path: Path) -> None:
    precisions = SemanticModel(edited_demo(tmp_path, lambda d: None)).precisions
    assert precisions[PRESSURE] == Precision(2)  # int16 x 0.01
    assert precisions[POWER] == Precision(None, 9)  # float32
    assert precisions["coldstore/machine-room/compressor-1/run_time"] == Precision(0)
    assert precisions[APPROACH] == Precision(1)  # tenths minus tenths


def test_declared_decimals_win_and_policy_show_prints_them(tmp_path: Path) -> None:
    def declared(document: dict[str, Any]) -> None:
        for s in document["signals"]:
            if s["path"] == APPROACH:
                s["source"]["decimals"] = 0

    declaring = edited_demo(tmp_path, declared)
    assert SemanticModel(declaring).precisions[APPROACH] == Precision(0)
    shown = show(declaring, "0" * 64, datetime.now(UTC), {})
    assert f"{APPROACH} [K] ← = outlet_temperature - temperature to 0 decimals" in shown


def test_decimals_beyond_what_a_policy_may_declare_are_refused(tmp_path: Path) -> None:
    def too_many(document: dict[str, Any]) -> None:
        for s in document["signals"]:
            if s["path"] == APPROACH:
                s["source"]["decimals"] = 13

    with pytest.raises(ConfigError, match=r"source.decimals.*<= 12"):
        edited_demo(tmp_path, too_many)


def test_a_large_integer_quotient_keeps_every_integer_digit() -> None:
    """Review: int64 1234567890123456 / 1000 was published as 1234567890120.0."""
    whole = {"a": Precision(0)}.__getitem__
    assert expression_precision("a / 1000", whole).round(1234567890123456 / 1000) == (
        1234567890123.456
    )
    assert expression_precision("a / 3", whole).round(3703703670370368 / 3) == 1234567890123456.0
    assert Precision(None).round(1234567890123.456) == 1234567890123.0
