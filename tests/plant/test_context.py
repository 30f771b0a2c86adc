"""Context at the edge: rules and their actions, derived signals, data-quality checks,
maintenance status, values at the edges, and the fouling scenario on the real simulated plant
read through the real Modbus connector (assessments, trends and precision:
test_assessment.py)."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker import policy
from broker.channel.spool import encode_frames
from broker.config import MaintenanceConfig
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.modbus import ModbusConnector
from broker.plant.maintenance import MaintenanceBook
from broker.plant.pipeline import PlantPipeline
from broker.policy import ModbusDevice, Policy
from broker.records import Record
from broker.sim.refrigeration import RefrigerationPlant
from tests.harness import demo_policy, free_port
from tests.plant.compressor import (
    AMBIENT,
    COMPRESSOR,
    POWER,
    PRESSURE,
    SPECIFIC,
    T0,
    by_signal,
    compressor_policy,
    edited,
    register,
    scan,
)


@pytest.fixture
def compressor(tmp_path: Path) -> Policy:
    return compressor_policy(tmp_path)


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
