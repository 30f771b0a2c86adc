"""Policy warnings that are not about a device's budget: what a policy says clearly but may
not mean, such as a Modbus address written in 1-based Modicon notation.

`policy compile`, `policy show` and `plan` print these next to the budget warnings
(`budget.py`). They are warnings: nothing here refuses a policy (a device may really have a
register at 40001), changes what it reads, or talks to a device.
"""

from __future__ import annotations

from broker.policy.schema import ModbusSource, Policy

# Modicon notation numbers each table from 1 behind a leading digit: 0xxxx coils, 1xxxx
# discrete inputs, 3xxxx input registers, 4xxxx holding registers. Coils are left out: their
# 1..9999 is also the ordinary 0-based range, so a warning there would be noise.
_MODICON = {"discrete_input": 10001, "input_register": 30001, "holding_register": 40001}
_MODICON_SPAN = 9999  # 40001..49999


def warnings(policy: Policy) -> list[str]:
    """What a signer should check in `policy` before signing, one sentence each."""
    return [
        found
        for signal in policy.signals
        if isinstance(signal.source, ModbusSource)
        and (found := _one_based(signal.path, signal.source)) is not None
    ]


def _one_based(path: str, source: ModbusSource) -> str | None:
    """A warning when `source.address` looks like a Modicon 1-based number for its table."""
    first = _MODICON.get(source.table)
    if first is None or not first <= source.address < first + _MODICON_SPAN:
        return None
    zero_based = source.address - first
    table = source.table.replace("_", " ")
    return (
        f"signal {path}: reads {table} {source.address} (0-based, as Modbus requests count); "
        f'for Modicon {source.address} (1-based "{str(first)[0]}xxxx" notation) write '
        f"address: {zero_based}"
    )
