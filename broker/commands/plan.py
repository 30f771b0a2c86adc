"""`plan POLICY`: the Modbus requests one scan of each device sends (docs/modbus.md).

For a PLC engineer reviewing a policy before it is signed: what the broker will ask of each
device, and whether the device's budget can carry it. Reads only the policy file; talks to
no device.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker import policy
from broker.policy import ModbusDevice

if TYPE_CHECKING:
    from broker.plant.connectors.modbus_plan import ReadRequest


def add_to(commands: Any) -> None:
    command = commands.add_parser(
        "plan", help="the Modbus requests one scan of each device sends, from a policy"
    )
    command.add_argument("policy", type=Path, help="the policy as written, YAML")
    command.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> int:
    # Imported here: the enterprise process loads this module too, never the plant's code.
    from broker.plant.connectors.modbus_plan import plan_reads  # noqa: PLC0415

    loaded = policy.load(args.policy)
    devices = [d for d in loaded.devices if isinstance(d, ModbusDevice)]
    if not devices:
        print(f"{args.policy}: no Modbus devices")
        return 0
    total = 0
    for device in devices:
        signals = [s for s in loaded.signals if s.device == device.name]
        requests = plan_reads(signals, device.unit_id)
        total += len(requests)
        print("\n".join(_describe(device, requests, len(signals))))
        print()
    print(f"total: {total} requests per scan, {len(devices)} Modbus device(s)")
    return 0


def _describe(device: ModbusDevice, requests: list[ReadRequest], signals: int) -> list[str]:
    budget = (
        "unlimited requests/s"
        if device.max_requests_per_s is None
        else f"at most {device.max_requests_per_s:g} requests/s"
    )
    lines = [
        f"{device.name} ({device.address}): {len(requests)} requests per scan for {signals} "
        f"signals, every {device.poll_interval_s:g} s; {budget}, "
        f"{device.max_connections} connection(s), timeout {device.timeout_s:g} s",
        f"  {'unit':>4}  {'function':<26} {'start':>5}  {'count':>5}  signals",
    ]
    for r in requests:
        function = f"FC{r.function_code} {r.table}"
        covered = ", ".join(slot.signal for slot in r.slots)
        lines.append(f"  {r.unit_id:>4}  {function:<26} {r.address:>5}  {r.count:>5}  {covered}")
    if device.max_requests_per_s is not None:
        scan_s = len(requests) / device.max_requests_per_s
        if scan_s > device.poll_interval_s:
            lines.append(
                f"  note: at {device.max_requests_per_s:g} requests/s a scan takes at least "
                f"{scan_s:g} s, longer than poll_interval_s: scans will be skipped"
            )
    return lines
