"""decoder_for: register words → typed values, word order, scale and offset; decoders_for:
one decoder for the signals decoded alike."""

from __future__ import annotations

import math
import struct

import msgspec
import pytest

from broker.plant.decode import DecodeError, decoder_for, decoders_for
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

    # Integers are exact; a float32 reads back as the short decimal that was stored.
    assert decode(registers(type_, value, word_order)) == value


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


# 64-bit types, byte order, bits in registers, strings


def modbus_signal(type_: str, scale: float = 1.0, **source: object) -> Signal:
    return msgspec.convert(
        {
            "path": "site/asset/m",
            "device": "plc",
            "source": {"protocol": "modbus", "table": "input_register", "address": 0,
                       "type": type_, **source},
            "scale": scale,
        },
        Signal,
    )  # fmt: skip


def words_of(
    fmt: str, value: float, word_order: str = "big", byte_order: str = "big"
) -> tuple[int, ...]:
    """How a PLC with these orders lays `value` out in registers."""
    words = list(struct.unpack(f">{struct.calcsize(fmt) // 2}H", struct.pack(">" + fmt, value)))
    if word_order == "little":
        words.reverse()
    if byte_order == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    return tuple(words)


WIDE_CASES = [
    ("int64", "q", -(2**62) - 12345),
    ("int64", "q", 2**63 - 1),
    ("uint64", "Q", 2**64 - 2),
    ("float64", "d", -1234.5678e100),
    ("int32", "i", -2),
    ("float32", "f", 0.15625),
]


@pytest.mark.parametrize("byte_order", ["big", "little"])
@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize(("type_", "fmt", "value"), WIDE_CASES)
def test_wide_types_decode_in_every_word_and_byte_order(
    type_: str, fmt: str, value: float, word_order: str, byte_order: str
) -> None:
    decode = decoder_for(modbus_signal(type_, word_order=word_order, byte_order=byte_order))

    assert decode(words_of(fmt, value, word_order, byte_order)) == value


def test_word_order_of_a_64_bit_value_reverses_all_four_registers() -> None:
    raw = (0x0001, 0x0203, 0x0405, 0x0607)
    big = decoder_for(modbus_signal("uint64"))(raw)
    little = decoder_for(modbus_signal("uint64", word_order="little"))(raw)

    assert big == 0x0001_0203_0405_0607
    assert little == 0x0607_0405_0203_0001


def test_byte_order_swaps_bytes_inside_a_one_register_value() -> None:
    assert decoder_for(modbus_signal("uint16", byte_order="little"))((0x3412,)) == 0x1234
    assert decoder_for(modbus_signal("int16", byte_order="little"))((0xFEFF,)) == -2


def test_unscaled_64_bit_integers_stay_exact() -> None:
    value = decoder_for(modbus_signal("uint64"))((0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF))

    assert value == 2**64 - 1
    assert type(value) is int


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_float64_is_a_decode_error(value: float) -> None:
    with pytest.raises(DecodeError):
        decoder_for(modbus_signal("float64"))(words_of("d", value))


@pytest.mark.parametrize("type_", ["int64", "uint64", "float64"])
@pytest.mark.parametrize("raw", [(1, 2), (1, 2, 3), (1, 2, 3, 4, 5)])
def test_a_64_bit_type_needs_exactly_four_registers(type_: str, raw: tuple[int, ...]) -> None:
    with pytest.raises(DecodeError):
        decoder_for(modbus_signal(type_))(raw)


@pytest.mark.parametrize("bit", range(16))
def test_bit_picks_one_bit_of_a_register_counting_from_the_least_significant(bit: int) -> None:
    decode = decoder_for(modbus_signal("bool", bit=bit))

    assert decode((1 << bit,)) is True
    assert decode((0xFFFF ^ (1 << bit),)) is False


def test_bit_numbers_follow_the_byte_order() -> None:
    """Bit 0 is the least significant bit of the register once its bytes are in order."""
    assert decoder_for(modbus_signal("bool", bit=8, byte_order="little"))((0x0001,)) is True
    assert decoder_for(modbus_signal("bool", bit=0, byte_order="little"))((0x0001,)) is False


