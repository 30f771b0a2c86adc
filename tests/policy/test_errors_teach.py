"""A policy mistake is told as `FILE:LINE: key.path: what`, in words that say how to fix it.

Each case changes one line of a small valid policy and asserts the whole message: the line the
mistake is on (nested keys, list items, keys implied or missing), the valid values and the
nearest one, the nearest known key, the `{min: 0, max: 400}` form. A signed payload has no
lines: its errors carry the key path alone.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import yaml

from broker import policy
from broker.errors import ConfigError
from broker.policy.parse import from_payload
from tests.harness import dmzbroker

GOOD = """\
deployment_id: site-a
version: 1
expires: '2036-01-01T00:00:00Z'
devices:
  - name: plc-1
    protocol: modbus
    host: 127.0.0.1
signals:
  - path: site/room/pump/running
    device: plc-1
    source: {table: coil, address: 0, type: bool}
  - path: site/room/pump/pressure
    device: plc-1
    source:
      table: holding_register
      address: 4
      type: int16
    scale: 0.1
    range: {min: 0, max: 400}
assets:
  - path: site/room/pump
    ambient: {outside: site/room/pump/pressure}
    states:
      - {state: running, when: running}
    rules:
      - name: high
        when: "pressure > 300"
        alert: Pressure is high
        action: check the valve
        outcome: safety
roles:
  - name: viewer
    signals: ["site/**"]
consumers:
  - identity: spiffe://site/consumer/historian
    roles: [viewer]
"""


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the one line of `text` that contains `needle`."""
    found = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(found) == 1, f"{needle!r} is on lines {found}"
    return found[0]


