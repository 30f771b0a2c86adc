"""The OPC UA type model: which values a node may hold, and which of them the broker takes.

Pure functions over asyncua's values, no I/O. A value is taken only when it is what the
server's own model says the node holds (its DataType, read at the start of each session)
and what the decoder can take: a scalar number, bool or text. This module must never let
through a value with a Bad status, of another variant type than the node's DataType allows,
an array, a structure, a ByteString, or a text longer than MAX_TEXT_BYTES: a server that
sends one (by mistake or on purpose) gets its signal marked `bad`, never data, and a text
of megabytes never reaches the pipeline or the spool. A Float (32-bit) is taken as the
shortest decimal that reads back as it (`decode.float32_text`), as a Modbus float32 is: the
variant type is known only here, the decoder sees a Python float.
"""

from __future__ import annotations

from typing import Literal

from asyncua import ua
from asyncua.ua.object_ids import ObjectIds

from broker.plant.decode import RawValue, float32_text
from broker.records import Quality

# A text value longer than this (UTF-8) is refused: a tag's text (a mode, a recipe name, an
# alarm message) is a few dozen bytes, and a record must stay far below the spool's frame
# limit whatever a server sends.
MAX_TEXT_BYTES = 4096
Refusal = Literal["bad_status", "type_mismatch", "value_unsupported"]
_QUALITY: tuple[Quality, ...] = ("good", "uncertain", "bad", "bad")  # by the 2 severity bits
_V = ua.VariantType
_SIGNED = frozenset({_V.SByte, _V.Int16, _V.Int32, _V.Int64})
_UNSIGNED = frozenset({_V.Byte, _V.UInt16, _V.UInt32, _V.UInt64})
# Abstract and derived standard DataTypes (namespace 0) → the variant types their values
# may have; a built-in DataType (ids 1–25, but BaseDataType) has the variant type of its id.
_DERIVED: dict[int, frozenset[ua.VariantType]] = {
    ObjectIds.Number: _SIGNED | _UNSIGNED | {_V.Float, _V.Double},
    ObjectIds.Integer: _SIGNED,
    ObjectIds.UInteger: _UNSIGNED,
    ObjectIds.Enumeration: frozenset({_V.Int32}),
    ObjectIds.Duration: frozenset({_V.Double}),
    ObjectIds.UtcTime: frozenset({_V.DateTime}),
    ObjectIds.IntegerId: frozenset({_V.UInt32}),
    ObjectIds.Counter: frozenset({_V.UInt32}),
    ObjectIds.LocaleId: frozenset({_V.String}),
}


def quality_of(status: ua.StatusCode | None) -> Quality:
    return _QUALITY[status.value >> 30] if status is not None else "good"


def variant_types(data_type: ua.DataValue) -> frozenset[ua.VariantType] | None:
    """The variant types a node's values may have, from a Read of its DataType; None when
    they cannot be told (a vendor's own type, BaseDataType, a node the server refuses)."""
    node = data_type.Value.Value if data_type.Value is not None else None
    if not isinstance(node, ua.NodeId) or node.NamespaceIndex != 0:
        return None
    identifier = node.Identifier
    if not isinstance(identifier, int) or identifier == ObjectIds.BaseDataType:
        return None
    if ObjectIds.Boolean <= identifier <= ObjectIds.DiagnosticInfo:
        return frozenset({ua.VariantType(identifier)})
    return _DERIVED.get(identifier)


def judged(
    value: ua.DataValue, modelled: frozenset[ua.VariantType] | None
) -> tuple[RawValue | None, Refusal | None]:
    """The raw value to take, or why it is not taken; `modelled` is the node's variant
    types (None: any)."""
    variant = value.Value
    if quality_of(value.StatusCode) == "bad":
        return None, "bad_status"
    if (
        modelled is not None
        and variant is not None
        and variant.VariantType is not ua.VariantType.Null  # no value: unsupported below
        and variant.VariantType not in modelled
    ):
        return None, "type_mismatch"
    raw = variant.Value if variant is not None else None
    if isinstance(raw, str) and _too_long(raw):
        return None, "value_unsupported"
    if isinstance(raw, float) and variant is not None and variant.VariantType is _V.Float:
        raw = float(float32_text(raw))  # 16.654696, not its double's 16.654695510864258
    if isinstance(raw, bool | int | float | str):
        return raw, None
    return None, "value_unsupported"


def described(variant: ua.Variant | None) -> str | None:
    """The variant's type as a log field: `Double`, `Double[]`, `String(1048576 chars)` for
    a text over the limit (its length, never its content)."""
    if variant is None:
        return None
    name = f"{variant.VariantType.name}{'[]' if variant.is_array else ''}"
    value = variant.Value
    if isinstance(value, str) and _too_long(value):
        return f"{name}({len(value)} chars)"
    return name


def _too_long(text: str) -> bool:
    # A UTF-8 character takes at least one byte: most long texts are told without encoding.
    return len(text) > MAX_TEXT_BYTES or len(text.encode()) > MAX_TEXT_BYTES
