"""`plan POLICY`: the Modbus requests one scan of each device sends (docs/modbus.md).

For a PLC engineer reviewing a policy before it is signed: what the broker will ask of each
device, and whether the device's budget can carry it. POLICY is the YAML as written or an
envelope (`policy compile`, signed or not), whose payload is planned as `policy show` reads
it: without verifying signatures, and saying so. Warnings (`broker.policy.budget`,
`broker.policy.advice`) are printed, never turned into a failing exit code: the co-signers
decide. Reads only the policy file; talks to no device.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from broker import policy
from broker.policy import ModbusDevice, Policy, Signal, advice, budget, report
from broker.policy.schema import written

if TYPE_CHECKING:
    from broker.plant.connectors.modbus_plan import ReadRequest


def add_to(commands: Any) -> None:
    command = commands.add_parser(
        "plan", help="the Modbus requests one scan of each device sends, from a policy"
    )
    command.add_argument(
        "policy",
        type=Path,
        help="the policy as written (YAML), or its envelope from `policy compile`, signed or not",
    )
    command.set_defaults(handler=_plan)


def scans(loaded: Policy) -> list[tuple[ModbusDevice, list[Signal], list[ReadRequest]]]:
    """Each Modbus device of a policy, its signals, and the requests one scan sends."""
    # Imported here: the enterprise process loads this module too, never the plant's code.
    from broker.plant.connectors.modbus_plan import plan_reads  # noqa: PLC0415

    of_device: dict[str | None, list[Signal]] = {}
    for signal in loaded.signals:  # once, not once per device: 100,000 signals, 20 devices
        of_device.setdefault(signal.device, []).append(signal)
    found = []
    for device in loaded.devices:
        if isinstance(device, ModbusDevice):
            signals = of_device.get(device.name, [])
            found.append((device, signals, plan_reads(signals, device.unit_id)))
    return found


def requests_per_scan(loaded: Policy) -> dict[str, int]:
    """The number of requests one scan sends, per Modbus device (for the budget warnings)."""
    return {device.name: len(requests) for device, _, requests in scans(loaded)}


def _is_envelope(path: Path) -> bool:
    """Whether `path` holds a policy envelope (JSON with a payloadType) rather than YAML."""
    try:
        data = msgspec.json.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return False  # YAML, or a file policy.load will name the problem of
    return isinstance(data, dict) and "payloadType" in data


def _plan(args: argparse.Namespace) -> int:
    if _is_envelope(args.policy):
        loaded, sha256 = report.unverified(args.policy)
        print(f"{args.policy}: the policy in this envelope, payload sha256 {sha256}")
        print(report.UNVERIFIED)
        print()
    else:
        loaded = policy.load(args.policy)
    planned = scans(loaded)
    if not planned:
        print(f"{args.policy}: no Modbus devices")
        return 0
    total = warned = 0
    for device, signals, requests in planned:
        total += len(requests)
        warnings = budget.warnings(device, len(requests))
        warned += len(warnings)
        print("\n".join(_describe(device, requests, len(signals), warnings)))
        print()
    print(f"total: {total} requests per scan, {len(planned)} Modbus device(s)")
    for warning in advice.warnings(loaded):  # about the signals' addresses, not one device
        print(f"WARNING: {warning}")
        warned += 1
    if warned:
        print(f"{warned} warning(s) above: read them before signing (they do not stop the policy)")
    return 0  # a warning is not an error (docs/modbus.md)


def _describe(
    device: ModbusDevice, requests: list[ReadRequest], signals: int, warnings: list[str]
) -> list[str]:
    lines = [
        f"{device.name} ({device.address}): {len(requests)} requests per scan for {signals} "
        f"signals, every {written(device.poll_interval_s)} s; {budget.describe(device)}, "
        f"timeout {written(device.timeout_s)} s",
        f"  {'unit':>4}  {'function':<26} {'start':>5}  {'count':>5}  signals",
    ]
    for r in requests:
        function = f"FC{r.function_code} {r.table}"
        covered = ", ".join(slot.signal for slot in r.slots)
        lines.append(f"  {r.unit_id:>4}  {function:<26} {r.address:>5}  {r.count:>5}  {covered}")
    lines.extend(f"  WARNING: {warning}" for warning in warnings)
    return lines
