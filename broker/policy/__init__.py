"""The policy: the one document that decides what crosses the boundary and who sees it.

`load` is imported when first used: the parser brings casbin and the semantic model, which a
process that only needs the schema or the trust root (`run`'s supervisor) never holds.
"""

from typing import TYPE_CHECKING

from broker.policy.device_schema import BacnetDevice, Device, Dnp3Device, ModbusDevice, OpcUaDevice
from broker.policy.schema import (
    Asset,
    BacnetSource,
    Dnp3Source,
    ModbusSource,
    OpcUaSource,
    Policy,
    Signal,
)

__all__ = [
    "Asset",
    "BacnetDevice",
    "BacnetSource",
    "Device",
    "Dnp3Device",
    "Dnp3Source",
    "ModbusDevice",
    "ModbusSource",
    "OpcUaDevice",
    "OpcUaSource",
    "Policy",
    "Signal",
    "load",
]


if TYPE_CHECKING:
    from broker.policy.parse import load


def __getattr__(name: str) -> object:
    if name == "load":
        from broker.policy.parse import load  # noqa: PLC0415 - see the module's docstring

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
