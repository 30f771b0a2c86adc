"""The compiled expression closures give what Python gives for the same expression.

Python's own evaluation of the (checked) text is the oracle here, and only here: the
product never evaluates text (ADR 0010)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.policy.expressions import Evaluator, ExpressionError, compile_expression

NAMES = ("a", "b", "c")
VALUES = st.one_of(
    st.booleans(),
    st.integers(-5, 5),
    st.floats(-5, 5, allow_nan=False),
    st.sampled_from(["running", "stopped", ""]),
)
ATOMS = st.one_of(
    st.sampled_from(NAMES),
    st.integers(-3, 3).map(str),
    st.sampled_from(["'running'", "'stopped'", "0.5"]),
)
COMPARE = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
ARITHMETIC = st.sampled_from(["+", "-", "*"])


def _expressions() -> st.SearchStrategy[str]:
    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(inner, COMPARE, inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.tuples(inner, COMPARE, inner, COMPARE, inner).map(
                lambda t: f"({t[0]} {t[1]} {t[2]} {t[3]} {t[4]})"
            ),
            st.tuples(inner, ARITHMETIC, inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.lists(inner, min_size=2, max_size=4).map(lambda p: "(" + " and ".join(p) + ")"),
            st.lists(inner, min_size=2, max_size=4).map(lambda p: "(" + " or ".join(p) + ")"),
            inner.map(lambda e: f"(not {e})"),
            inner.map(lambda e: f"(-{e})"),
            st.tuples(inner, inner, inner).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
        )

    return st.recursive(ATOMS, extend, max_leaves=8)


def python(text: str, names: dict[str, object]) -> object:
    try:
        return eval(text, {"__builtins__": {}}, names)  # the oracle, in this test only
    except (ArithmeticError, TypeError, ValueError):
        return None


@settings(max_examples=400, deadline=None)
@given(_expressions(), st.fixed_dictionaries({n: VALUES for n in NAMES}))
def test_a_compiled_expression_gives_what_python_gives(text: str, names: dict[str, object]) -> None:
    compiled = compile_expression(text, set(NAMES))
    got = Evaluator(names, {}).evaluate(compiled)
    expected = python(text, names)
    if isinstance(expected, float) and isinstance(got, float):
        assert math.isclose(got, expected) or got == expected
    else:
        assert got == expected
        assert type(got) is type(expected)  # `and`/`or` give the deciding value itself


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a and b", 0),  # the deciding value, not False
        ("b or a", 2),
        ("a < 3 <= c", True),
        ("c > 3 > a", False),  # stops at the first false pair
        ("state == 'running'", True),
        ("'running' == state", True),
        ("not b", True),
        ("a / b", None),  # division by zero: no value
        ("missing_input + 1", None),  # a bad input is None in the mapping: no value
        # ... and never a falsy value that a comparison or `not` would make something of
        ("not missing_input", None),
        ("missing_input != 0", None),
        ("missing_input == 0", None),
        ("1 if missing_input else 2", None),
        ("a or missing_input", 2),  # not read: the left side decides
        ("a % c", 2),
        ("state % a", None),  # text formatting, whose width has no bound: refused
        ("'%0999999999d' % a", None),
    ],
)
def test_known_cases(text: str, expected: object) -> None:
    names = {"a": 2, "b": 0, "c": 3, "state": "running", "missing_input": None}
    got = Evaluator(names, {}).evaluate(compile_expression(text, set(names)))
    assert got == expected and type(got) is type(expected)


def test_a_function_without_a_value_is_no_value_not_a_falsy_one() -> None:
    compiled = compile_expression("not trend('pressure')", set(), {"trend": {"pressure"}})
    assert Evaluator({}, {"trend": lambda m: None}).evaluate(compiled) is None
    assert Evaluator({}, {"trend": lambda m: 0.0}).evaluate(compiled) is True


def test_functions_are_called_with_their_quoted_argument() -> None:
    calls: list[str] = []

    def label(measure: str) -> str:
        calls.append(measure)
        return "abnormal"

    compiled = compile_expression(
        "label('pressure') != 'expected' and state == 'running'",
        {"state"},
        {"label": {"pressure"}},
    )
    assert Evaluator({"state": "running"}, {"label": label}).evaluate(compiled) is True
    assert calls == ["pressure"]


WORDS = {"label": frozenset({"expected", "drifting", "abnormal"}), "state": frozenset({"on"})}


@pytest.mark.parametrize(
    ("text", "always"),
    [
        ("label('pressure') == 'below_expected'", "false"),  # the label before issue 15
        ("'below_expected' == label('pressure')", "false"),
        ("state == 'on' and label('pressure') != 'low'", "true"),
        ("0 < 1 == state", "false"),  # a pair inside a chain
        ("state == 1", "false"),
    ],
)
def test_a_comparison_with_a_word_it_never_is_is_refused(text: str, always: str) -> None:
    with pytest.raises(
        ExpressionError, match=f"never .*: this comparison would always be {always}"
    ):
        compile_expression(text, {"state"}, {"label": {"pressure"}}, WORDS)


def test_the_refusal_names_the_words_it_is() -> None:
    with pytest.raises(ExpressionError) as refused:
        compile_expression(
            "label('pressure') == 'below_expected'", set(), {"label": {"pressure"}}, WORDS
        )
    assert str(refused.value).startswith(
        "label('pressure') is one of abnormal, drifting, expected, never 'below_expected'"
    )


@pytest.mark.parametrize(
    "text",
    [
        "label('pressure') == 'drifting'",
        "state != 'on'",
        "state < 'zzz'",  # an ordering, not an equality: not judged
        "state == state",
    ],
)
def test_comparisons_that_can_be_true_or_false_are_accepted(text: str) -> None:
    compile_expression(text, {"state"}, {"label": {"pressure"}}, WORDS)


def test_the_same_text_is_checked_against_each_asset_s_own_names_and_words() -> None:
    """Compiled once per distinct text and context: another asset's names, functions or
    words are never taken for this one's."""
    assert compile_expression("p > 1", {"p"}).names == {"p"}
    with pytest.raises(ExpressionError, match="unknown name 'p'"):
        compile_expression("p > 1", {"q"})
    assert compile_expression("trend('p') > 0", {"p"}, {"trend": {"p"}}).calls == {("trend", "p")}
    with pytest.raises(ExpressionError, match="not one of q"):
        compile_expression("trend('p') > 0", {"p"}, {"trend": {"q"}})
    compile_expression("state == 'on'", {"state"}, words={"state": frozenset({"on", "off"})})
    with pytest.raises(ExpressionError, match="never 'on'"):
        compile_expression("state == 'on'", {"state"}, words={"state": frozenset({"off"})})
