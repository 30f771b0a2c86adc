"""Assessments against baselines (label, direction, expected), trends, and the precision of
every number computed at the edge: read like the plant, never like float noise."""

from __future__ import annotations

import struct
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.plant.connectors.base import RawSample
from broker.plant.pipeline import PlantPipeline
from broker.policy import Policy
from broker.records import to_json
from tests.plant.compressor import (
    AMBIENT,
    POWER,
    PRESSURE,
    SPECIFIC,
    T0,
    by_signal,
    compressor_policy,
    edited,
    scan,
    scan_in_tenths,
    tenths,
)


@pytest.fixture
def compressor(tmp_path: Path) -> Policy:
    return compressor_policy(tmp_path)


def test_80_psi_is_expected_on_a_hot_day_and_abnormal_on_a_cold_one(compressor: Policy) -> None:
    hot = by_signal(PlantPipeline(compressor).process(scan(80, 20, ambient=35)))[PRESSURE]
    cold = by_signal(PlantPipeline(compressor).process(scan(80, 20, ambient=10)))[PRESSURE]

    assert hot.value == cold.value == 80
    assert hot.context.assessment is not None and cold.context.assessment is not None
    assert (hot.context.assessment.expected, hot.context.assessment.label) == (80, "expected")
    assert cold.context.assessment.expected == 60
    assert cold.context.assessment.deviation_pct == pytest.approx(33.33, abs=0.01)
    assert cold.context.assessment.label == "abnormal"
    assert [a.action for a in cold.context.alerts] == ["clean condenser coils"]
    assert hot.context.alerts == []


def test_the_same_pressure_and_ambient_at_a_higher_load_is_expected(compressor: Policy) -> None:
    light = by_signal(PlantPipeline(compressor).process(scan(72, 20, ambient=22.5)))[PRESSURE]
    heavy = by_signal(PlantPipeline(compressor).process(scan(72, 40, ambient=22.5)))[PRESSURE]

    assert light.context.assessment is not None and heavy.context.assessment is not None
    assert light.context.assessment.expected == 70  # halfway between 60 and 80
    assert heavy.context.assessment.expected == 77  # halfway between 66 and 88
    assert light.context.assessment.label == "expected"
    assert heavy.context.assessment.deviation_pct < 0


def test_between_the_two_bands_is_drifting_above(compressor: Policy) -> None:
    """Issue 15: a pressure above expected read `below_expected`, as if it were too low."""
    record = by_signal(PlantPipeline(compressor).process(scan(90, 20, ambient=35)))[PRESSURE]

    assessment = record.context.assessment
    assert assessment is not None  # 12.5 % above 80
    assert (assessment.label, assessment.direction, assessment.deviation_pct) == (
        "drifting", "above", 12.5,
    )  # fmt: skip
    assert record.context.alerts == []


@pytest.mark.parametrize(
    ("pressure", "label", "direction"),
    [
        (80, "expected", None),  # exactly on expected: on neither side
        (84, "expected", "above"),  # 5 %: under drifting_pct
        (60, "expected", "below"),  # -25 %: far below, but only higher is worse
        (88, "drifting", "above"),  # 10 %: drifting_pct itself
        (96, "abnormal", "above"),  # 20 %: abnormal_pct itself
    ],
)
def test_the_label_says_how_far_in_the_worse_direction_and_direction_which_side(
    compressor: Policy, pressure: float, label: str, direction: str | None
) -> None:
    record = by_signal(PlantPipeline(compressor).process(scan(pressure, 20, ambient=35)))[PRESSURE]

    assessment = record.context.assessment
    assert assessment is not None and assessment.expected == 80
    assert (assessment.label, assessment.direction) == (label, direction)


def test_when_both_sides_are_worse_a_low_value_drifts_below(tmp_path: Path) -> None:
    def both(document: dict[str, Any]) -> None:
        document["assets"][0]["baselines"][0]["worse"] = "both"

    pipeline = PlantPipeline(edited(tmp_path, both))
    low = by_signal(pipeline.process(scan(70, 20, ambient=35)))[PRESSURE].context.assessment

    assert low is not None
    assert (low.label, low.direction, low.deviation_pct) == ("drifting", "below", -12.5)


