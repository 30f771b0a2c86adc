"""`advice.warnings`: a Modbus address that looks like 1-based Modicon notation is warned about,
naming the 0-based address the broker reads and the one to write instead; never refused."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from broker.policy import advice, parse
from broker.policy.schema import Policy
from tests.harness import DEMO_POLICY


def policy_with(table: str, address: int, type_: str = "int16") -> Policy:
    document: dict[str, Any] = {
        "deployment_id": "advice",
        "version": 1,
        "expires": "2099-01-01T00:00:00Z",
        "devices": [{"name": "plc", "protocol": "modbus", "host": "10.0.0.5"}],
        "signals": [{"path": "site/area/pump/speed", "device": "plc",
                     "source": {"table": table, "address": address, "type": type_}}],
    }  # fmt: skip
    return parse.from_payload(msgspec.json.encode(document), "policy")


@pytest.mark.parametrize(
    ("table", "address", "type_", "modicon", "zero_based"),
    [
        ("holding_register", 40001, "int16", "4xxxx", 0),
        ("holding_register", 40105, "float32", "4xxxx", 104),
        ("holding_register", 49999, "int16", "4xxxx", 9998),
        ("input_register", 30001, "int16", "3xxxx", 0),
        ("input_register", 30010, "uint32", "3xxxx", 9),
        ("discrete_input", 10001, "bool", "1xxxx", 0),
    ],
)
def test_a_modicon_looking_address_is_warned_about_with_the_address_to_write(
    table: str, address: int, type_: str, modicon: str, zero_based: int
) -> None:
    found = advice.warnings(policy_with(table, address, type_))

    assert found == [
        f"signal site/area/pump/speed: reads {table.replace('_', ' ')} {address} (0-based, as "
        f'Modbus requests count); for Modicon {address} (1-based "{modicon}" notation) write '
        f"address: {zero_based}"
    ]


@pytest.mark.parametrize(
    ("table", "address", "type_"),
    [
        ("holding_register", 40000, "int16"),  # SunSpec's base: a real 0-based address
        ("holding_register", 39999, "int16"),
        ("holding_register", 50000, "int16"),
        ("holding_register", 30001, "int16"),  # 3xxxx is input registers' notation
        ("input_register", 40001, "int16"),  # 4xxxx is holding registers'
        ("input_register", 30000, "int16"),
        ("coil", 1, "bool"),  # 0xxxx coils are also ordinary 0-based addresses: no noise
        ("coil", 9999, "bool"),
        ("discrete_input", 10000, "bool"),
        ("discrete_input", 20000, "bool"),
    ],
)
def test_an_ordinary_address_is_not_warned_about(table: str, address: int, type_: str) -> None:
    assert advice.warnings(policy_with(table, address, type_)) == []


def test_the_demo_policy_draws_no_advice() -> None:
    assert advice.warnings(parse.load(DEMO_POLICY)) == []
