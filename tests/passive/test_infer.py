"""Inference from synthetic series with a known truth: the right type, word order and kind,
and never a merge of two registers that are not one value."""

from __future__ import annotations

import math
import random
import struct
import tracemalloc
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.passive.infer import MAX_OVERLAP, Guess, Inference
from broker.passive.observations import Description, Peer, Values, Warnings
from broker.passive.series import BATCH, RING, Block

PLC = Peer("10.0.0.7", 502)
HR = "holding_register"


def words_of(value: float, type_: str = "float32", order: str = "big") -> tuple[int, int]:
    code = {"float32": ">f", "int32": ">i", "uint32": ">I"}[type_]
    u = struct.unpack(">I", struct.pack(code, value))[0]
    hi, lo = u >> 16, u & 0xFFFF
    return (hi, lo) if order == "big" else (lo, hi)


def infer(rows: Sequence[Sequence[int]], table: str = HR, start: int = 0) -> dict[int, Guess]:
    inference = Inference()
    for k, row in enumerate(rows):
        inference.add(Values("modbus", 1000.0 + k, PLC, 1, table, start, tuple(row)))
    return {g.address: g for g in inference.guesses()}


def series(
    n: int, make: Callable[[int, random.Random], Sequence[int]], seed: int = 7
) -> list[Sequence[int]]:
    rng = random.Random(seed)
    return [make(k, rng) for k in range(n)]


@pytest.mark.parametrize("order", ["big", "little"])
@pytest.mark.parametrize("noise", [0.0005, 0.02, 0.1, 0.5])
def test_a_drifting_noisy_float32_between_int16s_is_one_float32(order: str, noise: float) -> None:
    # A cold-room temperature of -18.3 °C drifting, with noise, between two int16 registers.
    def row(k: int, rng: random.Random) -> tuple[int, ...]:
        temperature = -18.3 + 0.0003 * k + rng.gauss(0, noise)
        return (215 + rng.randint(-2, 2), *words_of(temperature, order=order), 7)

    guesses = infer(series(600, row))
    assert sorted(guesses) == [0, 1, 3]
    g = guesses[1]
    assert (g.type, g.word_order, g.width, g.kind) == ("float32", order, 2, "measurement")
    assert isinstance(g.minimum, float) and isinstance(g.maximum, float)
    assert -18.3 - 6 * noise - 0.01 < g.minimum < g.maximum < -18.3 + 0.18 + 6 * noise + 0.01
    assert g.confidence >= 0.55
    assert f"words {order}-endian" in g.evidence and "600 samples" in g.evidence
    assert guesses[0].type == "uint16" and guesses[3].kind == "constant"


@pytest.mark.parametrize("order", ["big", "little"])
def test_adjacent_float32s_pair_up_without_overlapping(order: str) -> None:
    # The high word of one float beside the noisy low word of the previous one also reads as a
    # plausible float: the device-wide word order and the strongest-first choice reject it.
    levels = (20.0, 55.0, -3.5, 1013.25)

    def row(_: int, rng: random.Random) -> tuple[int, ...]:
        return tuple(
            w for x in levels for w in words_of(x + rng.gauss(0, 0.05 * abs(x) / 20), order=order)
        )

    guesses = infer(series(400, row))
    assert sorted(guesses) == [0, 2, 4, 6]
    for address, level in zip((0, 2, 4, 6), levels, strict=True):
        g = guesses[address]
        assert (g.type, g.word_order) == ("float32", order), g.evidence
        assert g.minimum is not None and g.maximum is not None
        assert float(g.minimum) <= level <= float(g.maximum)


def test_an_energy_counter_crossing_a_16_bit_boundary_is_one_uint32() -> None:
    start = 3 * 65536 - 400

    def row(k: int, rng: random.Random) -> tuple[int, ...]:
        energy = start + 2 * k + rng.randint(0, 1)
        return (*words_of(energy, "uint32"), 100 + rng.randint(-1, 1))

    rows = series(500, row)
    guesses = infer(rows)
    assert sorted(guesses) == [0, 2]
    g = guesses[0]
    assert (g.type, g.word_order, g.kind) == ("uint32", "big", "counter")
    assert g.minimum == rows[0][0] << 16 | rows[0][1]
    assert g.maximum == rows[-1][0] << 16 | rows[-1][1]


