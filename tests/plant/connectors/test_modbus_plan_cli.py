"""`dmzbroker plan POLICY` through the real CLI: the requests per scan of each Modbus device."""

from __future__ import annotations

import re
from pathlib import Path

from tests.harness import DEMO_POLICY, demo_policy, dmzbroker, write_policy_yaml

ROW = re.compile(r"^\s+(\d+)\s+FC(\d) (\w+)\s+(\d+)\s+(\d+)\s+(.+)$")


def rows(output: str) -> list[tuple[int, int, int, int]]:
    """(unit id, function code, start, count) of each request line."""
    return [
        (int(m[1]), int(m[2]), int(m[4]), int(m[5]))
        for m in map(ROW.match, output.splitlines())
        if m
    ]


def test_the_demo_policy_plan_lists_each_request_with_the_signals_it_covers() -> None:
    result = dmzbroker("plan", str(DEMO_POLICY))

    assert rows(result.stdout) == [
        (1, 1, 0, 2),
        (1, 2, 0, 2),
        (1, 3, 0, 1),
        (1, 3, 10, 2),
        (1, 4, 0, 4),
        (1, 4, 10, 1),
        (1, 4, 20, 2),
        (1, 4, 30, 3),
    ]
    power = next(line for line in result.stdout.splitlines() if "motor_power" in line)
    assert "coldstore/machine-room/compressor-1/suction_pressure" in power
    assert result.stdout.strip().endswith("total: 8 requests per scan, 1 Modbus device(s)")


def test_a_gateway_with_unit_ids_and_a_tight_budget_is_planned_per_unit(tmp_path: Path) -> None:
    document = demo_policy(5020)
    document["devices"].append(
        {"name": "gateway", "protocol": "modbus", "host": "10.0.0.9", "unit_id": 3,
         "poll_interval_s": 1.0, "max_requests_per_s": 2}
    )  # fmt: skip
    for unit, address in ((None, 100), (None, 101), (4, 100), (4, 300)):
        source = {"table": "holding_register", "address": address, "type": "float32"}
        if unit is not None:
            source["unit_id"] = unit
        document["signals"].append(
            {"path": f"coldstore/gateway/meter/u{unit or 0}-a{address}", "device": "gateway",
             "source": source}
        )  # fmt: skip

    out = dmzbroker("plan", str(write_policy_yaml(tmp_path, document))).stdout

    gateway = out[out.index("gateway (10.0.0.9:502)") :]
    assert rows(gateway) == [(3, 3, 100, 3), (4, 3, 100, 2), (4, 3, 300, 2)]
    assert "at 2 requests/s a scan takes at least 1.5 s" in gateway
    assert "total: 11 requests per scan, 2 Modbus device(s)" in out


def test_a_missing_file_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    result = dmzbroker("plan", str(tmp_path / "absent.yaml"), check=False)

    assert result.returncode == 2
    assert result.stderr.strip() == f"dmzbroker: error: {tmp_path / 'absent.yaml'}: file not found"


def test_an_invalid_policy_names_the_key_and_never_shows_a_traceback(tmp_path: Path) -> None:
    document = demo_policy(5020)
    document["devices"][0]["max_connections"] = 99

    result = dmzbroker("plan", str(write_policy_yaml(tmp_path, document)), check=False)

    assert result.returncode == 2
    assert "max_connections" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
