"""A Modbus device's request budget, in words both owners read: what it is, whether a policy's
scans fit in it, and whether a policy raises it.

`dmzbroker plan` and `policy show` print these before a policy is signed, `policy diff` the
raises against the version before. They are warnings: nothing here refuses a policy (the
co-signers decide, ADR 0008), and nothing here talks to a device.
"""

from __future__ import annotations

from broker.policy.schema import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUESTS_PER_S,
    ModbusDevice,
)

ASK = "after asking the PLC's owner"
CONFIRM = "confirm with the PLC's owner that it can take it"


def _number(value: float) -> str:
    return f"{round(value, 2):g}"


def describe(device: ModbusDevice) -> str:
    """`at most 20 requests/s (the default), 1 connection (the default)`."""
    rate, connections = device.max_requests_per_s, device.max_connections
    return (
        f"at most {_number(rate)} requests/s"
        + (" (the default)" if rate == DEFAULT_MAX_REQUESTS_PER_S else "")
        + f", {connections} connection{'s' if connections > 1 else ''}"
        + (" (the default)" if connections == DEFAULT_MAX_CONNECTIONS else "")
    )


def warnings(device: ModbusDevice, requests_per_scan: int) -> list[str]:
    """What the policy asks of `device` beyond its budget, or beyond the defaults."""
    found = []
    needed = requests_per_scan / device.poll_interval_s
    budget = device.max_requests_per_s
    if needed > budget * (1 + 1e-9):  # float noise must not warn about an exact fit
        found.append(
            f"device {device.name} needs {requests_per_scan} requests every "
            f"{_number(device.poll_interval_s)} s = {_number(needed)} requests/s, but its "
            f"budget is {_number(budget)}/s: scans will be skipped (each takes at least "
            f"{_number(requests_per_scan / budget)} s); slow the poll interval, group the "
            "registers so fewer requests read them, or raise max_requests_per_s " + ASK
        )
    if budget > DEFAULT_MAX_REQUESTS_PER_S:
        found.append(
            f"raises device {device.name}'s budget from the default "
            f"{_number(DEFAULT_MAX_REQUESTS_PER_S)} to {_number(budget)} requests/s: " + CONFIRM
        )
    if device.max_connections > DEFAULT_MAX_CONNECTIONS:
        found.append(_more_connections(device, f"the default {DEFAULT_MAX_CONNECTIONS}"))
    return found


def raised_since(old: ModbusDevice, new: ModbusDevice, old_version: int) -> list[str]:
    """The budgets `new` raises above what version `old_version` gave the same device."""
    found = []
    if new.max_requests_per_s > old.max_requests_per_s:
        found.append(
            f"raises device {new.name}'s budget from {_number(old.max_requests_per_s)} "
            f"(version {old_version}) to {_number(new.max_requests_per_s)} requests/s: " + CONFIRM
        )
    if new.max_connections > old.max_connections:
        found.append(_more_connections(new, f"{old.max_connections} (version {old_version})"))
    return found


def _more_connections(device: ModbusDevice, before: str) -> str:
    return (
        f"lets device {device.name} be read over {device.max_connections} connections at "
        f"once instead of {before}: confirm with the PLC's owner that it has that many Modbus "
        "TCP connections to spare (small PLCs accept only a few, shared with HMIs and SCADA, "
        "and some drop the oldest when one more connects)"
    )
