"""A Modbus device's default budget, how a policy overrides it, and the warnings `policy show`
and `policy diff` print about it through the real CLI (`plan`'s are in
tests/plant/connectors/test_modbus_plan_cli.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import rfc8785
import yaml

from broker import policy
from broker.policy import ModbusDevice, parse
from tests.harness import DEMO_POLICY, dmzbroker, write_policy_yaml

DEFAULT_RATE = 20  # docs/modbus.md and ADR 0008 promise it; written here, not imported
DEVICE = "plc-machine-room"


def _demo(**device: Any) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(DEMO_POLICY.read_text())
    document["devices"][0].update(device)
    return document


def _device(loaded: policy.Policy) -> ModbusDevice:
    device = loaded.devices[0]
    assert isinstance(device, ModbusDevice)
    return device


def _compiled(directory: Path, document: dict[str, Any], name: str) -> Path:
    source = write_policy_yaml(directory, document, name)
    out = directory / f"{name}.dsse.json"
    dmzbroker("policy", "compile", str(source), "--out", str(out))
    return out


def _payload(envelope: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(base64.b64decode(json.loads(envelope.read_text())["payload"]))
    return data


def _warnings(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if "WARNING" in line]


# --- the default and its override ------------------------------------------------------------


def test_a_device_whose_policy_sets_no_budget_gets_the_conservative_default() -> None:
    written = yaml.safe_load(DEMO_POLICY.read_text())["devices"][0]
    assert "max_requests_per_s" not in written and "max_connections" not in written

    device = _device(policy.load(DEMO_POLICY))

    assert device.max_requests_per_s == DEFAULT_RATE
    assert device.max_connections == 1


def test_a_budget_in_the_policy_overrides_the_default(tmp_path: Path) -> None:
    lower = _demo(max_requests_per_s=5)
    higher = _demo(max_requests_per_s=250, max_connections=3)

    assert _device(policy.load(write_policy_yaml(tmp_path, lower, "lower"))).max_requests_per_s == 5
    raised = _device(policy.load(write_policy_yaml(tmp_path, higher, "higher")))
    assert (raised.max_requests_per_s, raised.max_connections) == (250, 3)


def test_the_signed_payload_spells_the_default_out(tmp_path: Path) -> None:
    """What the owners sign is the number the connector keeps, not an implied "unset"."""
    payload = _payload(_compiled(tmp_path, _demo(), "policy"))

    assert payload["devices"][0]["max_requests_per_s"] == DEFAULT_RATE
    assert payload["devices"][0]["max_connections"] == 1


def test_an_envelope_compiled_before_the_default_existed_still_loads_with_the_default(
    tmp_path: Path,
) -> None:
    """Such payloads say `null` for "not set": an upgrade must not refuse a signed policy."""
    payload = _payload(_compiled(tmp_path, _demo(), "policy"))
    payload["devices"][0]["max_requests_per_s"] = None

    loaded = parse.from_payload(rfc8785.dumps(payload), "old.dsse.json")

    assert _device(loaded).max_requests_per_s == DEFAULT_RATE


@pytest.mark.parametrize("rate", [0, -1, -0.5, 10_001])
def test_a_budget_out_of_range_is_refused_naming_the_device(tmp_path: Path, rate: float) -> None:
    source = write_policy_yaml(tmp_path, _demo(max_requests_per_s=rate))

    result = dmzbroker("plan", str(source), check=False)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"devices[0]: device '{DEVICE}': max_requests_per_s {rate:g} must be above 0" in line


# --- policy show and policy diff warn, in words for both owners -------------------------------


def test_show_warns_of_nothing_for_the_demo_policy(tmp_path: Path) -> None:
    result = dmzbroker("policy", "show", str(_compiled(tmp_path, _demo(), "policy")))

    assert result.returncode == 0
    assert _warnings(result.stdout) == []
    assert "unlimited" not in result.stdout
    [line] = [line for line in result.stdout.splitlines() if line.strip().startswith(DEVICE)]
    assert f"at most {DEFAULT_RATE} requests/s (the default), 1 connection (the default)" in line


def test_show_warns_when_scans_cannot_fit_the_budget_and_when_it_is_raised(
    tmp_path: Path,
) -> None:
    # The demo's 8 requests per scan every 0.1 s are 80 requests/s.
    tight = _compiled(tmp_path, _demo(poll_interval_s=0.1), "tight")
    raised = _compiled(tmp_path, _demo(max_requests_per_s=200, max_connections=2), "raised")

    tight_out = dmzbroker("policy", "show", str(tight))
    raised_out = dmzbroker("policy", "show", str(raised))

    assert tight_out.returncode == raised_out.returncode == 0  # a warning is not an error
    assert _warnings(tight_out.stdout) == [
        "WARNINGS for the OT and IT owners (2): read them before signing",
        f"WARNING: device {DEVICE} needs 8 requests every 0.1 s = 80 requests/s, but its "
        f"budget is {DEFAULT_RATE}/s: scans will be skipped (each takes at least 0.4 s); slow "
        "the poll interval, group the registers so fewer requests read them, or raise "
        "max_requests_per_s after asking the PLC's owner",
        f"WARNING: device {DEVICE} needs 8 requests every 0.1 s over 1 connection, one request "
        "at a time on each: at a typical 20 ms per answer that takes 0.16 s, longer than the "
        "poll interval, so scans will be skipped; slow the poll interval, group the registers "
        "so fewer requests read them, or allow more connections (max_connections) after "
        "asking the PLC's owner",
    ]
    raised_warnings = _warnings(raised_out.stdout)
    assert raised_warnings[0].startswith("WARNINGS for the OT and IT owners (2)")
    assert raised_warnings[1] == (
        f"WARNING: raises device {DEVICE}'s budget from the default {DEFAULT_RATE} to 200 "
        "requests/s: confirm with the PLC's owner that it can take it"
    )
    assert raised_warnings[2].startswith(
        f"WARNING: lets device {DEVICE} be read over 2 connections at once instead of the "
        "default 1: confirm with the PLC's owner"
    )
    assert "unlimited" not in tight_out.stdout + raised_out.stdout


def test_diff_warns_when_the_new_version_raises_a_budget(tmp_path: Path) -> None:
    old = _compiled(tmp_path, _demo(max_requests_per_s=50), "old")
    same = _compiled(tmp_path, {**_demo(max_requests_per_s=50), "version": 2}, "same")
    lower = _compiled(tmp_path, {**_demo(max_requests_per_s=10), "version": 2}, "lower")
    higher = _compiled(
        tmp_path, {**_demo(max_requests_per_s=400, max_connections=4), "version": 2}, "higher"
    )

    assert _warnings(dmzbroker("policy", "diff", str(old), str(same)).stdout) == []
    assert _warnings(dmzbroker("policy", "diff", str(old), str(lower)).stdout) == []
    raised = dmzbroker("policy", "diff", str(old), str(higher))

    assert raised.returncode == 0
    warnings = _warnings(raised.stdout)
    assert warnings[1] == (
        f"WARNING: raises device {DEVICE}'s budget from 50 (version 1) to 400 requests/s: "
        "confirm with the PLC's owner that it can take it"
    )
    assert warnings[2].startswith(
        f"WARNING: lets device {DEVICE} be read over 4 connections at once instead of 1 (version 1)"
    )
    assert len(warnings) == 3