def test_a_bit_in_a_register_needs_one_register() -> None:
    with pytest.raises(DecodeError):
        decoder_for(modbus_signal("bool", bit=0))(True)


def test_string_is_two_ascii_characters_per_register_with_trailing_nuls_trimmed() -> None:
    raw = (0x4F49, 0x4C2D, 0x3100, 0x0000)  # "OIL-1" padded with NULs

    assert decoder_for(modbus_signal("string", length=4))(raw) == "OIL-1"


def test_string_with_little_byte_order_swaps_each_pair_of_characters() -> None:
    raw = (0x494F, 0x2D4C, 0x0031)  # "OI" "L-" "1\0" with the bytes of each register swapped

    assert decoder_for(modbus_signal("string", length=3, byte_order="little"))(raw) == "OIL-1"


@pytest.mark.parametrize("raw", [(0x4F49,), (0x4F49, 0x4C2D, 0x3100)])
def test_string_needs_exactly_its_length_in_registers(raw: tuple[int, ...]) -> None:
    with pytest.raises(DecodeError):
        decoder_for(modbus_signal("string", length=2))(raw)


def test_a_string_that_is_not_ascii_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decoder_for(modbus_signal("string", length=1))((0xC3A9,))  # "é" in UTF-8


@pytest.mark.parametrize(("raw", "scale", "expected"), [(267, 0.1, "26.7"), (-175, 0.1, "-17.5"), (12345, 0.01, "123.45"), (3, 0.25, "0.75")])  # fmt: skip
def test_a_decimal_scale_gives_the_decimal_a_person_reads(
    raw: int, scale: float, expected: str
) -> None:
    # 267 × 0.1 is 26.700000000000003 in binary floating point; consumers should see 26.7
    decode = decoder_for(signal("int16", scale=scale))
    assert repr(decode(registers("int16", raw))) == expected


# Precision: what a person reads, never a float-noise tail (docs/modbus.md)


def float32_of(value: float) -> float:
    """The double a float32 register holding `value` unpacks to."""
    return float(struct.unpack(">f", struct.pack(">f", value))[0])


def test_a_float32_is_the_shortest_decimal_that_reads_back_as_it() -> None:
    decode = decoder_for(signal("float32"))
    raw = registers("float32", 16.654696)
    assert float32_of(16.654696) == 16.654695510864258  # what decoding used to publish

    assert repr(decode(raw)) == "16.654696"


@pytest.mark.parametrize("exponent", range(-149, 128))
def test_every_power_of_two_float32_is_published_at_its_shortest(exponent: int) -> None:
    """Powers of two sit at a float32 binade's edge, where the rounding interval is lopsided;
    subnormals (below 2**-126) carry fewer digits: both are checked against a plain search."""
    value = 2.0**exponent
    shortest = next(
        text for digits in range(1, 10) if float32_of(float(text := f"{value:.{digits}g}")) == value
    )
    decode = decoder_for(signal("float32"))

    assert decode(registers("float32", value)) == float(shortest)
    assert decode(registers("float32", -value)) == -float(shortest)


@pytest.mark.parametrize(
    ("type_", "raw", "scale", "offset", "expected"),
    [
        ("int16", 267, 0.1, 0.0, "26.7"),
        ("int16", 267, 0.25, 0.0, "66.75"),
        ("int16", 267, 2.0, 0.0, "534"),  # a whole scale keeps an integer an integer
        ("int16", -250, 0.1, 5.0, "-20.0"),
        ("uint16", 300, 1.0, -273.15, "26.85"),
        ("int32", 7, 0.1, 0.2, "0.9"),  # 7 × 0.1 + 0.2 is 0.9000000000000001 in binary
        ("int32", -100000, 0.001, 2.5, "-97.5"),
        ("uint16", 3, 1e-05, 0.0, "3e-05"),
        ("float32", 16.654696, 0.1, 0.0, "1.6654696"),
        ("float32", 0.1, 3.0, 0.0, "0.3"),  # the float32 0.1 read as 0.1, not 0.100000001
        ("float32", 12.5, 2.0, -1.0, "24.0"),
    ],
)
def test_a_scaled_value_is_as_precise_as_its_inputs(
    type_: str, raw: float, scale: float, offset: float, expected: str
) -> None:
    decode = decoder_for(signal(type_, scale=scale, offset=offset))

    assert repr(decode(registers(type_, raw))) == expected


