"""Context at the edge: assessments against baselines, rules and their actions, derived
signals, data-quality checks, maintenance status, and the fouling scenario on the real
simulated plant read through the real Modbus connector."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker import policy
from broker.channel.spool import encode_frames
from broker.config import MaintenanceConfig
from broker.plant.connectors import RawSample
from broker.plant.connectors.modbus import ModbusConnector
from broker.plant.maintenance import MaintenanceBook
from broker.plant.pipeline import PlantPipeline
from broker.policy import ModbusDevice, Policy
from broker.records import Record, to_json
from broker.sim.refrigeration import RefrigerationPlant
from tests.harness import demo_policy, free_port

COMPRESSOR = "site/plant/compressor"
PRESSURE = f"{COMPRESSOR}/discharge_pressure"
POWER = f"{COMPRESSOR}/motor_power"
AMBIENT = "site/outdoor/weather/ambient_temperature"
SPECIFIC = f"{COMPRESSOR}/pressure_per_kw"
T0 = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)


def register(value: float) -> tuple[int, ...]:
    """A float32 value as the two big-endian registers a PLC would hold."""
    return struct.unpack(">2H", struct.pack(">f", value))


def signal(path: str, address: int, **more: Any) -> dict[str, Any]:
    source = {"table": "input_register", "address": address, "type": "float32"}
    return {"path": path, "device": "plc", "source": source, **more}


def compressor_policy(tmp_path: Path, **asset: Any) -> Policy:
    """An 80 psi compressor: its discharge pressure's baseline depends on ambient and load."""
    document = {
        "deployment_id": "test",
        "version": 1,
        "expires": "2036-01-01T00:00:00Z",
        "devices": [{"name": "plc", "protocol": "modbus", "host": "127.0.0.1"}],
        "signals": [
            signal(PRESSURE, 0, unit="psi", range={"min": 0, "max": 300}),
            signal(POWER, 2, unit="kW", checks={"max_rate_per_s": 5, "flatline": "30s"}),
            signal(AMBIENT, 4, unit="degC", checks={"max_noise": 0.5}),
            {"path": SPECIFIC, "source": {"expression": "discharge_pressure / motor_power"}},
        ],
        "assets": [
            {
                "path": COMPRESSOR,
                "type": "compressor",
                "states": [{"state": "running", "when": "motor_power > 2"}],
                "ambient": {"temperature": AMBIENT},
                "load": {"signal": POWER, "windows": ["15m"]},
                "baselines": [
                    {
                        "measure": "discharge_pressure",
                        "ambient": "temperature",
                        "ambient_points": [10, 35],
                        "load_points": [20, 40],
                        "expected": [[60, 66], [80, 88]],  # psi
                        "worse": "higher",
                        "drifting_pct": 10,
                        "abnormal_pct": 20,
                        "states": ["running"],
                    }
                ],
                "rules": [
                    {
                        "name": "condenser-fouling",
                        "when": "state == 'running' and label('discharge_pressure') == 'abnormal'",
                        "alert": "Head pressure too high for the conditions",
                        "action": "clean condenser coils",
                        "outcome": "energy",
                    },
                    {
                        "name": "service-overdue",
                        "when": "maintenance == 'overdue'",
                        "alert": "Service overdue",
                        "action": "inspect compressor valves",
                        "outcome": "asset_life",
                    },
                ],
                **asset,
            }
        ],
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return policy.load(path)


def scan(pressure: float, power: float, ambient: float, at: datetime = T0) -> list[RawSample]:
    return [
        RawSample(PRESSURE, register(pressure), at, "good"),
        RawSample(POWER, register(power), at, "good"),
        RawSample(AMBIENT, register(ambient), at, "good"),
    ]


def by_signal(records: list[Record]) -> dict[str, Record]:
    return {r.signal: r for r in records}


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


def test_every_record_of_the_asset_carries_ambient_load_and_alerts(compressor: Policy) -> None:
    pipeline = PlantPipeline(compressor)
    pipeline.process(scan(60, 30, ambient=10, at=T0 - timedelta(minutes=5)))
    records = by_signal(pipeline.process(scan(80, 20, ambient=10)))

    power = records[POWER].context
    assert power.asset == COMPRESSOR and power.asset_type == "compressor"
    assert power.ambient == {"temperature": 10}
    assert power.load is not None and power.load.signal == POWER
    assert power.load.windows["15m"].mean == 25 and power.load.windows["15m"].max == 30
    assert [a.rule for a in power.alerts] == ["condenser-fouling"]


def test_a_derived_signal_is_computed_and_goes_bad_with_its_inputs(compressor: Policy) -> None:
    pipeline = PlantPipeline(compressor)
    good = by_signal(pipeline.process(scan(80, 20, ambient=20)))[SPECIFIC]
    broken = pipeline.process([RawSample(POWER, None, T0, "bad")])

    assert (good.value, good.quality) == (4.0, "good")
    derived = by_signal(broken)[SPECIFIC]
    assert (derived.value, derived.quality) == (None, "bad")
    assert [i.check for i in derived.context.quality_issues] == ["inputs_missing"]


def test_a_derived_signal_whose_arithmetic_fails_is_bad_and_the_scan_goes_on(
    compressor: Policy,
) -> None:
    records = by_signal(PlantPipeline(compressor).process(scan(80, 0, ambient=20)))

    derived = records[SPECIFIC]  # discharge_pressure / motor_power, with the motor at 0 kW
    assert (derived.value, derived.quality) == (None, "bad")
    assert "division by zero" in derived.context.quality_issues[0].detail
    assert (
        records[PRESSURE].quality == "good" and records[PRESSURE].context.asset_state == "stopped"
    )


def test_quality_checks_make_a_value_uncertain_and_say_why(compressor: Policy) -> None:
    pipeline = PlantPipeline(compressor)
    out_of_range = by_signal(pipeline.process(scan(350, 20, ambient=20)))[PRESSURE]
    later = T0 + timedelta(seconds=1)
    spike = by_signal(pipeline.process(scan(80, 35, ambient=20, at=later)))[POWER]

    assert out_of_range.quality == "uncertain"
    assert [i.check for i in out_of_range.context.quality_issues] == ["out_of_range"]
    assert "300" in out_of_range.context.quality_issues[0].detail
    assert spike.quality == "uncertain"
    assert [i.check for i in spike.context.quality_issues] == ["spike"]
    assert pipeline.checks.stats[PRESSURE].failed_checks["out_of_range"] == 1


def test_a_frozen_value_is_flagged_as_a_flatline(compressor: Policy) -> None:
    pipeline = PlantPipeline(compressor)
    records = [
        by_signal(pipeline.process(scan(80, 20, ambient=20, at=T0 + timedelta(seconds=s))))[POWER]
        for s in range(0, 40, 5)
    ]

    assert [r.quality for r in records[:6]] == ["good"] * 6  # unchanged for 0..25 s
    assert {r.quality for r in records[6:]} == {"uncertain"}  # 30 s and more
    assert records[-1].context.quality_issues[0].check == "flatline"


def test_a_noisy_value_is_flagged(compressor: Policy) -> None:
    pipeline = PlantPipeline(compressor)
    last = None
    for i in range(25):
        at = T0 + timedelta(seconds=i)
        last = by_signal(pipeline.process(scan(80, 20, ambient=20 + (2 if i % 2 else -2), at=at)))
    assert last is not None
    assert "noise" in {i.check for i in last[AMBIENT].context.quality_issues}


def test_a_maintenance_file_change_is_reflected(tmp_path: Path, compressor: Policy) -> None:
    records = tmp_path / "maintenance.yaml"
    today = date.today()
    entry = {"asset": COMPRESSOR, "last_service": str(today - timedelta(days=30))}
    records.write_text(yaml.safe_dump([{**entry, "next_due": str(today + timedelta(days=60))}]))
    pipeline = PlantPipeline(compressor, MaintenanceBook(MaintenanceConfig(file=records)))
    before = by_signal(pipeline.process(scan(80, 20, ambient=35)))[PRESSURE].context

    overdue = {
        **entry,
        "next_due": str(today - timedelta(days=2)),
        "open_work_orders": [{"id": "WO-7", "title": "Valve plate"}],
    }
    records.write_text(yaml.safe_dump([overdue]))
    os.utime(records, ns=(0, 10**18))  # a different mtime, whatever the clock's resolution

    def reread() -> Record:
        return by_signal(pipeline.process(scan(80, 20, ambient=35)))[PRESSURE]

    assert before.maintenance is not None and before.maintenance.status == "ok"
    after = None
    for _ in range(40):  # the book looks at the file at most once a second
        after = reread().context
        if after.maintenance is not None and after.maintenance.status == "overdue":
            break
        time.sleep(0.1)
    assert after is not None and after.maintenance is not None
    assert after.maintenance.status == "overdue"
    assert [w.id for w in after.maintenance.open_work_orders] == ["WO-7"]
    assert [a.action for a in after.alerts] == ["inspect compressor valves"]


def test_a_broken_maintenance_file_keeps_the_last_good_contents(
    tmp_path: Path, compressor: Policy
) -> None:
    records = tmp_path / "maintenance.csv"
    records.write_text(f"asset,last_service,next_due,open_work_orders\n{COMPRESSOR},,2099-01-01,\n")
    book = MaintenanceBook(MaintenanceConfig(file=records))
    assert book.status(COMPRESSOR).status == "ok"

    records.write_text(f"asset,last_service,next_due,open_work_orders\n{COMPRESSOR},,not-a-date,\n")
    os.utime(records, ns=(0, 10**18))
    book._checked = -10.0  # the next look reads the file again

    assert book.status(COMPRESSOR).status == "ok"
    assert book.status("site/other").status == "unknown"


def test_a_proposed_signal_is_checked_but_never_leaves_the_pipeline(tmp_path: Path) -> None:
    compressor_policy(tmp_path)
    document = yaml.safe_load((tmp_path / "policy.yaml").read_text())
    document["signals"][2]["lifecycle"] = "proposed"  # the ambient sensor, on trial
    document["assets"][0]["ambient"] = {}
    document["assets"][0]["baselines"] = []
    document["assets"][0]["rules"] = []
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(document))
    proposed = policy.load(tmp_path / "policy.yaml")
    pipeline = PlantPipeline(proposed)

    records = pipeline.process(scan(80, 20, ambient=99))

    assert AMBIENT not in {r.signal for r in records}
    assert pipeline.gate.dropped["proposed_signal"] == 1
    assert pipeline.checks.stats[AMBIENT].samples == 1  # validated all the same