def test_rules_read_the_label_and_the_direction(tmp_path: Path) -> None:
    drifting_low = {
        "name": "pressure-low",
        "when": "label('discharge_pressure') == 'drifting' and "
        "direction('discharge_pressure') == 'below'",
        "alert": "Head pressure low",
        "action": "check the refrigerant charge",
        "outcome": "energy",
    }

    def both(document: dict[str, Any]) -> None:
        baseline = document["assets"][0]["baselines"][0]
        baseline["worse"] = "both"
        document["assets"][0]["rules"] = [drifting_low]

    pipeline = PlantPipeline(edited(tmp_path, both))
    low = by_signal(pipeline.process(scan(70, 20, ambient=35)))[PRESSURE]
    high = by_signal(pipeline.process(scan(90, 20, ambient=35)))[PRESSURE]

    assert [a.rule for a in low.context.alerts] == ["pressure-low"]
    assert high.context.alerts == []  # drifting too, but above


def test_no_assessment_outside_the_baselines_states(compressor: Policy) -> None:
    record = by_signal(PlantPipeline(compressor).process(scan(80, 0.5, ambient=10)))[PRESSURE]

    assert record.context.asset_state == "stopped"
    assert record.context.assessment is None
    assert record.context.alerts == []


def test_a_value_near_the_float_limit_is_assessed_not_fatal(tmp_path: Path) -> None:
    def float64_pressure(document: dict[str, Any]) -> None:
        document["signals"][0]["source"]["type"] = "float64"

    pipeline = PlantPipeline(edited(tmp_path, float64_pressure))
    raw = struct.unpack(">4H", struct.pack(">d", 1e307))  # its deviation x 100 is infinite
    records = by_signal(
        pipeline.process([RawSample(PRESSURE, raw, T0, "good"), *scan(0, 20, 20)[1:]])
    )

    pressure = records[PRESSURE]
    assert (pressure.value, pressure.quality) == (1e307, "uncertain")  # out of range
    assert pressure.context.assessment is not None
    assert pressure.context.assessment.label == "abnormal"
    assert pressure.context.assessment.deviation_pct > 1e306


# --- trends ---


def test_a_trend_is_reported_only_once_its_history_spans_half_its_window(
    tmp_path: Path,
) -> None:
    """Issue 15: the first minute of a 10 min window gave 63 bar/h."""
    pipeline = PlantPipeline(compressor_policy(tmp_path, trend_window="10m"))
    trends = []
    for i in range(20):  # every 20 s (one bucket each): +1 psi a minute
        at = T0 + timedelta(seconds=20 * i)
        record = by_signal(pipeline.process(scan(80 + i / 3, 20, 20, at=at)))[PRESSURE]
        trends.append(record.context.trend)

    assert trends[:15] == [None] * 15  # up to 4 min 40 s of a 10 min window
    assert all(t is not None and t.direction == "rising" for t in trends[15:])
    assert trends[-1] is not None and trends[-1].slope_per_h == pytest.approx(60, rel=1e-6)


def test_a_trend_rule_ends_when_the_measure_has_had_no_good_value_for_its_window(
    tmp_path: Path,
) -> None:
    climbing = {
        "name": "pressure-climbing",
        "when": "trend('discharge_pressure') > 30",
        "alert": "Head pressure climbing",
        "action": "check the condenser",
        "outcome": "energy",
    }
    pipeline = PlantPipeline(compressor_policy(tmp_path, trend_window="10m", rules=[climbing]))
    for minute in range(10):  # +60 psi/h
        rising = pipeline.process(scan(80 + minute, 20, 20, at=T0 + timedelta(minutes=minute)))
    assert [a.rule for a in by_signal(rising)[POWER].context.alerts] == ["pressure-climbing"]
    at = T0 + timedelta(hours=3)
    unread = [RawSample(PRESSURE, None, at, "bad"), *scan(80, 20, 20, at=at)[1:]]

    later = by_signal(pipeline.process(unread))
    assert later[POWER].context.alerts == []  # no good pressure for 3 h: no trend to act on