def refusal(tmp_path: Path, text: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        policy.load(path)
    message = str(refused.value)
    assert "\n" not in message
    return message.removeprefix(f"{path}:")


def test_the_base_policy_loads(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    assert len(policy.load(path).signals) == 2


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # an enum: the valid values, and the nearest one
        ("table: holding_register", "table: holding_registers",
         "signals[1].source.table: invalid enum value 'holding_registers' — did you mean "
         "'holding_register'? (one of: coil, discrete_input, holding_register, input_register)"),
        ("outcome: safety", "outcome: safty",
         "assets[0].rules[0].outcome: invalid enum value 'safty' — did you mean 'safety'? "
         "(one of: energy, product_quality, asset_life, safety)"),
        ("type: int16", "type: banana",
         "signals[1].source.type: invalid enum value 'banana' (one of: "),
        # a tagged union's tag
        ("protocol: modbus", "protocol: modbuss",
         "devices[0].protocol: invalid value 'modbuss' — did you mean 'modbus'? "
         "(one of: modbus, opcua, dnp3, bacnet)"),
        # an unknown key: the nearest known one, or all of them
        ("scale: 0.1", "scael: 0.1",
         "signals[1]: unknown key 'scael' — did you mean 'scale'?"),
        ("address: 4", "adress: 4",
         "signals[1].source: unknown key 'adress' — did you mean 'address'?"),
        ("host: 127.0.0.1", "colour: red",
         "devices[0]: unknown key 'colour' (known keys: protocol, name, host, port, "),
        # a struct written as a list
        ("range: {min: 0, max: 400}", "range: [0, 400]",
         "signals[1].range: expected an object, got a list — write it as {min: 0, max: 400}"),
        ("range: {min: 0, max: 400}", "range: [-2.5, 12.75]",
         "signals[1].range: expected an object, got a list — write it as {min: -2.5, max: 12.75}"),
        ("range: {min: 0, max: 400}", "range: [0, 400, 9]",
         "signals[1].range: expected an object, got a list — write it as {min: …, max: …}"),
        # a value is shown as written, quoted once, with control characters spelled out
        ("table: holding_register", 'table: "holding\\e[31m_register\\n"',
         "signals[1].source.table: invalid enum value 'holding\\x1b[31m_register\\n' — did you "
         "mean 'holding_register'? (one of: "),
        ("table: holding_register", r"table: 'holding\register'",
         r"signals[1].source.table: invalid enum value 'holding\register' — did you "
         "mean 'holding_register'? (one of: "),
        ("scale: 0.1", '"sc\\nale": 0.1',
         "signals[1]: unknown key 'sc\\nale' — did you mean 'scale'?"),
        # a key that is not text, or holds a backtick: at its own line, named as written
        ("outside: site/room/pump/pressure", "5: site/room/pump/pressure",
         "assets[0].ambient: keys must be text, got 5"),
        ("host: 127.0.0.1", '"ho`st": 127.0.0.1',
         "devices[0]: unknown key 'ho`st' — did you mean 'host'?"),
        # a wrong type or bound deep in a list item
        ("protocol: modbus", "protocol: {a: 1}",
         "devices[0].protocol: expected `str`, got `dict`"),
        ("device: plc-1\n    source:\n", "device: [plc-1]\n    source:\n",
         "signals[1].device: expected `str | null`, got `array`"),
        ("address: 4", "address: -4",
         "signals[1].source.address: expected `int` >= 0, got `-4`"),
        ("outside: site/room/pump/pressure", "outside: 7",
         "assets[0].ambient.outside: expected `str`, got `int`"),
        # a check of a struct (ValueError in __post_init__), at the key it names
        ("identity: spiffe://site/consumer/historian", "identity: historian",
         "consumers[0]: identity 'historian': must be a URI such as spiffe://site/consumer/name"),
        ("range: {min: 0, max: 400}", "range: {min: 400, max: 0}",
         "signals[1].range: "),
        # across the document (parse.py) and the semantic model (model.py)
        ("device: plc-1\n    source:\n", "device: plc-2\n    source:\n",
         "signals[1].device: no device named 'plc-2'"),
        ("when: \"pressure > 300\"", "when: \"presure > 300\"",
         "assets[0].rules[0].when: unknown name 'presure'"),
        ("outside: site/room/pump/pressure", "outside: site/room/pump/flow",
         "assets[0].ambient.outside: no signal 'site/room/pump/flow'"),
    ],
)  # fmt: skip
def test_each_mistake_is_told_at_its_line_with_how_to_fix_it(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    needle = new.splitlines()[0]
    assert refusal(tmp_path, text).startswith(f"{line_of(text, needle)}: {expected}")


def test_a_missing_required_key_is_told_at_its_mapping(tmp_path: Path) -> None:
    text = GOOD.replace("      type: int16\n", "")
    source = text.splitlines().index("    source:") + 1
    assert refusal(tmp_path, text) == f"{source}: signals[1].source: missing required key 'type'"


def test_a_missing_top_level_key_is_told_at_the_first_line(tmp_path: Path) -> None:
    text = GOOD.replace("deployment_id: site-a\n", "")
    assert refusal(tmp_path, text) == "1: (top level): missing required key 'deployment_id'"


def test_a_wrong_protocol_is_told_at_its_device_even_after_the_signals(tmp_path: Path) -> None:
    devices = GOOD[GOOD.index("devices:") : GOOD.index("signals:")]
    text = GOOD.replace(devices, "") + devices.replace("protocol: modbus", "protocol: modbuss")
    assert refusal(tmp_path, text).startswith(
        f"{line_of(text, 'protocol: modbuss')}: devices[0].protocol: invalid value 'modbuss'"
    )


def test_a_duplicate_is_told_at_the_second_one(tmp_path: Path) -> None:
    text = GOOD.replace("path: site/room/pump/running", "path: site/room/pump/pressure")
    second = [
        n for n, line in enumerate(text.splitlines(), 1) if "- path: site/room/pump/p" in line
    ]
    assert refusal(tmp_path, text) == (
        f"{second[1]}: signals[1].path: 'site/room/pump/pressure' is used twice"
    )


def payload_refusal(data: object) -> str:
    with pytest.raises(ConfigError) as refused:
        from_payload(msgspec.json.encode(data), "site.dsse.json")
    return str(refused.value)


def test_payload_errors_have_the_key_path_and_the_words_but_no_line() -> None:
    data = yaml.safe_load(GOOD)
    data["signals"][1]["source"]["table"] = "holding_registers"
    assert payload_refusal(data) == (
        "site.dsse.json: signals[1].source.table: invalid enum value 'holding_registers' — "
        "did you mean 'holding_register'? (one of: coil, discrete_input, holding_register, "
        "input_register)"
    )
    data = yaml.safe_load(GOOD)
    data["signals"][1]["device"] = "plc-2"
    assert payload_refusal(data) == (
        "site.dsse.json: signals[1].device: no device named 'plc-2' — did you mean 'plc-1'? "
        "(one of: plc-1)"
    )


def test_the_cli_prints_the_one_line_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD.replace("range: {min: 0, max: 400}", "range: [0, 400]"))
    result = dmzbroker(
        "policy", "compile", str(path), "--out", str(tmp_path / "p.json"), check=False
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"dmzbroker: error: {path}:{line_of(GOOD, 'range:')}: signals[1].range: expected an "
        "object, got a list — write it as {min: 0, max: 400}"
    )
