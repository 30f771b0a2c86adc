"""The policy: the one document that decides what crosses the boundary and who sees it."""

from broker.policy.device_schema import Device, ModbusDevice, OpcUaDevice
from broker.policy.parse import load
from broker.policy.schema import Asset, ModbusSource, OpcUaSource, Policy, Signal

__all__ = [
    "Asset",
    "Device",
    "ModbusDevice",
    "ModbusSource",
    "OpcUaDevice",
    "OpcUaSource",
    "Policy",
    "Signal",
    "load",
]