def fouling_plant(fouling_bar_per_day: float) -> RefrigerationPlant:
    plant = RefrigerationPlant(
        "127.0.0.1",
        free_port(),
        tick_s=0.05,
        fouling_bar_per_day=fouling_bar_per_day,
        days_per_second=0.5,  # two simulated days in four seconds
    )
    plant.state.setpoint_c = -40  # keeps the compressor running: the baseline applies
    return plant


async def run_plant(plant: RefrigerationPlant, tmp_path: Path, days: float) -> list[Record]:
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(demo_policy(plant.address[1], poll_interval_s=0.1)))
    demo = policy.load(path)
    device = demo.devices[0]
    assert isinstance(device, ModbusDevice)
    pipeline = PlantPipeline(demo)
    pressure = "coldstore/machine-room/compressor-1/discharge_pressure"
    seen: list[Record] = []

    async def emit(samples: list[RawSample]) -> None:
        seen.extend(r for r in pipeline.process(samples) if r.signal == pressure)

    await plant.start()
    read = [s for s in demo.signals if s.device == device.name]
    connector = asyncio.create_task(ModbusConnector(device, read).run(emit))
    try:
        await asyncio.sleep(days / 0.5)
    finally:
        connector.cancel()
        await asyncio.gather(connector, return_exceptions=True)
        await plant.stop()
    return seen


