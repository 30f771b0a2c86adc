"""The signed policy means exactly what `policy show` says: a property test over Modbus signals,
every schema key shown, and the refusals of keys that would have no effect.

The property: for every Modbus signal the policy compiler accepts (any table, type, address,
bit, word and byte order, scale, offset, length, unit id), the line `policy show` prints for it
is parsed, and an independent reference decodes random registers from that line ALONE (exact
decimal arithmetic, its own register layout code). The plant pipeline (the Modbus request
plan, then broker.plant.pipeline with broker.plant.decode) must publish exactly that.
"""

from __future__ import annotations

import copy
import decimal
import re
import struct
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from broker.commands.plan import requests_per_scan
from broker.errors import ConfigError
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.modbus_plan import plan_reads
from broker.plant.pipeline import PlantPipeline
from broker.policy import ModbusDevice, Policy, parse, report
from broker.policy import envelope as envelopes
from tests.harness import DEMO_POLICY

TABLES = ["coil", "discrete_input", "holding_register", "input_register"]
TYPES = ["bool", "int16", "uint16", "int32", "uint32", "float32",
         "int64", "uint64", "float64", "string"]  # fmt: skip
EXPIRES = (datetime.now(UTC) + timedelta(days=30)).isoformat()


def policy_document(signals: list[dict[str, Any]], device_unit: int = 1) -> dict[str, Any]:
    return {
        "deployment_id": "meaning",
        "version": 1,
        "expires": EXPIRES,
        "devices": [{"name": "plc", "protocol": "modbus", "host": "10.0.0.5",
                     "unit_id": device_unit}],
        "signals": signals,
    }  # fmt: skip


def compiled(document: dict[str, Any]) -> tuple[Policy, str]:
    """What the signers read and what the broker runs: the compiled, canonical payload
    (refused with ConfigError like `policy compile`), and `policy show`'s text of it."""
    accepted = parse.from_payload(msgspec.json.encode(document), "policy.yaml")
    payload = envelopes.compile_policy(accepted).untrusted_payload
    signed = parse.from_payload(payload, "policy.dsse.json")
    return signed, report.show(signed, "0" * 64, datetime.now(UTC), requests_per_scan(signed))


# The reference: a signal's meaning read back from `policy show`'s line, and decoded from that.

SHOWN = re.compile(
    r"^  (?P<path>\S+) ← plc(?: unit (?P<unit>\d+))? (?P<table>\w+) (?P<address>\d+) "
    r"(?P<type>\w+)(?: bit (?P<bit>\d+))?(?: length (?P<length>\d+))?"
    r"(?: (?P<words>big|little)-word-first)?(?P<swapped> little-endian-bytes)?"
    r"(?: ×(?P<scale>\S+))?(?: (?P<sign>[+-])(?P<offset>\S+))?$"
)
DEVICE_UNIT = re.compile(r"^  plc: modbus \S+ unit (\d+),")
WIDTH = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2,
         "int64": 4, "uint64": 4, "float64": 4}  # fmt: skip
SIGNED = {"int16", "int32", "int64"}


def shown_signals(text: str) -> dict[str, dict[str, str | None]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("signals of"))
    found = {}
    for line in lines[start + 1 :: 2]:
        if not line.startswith("  "):
            break
        match = SHOWN.match(line)
        assert match is not None, f"`policy show` line not understood: {line!r}"
        found[match["path"]] = match.groupdict()
    return found


Memory = list[int]  # a device's registers repeat with this period: a small, varied map


def word_at(memory: Memory, unit: int, table: str, address: int) -> int:
    return memory[(address + 7 * unit + TABLES.index(table)) % len(memory)]


class Bad(Exception):
    """The reference finds no trustworthy value: the pipeline must publish `bad`."""


def shortest_float32(value: float) -> Decimal:
    """The decimal with the fewest significant digits that reads back as float32 `value`."""
    exact = Decimal(value)
    for digits in range(1, 10):
        candidate = Decimal(f"{exact:.{digits - 1}e}")
        if struct.unpack(">f", struct.pack(">f", float(candidate)))[0] == value:
            return candidate
    raise AssertionError(f"no decimal of 9 digits reads back as {value!r}")


