"""Connector registry: a protocol name in the policy → the connector that reads it.

Each connector's module is imported when a device of its protocol is built, not before:
its library (asyncua, bacpypes3, pymodbus) is memory the plant half would otherwise hold
for a protocol its policy never names (ADR 0029).
"""

from collections.abc import Sequence
from functools import partial

from broker.config import OpcUaConfig
from broker.plant.connectors.base import Connector, RawSample
from broker.plant.connectors.supervision import SupervisedDevice
from broker.policy import (
    BacnetDevice,
    Device,
    Dnp3Device,
    ModbusDevice,
    OpcUaDevice,
    Policy,
    Signal,
)
from broker.policy.schema import DerivedSource

# Sets of signal paths that share asset state: each must reach the pipeline in one batch.
SharedState = Sequence[frozenset[str]]


def connectors_for(policy: Policy, opcua: OpcUaConfig | None) -> dict[str, Connector]:
    """Device name → its connector, reading only that device's signals (derived ones are
    computed in the pipeline, never read)."""
    signals_of, shared = signals_by_device(policy), shared_state(policy)
    return {d.name: connector_for(d, signals_of[d.name], opcua, shared) for d in policy.devices}


def supervised_devices(policy: Policy, opcua: OpcUaConfig | None) -> dict[str, SupervisedDevice]:
    """Device name → its supervisor, which builds the connector itself: a device that the
    appliance config cannot serve is `bad` on its own, and the others read (supervision.py)."""
    signals_of, shared = signals_by_device(policy), shared_state(policy)
    return {
        d.name: SupervisedDevice(
            d.name,
            partial(connector_for, d, signals_of[d.name], opcua, shared),
            [signal.path for signal in signals_of[d.name]],
        )
        for d in policy.devices
    }


def signals_by_device(policy: Policy) -> dict[str, list[Signal]]:
    """Device name → the signals read from it, in policy order."""
    signals_of: dict[str, list[Signal]] = {d.name: [] for d in policy.devices}
    for signal in policy.signals:
        if signal.device is not None:
            signals_of[signal.device].append(signal)
    return signals_of


def shared_state(policy: Policy) -> list[frozenset[str]]:
    """The signals each modelled asset (declared, or with a derived signal) computes its
    state, alerts and derived signals from: its own, its ambient ones and its load. The
    pipeline builds a batch's context once all of the batch is observed, so these must come
    in one batch for every record of a scan to carry that scan's asset state; a signal of no
    modelled asset carries only its asset's path and may come in any batch."""
    modelled = {a.path for a in policy.assets}
    modelled |= {s.asset for s in policy.signals if isinstance(s.source, DerivedSource)}
    members: dict[str, set[str]] = {path: set() for path in modelled}
    for signal in policy.signals:
        if signal.asset in members:
            members[signal.asset].add(signal.path)
    for asset in policy.assets:
        members[asset.path].update(asset.ambient.values())
        if asset.load is not None:
            members[asset.path].add(asset.load.signal)
    return [frozenset(paths) for paths in members.values() if len(paths) > 1]


def connector_for(
    device: Device,
    signals: Sequence[Signal],
    opcua: OpcUaConfig | None,
    shared: SharedState | None = None,
) -> Connector:
    """The device's connector; `opcua` is the appliance config's `plant.opcua`. A Modbus
    connector hands each request's samples on when it is answered, in batches that keep
    each of `shared` whole (None: a whole scan is one batch).

    Raises ConfigError or TrustError when an OPC UA device lacks what it needs there: the
    client certificate, a trust list (or a pin in the policy), user credentials.
    """
    match device:
        case ModbusDevice():
            from broker.plant.connectors.modbus import ModbusConnector

            return ModbusConnector(device, signals, shared)
        case OpcUaDevice():
            from broker.plant.connectors.opcua import OpcUaConnector
            from broker.plant.connectors.opcua_session import SessionSettings

            return OpcUaConnector(device, signals, SessionSettings.build(device, opcua))
        case BacnetDevice():
            from broker.plant.connectors.bacnet import BacnetConnector

            return BacnetConnector(device, signals)
        case Dnp3Device():
            from broker.plant.connectors.dnp3 import Dnp3Connector

            return Dnp3Connector(device, signals)


__all__ = [
    "Connector",
    "RawSample",
    "SupervisedDevice",
    "connector_for",
    "connectors_for",
    "shared_state",
    "signals_by_device",
    "supervised_devices",
]
