"""Connector registry: a protocol name in the policy → the class that reads it."""

from broker.plant.connectors.base import Connector, RawSample
from broker.plant.connectors.modbus import ModbusConnector

CONNECTORS: dict[str, type[Connector]] = {
    "modbus": ModbusConnector,
}

__all__ = ["CONNECTORS", "Connector", "RawSample"]