def test_an_integer_times_a_whole_scale_past_64_bits_is_a_float() -> None:
    decode = decoder_for(modbus_signal("uint64", scale=1000.0))
    value = decode((0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF))

    assert value == float((2**64 - 1) * 1000)
    assert decoder_for(modbus_signal("uint64", scale=1000.0))((0, 0, 0, 7)) == 7000


def test_an_integer_scaled_past_the_largest_float_is_a_decode_error() -> None:
    decode = decoder_for(modbus_signal("uint64", scale=1e300))

    assert decode((0, 0, 0, 1)) == 1e300
    with pytest.raises(DecodeError):
        decode((0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF))


def opcua_signal(scale: float = 1.0, offset: float = 0.0) -> Signal:
    return msgspec.convert(
        {
            "path": "site/asset/m",
            "device": "ua",
            "source": {"protocol": "opcua", "node": "ns=2;s=M"},
            "scale": scale,
            "offset": offset,
        },
        Signal,
    )


def test_an_opc_ua_number_is_scaled_exactly_and_text_and_bools_pass_through() -> None:
    decode = decoder_for(opcua_signal(scale=0.1, offset=0.2))

    assert repr(decode(7)) == "0.9"
    assert repr(decode(0.7)) == "0.27"
    assert decode("text") == "text"
    assert decode(True) is True
    with pytest.raises(DecodeError):
        decode(math.nan)
    with pytest.raises(DecodeError):
        decoder_for(opcua_signal(scale=1e300))(10**400)


def test_an_unscaled_opc_ua_double_is_kept_as_the_server_sent_it() -> None:
    decode = decoder_for(opcua_signal())

    assert decode(16.654695510864258) == 16.654695510864258  # a double: not ours to shorten
    assert decode(-7) == -7


# Sharing: one decoder for the signals decoded alike, never one that decodes differently


def named(path: str, signal_: Signal) -> Signal:
    return msgspec.structs.replace(signal_, path=path)


def test_signals_decoded_alike_share_one_decoder_and_the_others_have_their_own() -> None:
    decoders = decoders_for(
        [
            named("a/int16", signal("int16", scale=0.1)),
            named("b/int16", signal("int16", scale=0.1)),  # another address, the same decoding
            named("c/int16", signal("int16", scale=0.2)),
            named("d/int16", signal("int16", scale=0.1, offset=1.0)),
            named("e/uint16", signal("uint16", scale=0.1)),
            named("f/float32", signal("float32", "big")),
            named("g/float32", signal("float32", "little")),
            named("h/ua", opcua_signal(scale=0.1)),
            named("i/ua", opcua_signal(scale=0.1)),
        ]
    )

    assert decoders["a/int16"] is decoders["b/int16"]
    assert decoders["h/ua"] is decoders["i/ua"]
    distinct = {id(decoders[p]) for p in decoders if p not in ("b/int16", "i/ua")}
    assert len(distinct) == 7
    assert (decoders["a/int16"]((267,)), decoders["c/int16"]((267,))) == (26.7, 53.4)
    assert decoders["e/uint16"]((0xFFFF,)) == 6553.5
    words = registers("float32", 1.5)
    assert decoders["f/float32"](words) == 1.5
    assert decoders["g/float32"](words[::-1]) == 1.5


def test_an_offset_of_minus_zero_is_not_taken_for_zero() -> None:
    decoders = decoders_for(
        [
            named("x/plus", signal("float32", scale=2.0, offset=0.0)),
            named("x/minus", signal("float32", scale=2.0, offset=-0.0)),
        ]
    )
    negative_zero = registers("float32", -0.0)

    assert math.copysign(1, decoders["x/plus"](negative_zero)) == 1
    assert math.copysign(1, decoders["x/minus"](negative_zero)) == -1