async def test_condenser_fouling_is_flagged_within_two_simulated_days(tmp_path: Path) -> None:
    records = await run_plant(fouling_plant(fouling_bar_per_day=1.0), tmp_path, days=2.0)

    flagged = [r for r in records if "condenser-fouling" in {a.rule for a in r.context.alerts}]
    assert flagged, "the fouling was never flagged"
    first = flagged[0]
    assert first.context.assessment is not None and first.context.assessment.label == "abnormal"
    assert [a.action for a in first.context.alerts if a.rule == "condenser-fouling"] == [
        "clean condenser coils"
    ]
    assert isinstance(first.value, float) and first.value < 14  # below the high-pressure trip
    assert first.quality == "good"  # the raw value alone looks normal


async def test_a_healthy_condenser_is_never_flagged(tmp_path: Path) -> None:
    records = await run_plant(fouling_plant(fouling_bar_per_day=0.0), tmp_path, days=2.0)

    assessed = [r.context.assessment for r in records if r.context.assessment is not None]
    assert len(assessed) > 10
    assert {a.label for a in assessed} == {"expected"}
    assert not any(r.context.alerts for r in records)


# --- values at the edges: nothing a device sends may stop the plant half or skew history ---


def edited(tmp_path: Path, change: Any) -> Policy:
    """The compressor policy, changed by `change(document)` before it is loaded."""
    compressor_policy(tmp_path)
    path = tmp_path / "policy.yaml"
    document = yaml.safe_load(path.read_text())
    change(document)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return policy.load(path)


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


