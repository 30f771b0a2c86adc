"""The policy: the one document that decides what crosses the boundary and who sees it."""

from broker.policy.device_schema import BacnetDevice, Device, Dnp3Device, ModbusDevice, OpcUaDevice
from broker.policy.parse import load
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
