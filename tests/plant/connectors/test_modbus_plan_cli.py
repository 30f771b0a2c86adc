"""`dmzbroker plan POLICY` through the real CLI: the requests per scan of each Modbus device."""

from __future__ import annotations

import re
from pathlib import Path

from broker import policy
from broker.plant.connectors.modbus_plan import plan_reads
from tests.harness import DEMO_POLICY, demo_policy, dmzbroker, write_policy_yaml

ROW = re.compile(r"^\s+(\d+)\s+FC(\d) (\w+)\s+(\d+)\s+(\d+)\s+(.+)$")


def warnings(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith("WARNING")]


def rows(output: str) -> list[tuple[int, int, int, int]]:
    """(unit id, function code, start, count) of each request line."""
    return [
        (int(m[1]), int(m[2]), int(m[4]), int(m[5]))
        for m in map(ROW.match, output.splitlines())
        if m
    ]


def test_the_demo_policy_plan_lists_each_request_with_the_signals_it_covers() -> None:
    demo = policy.load(DEMO_POLICY)
    plan = plan_reads([s for s in demo.signals if s.device == demo.devices[0].name], 1)

    result = dmzbroker("plan", str(DEMO_POLICY))

    assert rows(result.stdout) == [(r.unit_id, r.function_code, r.address, r.count) for r in plan]
    listed = [m[6].split(", ") for m in map(ROW.match, result.stdout.splitlines()) if m]
    assert listed == [[slot.signal for slot in r.slots] for r in plan]
    assert result.stdout.strip().endswith(
        f"total: {len(plan)} requests per scan, 1 Modbus device(s)"
    )
    # 8 requests every second fit the default budget of 20 requests/s: nothing to warn about.
    assert "at most 20 requests/s (the default), 1 connection (the default)" in result.stdout
    assert "WARNING" not in result.stdout and "warning" not in result.stdout
    assert "unlimited" not in result.stdout


def test_a_gateway_with_unit_ids_and_a_tight_budget_is_planned_per_unit(tmp_path: Path) -> None:
    document = demo_policy(5020, poll_interval_s=1.0)
    del document["devices"][0]["max_requests_per_s"]
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
    assert warnings(gateway) == [
        "WARNING: device gateway needs 3 requests every 1 s = 3 requests/s, but its budget is "
        "2/s: scans will be skipped (each takes at least 1.5 s); slow the poll interval, group "
        "the registers so fewer requests read them, or raise max_requests_per_s after asking "
        "the PLC's owner"
    ]
    assert warnings(out[: out.index("gateway (10.0.0.9:502)")]) == []
    assert f"total: {len(rows(out))} requests per scan, 2 Modbus device(s)" in out
    assert "1 warning(s) above: read them before signing" in out


def single_registers(count: int, **device: object) -> dict[str, object]:
    """The demo policy with one device of `count` one-register signals with gaps between
    them: one request each."""
    document = demo_policy(5020, poll_interval_s=1.0)
    del document["devices"][0]["max_requests_per_s"]
    document["devices"].append({"name": "plc", "protocol": "modbus", "host": "10.0.0.7", **device})
    document["signals"] += [
        {"path": f"site/line/press/r{a}", "device": "plc",
         "source": {"table": "input_register", "address": a, "type": "uint16"}}
        for a in range(0, 2 * count, 2)
    ]  # fmt: skip
    return document


def test_plan_warns_in_plain_words_when_scans_cannot_fit_the_default_budget(
    tmp_path: Path,
) -> None:
    document = single_registers(48, poll_interval_s=0.1)

    result = dmzbroker("plan", str(write_policy_yaml(tmp_path, document)))

    assert result.returncode == 0  # a warning is not an error
    assert warnings(result.stdout) == [
        "WARNING: device plc needs 48 requests every 0.1 s = 480 requests/s, but its budget is "
        "20/s: scans will be skipped (each takes at least 2.4 s); slow the poll interval, group "
        "the registers so fewer requests read them, or raise max_requests_per_s after asking "
        "the PLC's owner",
        "WARNING: device plc needs 48 requests every 0.1 s over 1 connection, one request at a "
        "time on each: at a typical 20 ms per answer that takes 0.96 s, longer than the poll "
        "interval, so scans will be skipped; slow the poll interval, group the registers so "
        "fewer requests read them, or allow more connections (max_connections) after asking "
        "the PLC's owner",
    ]
    assert "unlimited" not in result.stdout


def test_plan_warns_when_a_policy_raises_a_budget_above_the_default(tmp_path: Path) -> None:
    document = single_registers(48, poll_interval_s=1.0, max_requests_per_s=200, max_connections=2)

    result = dmzbroker("plan", str(write_policy_yaml(tmp_path, document)))

    assert result.returncode == 0
    found = warnings(result.stdout)
    assert found[0] == (
        "WARNING: raises device plc's budget from the default 20 to 200 requests/s: confirm "
        "with the PLC's owner that it can take it"
    )
    assert found[1].startswith(
        "WARNING: lets device plc be read over 2 connections at once instead of the default 1"
    )
    assert len(found) == 2  # 48 requests a second fit in 200: no overload warning


