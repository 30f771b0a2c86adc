"""canonical_json: byte for byte what the reference RFC 8785 implementation writes."""

from __future__ import annotations

import math
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.policy.envelope import canonical_json

SAFE = 2**53 - 1
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-SAFE, SAFE)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_same_bytes_as_rfc8785(value: Any) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    "value",
    [
        {"\ue000": 1, "\U0001f600": 2, "a": 3},  # UTF-16 order puts the emoji (D83D..) first
        {"k": {"\uffff": 0, "\U00010000": 1}},
        [2.0, -0.0, 1e21, 1e20, 1e-6, 1e-7, 5e-324, 1.7976931348623157e308, 0.1, 12345.678],
        [2.0**53, -(2.0**53), 2.0**53 - 1, 1e16, 1e16 + 2, 9999999999999998.0, 1e-4, 9.9e-5],
        [1e16 - 0.5, 123456789012345.67, -0.00012, 0.5, -1.5],
        {"b": [True, False, None], "a": '\x00\x1f"\\\u2028\x7f'},
    ],
)
def test_edge_cases_as_rfc8785(value: Any) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, 2**53, [-(2**60)], {"x": -math.inf}])
def test_what_json_cannot_hold_is_refused(value: Any) -> None:
    with pytest.raises(rfc8785.CanonicalizationError):
        canonical_json(value)
