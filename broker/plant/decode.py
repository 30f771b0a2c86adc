"""Raw point → typed value: register words to numbers, byte and word order, bit fields,
strings, OPC UA variants, scale and offset, at the precision the plant has.

Precision (docs/modbus.md): a float32 is published as the shortest decimal that reads back
as the same float32 (16.654696, not the 16.654695510864258 its double holds); a scaled value
is the exact decimal result of raw × scale + offset, as precise as its inputs and no more
(267 × 0.1 + 0 is 26.7; an integer times a whole scale stays an integer). An OPC UA Float
arrives as the shortest decimal of its float32 (`float32_text`, applied by the connector,
which alone sees the variant type), so it is published and scaled as a Modbus float32 is.
Never a float-noise tail, never a rounding that loses what the device said.

Decoders are built when the policy loads, so the hot path runs one small closure per sample;
signals decoded alike share one (`decoders_for`), so 100,000 signals of a few kinds cost a few
closures, not 100,000. Pure: no I/O, no device access.
"""

from __future__ import annotations

import decimal
import math
import struct
from collections.abc import Callable, Iterable
from decimal import Decimal

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
_FLOAT32 = struct.Struct(">f")
_FLOAT32_MIN_NORMAL = 2.0**-126
# Exact for every product of a float's shortest decimal (<= 17 digits) and a scale, plus an
# offset within 10**40 of it; beyond that, rounded far below a double's precision.
_EXACT = decimal.Context(prec=80, Emin=-999_999, Emax=999_999)
# What each integer type can hold: bounds the result of a scale at build time.
_INTEGER_RANGE = {
    "int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1),
}  # fmt: skip
# What a record can carry as an integer (the JSON codecs take 64 bits), and as a float.
_RECORD_INTEGERS = (-(2**63), 2**64 - 1)
_LARGEST_FLOAT = 1e308


class DecodeError(ValueError):
    """The raw value cannot become a trustworthy value (wrong width, NaN, infinity, type)."""


def decoders_for(signals: Iterable[Signal]) -> dict[str, Decoder]:
    """Each signal's decoder by path, one shared by all the signals decoded alike."""
    shared: dict[tuple[object, ...], Decoder] = {}
    decoders = {}
    for signal in signals:
        key = _decoding(signal)
        decoder = shared.get(key)
        if decoder is None:
            decoder = shared[key] = decoder_for(signal)
        decoders[signal.path] = decoder
    return decoders


def _decoding(signal: Signal) -> tuple[object, ...]:
    """Everything decoder_for reads of a signal. Scale and offset by their repr: -0.0 and
    0.0 are equal, yet an offset of -0.0 can make a value's sign differ."""
    source = signal.source
    scaling = (repr(signal.scale), repr(signal.offset))
    if not isinstance(source, ModbusSource):
        return scaling
    layout = (source.type, source.width, source.word_order, source.byte_order, source.bit)
    return (*scaling, *layout)


def decoder_for(signal: Signal) -> Decoder:
    source = signal.source
    if not isinstance(source, ModbusSource):
        return _variant(_scaling(signal, None), _scaling(signal, "float64"))
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
    scale = _scaling(signal, source.type)
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


Number = Callable[[int | float], Value]


def _scaling(signal: Signal, type_: str | None) -> Number | None:
    """What turns the unpacked number of a `type_` (None: an integer of any size, as OPC UA
    gives them) into the published value: scale and offset applied exactly, a float32 at its
    own precision, and a number that is not finite never passed on. None when there is
    nothing to do (an unscaled integer)."""
    unscaled = (signal.scale, signal.offset) == (1.0, 0.0)
    if type_ == "float32":
        return _float32 if unscaled else _decimal_scaling(signal, float32_text)
    if type_ == "float64":
        return _finite if unscaled else _decimal_scaling(signal, repr)
    return None if unscaled else _integer_scaling(signal, _INTEGER_RANGE.get(type_ or ""))


def _integer_scaling(signal: Signal, raw_range: tuple[int, int] | None) -> Number:
    """An integer × scale + offset in integer arithmetic, divided once by a power of ten: the
    correctly rounded float of the exact decimal (267 × 0.1 → 2670 / 100 → 26.7), or an
    integer when scale and offset are whole (267 × 2 → 534)."""
    scale, scale_exponent = _digits(signal.scale)
    offset, offset_exponent = _digits(signal.offset)
    exponent = min(scale_exponent, offset_exponent, 0)
    times = scale * 10 ** (scale_exponent - exponent)
    plus = offset * 10 ** (offset_exponent - exponent)
    divisor = 10**-exponent
    # raw × times + plus is a line: its extremes over the type's range are at the range's ends.
    ends = [raw * times + plus for raw in raw_range] if raw_range is not None else None
    if divisor == 1:
        low, high = _RECORD_INTEGERS
        if ends is not None and all(low <= end <= high for end in ends):
            return lambda value: value * times + plus
        return lambda value: _record_integer(value * times + plus)
    if ends is not None and all(abs(end) / divisor < _LARGEST_FLOAT for end in ends):
        return lambda value: (value * times + plus) / divisor
    return lambda value: _divided(value * times + plus, divisor)


