"""Raw point → typed value: register words to numbers, word order, scale and offset.

Decoders are built once per signal when the policy loads, so the hot path runs one small
closure per sample. Pure: no I/O, no device access.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

from broker.policy import Signal
from broker.records import Value

RawValue = tuple[int, ...] | bool
Decoder = Callable[[RawValue], Value]

_STRUCT_FORMAT = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f"}


class DecodeError(ValueError):
    """The raw value cannot become a trustworthy number (wrong width, NaN, infinity)."""


def decoder_for(signal: Signal) -> Decoder:
    source = signal.source
    if source.type == "bool":
        return bool
    words = struct.Struct(f">{source.width}H")
    number = struct.Struct(">" + _STRUCT_FORMAT[source.type])
    swap = source.word_order == "little"
    scale, offset = signal.scale, signal.offset
    scaled = scale != 1.0 or offset != 0.0

    def decode(raw: RawValue) -> Value:
        if isinstance(raw, bool) or len(raw) != source.width:
            raise DecodeError(f"expected {source.width} register(s), got {raw!r}")
        try:
            value: int | float = number.unpack(words.pack(*(raw[::-1] if swap else raw)))[0]
        except struct.error as e:  # a register outside 0..65535
            raise DecodeError(f"not 16-bit registers: {raw!r}") from e
        if scaled:
            value = value * scale + offset
        if isinstance(value, float) and not math.isfinite(value):
            raise DecodeError(f"not a finite number: {value}")
        return value

    return decode
