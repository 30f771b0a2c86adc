"""A Modbus device's request budget, in words both owners read: what it is, whether a policy's
scans fit in it, and whether a policy raises it.

`dmzbroker plan` and `policy show` print these before a policy is signed, `policy diff` the
raises against the version before, and the Modbus connector audits the misfits of the policy
it runs (`device_budget_exceeded`). They are warnings: nothing here refuses a policy (the
co-signers decide, ADR 0008), and nothing here talks to a device.

A scan fits when it needs at most `HEADROOM` of the budget's rate, and when its requests,
answered one at a time per connection at `TYPICAL_ANSWER_S` each, take at most the poll
interval. Both are estimates made before any device answers: they warn of what will
certainly skip scans and of what leaves no room for a device that answers slowly, never
promise that a quieter policy fits.
"""

from __future__ import annotations

import math

from broker.policy.device_schema import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUESTS_PER_S,
    ModbusDevice,
)
from broker.policy.schema import written

# A scan needing more of the budget than this leaves no room for the device's answer time: with
# one request at a time per connection, each request waits for its answer as well as its turn.
HEADROOM = 0.8
# A typical Modbus TCP answer: a PLC on Ethernet answers in one or two program cycles (5-20 ms);
# a serial gateway at 9600 baud takes about 40-60 ms per read (ADR 0008), which HEADROOM and the
# owners' judgement cover. A device with a shorter timeout_s cannot take longer than that.
TYPICAL_ANSWER_S = 0.02

ASK = "after asking the PLC's owner"
CONFIRM = "confirm with the PLC's owner that it can take it"


def _number(value: float) -> str:
    return f"{round(value, 2):g}"


def describe(device: ModbusDevice) -> str:
    """`at most 20 requests/s (the default), 1 connection (the default)`."""
    rate, connections = device.max_requests_per_s, device.max_connections
    return (
        f"at most {written(rate)} requests/s"
        + (" (the default)" if rate == DEFAULT_MAX_REQUESTS_PER_S else "")
        + f", {connections} connection{'s' if connections > 1 else ''}"
        + (" (the default)" if connections == DEFAULT_MAX_CONNECTIONS else "")
    )


def warnings(device: ModbusDevice, requests_per_scan: int) -> list[str]:
    """What the policy asks of `device` beyond its budget, or beyond the defaults."""
    found = misfits(device, requests_per_scan)
    budget = device.max_requests_per_s
    if budget > DEFAULT_MAX_REQUESTS_PER_S:
        found.append(
            f"raises device {device.name}'s budget from the default "
            f"{written(DEFAULT_MAX_REQUESTS_PER_S)} to {written(budget)} requests/s: " + CONFIRM
        )
    if device.max_connections > DEFAULT_MAX_CONNECTIONS:
        found.append(_more_connections(device, f"the default {DEFAULT_MAX_CONNECTIONS}"))
    return found


def misfits(device: ModbusDevice, requests_per_scan: int) -> list[str]:
    """Why `requests_per_scan` requests every poll interval will skip scans of `device`."""
    found = []
    interval = device.poll_interval_s
    needed = requests_per_scan / interval
    budget = device.max_requests_per_s
    every = f"device {device.name} needs {requests_per_scan} requests every {written(interval)} s"
    fix = "slow the poll interval, group the registers so fewer requests read them, or "
    if needed > budget * (1 + 1e-9):  # float noise must not call an exact fit an overrun
        found.append(
            f"{every} = {_number(needed)} requests/s, but its budget is {written(budget)}/s: "
            f"scans will be skipped (each takes at least {_number(requests_per_scan / budget)} "
            f"s); {fix}raise max_requests_per_s " + ASK
        )
    elif needed > budget * HEADROOM:
        found.append(
            f"{every} = {_number(needed)} requests/s, {needed / budget:.0%} of its budget of "
            f"{written(budget)}/s: that leaves no room for the device's answer time, so scans "
            f"will be skipped whenever it answers slowly; {fix}raise max_requests_per_s " + ASK
        )
    connections = min(device.max_connections, max(1, requests_per_scan))
    answer_s = min(TYPICAL_ANSWER_S, device.timeout_s)
    answering_s = math.ceil(requests_per_scan / connections) * answer_s
    if answering_s > interval * (1 + 1e-9):
        found.append(
            f"{every} over {connections} connection{'s' if connections > 1 else ''}, one "
            f"request at a time on each: at a typical {_number(answer_s * 1000)} ms per answer "
            f"that takes {_number(answering_s)} s, longer than the poll interval, so scans will "
            f"be skipped; {fix}allow more connections (max_connections) " + ASK
        )
    return found


def raised_since(old: ModbusDevice, new: ModbusDevice, old_version: int) -> list[str]:
    """The budgets `new` raises above what version `old_version` gave the same device."""
    found = []
    if new.max_requests_per_s > old.max_requests_per_s:
        found.append(
            f"raises device {new.name}'s budget from {written(old.max_requests_per_s)} "
            f"(version {old_version}) to {written(new.max_requests_per_s)} requests/s: " + CONFIRM
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
