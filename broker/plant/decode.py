"""Raw point → typed value: register words to numbers, byte and word order, bit fields,
strings, OPC UA variants, scale and offset.

Decoders are built once per signal when the policy loads, so the hot path runs one small
closure per sample. Pure: no I/O, no device access.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

from broker.policy import ModbusSource, Signal
from broker.records import Value

# Modbus: a bit, or the 16-bit registers. OPC UA: the variant's value as asyncua gives it.
RawValue = tuple[int, ...] | bool | int | float | str
Decoder = Callable[[RawValue], Value]

_STRUCT_FORMAT = {
    "int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f",
    "int64": "q", "uint64": "Q", "float64": "d",
}  # fmt: skip


_WORD = struct.Struct(">H")


class DecodeError(ValueError):
    """The raw value cannot become a trustworthy value (wrong width, NaN, infinity, type)."""


def decoder_for(signal: Signal) -> Decoder:
    source = signal.source
    if not isinstance(source, ModbusSource):
        return _variant(_scaling(signal, integral=False) or _finite)
    if source.type == "bool" and source.bit is None:
        return _bit
    registers = _registers(source)
    words = struct.Struct(f">{source.width}H")
    if source.type == "bool":
        mask = 1 << (source.bit or 0)
        return lambda raw: bool(_checked(words, registers(raw))[0] & mask)
    if source.type == "string":
        return lambda raw: _ascii(_checked(words, registers(raw)))
    number = struct.Struct(">" + _STRUCT_FORMAT[source.type])
    scale = _scaling(signal, integral=source.type not in ("float32", "float64"))
    in_order = "little" not in (source.word_order, source.byte_order)
    width = source.width

    def decode(raw: RawValue) -> Value:
        try:  # packing checks the count, the type and the range of the registers
            packed = words.pack(*(raw if in_order else registers(raw)))  # type: ignore[misc]
        except (struct.error, TypeError) as e:
            raise DecodeError(f"expected {width} 16-bit register(s), got {raw!r}") from e
        value = number.unpack(packed)[0]
        return value if scale is None else scale(value)

    return decode


def _checked(words: struct.Struct, registers: tuple[int, ...]) -> tuple[int, ...]:
    try:
        words.pack(*registers)
    except struct.error as e:
        raise DecodeError(f"not 16-bit registers: {registers!r}") from e
    return registers


def _bit(raw: RawValue) -> Value:
    if not isinstance(raw, bool):
        raise DecodeError(f"expected a bit, got {raw!r}")
    return raw


def _registers(source: ModbusSource) -> Callable[[RawValue], tuple[int, ...]]:
    """Checks the width, and puts words and bytes in big-endian order (the range is checked
    when the words are packed)."""
    width = source.width
    swap_words = source.word_order == "little"
    swap_bytes = source.byte_order == "little"

    def ordered(raw: RawValue) -> tuple[int, ...]:
        if not isinstance(raw, tuple) or len(raw) != width:
            raise DecodeError(f"expected {width} register(s), got {raw!r}")
        if swap_bytes:
            _checked(_WORD, raw[:1])  # a swap would hide a register out of range
            raw = tuple(((w & 0xFF) << 8) | (w >> 8) for w in raw)
        return raw[::-1] if swap_words else raw

    return ordered


def _ascii(words: tuple[int, ...]) -> str:
    data = b"".join(word.to_bytes(2, "big") for word in words).rstrip(b"\0")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as e:
        raise DecodeError(f"not ASCII text: {data!r}") from e


def _scaling(signal: Signal, integral: bool) -> Callable[[int | float], Value] | None:
    """Scale and offset when set, and a number that is not finite is never passed on; None
    when there is nothing to do (an unscaled integer)."""
    factor, offset = signal.scale, signal.offset
    if (factor, offset) == (1.0, 0.0):
        return None if integral else _finite
    # 267 × 0.1 is 26.700000000000003 but 267 / 10 is 26.7: divide by a whole divisor.
    divisor = round(1 / factor) if factor else 0
    if divisor > 1 and math.isclose(factor * divisor, 1.0, rel_tol=1e-12):
        return lambda value: _finite(value / divisor + offset)
    return lambda value: _finite(value * factor + offset)


def _finite(value: int | float) -> Value:
    if not math.isfinite(value):
        raise DecodeError(f"not a finite number: {value}")
    return value


def _variant(scale: Callable[[int | float], Value]) -> Decoder:
    """An OPC UA value: numbers scaled, booleans and text as they are, nothing else."""

    def decode(raw: RawValue) -> Value:
        if isinstance(raw, bool | str):
            return raw
        if isinstance(raw, int | float):
            return scale(raw)
        raise DecodeError(f"a {type(raw).__name__} value is not a number, bool or text")

    return decode