def reference(line: dict[str, str | None], unit: int, memory: Memory) -> object:
    """What the shown line says the broker publishes for these registers."""
    table, type_, address = str(line["table"]), str(line["type"]), int(str(line["address"]))
    if table in ("coil", "discrete_input"):
        return bool(word_at(memory, unit, table, address) & 1)
    width = int(str(line["length"])) if line["length"] else WIDTH.get(type_, 1)
    words = [word_at(memory, unit, table, address + i) for i in range(width)]
    if line["swapped"]:
        words = [int.from_bytes(w.to_bytes(2, "little"), "big") for w in words]
    if line["words"] == "little":
        words.reverse()
    data = b"".join(w.to_bytes(2, "big") for w in words)
    if line["bit"] is not None:  # whatever the type, a bit shown is the value signed
        return bool(int.from_bytes(data, "big") >> int(line["bit"]) & 1)
    if type_ == "string":
        try:
            return data.rstrip(b"\0").decode("ascii")
        except UnicodeDecodeError as e:
            raise Bad from e
    if type_ in ("float32", "float64"):
        number = struct.unpack(">f" if type_ == "float32" else ">d", data)[0]
        if number != number or number in (float("inf"), float("-inf")):
            raise Bad
        raw = shortest_float32(number) if type_ == "float32" else Decimal(repr(number))
    else:
        raw = Decimal(int.from_bytes(data, "big", signed=type_ in SIGNED))
    scale = Decimal(line["scale"] or "1")
    offset = Decimal(f"{line['sign'] or '+'}{line['offset'] or '0'}")
    with decimal.localcontext(prec=100):  # exact for every number drawn here
        exact = raw * scale + offset
    whole = type_ not in ("float32", "float64") and all(
        d == d.to_integral_value() for d in (scale, offset)
    )
    if whole and -(2**63) <= exact <= 2**64 - 1:
        return int(exact)
    published = float(exact)
    if published in (float("inf"), float("-inf")):
        raise Bad
    return published


# The pipeline: the planned requests answered from the same memory, through PlantPipeline.


def published(policy: Policy, memory: Memory) -> dict[str, object]:
    device = policy.devices[0]
    assert isinstance(device, ModbusDevice)
    now = datetime.now(UTC)
    samples = []
    for request in plan_reads(policy.signals, device.unit_id):
        items = [
            word_at(memory, request.unit_id, request.table, request.address + i)
            for i in range(request.count)
        ]
        for slot in request.slots:  # as broker.plant.connectors.modbus hands them on
            if request.table in ("coil", "discrete_input"):
                raw: Any = bool(items[slot.offset] & 1)
            else:
                raw = tuple(items[slot.offset : slot.offset + slot.width])
            samples.append(RawSample(slot.signal, raw, now, "good"))
    records = PlantPipeline(policy).process(samples)
    return {r.signal: (Bad if r.quality == "bad" else r.value) for r in records}


NICE_NUMBERS = [0.1, 0.25, 2.0, 0.001, -1.5, 1e-05, 100.0, 0.3, 1.8, 3.6, 1000.0]
numbers = st.one_of(
    st.sampled_from(NICE_NUMBERS),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).filter(lambda x: x != 0),
)
WORDS = [0, 0xFFFF, 0x8000, 0x7FFF, 0x7F80, 0x7FC0, 0xFF80, 0x3F80, 0x4148, 0x4F49, 0x0041]


