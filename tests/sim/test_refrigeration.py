"""The demo's plant keeps the README's word: on the simulation's own clock (no real minutes
waited), the discharge pressure read through the demo policy's pipeline turns `drifting`
and then `abnormal` within the times README.md's demo section states. Its chill room (the
BACnet room controller's) moves physically with the compressor, its door and the fault."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from broker import policy
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.modbus_plan import plan_reads
from broker.plant.pipeline import PlantPipeline
from broker.policy import ModbusDevice
from broker.records import Assessment
from broker.sim.refrigeration import (
    DOOR_EVERY_S,
    DOOR_FIRST_S,
    DOOR_OPEN_S,
    FC_COILS,
    FC_INPUTS,
    PlantState,
    RefrigerationPlant,
    demo_plant,
    door_open_at,
    step,
)
from tests.harness import DEMO_POLICY, REPO, free_port

PRESSURE = "coldstore/machine-room/compressor-1/discharge_pressure"
# What README.md says, and the simulated seconds the test allows for it.
DRIFTING_TEXT, DRIFTING_WITHIN_S = "within half a minute the discharge pressure reads", 30.0
ABNORMAL_TEXT, ABNORMAL_WITHIN_S = "within a minute `abnormal`", 60.0


async def assessments(plant: RefrigerationPlant, seconds: float) -> list[tuple[float, Assessment]]:
    """The discharge pressure's assessments, scan by scan, as the plant half would make them
    polling the demo plant at the policy's interval for `seconds` of simulated time."""
    demo = policy.load(DEMO_POLICY)
    device = demo.devices[0]
    assert isinstance(device, ModbusDevice)
    requests = plan_reads([s for s in demo.signals if s.device == device.name], device.unit_id)
    pipeline = PlantPipeline(demo)
    start = datetime.now(UTC) - timedelta(seconds=seconds)  # all of it in the past
    ticks_per_scan = round(device.poll_interval_s / plant.tick_s)
    found = []
    for tick in range(1, round(seconds / plant.tick_s) + 1):
        t = tick * plant.tick_s
        await plant.advance(t)
        if tick % ticks_per_scan:
            continue
        at, samples = start + timedelta(seconds=t), []
        for request in requests:
            items = await plant.values(request.function_code, request.address, request.count)
            bits = request.function_code in (FC_COILS, FC_INPUTS)
            for slot in request.slots:
                raw = (
                    bool(items[slot.offset])
                    if bits
                    else tuple(items[slot.offset : slot.offset + slot.width])
                )
                samples.append(RawSample(slot.signal, raw, at, "good"))
        (record,) = [r for r in pipeline.process(samples) if r.signal == PRESSURE]
        if record.context.assessment is not None:
            assert record.quality == "good" and isinstance(record.value, float)
            assert record.value < 14  # below the high-pressure switch: the raw value looks normal
            found.append((t, record.context.assessment))
    return found


def first(found: list[tuple[float, Assessment]], label: str) -> float:
    return next((t for t, a in found if a.label == label), float("inf"))


async def test_the_demo_fault_reads_drifting_then_abnormal_within_the_readmes_times() -> None:
    plant = demo_plant(port=free_port())  # never started: the test drives its clock
    found = await assessments(plant, ABNORMAL_WITHIN_S + 10)

    assert found[0][1].label == "expected"  # a clean condenser when the demo starts
    drifting, abnormal = first(found, "drifting"), first(found, "abnormal")
    assert drifting <= DRIFTING_WITHIN_S, found
    assert drifting < abnormal <= ABNORMAL_WITHIN_S, found
    assert {a.direction for _, a in found if a.label != "expected"} == {"above"}
    assert {a.label for t, a in found if t > abnormal + 10} == {"abnormal"}  # it stays there


async def test_a_plant_without_the_fault_stays_expected() -> None:
    plant = demo_plant(port=free_port())
    plant.fouling_per_s = 0.0
    found = await assessments(plant, ABNORMAL_WITHIN_S + 10)
    assert len(found) > 30
    assert {a.label for _, a in found} == {"expected"}


