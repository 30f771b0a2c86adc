"""PlantPipeline.process: raw samples → records, through the gate, the decoders and context."""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime

import msgspec
import pytest

from broker.plant.connectors.base import RawSample
from broker.plant.pipeline import PlantPipeline
from broker.policy import Policy, load
from broker.records import Quality, Record
from tests.harness import DEMO_POLICY

COMPRESSOR = "coldstore/machine-room/compressor-1"
CONDENSER = "coldstore/machine-room/condenser-1"
SUCTION = f"{COMPRESSOR}/suction_pressure"
MOTOR_POWER = f"{COMPRESSOR}/motor_power"
RUN_TIME = f"{COMPRESSOR}/run_time"
RUNNING = f"{COMPRESSOR}/running"
FAN_RUNNING = f"{CONDENSER}/fan_running"
OUTLET = f"{CONDENSER}/outlet_temperature"
AMBIENT = "coldstore/outdoor/weather/ambient_temperature"
HIGH_PRESSURE = f"{COMPRESSOR}/high_pressure_alarm"
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def words(fmt: str, value: float) -> tuple[int, ...]:
    """Big-endian register words of `value` packed with struct format `fmt`."""
    raw = struct.pack(">" + fmt, value)
    return struct.unpack(f">{len(raw) // 2}H", raw)


def sample(signal: str, raw: object, quality: Quality = "good") -> RawSample:
    return RawSample(signal, raw, T0, quality)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load(DEMO_POLICY)


@pytest.fixture
def pipeline(policy: Policy) -> PlantPipeline:
    return PlantPipeline(policy)


def by_signal(records: list[Record]) -> dict[str, Record]:
    return {r.signal: r for r in records}


def test_values_are_decoded_scaled_and_carry_their_unit(
    policy: Policy, pipeline: PlantPipeline
) -> None:
    spec = {s.path: s for s in policy.signals}
    samples = [
        sample(SUCTION, words("h", 350)),
        sample(MOTOR_POWER, words("f", 12.5)),
        sample(RUN_TIME, words("I", 100_000)[::-1]),  # little word order in the policy
    ]

    records = by_signal(pipeline.process(samples))

    suction = spec[SUCTION]
    assert records[SUCTION].value == pytest.approx(350 * suction.scale + suction.offset)
    assert records[MOTOR_POWER].value == 12.5
    assert records[RUN_TIME].value == 100_000
    assert {path: r.unit for path, r in records.items()} == {p: spec[p].unit for p in records}
    assert all(r.quality == "good" and r.source_time == T0 for r in records.values())


def test_records_carry_the_policy_version(policy: Policy) -> None:
    pipeline = PlantPipeline(msgspec.structs.replace(policy, version=7))

    (record,) = pipeline.process([sample(SUCTION, words("h", 1))])

    assert record.policy_version == 7


def test_sample_for_a_signal_not_in_the_policy_is_dropped_and_counted(
    pipeline: PlantPipeline,
) -> None:
    samples = [
        sample(f"{COMPRESSOR}/oil_pressure", words("h", 5)),
        sample(SUCTION, words("h", 5)),
        sample("elsewhere/secret/value", (1,)),
    ]

    records = pipeline.process(samples)

    assert [r.signal for r in records] == [SUCTION]
    assert pipeline.gate.dropped["policy_denied"] == 2


@pytest.mark.parametrize(
    ("signal", "raw", "quality"),
    [
        (SUCTION, words("h", 100), "bad"),  # the device said bad
        (SUCTION, None, "good"),  # no value at all
        (SUCTION, (1, 2), "good"),  # wrong register count
        (MOTOR_POWER, words("f", math.nan), "good"),
        (MOTOR_POWER, words("f", math.inf), "good"),
    ],
    ids=["bad-quality", "no-raw", "wrong-width", "nan", "inf"],
)
def test_bad_or_undecodable_sample_yields_bad_quality_and_no_value(
    pipeline: PlantPipeline, signal: str, raw: object, quality: Quality
) -> None:
    (record,) = pipeline.process([sample(signal, raw, quality)])

    assert (record.signal, record.value, record.quality) == (signal, None, "bad")