def _decimal_scaling(signal: Signal, text: Callable[[float], str]) -> Number:
    """A float × scale + offset in decimal arithmetic, from the float's shortest decimal
    (`text`), so that 16.654696 × 0.1 is 1.6654696 and 0.1 × 3 is 0.3."""
    scale, offset = Decimal(repr(signal.scale)), Decimal(repr(signal.offset))
    fma = _EXACT.fma

    def scaled(value: int | float) -> Value:
        if not math.isfinite(value):  # a NaN or infinity has no decimal to scale
            raise DecodeError(f"not a finite number: {value}")
        return _finite(float(fma(Decimal(text(value)), scale, offset)))

    return scaled


def _digits(number: float) -> tuple[int, int]:
    """`number`'s shortest decimal as (integer, exponent of ten): 0.25 → (25, -2)."""
    sign, digits, exponent = Decimal(repr(number)).normalize().as_tuple()
    assert isinstance(exponent, int)  # a finite number (the schema refuses the others)
    whole = int("".join(map(str, digits)))
    return (-whole if sign else whole), exponent


def _record_integer(value: int) -> Value:
    if _RECORD_INTEGERS[0] <= value <= _RECORD_INTEGERS[1]:
        return value
    return _divided(value, 1)  # too large an integer for a record: a float, if finite


def _divided(numerator: int, divisor: int) -> Value:
    try:
        return numerator / divisor
    except OverflowError as e:
        raise DecodeError(f"not a finite number: {numerator} / {divisor}") from e


def _finite(value: int | float) -> Value:
    if not math.isfinite(value):
        raise DecodeError(f"not a finite number: {value}")
    return value


def _float32(value: int | float) -> Value:
    if not math.isfinite(value):
        raise DecodeError(f"not a finite number: {value}")
    return float(float32_text(value))


def float32_text(value: float) -> str:
    """The shortest decimal that reads back as the float32 `value` (a double holding it).

    For a normal float32, every decimal of up to 6 significant digits reads back, so `%.6g`
    (which drops trailing zeros) gives the shortest whenever it has 6 digits or fewer, and 9
    digits always read back. In between, more digits round-trip whenever fewer do, so two
    tries out of 6..9 find the shortest. Subnormals (below 2**-126) have fewer digits of
    precision: those count up from one."""
    bits = _float32_bits(value)
    if value != 0.0 and abs(value) < _FLOAT32_MIN_NORMAL:
        return next(t for d in range(1, 10) if _reads_back(t := f"{value:.{d}g}", bits))
    text = f"{value:.7g}"
    if _reads_back(text, bits):
        shorter = f"{value:.6g}"
        # the same text when 7 digits had a trailing zero: it was just read back
        return shorter if shorter == text or _reads_back(shorter, bits) else text
    text = f"{value:.8g}"
    return text if _reads_back(text, bits) else f"{value:.9g}"


def _float32_bits(value: float) -> bytes | None:
    """The float32 `value` as bytes, to compare each try with (one pack per try instead of
    a pack and an unpack); None when it is no float32, which no text reads back as."""
    try:
        bits = _FLOAT32.pack(value)
    except OverflowError:
        return None
    return bits if _FLOAT32.unpack(bits)[0] == value else None


def _reads_back(text: str, bits: bytes | None) -> bool:
    try:
        return _FLOAT32.pack(float(text)) == bits
    except OverflowError:  # rounded up past the largest float32
        return False


def _variant(integer: Number | None, real: Number | None) -> Decoder:
    """An OPC UA value: numbers scaled, booleans and text as they are, nothing else."""

    def decode(raw: RawValue) -> Value:
        if isinstance(raw, bool | str):
            return raw
        if isinstance(raw, int):
            return raw if integer is None else integer(raw)
        if isinstance(raw, float):
            return _finite(raw) if real is None else real(raw)
        raise DecodeError(f"a {type(raw).__name__} value is not a number, bool or text")

    return decode