def test_the_readme_states_the_times_this_test_checks() -> None:
    text = " ".join((REPO / "README.md").read_text().split())
    assert DRIFTING_TEXT in text
    assert ABNORMAL_TEXT in text


async def chill_room_ticks(plant: RefrigerationPlant, seconds: float) -> list[Tick]:
    """The chill room tick by tick, on the simulation's own clock (never started)."""
    ticks, before = [], plant.chill_room.temperature_c
    for tick in range(1, round(seconds / plant.tick_s) + 1):
        t = tick * plant.tick_s
        await plant.advance(t)
        room = plant.chill_room
        ticks.append(
            Tick(t, room.temperature_c - before, room.door_open, room.fan_running,
                 plant.state.compressor_on, room.calling, room.temperature_c)
        )  # fmt: skip
        before = room.temperature_c
    return ticks


class Tick(NamedTuple):
    t: float
    change: float  # K since the tick before
    door_open: bool
    fan_running: bool
    compressor_on: bool
    calling: bool
    temperature_c: float


def mean(values: list[float]) -> float:
    assert values  # the simulation went through that condition
    return sum(values) / len(values)


async def test_the_chill_room_door_opens_now_and_then_on_the_simulators_clock() -> None:
    plant = demo_plant(port=free_port())
    ticks = await chill_room_ticks(plant, 180)
    opened = [t.t for t in ticks if t.door_open]
    # Closed for the first DOOR_FIRST_S, then open DOOR_OPEN_S seconds every DOOR_EVERY_S.
    assert min(opened) == DOOR_FIRST_S
    starts = [t for t in opened if t - plant.tick_s not in opened]
    assert starts == [DOOR_FIRST_S + n * DOOR_EVERY_S for n in range(len(starts))]
    assert len(starts) == 3
    assert len(opened) == 3 * DOOR_OPEN_S / plant.tick_s
    assert [door_open_at(t.t) for t in ticks] == [t.door_open for t in ticks]


async def test_the_chill_room_warms_with_its_door_open_or_its_compressor_off_and_cools_while_it_runs() -> (
    None
):
    plant = demo_plant(port=free_port())
    ticks = await chill_room_ticks(plant, 1200)
    # The evaporator fan runs with the compressor and stops while the door is open.
    assert all(t.fan_running == (t.compressor_on and not t.door_open) for t in ticks)
    assert any(t.fan_running for t in ticks) and any(t.compressor_on and t.door_open for t in ticks)
    off_shut = mean([t.change for t in ticks if not t.compressor_on and not t.door_open])
    off_open = mean([t.change for t in ticks if not t.compressor_on and t.door_open])
    cooling = mean([t.change for t in ticks if t.fan_running and t.calling])
    assert 0 < off_shut < off_open  # through the walls; much more through the door
    assert cooling < 0
    # Its controller holds it near its +2 degC setpoint, well inside the policy's rule.
    assert all(0 < t.temperature_c < 5 for t in ticks), min(ticks, key=lambda t: t.temperature_c)


async def test_a_fouled_condenser_cools_the_chill_room_less() -> None:
    clean = demo_plant(port=free_port())
    clean.fouling_per_s = 0.0
    fouled = demo_plant(port=free_port())
    rates = []
    for plant in (clean, fouled):
        ticks = await chill_room_ticks(plant, 600)
        rates.append(mean([t.change for t in ticks[300:] if t.fan_running and t.calling]))
    assert rates[0] < rates[1] < 0  # both cool, the fouled one more slowly


async def test_the_chill_room_changes_none_of_the_plcs_values() -> None:
    """Its physics has its own random numbers: the PLC, and the fault's timing, are as they
    were before the room controller existed."""
    plant = demo_plant(port=free_port())
    alone, rng = PlantState(), random.Random(1)  # as RefrigerationPlant seeds the PLC's
    for tick in range(1, 401):
        await plant.advance(tick * plant.tick_s)
        step(alone, tick * plant.tick_s, plant.tick_s, rng, plant.fouling_per_s)
        assert plant.state == alone