def test_an_int32_crossing_zero_in_little_endian_words_is_one_int32() -> None:
    def row(k: int, rng: random.Random) -> tuple[int, ...]:
        return words_of(40 - k // 3 + rng.randint(-2, 2), "int32", "little")

    g = infer(series(300, row))[0]
    assert (g.type, g.word_order, g.width) == ("int32", "little", 2)
    assert (
        isinstance(g.minimum, int)
        and g.minimum < -50
        and isinstance(g.maximum, int)
        and g.maximum > 30
    )


@pytest.mark.parametrize(
    "make",
    [
        # ADC counts: a high word in the range of a float32's exponent, beside a noisy one
        lambda k, rng: (15000 + rng.randint(-5, 5), 16000 + rng.randint(-300, 300)),
        # tenths of °C (negative) and tenths of a bar
        lambda k, rng: ((-183 + rng.randint(-3, 3)) & 0xFFFF, 62 + rng.randint(-1, 1)),
        # a slowly rising level beside a step-changing mode
        lambda k, rng: (k // 10, rng.choice((0, 3)) if k % 25 == 0 else 1),
        # a noisy 16-bit word beside another one with unrelated jumps
        lambda k, rng: (rng.randrange(65536), 1000 * rng.randint(0, 30)),
    ],
)
def test_two_unrelated_16_bit_registers_are_never_merged(
    make: Callable[[int, random.Random], tuple[int, int]],
) -> None:
    guesses = infer(series(600, make))
    assert sorted(guesses) == [0, 1]
    assert all(g.width == 1 and g.word_order is None for g in guesses.values())


def test_registers_read_in_different_requests_are_never_merged() -> None:
    # A float32's two words answered by two requests: not "always read together".
    rng = random.Random(3)
    inference = Inference()
    for k in range(300):
        hi, lo = words_of(20.0 + rng.gauss(0, 0.01))
        inference.add(Values("modbus", k, PLC, 1, HR, 0, (1, hi)))
        inference.add(Values("modbus", k + 0.01, PLC, 1, HR, 2, (lo, 2)))
    assert [g.width for g in inference.guesses()] == [1, 1, 1, 1]


def test_int16_negative_with_a_tenths_scale_suggested() -> None:
    g = infer(series(300, lambda k, rng: ((-183 + k // 20 + rng.randint(-2, 2)) & 0xFFFF,)))[0]
    assert (g.type, g.kind, g.scale) == ("int16", "measurement", 0.1)
    assert isinstance(g.minimum, int) and -186 <= g.minimum < g.maximum <= -166  # type: ignore[operator]
    assert "scale 0.1? (a guess)" in g.evidence


def test_uint16_that_only_sits_high_stays_unsigned_when_it_moves_smoothly() -> None:
    g = infer(series(300, lambda k, rng: (40000 + rng.randint(-100, 100),)))[0]
    assert g.type == "uint16" and isinstance(g.minimum, int) and g.minimum > 39000


def test_bools_counters_constants_and_states() -> None:
    def row(k: int, rng: random.Random) -> tuple[int, ...]:
        flag = 1 if (k // 7) % 2 else 0
        count = (65500 + 3 * k) & 0xFFFF  # wraps at 65536
        mode = (0, 2, 5)[(k // 30) % 3]
        return (flag, count, 1234, mode)

    guesses = infer(series(200, row))
    assert (guesses[0].type, guesses[0].kind) == ("bool", "bool")  # drafted as its bit 0
    assert "bit 0" in guesses[0].evidence and guesses[0].confidence >= 0.8
    assert (guesses[1].type, guesses[1].kind) == (
        "uint16",
        "counter",
    ) and "wrapped 1 times" in guesses[1].evidence
    assert guesses[2].kind == "constant" and guesses[2].confidence <= 0.3
    assert guesses[3].kind == "state"

    coils = infer(series(50, lambda k, rng: (k % 3 == 0, False)), table="coil")
    assert [(g.type, g.kind, g.confidence) for g in coils.values()] == [("bool", "bool", 1.0)] * 2


def test_points_written_by_the_scada_are_setpoints_even_when_never_read() -> None:
    inference = Inference()
    for k in range(50):
        inference.add(Values("modbus", k, PLC, 1, HR, 10, (215 + k % 3, 0)))
    inference.add(Values("modbus", 60, PLC, 1, HR, 10, (220,), written=True))
    inference.add(Values("modbus", 61, PLC, 1, HR, 40, (*words_of(-18.5),), written=True))
    guesses = {g.address: g for g in inference.guesses()}
    assert guesses[10].written and guesses[10].kind == "setpoint" and guesses[10].samples == 50
    assert not guesses[11].written
    assert {40, 41} <= set(guesses) and guesses[40].written and guesses[40].kind == "setpoint"


def test_dnp3_and_bacnet_points_take_the_type_their_values_have() -> None:
    inference = Inference()
    outstation, device = Peer("10.0.0.8", 20000), Peer("10.0.0.9", 47808)
    for k in range(40):
        inference.add(
            Values("dnp3", k, outstation, 10, "30", 0, (20.5 + 0.1 * (k % 4), 1000 + 5 * k))
        )
        inference.add(Values("dnp3", k, outstation, 10, "1", 0, (k % 5 == 0, "on")))
        inference.add(Values("bacnet", k, device, 1201, "analog-input", 3, (4.5 + k % 2,)))
    inference.add(
        Description(
            "bacnet", device, 1201, "analog-input", 3, name="AHU-1 SAT", units="degrees-celsius"
        )
    )
    guesses = {(g.protocol, g.table, g.address): g for g in inference.guesses()}
    assert guesses[("dnp3", "30", 0)].type == "float32"
    assert (guesses[("dnp3", "30", 1)].type, guesses[("dnp3", "30", 1)].kind) == (
        "uint32",
        "counter",
    )
    assert guesses[("dnp3", "1", 0)].type == "bool"
    assert guesses[("dnp3", "1", 1)].type == "string"
    ai = guesses[("bacnet", "analog-input", 3)]
    assert (ai.type, ai.name, ai.units, ai.width) == ("float32", "AHU-1 SAT", "degrees-celsius", 1)


def test_registers_that_change_at_the_same_answers_are_linked() -> None:
    def row(k: int, rng: random.Random) -> tuple[int, ...]:
        batch = k // 13  # a recipe step changes two registers at once
        other = (k // 17) % 2  # an unrelated flag changes at other times
        return (100 + batch, 7 * batch % 50, other, 42)

    guesses = infer(series(200, row))
    assert guesses[0].changes_with == (1,) and guesses[1].changes_with == (0,)
    assert guesses[2].changes_with == () and guesses[3].changes_with == ()


def test_many_samples_of_one_point_keep_memory_bounded() -> None:
    inference = Inference()
    answers = [Values("modbus", k, PLC, 1, HR, 0, (k,)) for k in range(0x10000)]  # built once
    for k in range(200_000):
        inference.add(answers[k & 0xFFFF])
    (block,) = inference._blocks.values()
    assert len(block.ring) == RING and block.new < BATCH
    (g,) = inference.guesses()
    assert (g.kind, g.samples) == ("counter", 200_000) and "wrapped 3 times" in g.evidence


def test_ranges_beyond_the_memory_budget_are_dropped_with_a_warning() -> None:
    warnings = Warnings()
    budget = 2 * Block.cost(5, "words") + 5_000
    inference = Inference(warnings, max_bytes=budget)
    for start in (0, 5, 10):
        inference.add(Values("modbus", 0, PLC, 1, HR, start, (1, 2, 3, 4, 5)))
    inference.add(Values("modbus", 0, PLC, 1, HR, 0, (1, 2, 3, 4, 5)))  # a known range still counts
    assert len(inference.guesses()) == 10
    (kind, n, where), *others = warnings.items()
    assert kind.startswith("inference memory budget of") and n == 1 and where == str(PLC)
    assert others == []


def test_register_values_that_are_not_words_are_a_warning_not_an_exception() -> None:
    warnings = Warnings()
    inference = Inference(warnings)
    inference.add(Values("modbus", 0, PLC, 1, HR, 0, (1, 70000)))
    inference.add(Values("modbus", 0, PLC, 1, HR, 0, (1, "x")))
    inference.add(Values("modbus", 0, PLC, 1, HR, 0, ()))
    assert inference.guesses() == [] and len(warnings) == 2


@settings(max_examples=30, deadline=None)
@given(
    level=st.floats(min_value=0.01, max_value=5000) | st.floats(min_value=-5000, max_value=-0.01),
    relative_noise=st.floats(min_value=1e-5, max_value=0.01),
    order=st.sampled_from(["big", "little"]),
    before=st.integers(min_value=0, max_value=3),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_any_noisy_float32_is_found_with_its_word_order(
    level: float, relative_noise: float, order: str, before: int, seed: int
) -> None:
    def row(k: int, rng: random.Random) -> tuple[int, ...]:
        value = level * (1 + rng.gauss(0, relative_noise)) + 0.001 * abs(level) * k / 300
        return (*[100 + i for i in range(before)], *words_of(value, order=order), 5)

    guesses = infer(series(300, row, seed))
    assert sorted(guesses) == [*range(before), before, before + 2]
    g = guesses[before]
    assert (g.type, g.word_order) == ("float32", order), g.evidence


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.lists(st.one_of(st.integers(0, 0xFFFF)), min_size=3, max_size=3),
        min_size=1,
        max_size=300,
    )
)
def test_any_register_series_gives_one_guess_per_point_or_pair(rows: list[list[int]]) -> None:
    guesses = infer(rows)
    covered = [a for g in guesses.values() for a in range(g.address, g.address + g.width)]
    assert sorted(covered) == [0, 1, 2]
    assert all(0 <= g.confidence <= 1 and g.samples == len(rows) for g in guesses.values())


# --- float32 without carries, 32-bit values with a still high word, 0/1 registers ---------


@pytest.mark.parametrize(
    ("value", "n", "order"),
    [
        (lambda k: 20 + math.sin(k / 5), 50, "big"),  # a short capture: 50 polls
        (lambda k: round(20 + math.sin(k / 5), 1), 300, "big"),  # quantised to tenths
        (lambda k: math.sin(k / 6), 300, "little"),  # crossing zero flips the sign bit
        (lambda k: round(math.sin(k / 6), 2), 120, "big"),
    ],
)
def test_a_float32_that_shows_no_carries_is_found_by_its_smoothness(
    value: Callable[[int], float], n: int, order: str
) -> None:
    guesses = infer([(7, *words_of(value(k), order=order)) for k in range(n)])
    assert sorted(guesses) == [0, 1]
    g = guesses[1]
    assert (g.type, g.word_order, g.width) == ("float32", order, 2), g.evidence
    assert 0.5 <= g.confidence <= 0.8


def test_what_may_be_half_of_a_float32_gets_a_low_confidence_when_nothing_is_certain() -> None:
    # Six polls of a float32: too few to tell; each word alone would be a fair uint16.
    guesses = infer([words_of(20 + math.sin(k / 5)) for k in range(6)])
    assert [(g.width, g.confidence <= 0.3) for g in guesses.values()] == [(1, True)] * 2
    assert all("half of a float32?" in g.evidence for g in guesses.values())
    # A high word in a float's exponent range whose float32 reading is anything but smooth.
    rows = series(200, lambda k, rng: (rng.choice((0x3F80, 0x4480, 0x4B00)), rng.randrange(65536)))
    hi = infer(rows)[0]
    assert hi.width == 1 and hi.confidence <= 0.3 and "half of a float32?" in hi.evidence


def test_smoothness_never_merges_a_word_in_a_float_range_beside_a_slow_or_two_valued_one() -> None:
    status = infer(series(300, lambda k, rng: (0x4000 + (k // 50) % 2, rng.choice((0, 9000)))))
    assert [g.width for g in status.values()] == [1, 1]
    adc = infer(series(300, lambda k, rng: (15000 + rng.randint(-5, 5), 400 + 30 * (k % 7))))
    assert [g.width for g in adc.values()] == [1, 1]


@pytest.mark.parametrize(
    ("type_", "value", "order"),
    [
        ("int32", lambda k: -100_000 + 7 * k, "big"),  # high word a still 0xFFFE
        ("uint32", lambda k: 100_000 + 3 * k, "little"),  # high word a still 1
        ("int32", lambda k: -2_000 + (37 * k) % 500, "big"),  # still 0xFFFF, low word moving
    ],
)
def test_a_32_bit_value_whose_high_word_never_moved_is_a_low_confidence_32_bit_value(
    type_: str, value: Callable[[int], int], order: str
) -> None:
    guesses = infer([(*words_of(value(k), type_, order), 5) for k in range(300)])
    assert sorted(guesses) == [0, 2]  # the low half is not a 16-bit signal of its own
    g = guesses[0]
    assert (g.type, g.word_order, g.width) == (type_, order, 2), g.evidence
    assert 0.3 <= g.confidence <= 0.45 and "no carry seen" in g.evidence
    assert g.minimum == min(value(k) for k in range(300))


def test_a_register_of_0_and_1_is_a_bool_only_once_it_changed_often_enough() -> None:
    flag = infer([(1 if k % 40 >= 20 else 0,) for k in range(200)])[0]
    assert (flag.type, flag.kind) == ("bool", "bool")
    once = infer([(1 if k >= 150 else 0,) for k in range(200)])[0]
    assert (once.type, once.kind) == ("uint16", "bool") and once.confidence <= 0.5
    assert "a flag? (bit 0)" in once.evidence


def test_a_dnp3_counters_evidence_is_its_rate() -> None:
    inference = Inference()
    for k in range(40):
        inference.add(Values("dnp3", k, Peer("10.0.0.8", 20000), 10, "20", 0, (1000 + 3 * k,)))
    (g,) = inference.guesses()
    assert g.kind == "counter" and "+3 a sample" in g.evidence


# --- cost: memory in bytes, pairs that settle or die --------------------------------------


def test_bits_are_kept_a_byte_each_and_a_block_stays_within_its_cost() -> None:
    rng = random.Random(5)
    for table, width, make in (
        (HR, 125, lambda: tuple(rng.randrange(65536) for _ in range(125))),
        ("coil", 2000, lambda: tuple(rng.random() < 0.5 for _ in range(2000))),
    ):
        inference = Inference()
        tracemalloc.start()
        try:
            for k in range(RING + BATCH + 7):
                inference.add(Values("modbus", k, PLC, 1, table, 0, make()))
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        (block,) = inference._blocks.values()
        assert all(len(row) == width for row in block.ring)
        if table == "coil":
            assert all(isinstance(row, bytes) for row in block.ring)
        assert held <= Block.cost(width, block.packing)


def test_overlapping_ranges_do_not_multiply_what_is_kept() -> None:
    warnings = Warnings()
    inference = Inference(warnings)
    for k in range(3):
        for start in range(50):  # 50 ranges of 20 registers, each one register further
            inference.add(Values("modbus", k, PLC, 1, HR, start, tuple(range(start, start + 20))))
    kept = len(inference._blocks)
    assert kept <= 50 // 2  # each register digested in at most 2 × MAX_OVERLAP ranges
    assert [g.address for g in inference.guesses()][:60] == list(range(60))
    assert [(kind, n) for kind, n, _ in warnings.items()] == [
        (f"range overlapping {MAX_OVERLAP} others read already (not used for types)", 50 - kept)
    ]
    # Ranges that nest (an HMI's screens) are all kept: most of each one is new.
    inference = Inference(warnings)
    for k in range(3):
        for count in (10, 20, 5, 50, 100, 125):
            inference.add(Values("modbus", k, PLC, 1, HR, 0, tuple(range(count))))
    assert len(inference._blocks) == 6 and len(inference.guesses()) == 125


def test_pairs_of_unrelated_moving_words_are_dropped_after_one_batch() -> None:
    # A wide block of 16-bit words that all move by more than a carry's step: nothing can
    # tell that two of them are one value, so no pair of them is tracked after a batch.
    rows = [tuple(300 + 3 * (k % 64) + j for j in range(125)) for k in range(BATCH + 1)]
    inference = Inference()
    for k, row in enumerate(rows):
        inference.add(Values("modbus", k, PLC, 1, HR, 0, row))
    (block,) = inference._blocks.values()
    assert block.live == [] and all(p.dead for p in block.pairs)
    # ... while a float32 whose high word jumps at every poll is still followed and found.
    rng = random.Random(2)
    floats = [words_of(1000 + rng.uniform(-200, 200)) for _ in range(3 * BATCH)]
    guesses = infer(floats)
    assert (guesses[0].type, guesses[0].width) == ("float32", 2)