def test_a_derived_integer_a_record_cannot_hold_is_bad(tmp_path: Path) -> None:
    def meters(document: dict[str, Any]) -> None:
        for name, address in (("energy_in", 10), ("energy_out", 20)):
            source = {"table": "input_register", "address": address, "type": "uint64"}
            document["signals"].append(
                {"path": f"{COMPRESSOR}/{name}", "device": "plc", "source": source}
            )
        net = {"expression": "energy_out - energy_in"}
        document["signals"].append({"path": f"{COMPRESSOR}/energy_net", "source": net})

    pipeline = PlantPipeline(edited(tmp_path, meters))
    not_available = (0xFFFF,) * 4  # 2**64 - 1, a meter's usual "no reading"
    records = pipeline.process(
        [
            *scan(80, 20, 20),
            RawSample(f"{COMPRESSOR}/energy_in", not_available, T0, "good"),
            RawSample(f"{COMPRESSOR}/energy_out", (0, 0, 0, 5), T0, "good"),
        ]
    )

    net = by_signal(records)[f"{COMPRESSOR}/energy_net"]
    assert (net.value, net.quality) == (None, "bad")  # 5 - (2**64 - 1): beyond 64 bits
    assert len(encode_frames(records)) == 1  # and the scan can be written


def test_load_history_keeps_only_good_values(compressor: Policy) -> None:
    pipeline = PlantPipeline(compressor)
    pipeline.process(scan(80, 20, ambient=20))
    spike = by_signal(pipeline.process(scan(80, 900, ambient=20, at=T0 + timedelta(seconds=1))))
    assert spike[POWER].quality == "uncertain"  # faster than 5 kW/s
    later = by_signal(pipeline.process(scan(80, 20, ambient=20, at=T0 + timedelta(seconds=60))))

    load = later[PRESSURE].context.load
    assert load is not None
    assert (load.windows["15m"].mean, load.windows["15m"].max) == (20.0, 20.0)


def test_a_bad_input_makes_the_state_unknown_not_a_guess(tmp_path: Path) -> None:
    compressor = compressor_policy(
        tmp_path, states=[{"state": "running", "when": "motor_power != 0"}]
    )
    pipeline = PlantPipeline(compressor)
    assert by_signal(pipeline.process(scan(80, 0, 20)))[PRESSURE].context.asset_state == "stopped"
    unread = [RawSample(POWER, None, T0 + timedelta(seconds=1), "bad")]

    assert by_signal(pipeline.process(unread))[POWER].context.asset_state == "unknown"


def test_a_time_ahead_of_the_broker_is_flagged_and_kept_out_of_history(
    compressor: Policy,
) -> None:
    pipeline = PlantPipeline(compressor)
    now = datetime.now(UTC)
    ahead = by_signal(pipeline.process(scan(80, 50, 20, at=now + timedelta(days=1))))
    records = [
        by_signal(pipeline.process(scan(80, power, 20, at=now + timedelta(seconds=s))))
        for s, power in ((-60, 20), (-30, 22), (0, 24))
    ]

    assert ahead[POWER].quality == "uncertain"
    assert [i.check for i in ahead[POWER].context.quality_issues] == ["clock_ahead"]
    assert "86400 s ahead" in ahead[POWER].context.quality_issues[0].detail
    assert ahead[SPECIFIC].source_time <= datetime.now(UTC)  # derived: the broker's time
    load = records[-1][PRESSURE].context.load
    assert load is not None
    assert (load.windows["15m"].mean, load.windows["15m"].max) == (22.0, 24.0)
    assert records[-1][POWER].quality == "good"


