"""The compiled policy's bytes and their reading back, on the fast paths of ADR 0033.

`canonical_policy` must write exactly what RFC 8785's reference writes for the policy's plain
data (or every signature over an existing policy would stop verifying), and may leave out the
refusals of numbers JSON cannot hold only because the schema refuses them first: a test walks
the schema so that a number field added later without that refusal fails here.
`parse.from_payload` reads a payload as `policy compile` writes it straight into the typed
policy; an older payload or a refused one takes the longer way, with the same result.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec
import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msgspec import inspect

from broker.errors import ConfigError
from broker.policy import envelope as envelopes
from broker.policy import parse
from broker.policy.schema import Baseline, Checks, Deadband, Dnp3Source, Policy
from tests.harness import DEMO_POLICY

SAFE = 2**53 - 1


def demo_document() -> dict[str, Any]:
    return msgspec.to_builtins(parse.load(DEMO_POLICY))  # type: ignore[no-any-return]


def reference_bytes(policy: Policy) -> bytes:
    return rfc8785.dumps(msgspec.to_builtins(policy))


def edited(document: dict[str, Any]) -> Policy:
    return parse.from_payload(msgspec.json.encode(document), "policy.yaml")


def test_the_demo_policy_compiles_to_the_reference_bytes() -> None:
    policy = parse.load(DEMO_POLICY)
    assert envelopes.canonical_policy(policy) == reference_bytes(policy)


@pytest.mark.parametrize(
    "scale",
    [2.0, 0.1, 1e-4, 9.9e-5, 1e-6, 1e-7, 5e-324, 1e16, 1e16 + 2, 2.0**53, 2.0**53 + 2, 1e21,
     1.7976931348623157e308, -12345.678, 123456789012345.67],
)  # fmt: skip
def test_every_form_of_a_number_is_written_as_the_reference_writes_it(scale: float) -> None:
    document = demo_document()
    document["signals"][1].update(scale=scale, offset=-0.0, description="ünïcode ☃ \U0001f600")
    document["assets"][0]["baselines"][0]["expected"][0] = [scale, -scale]
    policy = edited(document)
    assert envelopes.canonical_policy(policy) == reference_bytes(policy)


@pytest.mark.parametrize("text", ["\ue000 private use", "\uffff", "\U00010000 beyond the BMP"])
def test_text_that_utf16_order_sorts_apart_is_written_as_the_reference_writes_it(
    text: str,
) -> None:
    document = demo_document()
    document["signals"][0]["description"] = text
    document["assets"][0]["description"] = text + '\x00\x1f"\\\u2028\x7f'
    policy = edited(document)
    assert envelopes.canonical_policy(policy) == reference_bytes(policy)


def test_a_signature_over_the_reference_bytes_verifies_on_the_compiled_envelope() -> None:
    """An envelope compiled and signed before keeps verifying: its payload is these bytes."""
    policy = parse.load(DEMO_POLICY)
    key = Ed25519PrivateKey.generate()
    signed_before = key.sign(envelopes.pae(envelopes.PAYLOAD_TYPE, reference_bytes(policy)))
    compiled = envelopes.compile_policy(policy)
    key.public_key().verify(  # raises InvalidSignature otherwise
        signed_before, envelopes.pae(compiled.payloadType, compiled.untrusted_payload)
    )


def test_a_compiled_payload_reads_back_as_the_policy_compiled() -> None:
    policy = parse.load(DEMO_POLICY)
    payload = envelopes.compile_policy(policy).untrusted_payload
    assert parse.from_payload(payload, "site.dsse.json") == policy


def test_a_payload_without_source_tags_or_with_null_budgets_reads_the_longer_way() -> None:
    """Envelopes compiled by older versions: no `protocol` in sources, null budgets."""
    policy = parse.load(DEMO_POLICY)
    older = msgspec.to_builtins(policy)
    for signal in older["signals"]:
        if signal["device"] is not None:  # a derived source always carried its tag
            del signal["source"]["protocol"]
    for device in older["devices"]:
        device["max_requests_per_s"] = None
    assert parse.from_payload(rfc8785.dumps(older), "old.dsse.json") == policy


def test_a_refused_payload_names_its_problem_as_before() -> None:
    document = demo_document()
    document["signals"][3]["device"] = "plc-nowhere"
    with pytest.raises(ConfigError) as refused:
        parse.from_payload(msgspec.json.encode(document), "site.dsse.json")
    assert str(refused.value).startswith(
        "site.dsse.json: signals[3].device: no device named 'plc-nowhere'"
    )


# --- every number a policy holds is one JSON holds -------------------------------------------

# Number fields without bounds in their type: each refuses what JSON cannot hold when it is
# built, a float anything but a finite number, an integer anything beyond 2**53 (tested below).
CHECKED_WHEN_BUILT = {
    ("Signal", "scale"), ("Signal", "offset"), ("Range", "min"), ("Range", "max"),
    ("Checks", "max_rate_per_s"), ("Checks", "max_noise"), ("Deadband", "value"),
    ("Baseline", "ambient_points"), ("Baseline", "load_points"), ("Baseline", "expected"),
    ("Baseline", "drifting_pct"), ("Baseline", "abnormal_pct"),
    ("Baseline", "below_expected_pct"),  # refused whatever its value (the old name)
    ("ModbusDevice", "max_requests_per_s"), ("BacnetDevice", "max_requests_per_s"),
    ("Dnp3Source", "group"), ("Dnp3Source", "variation"),  # one of the listed numbers
}  # fmt: skip


def _unbounded(kind: inspect.Type) -> bool:
    if isinstance(kind, inspect.FloatType | inspect.IntType):
        low = kind.ge if kind.ge is not None else kind.gt
        high = kind.le if kind.le is not None else kind.lt
        if low is None or high is None:
            return True
        if isinstance(kind, inspect.FloatType):
            return not (math.isfinite(low) and math.isfinite(high))
        return low < -SAFE or high > SAFE
    return any(_unbounded(inner) for inner in _inner(kind))


def _inner(kind: inspect.Type) -> list[inspect.Type]:
    """The types a union or container holds, less structs (walked on their own by _structs)."""
    return [t for t in _contained(kind) if not isinstance(t, inspect.StructType)]


def _contained(kind: inspect.Type) -> list[inspect.Type]:
    """The types a union or container holds: its members, items, or a dict's values (keys are
    written as JSON strings)."""
    if isinstance(kind, inspect.UnionType):
        return list(kind.types)
    if isinstance(kind, inspect.TupleType):
        return list(kind.item_types)
    if isinstance(kind, inspect.DictType):
        return [kind.value_type]
    if isinstance(
        kind, inspect.ListType | inspect.VarTupleType | inspect.SetType | inspect.FrozenSetType
    ):
        return [kind.item_type]
    return []


def _structs(kind: inspect.Type, seen: dict[type, inspect.StructType]) -> None:
    if isinstance(kind, inspect.StructType):
        if kind.cls in seen:
            return
        seen[kind.cls] = kind
        for field in kind.fields:
            _structs(field.type, seen)
    for inner in _contained(kind):
        _structs(inner, seen)


def unbounded_fields(root: type) -> set[tuple[str, str]]:
    """(struct, field) of every number field under `root` whose type leaves it unbounded."""
    structs: dict[type, inspect.StructType] = {}
    _structs(inspect.type_info(root), structs)
    return {
        (cls.__name__, field.name)
        for cls, info in structs.items()
        for field in info.fields
        if _unbounded(field.type)
    }


def test_every_number_field_without_bounds_is_checked_when_built() -> None:
    assert unbounded_fields(Policy) == CHECKED_WHEN_BUILT


Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]


class Reading(msgspec.Struct):
    value: float


class LaterField(msgspec.Struct):
    """Fields a policy might grow: numbers in tuples and sets, and a struct inside a tuple."""

    points: tuple[float, ...]
    pair: tuple[int, Fraction]
    codes: frozenset[int]
    flags: set[Fraction]
    readings: tuple[Reading, ...]
    bounded: tuple[Fraction, ...]


def test_the_walk_finds_numbers_inside_tuples_and_sets() -> None:
    """Review R6: the walk looked only inside lists, dicts and unions, so a `tuple[float, ...]`
    field with no check would have passed it."""
    assert unbounded_fields(LaterField) == {
        ("LaterField", "points"),
        ("LaterField", "pair"),
        ("LaterField", "codes"),
        ("Reading", "value"),
    }


BASELINE = {"measure": "m", "ambient": "a", "ambient_points": [0, 1], "expected": [[1], [2]]}


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(
    ("kind", "valid", "field"),
    [
        (Checks, {}, "max_rate_per_s"),
        (Checks, {}, "max_noise"),
        (Deadband, {"kind": "absolute", "value": 1.0}, "value"),
        (Baseline, BASELINE, "drifting_pct"),
        (Baseline, BASELINE, "abnormal_pct"),
    ],
)
def test_a_number_json_cannot_hold_is_refused_when_built(
    kind: type, valid: dict[str, Any], field: str, value: float
) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**valid, field: value}, kind)


@pytest.mark.parametrize("value", [math.inf, math.nan])
@pytest.mark.parametrize("where", ["ambient_points", "load_points", "expected"])
def test_a_baseline_point_json_cannot_hold_is_refused_when_built(where: str, value: float) -> None:
    baseline = {"measure": "m", "ambient": "a", "ambient_points": [0, 1], "load_points": [0, 1],
                "expected": [[1, 2], [3, 4]]}  # fmt: skip
    if where == "expected":
        baseline["expected"] = [[1, value], [3, 4]]
    else:
        baseline[where] = [0, value]
    with pytest.raises(msgspec.ValidationError, match="finite"):
        msgspec.convert(baseline, Baseline)


@pytest.mark.parametrize("field", ["group", "variation"])
def test_a_dnp3_number_beyond_the_listed_ones_is_refused(field: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"group": 30, "index": 0, field: 2**60}, Dnp3Source)