def test_plan_warns_when_a_scan_leaves_its_budget_no_room_for_the_answers(tmp_path: Path) -> None:
    """One connection sends one request at a time: a scan that needs all of the rate has no
    time left for the device to answer (10 requests every 0.5 s at 20/s with a 60 ms round
    trip skipped half its scans). An exact fit is a warning, not a fit."""
    exact = single_registers(10, poll_interval_s=0.5)  # 10 / 0.5 s = 20 requests/s
    nearly = single_registers(9, poll_interval_s=0.5)  # 18 requests/s: 90 %

    for document, rate, share in ((exact, 20, "100%"), (nearly, 18, "90%")):
        found = warnings(dmzbroker("plan", str(write_policy_yaml(tmp_path, document))).stdout)
        requests = round(rate * 0.5)
        assert found == [
            f"WARNING: device plc needs {requests} requests every 0.5 s = {rate} requests/s, "
            f"{share} of its budget of 20/s: that leaves no room for the device's answer time, "
            "so scans will be skipped whenever it answers slowly; slow the poll interval, group "
            "the registers so fewer requests read them, or raise max_requests_per_s after "
            "asking the PLC's owner"
        ]


def test_plan_is_quiet_when_the_scan_leaves_room_for_the_answers(tmp_path: Path) -> None:
    document = single_registers(8, poll_interval_s=0.5)  # 16 requests/s: 80 %, 8 x 20 ms

    result = dmzbroker("plan", str(write_policy_yaml(tmp_path, document)))

    assert warnings(result.stdout) == []


def test_plan_warns_when_one_connection_cannot_carry_the_answers_in_time(tmp_path: Path) -> None:
    """A budget raised far enough still leaves each connection one request at a time."""
    one = single_registers(60, poll_interval_s=1.0, max_requests_per_s=200)
    two = single_registers(60, poll_interval_s=1.0, max_requests_per_s=200, max_connections=2)

    one_found = warnings(dmzbroker("plan", str(write_policy_yaml(tmp_path, one))).stdout)
    two_found = warnings(dmzbroker("plan", str(write_policy_yaml(tmp_path, two))).stdout)

    assert one_found[0] == (
        "WARNING: device plc needs 60 requests every 1 s over 1 connection, one request at a "
        "time on each: at a typical 20 ms per answer that takes 1.2 s, longer than the poll "
        "interval, so scans will be skipped; slow the poll interval, group the registers so "
        "fewer requests read them, or allow more connections (max_connections) after asking "
        "the PLC's owner"
    )
    assert len(one_found) == 2  # and the raised budget
    assert not [w for w in two_found if "per answer" in w]  # 30 each: 0.6 s
    assert len(two_found) == 2  # the raised budget and the second connection


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


def test_plan_of_an_envelope_plans_what_was_signed_and_says_it_is_unverified(
    tmp_path: Path,
) -> None:
    """The same plan from the YAML and from its envelope, signed or not; the envelope's is
    what the signers approved, read without verifying (like `policy show`)."""
    source = write_policy_yaml(tmp_path, demo_policy(5020, poll_interval_s=1.0))
    envelope = tmp_path / "policy.dsse.json"
    dmzbroker("policy", "compile", str(source), "--out", str(envelope))

    from_yaml = dmzbroker("plan", str(source)).stdout
    result = dmzbroker("plan", str(envelope))

    assert result.returncode == 0
    assert rows(result.stdout) == rows(from_yaml) != []
    first, second = result.stdout.splitlines()[:2]
    assert first.startswith(f"{envelope}: the policy in this envelope, payload sha256 ")
    assert second == (
        "(contents shown as written; `dmzbroker policy verify` checks the signatures)"
    )
    sha256 = first.rsplit(" ", 1)[1]
    assert f"sha256      {sha256}" in dmzbroker("policy", "show", str(envelope)).stdout
    assert "unknown field" not in result.stdout + result.stderr


def test_plan_of_a_broken_envelope_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    envelope = tmp_path / "policy.dsse.json"
    envelope.write_text('{"payloadType": "application/vnd.dmzbroker.policy+json; v=1"}')

    result = dmzbroker("plan", str(envelope), check=False)

    assert result.returncode == 2
    assert result.stderr.startswith(f"dmzbroker: error: {envelope}: not a policy envelope")
    assert "Traceback" not in result.stderr


MODICON = (
    "signal site/line/press/r40001: reads holding register 40001 (0-based, as Modbus requests "
    'count); for Modicon 40001 (1-based "4xxxx" notation) write address: 0'
)


def test_a_modicon_address_is_warned_about_by_plan_show_and_compile_never_refused(
    tmp_path: Path,
) -> None:
    document = single_registers(1)
    document["signals"].append(
        {"path": "site/line/press/r40001", "device": "plc",
         "source": {"table": "holding_register", "address": 40001, "type": "int16"}}
    )  # fmt: skip
    source = write_policy_yaml(tmp_path, document)
    envelope = tmp_path / "policy.dsse.json"

    compiled = dmzbroker("policy", "compile", str(source), "--out", str(envelope))
    planned = dmzbroker("plan", str(source))
    shown = dmzbroker("policy", "show", str(envelope))

    for result in (compiled, planned, shown):
        assert result.returncode == 0
        assert f"WARNING: {MODICON}" in warnings(result.stdout)
    assert "1 warning(s) above: read them before signing" in planned.stdout