def test_a_frozen_value_with_a_frozen_source_time_is_a_flatline_by_its_reads(
    compressor: Policy,
) -> None:
    """An OPC UA server may stamp a value with the time of its last change: a sensor stuck
    at one value then keeps one source time, and only the reads show how long."""
    pipeline = PlantPipeline(compressor)
    changed = T0 - timedelta(hours=1)
    records = [
        by_signal(
            pipeline.process(
                [RawSample(POWER, register(20), changed, "good", T0 + timedelta(seconds=s))]
            )
        )[POWER]
        for s in range(0, 40, 5)
    ]

    assert {r.source_time for r in records} == {changed}
    assert [r.quality for r in records[:6]] == ["good"] * 6  # unchanged for 0..25 s of reads
    assert records[-1].context.quality_issues[0].check == "flatline"
    assert pipeline.checks.stats[POWER].longest_gap_s == 5.0  # between reads, not changes


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


def test_a_derived_signal_is_checked_by_when_its_inputs_were_read(tmp_path: Path) -> None:
    def flatline_on_derived(document: dict[str, Any]) -> None:
        document["signals"][3]["checks"] = {"flatline": "30s"}

    pipeline = PlantPipeline(edited(tmp_path, flatline_on_derived))
    changed = T0 - timedelta(hours=1)  # every input stamped with its last change
    derived = [
        by_signal(
            pipeline.process(
                [
                    RawSample(s.signal, s.raw, changed, "good", T0 + timedelta(seconds=second))
                    for s in scan(80, 20, 20)
                ]
            )
        )[SPECIFIC]
        for second in range(0, 40, 5)
    ]

    assert [r.quality for r in derived[:6]] == ["good"] * 6
    assert derived[-1].context.quality_issues[0].check == "flatline"
    assert pipeline.checks.stats[SPECIFIC].longest_gap_s == 5.0


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


def tenths(document: dict[str, Any]) -> None:
    """Pressure and ambient as a PLC often holds them: int16 registers in tenths."""
    for i in (0, 2):
        document["signals"][i]["source"]["type"] = "int16"
        document["signals"][i]["scale"] = 0.1
    document["signals"][3]["source"]["expression"] = "discharge_pressure - temperature"
    document["assets"][0]["trend_window"] = "10m"


def scan_in_tenths(pressure: int, power: float, ambient: int, at: datetime = T0) -> list[RawSample]:
    return [
        RawSample(PRESSURE, (pressure,), at, "good"),
        RawSample(POWER, register(power), at, "good"),
        RawSample(AMBIENT, (ambient,), at, "good"),
    ]


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
    assert undeclared[SPECIFIC].value == 2.666667  # float32 inputs: 7 significant digits
    assert two[SPECIFIC].value == 2.67


def test_expected_is_as_precise_as_the_measure(tmp_path: Path) -> None:
    pipeline = PlantPipeline(edited(tmp_path, tenths))
    # at 26.7 degC and 20 kW the table gives 60 + 16.7 / 25 x 20 = 73.36 psi
    record = by_signal(pipeline.process(scan_in_tenths(800, 20, ambient=267)))[PRESSURE]

    assessment = record.context.assessment
    assert assessment is not None
    assert assessment.expected == 73.4  # tenths, like the pressure it is compared with
    assert assessment.deviation_pct == round((80 - 73.4) / 73.4 * 100, 2)


def test_load_means_and_trend_slopes_are_rounded_to_what_follows_from_their_values(
    tmp_path: Path,
) -> None:
    pipeline = PlantPipeline(edited(tmp_path, tenths))
    for i in range(16):  # every 20 s for 5 min: pressure +0.1 psi, load 0.1 / 0.2 kW
        at = T0 + timedelta(seconds=20 * i)
        records = by_signal(pipeline.process(scan_in_tenths(800 + i, 0.1 + i % 2 / 10, 200, at)))

    context = records[PRESSURE].context
    assert context.load is not None
    mean = context.load.windows["15m"].mean  # float32 0.1 and 0.2: 7 significant digits
    assert mean is not None and mean == float(f"{mean:.7g}") and mean == pytest.approx(0.15)
    assert context.trend is not None  # 0.1 psi per 20 s: 18 psi/h, to 2 decimals
    assert context.trend.slope_per_h == 18.0


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