def test_a_records_trend_ends_once_its_good_values_are_older_than_the_window(
    tmp_path: Path,
) -> None:
    pipeline = PlantPipeline(compressor_policy(tmp_path, trend_window="10m"))
    for minute in range(10):  # +60 psi/h
        rising = pipeline.process(scan(80 + minute, 20, 20, at=T0 + timedelta(minutes=minute)))
    trend = by_signal(rising)[PRESSURE].context.trend
    assert trend is not None and trend.direction == "rising"

    for minute in range(10, 60):  # out of range: uncertain, kept out of history
        later = by_signal(pipeline.process(scan(350, 20, 20, at=T0 + timedelta(minutes=minute))))
    assert later[PRESSURE].quality == "uncertain"
    assert later[PRESSURE].context.trend is None


# --- precision: numbers computed at the edge read like the plant, never like float noise ---


def test_a_derived_difference_is_the_exact_decimal_not_float_noise(tmp_path: Path) -> None:
    """Issue 15: 7.9999999999999964 is a defect. 17.9 - 10.1 is 7.799999999999999 in floats."""
    pipeline = PlantPipeline(edited(tmp_path, tenths))
    records = by_signal(pipeline.process(scan_in_tenths(179, 20, ambient=101)))

    assert (records[PRESSURE].value, records[AMBIENT].value) == (17.9, 10.1)
    assert records[SPECIFIC].value == 7.8
    assert b'"value":7.8,' in to_json(records[SPECIFIC])


def test_a_derived_quotient_has_the_decimals_the_signal_declares(tmp_path: Path) -> None:
    def declared(document: dict[str, Any]) -> None:
        document["signals"][3]["source"]["decimals"] = 2

    undeclared = by_signal(PlantPipeline(compressor_policy(tmp_path)).process(scan(80, 30, 20)))
    two = by_signal(PlantPipeline(edited(tmp_path, declared)).process(scan(80, 30, 20)))

    assert 80 / 30 == 2.6666666666666665
    assert undeclared[SPECIFIC].value == 2.66666667  # float32 inputs: 9 significant digits
    assert two[SPECIFIC].value == 2.67


def test_expected_is_one_decimal_finer_than_the_measure_and_the_table(tmp_path: Path) -> None:
    pipeline = PlantPipeline(edited(tmp_path, tenths))
    # at 26.7 degC and 20 kW the table gives 60 + 16.7 / 25 x 20 = 73.36 psi
    record = by_signal(pipeline.process(scan_in_tenths(800, 20, ambient=267)))[PRESSURE]

    assessment = record.context.assessment
    assert assessment is not None
    assert assessment.expected == 73.36  # hundredths: the pressure is in tenths, the table whole
    assert assessment.deviation_pct == round((80 - 73.36) / 73.36 * 100, 2)


def test_load_means_and_trend_slopes_are_rounded_to_what_follows_from_their_values(
    tmp_path: Path,
) -> None:
    pipeline = PlantPipeline(edited(tmp_path, tenths))
    for i in range(16):  # every 20 s for 5 min: pressure +0.1 psi, load 0.1 / 0.2 kW
        at = T0 + timedelta(seconds=20 * i)
        records = by_signal(pipeline.process(scan_in_tenths(800 + i, 0.1 + i % 2 / 10, 200, at)))

    context = records[PRESSURE].context
    assert context.load is not None
    mean = context.load.windows["15m"].mean  # float32 0.1 and 0.2: 9 significant digits
    assert mean is not None and mean == float(f"{mean:.9g}") and mean == pytest.approx(0.15)
    assert context.trend is not None  # 0.1 psi per 20 s: 18 psi/h, to 2 decimals
    assert context.trend.slope_per_h == 18.0


@pytest.mark.parametrize(
    ("raw", "scale", "offset", "published"),
    [
        (16.654696, 1, 0, 16.654696),  # 8 significant digits: 7 would make it 16.6547
        (16.654696, 0.1, 0, 1.6654696),  # not to the scale's one decimal
        (1013.25, 0.001, 0, 1.01325),
        (1.3, 2, 0, 2.6),  # a whole scale: not to 0 decimals
        (293.1234, 1, -273.15, 19.9734),
    ],
)
def test_a_derived_copy_of_a_scaled_float32_is_the_value_as_published(
    tmp_path: Path, raw: float, scale: float, offset: float, published: float
) -> None:
    """Review of issue 15: a scaled float is not stepped to its scale's decimals."""

    def scaled(document: dict[str, Any]) -> None:
        document["signals"][0].update(scale=scale, offset=offset)
        document["signals"][3]["source"]["expression"] = "discharge_pressure + 0"

    records = by_signal(PlantPipeline(edited(tmp_path, scaled)).process(scan(raw, 20, 20)))

    assert records[PRESSURE].value == published
    assert records[SPECIFIC].value == published


