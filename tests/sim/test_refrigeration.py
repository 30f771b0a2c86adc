"""The demo's plant keeps the README's word: on the simulation's own clock (no real minutes
waited), the discharge pressure read through the demo policy's pipeline turns `drifting`
and then `abnormal` within the times README.md's demo section states."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from broker import policy
from broker.plant.connectors import RawSample
from broker.plant.connectors.modbus_plan import plan_reads
from broker.plant.pipeline import PlantPipeline
from broker.policy import ModbusDevice
from broker.records import Assessment
from broker.sim.refrigeration import FC_COILS, FC_INPUTS, RefrigerationPlant, demo_plant
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
