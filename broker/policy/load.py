"""Load a policy file and check what no single field can: references and duplicates.

A policy that loads is internally consistent: every signal names a known device, no two
devices or signals share a name, every asset's state signal exists and belongs to that asset.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from broker import documents
from broker.errors import ConfigError
from broker.policy.schema import Policy


def load(path: Path) -> Policy:
    """Load, type-check and cross-check a policy; raises ConfigError naming file and key."""
    policy = documents.load(path, Policy)
    for problem in _problems(policy):
        raise ConfigError(f"{path}: {problem}")
    return policy


def _problems(policy: Policy) -> Iterator[str]:
    devices: set[str] = set()
    for i, device in enumerate(policy.devices):
        if device.name in devices:
            yield f"devices[{i}].name: {device.name!r} is used twice"
        devices.add(device.name)
    signals: set[str] = set()
    for i, signal in enumerate(policy.signals):
        if signal.device not in devices:
            yield f"signals[{i}].device: no device named {signal.device!r}"
        if signal.path in signals:
            yield f"signals[{i}].path: {signal.path!r} is used twice"
        signals.add(signal.path)
    for i, asset in enumerate(policy.assets):
        if asset.state_signal is None:
            continue
        if asset.state_signal not in signals:
            yield f"assets[{i}].state_signal: no signal {asset.state_signal!r}"
        elif not asset.state_signal.startswith(asset.path + "/"):
            yield f"assets[{i}].state_signal: {asset.state_signal!r} is not under {asset.path!r}"