def test_undecodable_sample_does_not_spoil_the_rest_of_the_batch(
    pipeline: PlantPipeline,
) -> None:
    records = by_signal(pipeline.process([sample(SUCTION, (1, 2)), sample(RUN_TIME, (7, 0))]))

    assert records[SUCTION].quality == "bad"
    assert (records[RUN_TIME].value, records[RUN_TIME].quality) == (7, "good")


def test_uncertain_sample_keeps_its_quality(pipeline: PlantPipeline) -> None:
    (record,) = pipeline.process([sample(RUN_TIME, (7, 0), "uncertain")])

    assert (record.value, record.quality) == (7, "uncertain")
    assert [i.detail for i in record.context.quality_issues] == ["the device marked it uncertain"]


@pytest.mark.parametrize(
    ("raw", "quality", "value"),
    [((7, 0), "uncertain", 7), ((7, 0), "bad", None), (None, "bad", None)],
)
def test_the_devices_reason_is_the_records_device_status_issue(
    pipeline: PlantPipeline, raw: object, quality: Quality, value: object
) -> None:
    said = RawSample(RUN_TIME, raw, T0, quality, reason="DNP3 flag LOCAL_FORCED")  # type: ignore[arg-type]

    (record,) = pipeline.process([said])

    assert (record.value, record.quality) == (value, quality)
    assert [(i.check, i.detail) for i in record.context.quality_issues] == [
        ("device_status", "DNP3 flag LOCAL_FORCED")
    ]


def compressor(running: bool, alarm: bool = False) -> list[RawSample]:
    """The samples the compressor's state rules read (policy: fault, running, otherwise stopped)."""
    return [
        sample(RUNNING, running),
        sample(MOTOR_POWER, words("f", 14.0 if running else 0.0)),
        sample(HIGH_PRESSURE, alarm),
    ]


def test_asset_state_follows_the_state_rules_over_the_same_batch(pipeline: PlantPipeline) -> None:
    # The state samples come last: they still set the context of the records before them.
    samples = [
        sample(SUCTION, words("h", 1)),
        sample(OUTLET, words("h", 1)),
        sample(AMBIENT, words("h", 1)),
        *compressor(running=True),
        sample(FAN_RUNNING, False),
    ]

    records = by_signal(pipeline.process(samples))

    assert records[SUCTION].context.asset_state == "running"
    assert records[RUNNING].context.asset_state == "running"
    assert records[OUTLET].context.asset_state == "stopped"
    assert records[FAN_RUNNING].context.asset_state == "stopped"
    assert records[AMBIENT].context.asset_state == "unknown"  # its asset has no states


def test_the_first_true_state_rule_wins(pipeline: PlantPipeline) -> None:
    records = by_signal(pipeline.process([sample(SUCTION, (1,)), *compressor(True, alarm=True)]))

    assert records[SUCTION].context.asset_state == "fault"


def test_running_needs_power_as_well_as_the_contactor(pipeline: PlantPipeline) -> None:
    samples = [
        sample(RUNNING, True),
        sample(MOTOR_POWER, words("f", 0.5)),
        sample(HIGH_PRESSURE, False),
    ]

    records = by_signal(pipeline.process([sample(SUCTION, (1,)), *samples]))

    assert records[SUCTION].context.asset_state == "stopped"


def test_asset_state_is_unknown_before_any_state_sample(pipeline: PlantPipeline) -> None:
    (record,) = pipeline.process([sample(SUCTION, words("h", 1))])

    assert record.context.asset_state == "unknown"


def test_asset_state_becomes_unknown_when_the_state_sample_is_bad(
    pipeline: PlantPipeline,
) -> None:
    pipeline.process(compressor(running=True))

    records = by_signal(pipeline.process([sample(RUNNING, None, "bad"), sample(SUCTION, (1,))]))

    assert records[SUCTION].context.asset_state == "unknown"


def test_asset_state_changes_from_one_batch_to_the_next(pipeline: PlantPipeline) -> None:
    first = by_signal(pipeline.process([*compressor(running=True), sample(SUCTION, (1,))]))
    second = by_signal(pipeline.process([*compressor(running=False), sample(SUCTION, (1,))]))

    assert first[SUCTION].context.asset_state == "running"
    assert second[SUCTION].context.asset_state == "stopped"
