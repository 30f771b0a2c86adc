"""Parse a policy and check what no single field can: references and duplicates.

A policy that loads is internally consistent: every signal names a known device, no two
devices or signals share a name, and the semantic model's references and expressions hold
(`model.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import msgspec
from casbin.util import glob_match as matches

from broker import documents
from broker.conversion_errors import choices
from broker.errors import ConfigError
from broker.policy.collection import collection_paused
from broker.policy.device_schema import Device, Dnp3Device, OpcUaDevice
from broker.policy.model import SemanticModel
from broker.policy.schema import Dnp3Source, OpcUaSource, Policy, Signal


def load(path: Path) -> Policy:
    """Load a policy as people write it (YAML); raises ConfigError naming file, line and key."""
    with collection_paused():
        return documents.load(path, Policy, prepare=_with_source_protocols, check=_problems)


def from_payload(trusted_payload: bytes, source: str) -> Policy:
    """Parse the verified payload of a policy envelope (canonical JSON)."""
    with collection_paused():
        compiled = _as_compiled(trusted_payload)
        if compiled is not None and next(_problems(compiled), None) is None:
            return compiled
        try:  # an older envelope, or one that is refused: read it the way that names why
            data = msgspec.json.decode(trusted_payload)
        except msgspec.DecodeError as e:
            raise ConfigError(f"{source}: the signed payload is not JSON: {e}") from e
        data = _with_source_protocols(_unset_budgets_left_out(data))
        return documents.convert(data, Policy, source, check=_problems)


def _as_compiled(trusted_payload: bytes) -> Policy | None:
    """The payload as `policy compile` writes it (each source tagged with its protocol, every
    device with its budget) decoded straight to the typed policy, in C: at 100,000 signals
    twice as fast as decoding plain data, preparing it and converting that, and with no
    plain copy to free. The same types with the same strictness accept nothing the longer
    way refuses, and a duplicate key is the last one's value on both. None for any other
    payload: the longer way reads older envelopes and names what is wrong with the rest."""
    try:
        return msgspec.json.decode(trusted_payload, type=Policy)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _unset_budgets_left_out(data: Any) -> Any:
    """Drop `max_requests_per_s: null` from the devices of a signed payload.

    Envelopes compiled before every device had a default budget (ADR 0008) spell a budget
    the policy did not set as null. It still means "not set", so the device gets the default
    instead of an already signed policy being refused after an upgrade. Only payloads: in
    YAML a null is a mistake and is refused with its place.
    """
    devices = data.get("devices") if isinstance(data, dict) else None
    for device in devices if isinstance(devices, list) else []:
        if isinstance(device, dict) and device.get("max_requests_per_s", 0) is None:
            del device["max_requests_per_s"]
    return data


# A tuple: `in` compares, so a mistaken value that cannot be hashed (a dict) is no TypeError
_DEVICE_PROTOCOLS = tuple(d.__struct_config__.tag for d in get_args(Device))


def _with_source_protocols(data: Any) -> Any:
    """Tag each signal's `source` with its device's protocol, which decides its shape.

    People do not write the tag (the device already says it); the typed schema needs it to
    tell a Modbus source from an OPC UA one. An explicit tag is kept, and checked below.
    """
    if not isinstance(data, dict):
        return data
    devices = data.get("devices")
    protocols = {  # a protocol that is not one is refused at its device, not at each signal
        d["name"]: d["protocol"]
        for d in (devices if isinstance(devices, list) else [])
        if isinstance(d, dict)
        and isinstance(d.get("name"), str)
        and d.get("protocol") in _DEVICE_PROTOCOLS
    }
    signals = data.get("signals")
    for signal in signals if isinstance(signals, list) else []:
        if isinstance(signal, dict) and isinstance(signal.get("source"), dict):
            source = signal["source"]
            if "expression" in source and "device" not in signal:
                implied = "derived"
            else:
                device = signal.get("device")  # a mistyped one is refused below, at its key
                implied = (protocols.get(device) if isinstance(device, str) else None) or (
                    "opcua" if "node" in source else "modbus"
                )
            source.setdefault("protocol", implied)
    return data


def _problems(policy: Policy) -> Iterator[str]:
    yield from _duplicates("devices", "name", [d.name for d in policy.devices])
    yield from _duplicates("signals", "path", [s.path for s in policy.signals])
    yield from _duplicates("roles", "name", [r.name for r in policy.roles])
    yield from _duplicates("consumers", "identity", [c.identity for c in policy.consumers])
    signals = {s.path for s in policy.signals}
    roles = {r.name for r in policy.roles}
    protocols = {d.name: d.protocol for d in policy.devices}
    polled = {d.name for d in policy.devices if isinstance(d, OpcUaDevice) and d.read == "poll"}
    by_events = {d.name for d in policy.devices if isinstance(d, Dnp3Device) and d.read == "events"}
    for i, signal in enumerate(policy.signals):
        if signal.device is None:
            continue  # a derived signal: its expression is checked with its asset
        if signal.device not in protocols:
            yield (
                f"signals[{i}].device: no device named {signal.device!r}"
                + choices(signal.device, sorted(protocols))
            )
        elif signal.source.protocol != protocols[signal.device]:
            yield (
                f"signals[{i}].source: a {signal.source.protocol} source on "
                f"{protocols[signal.device]} device {signal.device!r}"
            )
        elif signal.device in polled and (unused := _subscription_keys(signal)):
            yield (
                f"signals[{i}].source.{unused[0]}: only a subscription applies "
                f"{', '.join(unused)}, and device {signal.device!r} is polled (read: poll): "
                "leave them out, or let the device subscribe"
            )
        elif (
            signal.device in by_events
            and isinstance(signal.source, Dnp3Source)
            and signal.source.variation != 0
        ):  # class polls return the outstation's own variations: the key would do nothing
            yield (
                f"signals[{i}].source.variation: device {signal.device!r} is read by events "
                "(read: events), whose class polls return the variations the outstation is "
                "set up for: leave variation out, or read the device with read: static"
            )
    for i, role in enumerate(policy.roles):
        for pattern in role.signals:
            if not any(matches(path, pattern) for path in signals):
                yield f"roles[{i}].signals: {pattern!r} matches no signal of this policy"
    for i, consumer in enumerate(policy.consumers):
        for role_name in consumer.roles:
            if role_name not in roles:
                yield (
                    f"consumers[{i}].roles: no role named {role_name!r}"
                    + choices(role_name, sorted(roles))
                )
    yield from _duplicates("assets", "path", [a.path for a in policy.assets])
    yield from SemanticModel(policy).problems


def _subscription_keys(signal: Signal) -> list[str]:
    """The keys of an OPC UA source that only a subscription applies, as the policy sets them."""
    source = signal.source
    if not isinstance(source, OpcUaSource):
        return []
    return [
        key
        for key, unset in (
            ("sampling_interval_ms", source.sampling_interval_ms is None),
            ("queue_size", source.queue_size == 1),
            ("deadband", source.deadband is None),
        )
        if not unset
    ]


def _duplicates(section: str, field: str, values: list[str]) -> Iterator[str]:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            yield f"{section}[{i}].{field}: {value!r} is used twice"
        seen.add(value)
