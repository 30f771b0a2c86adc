"""decoder_for: register words → typed values, word order, scale and offset."""

from __future__ import annotations

import math
import struct

import msgspec
import pytest

from broker.plant.decode import DecodeError, decoder_for
from broker.policy import Signal

FORMATS = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f"}


def signal(type_: str, word_order: str = "big", scale: float = 1.0, offset: float = 0.0) -> Signal:
    table = "coil" if type_ == "bool" else "holding_register"
    source = {"protocol": "modbus", "table": table, "address": 0, "type": type_}
    if type_ in ("int32", "uint32", "float32"):
        source["word_order"] = word_order
    return msgspec.convert(
        {
            "path": "site/asset/m",
            "device": "plc",
            "source": source,
            "scale": scale,
            "offset": offset,
        },
        Signal,
    )


def registers(type_: str, value: float, word_order: str = "big") -> tuple[int, ...]:
    """The Modbus registers holding `value`: big-endian bytes within each register."""
    raw = struct.pack(">" + FORMATS[type_], value)
    words = struct.unpack(f">{len(raw) // 2}H", raw)
    return words[::-1] if word_order == "little" else words


def as_stored(type_: str, value: float) -> float:
    """`value` after a round trip through the type (float32 rounds)."""
    fmt = ">" + FORMATS[type_]
    return struct.unpack(fmt, struct.pack(fmt, value))[0]


CASES = [
    ("int16", -12345),
    ("int16", 32767),
    ("uint16", 54321),
    ("int32", -123456789),
    ("int32", 2**31 - 1),
    ("uint32", 3_000_000_000),
    ("float32", -0.15625),
    ("float32", 3.14159),
]


@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize(("type_", "value"), CASES)
def test_decodes_each_type_in_each_word_order(type_: str, value: float, word_order: str) -> None:
    decode = decoder_for(signal(type_, word_order))

    assert decode(registers(type_, value, word_order)) == as_stored(type_, value)


@pytest.mark.parametrize(
    ("word_order", "raw"), [("big", (0x1234, 0x5678)), ("little", (0x5678, 0x1234))]
)
def test_word_order_says_which_register_holds_the_high_word(
    word_order: str, raw: tuple[int, int]
) -> None:
    assert decoder_for(signal("uint32", word_order))(raw) == 0x12345678


def test_int16_is_signed_and_uint16_is_not() -> None:
    assert decoder_for(signal("int16"))((0xFFFF,)) == -1
    assert decoder_for(signal("uint16"))((0xFFFF,)) == 65535


def test_unscaled_integer_stays_an_exact_int() -> None:
    value = decoder_for(signal("uint32"))(registers("uint32", 2**32 - 1))

    assert value == 2**32 - 1
    assert type(value) is int


@pytest.mark.parametrize(
    ("type_", "raw_value", "scale", "offset"),
    [
        ("int16", -250, 0.1, 5.0),
        ("uint16", 1234, 0.01, 0.0),
        ("uint16", 300, 1.0, -273.15),  # offset alone applies too
        ("int32", -100000, 0.001, 2.5),
        ("float32", 12.5, 2.0, -1.0),
    ],
)
def test_scale_and_offset_apply_to_the_decoded_number(
    type_: str, raw_value: float, scale: float, offset: float
) -> None:
    decode = decoder_for(signal(type_, scale=scale, offset=offset))

    assert decode(registers(type_, raw_value)) == pytest.approx(raw_value * scale + offset)


@pytest.mark.parametrize("bit", [True, False])
def test_bool_decodes_to_the_bit(bit: bool) -> None:
    assert decoder_for(signal("bool"))(bit) is bit


@pytest.mark.parametrize(
    ("type_", "raw"),
    [
        ("int16", ()),
        ("int16", (1, 2)),
        ("uint16", (1, 2, 3)),
        ("int32", (1,)),
        ("uint32", (1, 2, 3)),
        ("float32", (0x4148,)),
    ],
)
def test_wrong_register_count_is_a_decode_error(type_: str, raw: tuple[int, ...]) -> None:
    with pytest.raises(DecodeError):
        decoder_for(signal(type_))(raw)


def test_a_bit_for_a_register_signal_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decoder_for(signal("int16"))(True)


@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_float32_is_a_decode_error(value: float, word_order: str) -> None:
    decode = decoder_for(signal("float32", word_order))

    with pytest.raises(DecodeError):
        decode(registers("float32", value, word_order))


def test_scaling_to_infinity_is_a_decode_error() -> None:
    biggest_float32 = struct.unpack(">f", bytes.fromhex("7f7fffff"))[0]
    decode = decoder_for(signal("float32", scale=1e300))

    with pytest.raises(DecodeError):
        decode(registers("float32", biggest_float32))


@pytest.mark.parametrize("raw", [(70000,), (-1,)])
def test_a_register_outside_16_bits_is_a_decode_error(raw: tuple[int, ...]) -> None:
    with pytest.raises(DecodeError):
        decoder_for(signal("uint16"))(raw)