@st.composite
def modbus_sources(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly a source the compiler accepts, with each optional key where it applies; now and
    then any combination of keys, valid or not (the compiler decides)."""
    table = draw(st.sampled_from([*TABLES, "holding_register", "input_register"]))
    bits = table in ("coil", "discrete_input")
    type_ = "bool" if bits else draw(st.sampled_from(TYPES))
    source: dict[str, Any] = {
        "table": table,
        "type": type_,
        "address": draw(st.one_of(st.integers(0, 200), st.integers(0, 65535))),
    }
    width = 1 if type_ in ("bool", "string") else WIDTH[type_]
    applies = {
        "bit": st.integers(0, 15) if type_ == "bool" and not bits else None,
        "length": st.integers(1, 6) if type_ == "string" else None,
        "word_order": st.sampled_from(["big", "little"]) if width > 1 else None,
        "byte_order": st.sampled_from(["big", "little"]) if not bits else None,
        "unit_id": st.integers(0, 255),
    }
    anything = draw(st.integers(0, 4)) == 0
    if anything:
        source["type"] = draw(st.sampled_from(TYPES))
    for key, where_it_applies in applies.items():
        required = key in ("bit", "length") and where_it_applies is not None
        values = DRAWN.get(key) if anything and where_it_applies is None else where_it_applies
        if values is not None and (required or draw(st.booleans())):
            source[key] = draw(values)
    return source


DRAWN = {
    "bit": st.integers(0, 15),
    "length": st.integers(1, 6),
    "word_order": st.sampled_from(["big", "little"]),
    "byte_order": st.sampled_from(["big", "little"]),
}


@st.composite
def modbus_signals(draw: st.DrawFn, index: int) -> dict[str, Any]:
    signal: dict[str, Any] = {
        "path": f"site/area/asset/m{index}",
        "device": "plc",
        "source": draw(modbus_sources()),
    }
    numeric = signal["source"]["type"] not in ("bool", "string")
    if (numeric or draw(st.integers(0, 9)) == 0) and draw(st.booleans()):
        signal["scale"] = draw(numbers)
    if (numeric or draw(st.integers(0, 9)) == 0) and draw(st.booleans()):
        signal["offset"] = draw(numbers)
    return signal


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    signals=st.integers(1, 3).flatmap(lambda n: st.tuples(*(modbus_signals(i) for i in range(n)))),
    device_unit=st.integers(0, 255),
    memory=st.lists(
        st.one_of(st.integers(0, 0xFFFF), st.sampled_from(WORDS)), min_size=5, max_size=9
    ),
)
def test_what_policy_show_prints_is_what_the_pipeline_publishes(
    signals: tuple[dict[str, Any], ...], device_unit: int, memory: Memory
) -> None:
    try:
        policy, shown = compiled(policy_document(list(signals), device_unit))
    except ConfigError:
        event("refused at compile")
        return  # refused at compile: nothing is signed (the refusals are tested below)
    event("accepted")
    lines = shown_signals(shown)
    unit = int(next(m[1] for m in map(DEVICE_UNIT.match, shown.splitlines()) if m))
    assert unit == device_unit
    assert set(lines) == {s.path for s in policy.signals}

    actual = published(policy, memory)

    for path, line in lines.items():
        try:
            expected: object = reference(line, int(line["unit"] or unit), memory)
        except Bad:
            expected = Bad
        value = actual[path]
        assert value == expected, f"{path}: shown as {line}, published {value!r}"
        assert type(value) is type(expected), f"{path}: {value!r} is not like {expected!r}"


# The refusals: a key that would have no effect is refused, naming the key.


def refusal(source: dict[str, Any], **signal: Any) -> str:
    document = policy_document(
        [{"path": "site/area/asset/m", "device": "plc", "source": source, **signal}]
    )
    with pytest.raises(ConfigError) as refused:
        compiled(document)
    return str(refused.value)


@pytest.mark.parametrize("type_", ["int16", "uint16", "int32", "float32", "float64"])
def test_bit_on_a_register_that_is_not_a_bool_is_refused_naming_bit(type_: str) -> None:
    message = refusal({"table": "holding_register", "address": 104, "type": type_, "bit": 3})

    assert "bit: applies only to type 'bool'" in message
    article = "an" if type_.startswith("int") else "a"
    assert f"{article} {type_} is read whole" in message


@pytest.mark.parametrize("table", ["coil", "discrete_input"])
def test_bit_on_a_coil_or_discrete_input_is_refused_as_a_single_bit_already(table: str) -> None:
    message = refusal({"table": table, "address": 2, "type": "bool", "bit": 2})

    assert f"bit: does not apply to a {table}, which is a single bit already" in message
    assert "does not fit table" not in message


def test_a_bool_bit_of_a_register_is_accepted_and_shown_with_its_bit() -> None:
    document = policy_document(
        [{"path": "site/area/asset/m", "device": "plc",
          "source": {"table": "holding_register", "address": 40, "type": "bool", "bit": 3}}]
    )  # fmt: skip
    _, shown = compiled(document)

    assert "  site/area/asset/m ← plc holding_register 40 bool bit 3" in shown.splitlines()


def test_a_scale_of_zero_is_refused() -> None:
    message = refusal({"table": "holding_register", "address": 1, "type": "int16"}, scale=0.0)

    assert "scale: 0 would publish the offset whatever the device sends" in message


@pytest.mark.parametrize(
    ("source", "named"),
    [
        ({"sampling_interval_ms": 100}, "sampling_interval_ms"),
        ({"queue_size": 10}, "queue_size"),
        ({"deadband": {"kind": "absolute", "value": 0.5}}, "deadband"),
    ],
)
def test_subscription_keys_on_a_polled_opc_ua_device_are_refused(
    source: dict[str, Any], named: str
) -> None:
    document = policy_document([])
    document["devices"] = [{"name": "ua", "protocol": "opcua", "endpoint": "opc.tcp://h:4840",
                            "read": "poll", "server_certificate_sha256": "a" * 64}]  # fmt: skip
    document["signals"] = [
        {"path": "site/area/asset/m", "device": "ua", "source": {"node": "ns=2;s=M", **source}}
    ]
    with pytest.raises(ConfigError) as refused:
        compiled(document)

    assert f"signals[0].source.{named}: only a subscription applies {named}" in str(refused.value)
    assert "is polled (read: poll)" in str(refused.value)
    document["devices"][0]["read"] = "subscribe"
    compiled(document)  # the same keys on a subscription are applied, so accepted


# Every key is shown: changing any key of a source, signal, device or asset changes the text.

OPCUA_DOCUMENT = {
    "deployment_id": "meaning",
    "version": 1,
    "expires": EXPIRES,
    "devices": [{"name": "ua", "protocol": "opcua", "endpoint": "opc.tcp://h:4840",
                 "server_certificate_sha256": "a" * 64}],
    "signals": [{"path": "site/area/asset/m", "device": "ua", "source": {"node": "ns=2;s=M"}}],
}  # fmt: skip

CHANGES: list[tuple[str, dict[str, Any], str, object]] = [
    # (what, document, dotted key path, another valid value)
    ("modbus length", policy_document([{"path": "site/area/asset/m", "device": "plc",
     "source": {"table": "input_register", "address": 0, "type": "string", "length": 2}}]),
     "signals.0.source.length", 3),
    ("modbus byte order", policy_document([{"path": "site/area/asset/m", "device": "plc",
     "source": {"table": "input_register", "address": 0, "type": "int16"}}]),
     "signals.0.source.byte_order", "little"),
    ("modbus unit", policy_document([{"path": "site/area/asset/m", "device": "plc",
     "source": {"table": "input_register", "address": 0, "type": "int16"}}]),
     "signals.0.source.unit_id", 9),
    ("scale precision", policy_document([{"path": "site/area/asset/m", "device": "plc",
     "source": {"table": "input_register", "address": 0, "type": "int16"}, "scale": 0.1234567}]),
     "signals.0.scale", 0.1234568),
    ("offset precision", policy_document([{"path": "site/area/asset/m", "device": "plc",
     "source": {"table": "input_register", "address": 0, "type": "int16"}, "offset": 1.0000001}]),
     "signals.0.offset", 1.0000002),
    ("range precision", policy_document([{"path": "site/area/asset/m", "device": "plc",
     "source": {"table": "input_register", "address": 0, "type": "int16"},
     "range": {"min": 0.0000001, "max": 10}}]), "signals.0.range.min", 0.0000002),
    ("poll interval precision", policy_document([{"path": "site/area/asset/m", "device": "plc",
     "source": {"table": "input_register", "address": 0, "type": "int16"}}]),
     "devices.0.poll_interval_s", 1.0000001),
    ("budget precision", policy_document([{"path": "site/area/asset/m", "device": "plc",
     "source": {"table": "input_register", "address": 0, "type": "int16"}}]),
     "devices.0.max_requests_per_s", 0.001),
    ("opcua sampling", OPCUA_DOCUMENT, "signals.0.source.sampling_interval_ms", 250),
    ("opcua queue", OPCUA_DOCUMENT, "signals.0.source.queue_size", 5),
    ("opcua deadband", OPCUA_DOCUMENT, "signals.0.source.deadband",
     {"kind": "percent", "value": 2}),
    ("opcua identity", OPCUA_DOCUMENT, "devices.0.user_identity", "certificate"),
]  # fmt: skip


def changed(document: dict[str, Any], dotted: str, value: object) -> dict[str, Any]:
    document = copy.deepcopy(document)
    *parents, last = dotted.split(".")
    node: Any = document
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[last] = value
    return document


@pytest.mark.parametrize(
    ("document", "dotted", "value"),
    [pytest.param(d, k, v, id=what) for what, d, k, v in CHANGES],
)
def test_every_key_that_changes_what_runs_changes_what_policy_show_prints(
    document: dict[str, Any], dotted: str, value: object
) -> None:
    before = compiled(document)[1]
    after = compiled(changed(document, dotted, value))[1]

    assert before != after


def test_the_demo_policy_shows_its_baseline_tables_and_trend_windows() -> None:
    loaded = parse.load(DEMO_POLICY)
    asset = next(a for a in loaded.assets if a.baselines)
    baseline = asset.baselines[0]

    text = report.show(loaded, "0" * 64, datetime.now(UTC), {})

    header = text.splitlines().index(
        f"  {asset.path} ({asset.type})" + (f": {asset.description}" if asset.description else "")
    )
    assert text.splitlines()[header + 1] == f"      trends over {asset.trend_window}"
    first = f"{baseline.ambient} {baseline.ambient_points[0]:g}"
    assert f"expected at {first}, by load: " in text or f"expected by {baseline.ambient}: " in text
