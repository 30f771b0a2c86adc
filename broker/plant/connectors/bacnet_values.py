"""What a BACnet device's answers mean for the BACnet connector: the properties a scan reads
and how they are cut into ReadPropertyMultiple batches, the results of an ACK, a property
value as the pipeline takes it, and status-flags and reliability as quality.

Pure: no I/O. It must never take a result the request did not ask for as data, and never
rate a value `good` whose object's status-flags were not read with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from bacpypes3.primitivedata import Boolean, Double, Enumerated, ObjectIdentifier

from broker.plant.connectors import bacnet_frames as frames
from broker.plant.connectors.bacnet_frames import FrameError
from broker.plant.decode import RawValue, float32_text
from broker.policy import Signal
from broker.policy.schema import BacnetSource
from broker.records import Quality

PRESENT_VALUE: Final = "present-value"
STATUS: Final = ("status-flags", "reliability")


@dataclass(frozen=True)
class Read:
    signal: str
    obj: ObjectIdentifier
    object_type: str
    prop: str
    unit: str  # the policy's


def read_of(signal: Signal) -> Read:
    source = signal.source
    if not isinstance(source, BacnetSource):
        raise TypeError(f"{signal.path}: not a BACnet source")
    obj = ObjectIdentifier((source.object_type, source.instance))
    return Read(signal.path, obj, source.object_type, source.property, signal.unit)


def scan_objects(reads: Sequence[Read]) -> list[list[frames.Property]]:
    """Per object the signals name, in order: its signals' properties, then status-flags
    and reliability (read with the value, so that its quality is the value's)."""
    objects: dict[ObjectIdentifier, dict[str, None]] = {}
    for r in reads:
        objects.setdefault(r.obj, {})[r.prop] = None
    for props in objects.values():
        props.update(dict.fromkeys(STATUS))
    return [[(obj, prop) for prop in props] for obj, props in objects.items()]


def batches(
    objects: Sequence[list[frames.Property]], max_apdu: int, max_objects: int
) -> list[list[frames.Property]]:
    """Objects' property lists in ReadPropertyMultiple batches whose answers fit `max_apdu`
    (by `bacnet_frames.answer_size`) with at most `max_objects` objects each; an object's
    properties are never cut across two batches (an object over the limit goes alone)."""
    cut: list[list[frames.Property]] = []
    count = 0
    for props in objects:
        if cut and count < max_objects and frames.answer_size([*cut[-1], *props]) <= max_apdu:
            cut[-1].extend(props)
            count += 1
        else:
            cut.append(list(props))
            count = 1
    return cut


def take(
    answer: Any,
    batch: list[frames.Property],
    values: dict[frames.Property, Any],
    errors: dict[frames.Property, str],
) -> None:
    """The results of a ReadPropertyMultiple-ACK; what it leaves out is an error too."""
    asked = set(batch)
    for result in answer.listOfReadAccessResults or ():
        obj = result.objectIdentifier
        object_type = str(obj[0])
        for element in result.listOfResults or ():
            key = (obj, str(element.propertyIdentifier))
            if key not in asked:
                continue  # not asked for: never data
            error = element.readResult.propertyAccessError
            if error is not None:
                errors[key] = (
                    f"BACnet: {object_type} {obj[1]} has no {key[1]} "
                    f"({error.errorClass}: {error.errorCode})"
                )
                continue
            try:
                values[key] = frames.value_of(object_type, key[1], element.readResult.propertyValue)
            except FrameError as e:
                errors[key] = f"BACnet: {e}"
    for key in asked - values.keys() - errors.keys():
        errors[key] = f"BACnet: {key[0]} {key[1]} missing from the answer"


def raw_of(object_type: str, prop: str, value: Any) -> RawValue:  # noqa: PLR0911 - per type
    """A property value as the pipeline takes it: a binary present-value as bool, a REAL at
    its float32 precision, an enumeration by its BACnet name, a number as it came."""
    if prop == PRESENT_VALUE and object_type.startswith("binary"):
        return int(value) == 1  # active
    if isinstance(value, Enumerated):
        return str(value)
    if isinstance(value, Boolean):
        return bool(value)
    if isinstance(value, Double):
        return float(value)
    if isinstance(value, float):
        return float(float32_text(value)) if math.isfinite(value) else float(value)
    if isinstance(value, int):
        return int(value)
    return str(value)


def quality_of(flags: Any, reliability: Any, flags_error: str | None) -> tuple[Quality, str | None]:
    """Status-flags and reliability (clause 12) → quality: a fault or an unreliable value is
    `bad`, out of service or overridden `uncertain`, in alarm alone stays `good`. Every
    object type the broker reads has status-flags (required): a value whose status-flags
    were not read is `uncertain`, never `good`. Reliability is optional: its absence says
    nothing."""
    reliable = reliability is None or str(reliability) == "no-fault-detected"
    if not reliable:
        return "bad", f"BACnet reliability: {reliability}"
    if flags is None:
        return "uncertain", f"BACnet: status unknown, status-flags not read ({flags_error})"
    bits = list(flags)
    bits += [0] * (4 - len(bits))
    if bits[1]:
        return "bad", "BACnet status-flags: fault"
    if bits[3]:
        return "uncertain", "BACnet: out of service, the value is not from the sensor"
    if bits[2]:
        return "uncertain", "BACnet: overridden, the value is not from the sensor"
    return "good", None