def integer_pressure(table: list[list[float]]) -> Any:
    def change(document: dict[str, Any]) -> None:
        document["signals"][0]["source"]["type"] = "int16"
        document["assets"][0]["baselines"][0]["expected"] = table

    return change


def test_expected_keeps_the_tables_own_decimals_for_an_integer_measure(tmp_path: Path) -> None:
    """Review: an int16 measure against a table of 1.4 read expected 1.0, deviation 0 %."""
    pipeline = PlantPipeline(edited(tmp_path, integer_pressure([[1.4, 1.4], [1.4, 1.4]])))
    assessment = by_signal(pipeline.process(scan_int(1)))[PRESSURE].context.assessment

    assert assessment is not None
    assert (assessment.expected, assessment.deviation_pct) == (1.4, -28.57)


def test_an_expected_that_rounds_to_zero_is_still_assessed(tmp_path: Path) -> None:
    """Review: a table of 0.4 rounded to 0 and the +150 % value had no assessment at all."""
    pipeline = PlantPipeline(edited(tmp_path, integer_pressure([[0.4, 0.4], [0.4, 0.4]])))
    assessment = by_signal(pipeline.process(scan_int(1)))[PRESSURE].context.assessment
    assert assessment is not None and (assessment.expected, assessment.label) == (0.4, "abnormal")

    tiny = PlantPipeline(edited(tmp_path, integer_pressure([[0, 0], [0.001, 0.001]])))
    at = by_signal(tiny.process(scan_int(1, ambient=10.5)))[PRESSURE].context.assessment
    assert at is not None  # 0.00002 expected: 0.0 to 4 decimals, assessed from the exact
    assert (at.expected, at.label, at.direction) == (0.0, "abnormal", "above")


def scan_int(pressure: int, ambient: float = 20, at: datetime = T0) -> list[RawSample]:
    return [RawSample(PRESSURE, (pressure,), at, "good"), *scan(0, 20, ambient, at)[1:]]


@pytest.mark.parametrize(
    ("tenths_of_psi", "label", "deviation"),
    [(121, "drifting", 10.0), (120, "expected", 9.09), (132, "abnormal", 20.0)],
)
def test_the_label_follows_the_deviation_as_published_at_its_threshold(
    tmp_path: Path, tenths_of_psi: int, label: str, deviation: float
) -> None:
    """Review: 12.1 against 11.0 showed deviation_pct 10.0 but read `expected` (the float
    division gave 9.999999999999996), against the signed drifting_pct: 10."""

    def eleven(document: dict[str, Any]) -> None:
        tenths(document)
        document["assets"][0]["baselines"][0]["expected"] = [[11.0, 11.0], [11.0, 11.0]]

    pipeline = PlantPipeline(edited(tmp_path, eleven))
    record = by_signal(pipeline.process(scan_in_tenths(tenths_of_psi, 20, 200)))[PRESSURE]

    assessment = record.context.assessment
    assert assessment is not None
    assert (assessment.deviation_pct, assessment.label) == (deviation, label)


def test_a_slope_that_rounds_to_zero_is_steady_not_rising(tmp_path: Path) -> None:
    """Review: an integer count near 0 could read `rising` with slope_per_h 0.0."""

    def count(document: dict[str, Any]) -> None:
        document["signals"][0]["source"]["type"] = "int16"  # whole units: slope to 0.1/h

    pipeline = PlantPipeline(edited(tmp_path, count))
    for i in range(160):  # every 12 s for 32 min: a single 1 among zeros, after the middle
        at = T0 + timedelta(seconds=12 * i)
        record = by_signal(pipeline.process(scan_int(1 if i == 100 else 0, at=at)))[PRESSURE]

    trend = record.context.trend
    assert trend is not None  # 0.02 psi/h
    assert (trend.slope_per_h, trend.direction) == (0.0, "steady")
