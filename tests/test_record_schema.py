"""docs/record.schema.json holds for records as consumers receive them, and nothing looser.

Records come from the real pipeline on the demo policy (through the real spool and the
enterprise store, stale included) and from a running broker's API.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

from broker.channel.spool import SpoolReceiver, SpoolSender
from broker.config import MaintenanceConfig
from broker.enterprise.store import Store
from broker.plant.connectors.base import RawSample
from broker.plant.maintenance import MaintenanceBook
from broker.plant.pipeline import PlantPipeline
from broker.policy import load
from broker.records import Quality, to_json
from tests.harness import DEMO_POLICY, REPO, Deployment, Pki, consumer_ssl, eventually, get_json

SCHEMA = json.loads((REPO / "docs" / "record.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)
COMPRESSOR = "coldstore/machine-room/compressor-1"
ROOM = "coldstore/storage/cold-room-1"
T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def words(fmt: str, value: float) -> tuple[int, ...]:
    raw = struct.pack(">" + fmt, value)
    return struct.unpack(f">{len(raw) // 2}H", raw)


def scan(minute: int, discharge_bar: float) -> list[RawSample]:
    """One scan of the demo plant: compressor running hot, the room warm, one read failed."""
    at = T0 + timedelta(minutes=minute)
    raw: dict[str, Any] = {
        f"{COMPRESSOR}/running": True,
        f"{COMPRESSOR}/motor_power": words("f", 15.0),
        f"{COMPRESSOR}/discharge_pressure": words("h", round(discharge_bar * 100)),
        f"{COMPRESSOR}/suction_pressure": words("h", 1600),  # 16 bar: out of range
        f"{COMPRESSOR}/high_pressure_alarm": False,
        "coldstore/machine-room/condenser-1/fan_running": True,
        "coldstore/machine-room/condenser-1/outlet_temperature": words("h", 320),
        "coldstore/outdoor/weather/ambient_temperature": words("h", 240),
        "coldstore/outdoor/weather/relative_humidity": None,  # the read failed
        f"{ROOM}/temperature": words("h", -120),
        f"{ROOM}/setpoint": words("h", -180),
    }
    return [
        RawSample(path, value, at, "bad" if value is None else "good")
        for path, value in raw.items()
    ]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Pipeline records as the API serves them: spooled, read back, some of them aged."""
    directory = tmp_path_factory.mktemp("records")
    maintenance = directory / "maintenance.csv"
    overdue = date.today() - timedelta(days=3)
    maintenance.write_text(
        "asset,last_service,next_due,open_work_orders\n"
        f"{COMPRESSOR},2026-01-05,{overdue},WO-1042: Replace compressor oil filter\n"
    )
    policy = load(DEMO_POLICY)
    pipeline = PlantPipeline(policy, MaintenanceBook(MaintenanceConfig(file=maintenance)))
    records = [r for minute in range(8) for r in pipeline.process(scan(minute, 11 + minute / 4))]
    sender = SpoolSender(directory / "spool", segment_bytes=1 << 20, retention_bytes=1 << 24)
    sender.send(records)
    sender.close()
    receiver = SpoolReceiver(directory / "spool", directory / "state")
    received = receiver.receive()
    receiver.close()
    store = Store(policy, queue_limit=10)
    store.apply(received)
    later = datetime.now(UTC) + timedelta(minutes=10)  # served after the plant went quiet
    aged = store.snapshot(later, frozenset(r.signal for r in received))
    store.close()
    return [json.loads(to_json(r)) for r in [*received, *aged]]


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_pipeline_records_as_served_are_valid(served: list[dict[str, Any]]) -> None:
    for record in served:
        VALIDATOR.validate(record)


def test_the_records_checked_cover_every_part_of_the_context(
    served: list[dict[str, Any]],
) -> None:
    """Otherwise the test above would pass on trivial records."""
    qualities: set[Quality] = {r["quality"] for r in served}
    assert qualities == {"good", "uncertain", "bad", "stale"}
    contexts = [r["context"] for r in served]
    assert any(r["signal"].endswith("approach_temperature") for r in served)  # derived
    assert any(c["assessment"] and c["assessment"]["label"] == "abnormal" for c in contexts)
    assert any(c["assessment"] and c["assessment"]["direction"] == "above" for c in contexts)
    assert any(c["trend"] for c in contexts)
    assert any(c["load"] and c["load"]["windows"]["15m"]["mean"] for c in contexts)
    assert {a["rule"] for c in contexts for a in c["alerts"]} >= {
        "condenser-fouling", "service-overdue", "room-too-warm",
    }  # fmt: skip
    assert any(c["maintenance"] and c["maintenance"]["open_work_orders"] for c in contexts)
    assert {i["check"] for c in contexts for i in c["quality_issues"]} >= {
        "read_failed", "out_of_range", "stale",
    }  # fmt: skip
    assert all(r["source_time"].endswith("Z") for r in served)


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.pop("unit"),
        lambda r: r.update(time=r.pop("source_time")),
        lambda r: r.update(extra=1),
        lambda r: r["context"].pop("alerts"),
        lambda r: r["context"].update(state=r["context"].pop("asset_state")),
        lambda r: r["context"]["assessment"].update(expected_value=1.0),
        lambda r: r["context"]["assessment"].update(label="below_expected"),  # before issue 15
        lambda r: r["context"]["assessment"].pop("direction"),
        lambda r: r["context"]["assessment"].update(direction="higher"),
        lambda r: r["context"]["alerts"][0].pop("action"),
        lambda r: r["context"]["maintenance"].update(status="fine"),
        lambda r: r.update(source_time="2026-05-01T12:00:00+02:00"),
        lambda r: r.update(quality="ok"),
    ],
)
def test_a_record_with_a_missing_renamed_or_unknown_field_is_refused(
    served: list[dict[str, Any]], change: Any
) -> None:
    record = json.loads(
        json.dumps(next(r for r in served if r["context"]["assessment"] and r["context"]["alerts"]))
    )
    VALIDATOR.validate(record)
    change(record)
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(record)


@pytest.mark.timeout(90)
async def test_records_from_a_running_broker_are_valid(
    deployment: Deployment, pki: Pki, start_broker: Any
) -> None:
    start_broker("run", deployment.config)
    body: dict[str, Any] = {}

    async def snapshot_arrived() -> bool:
        try:
            status, found = await get_json(deployment.base_url + "/v1/snapshot", consumer_ssl(pki))
        except aiohttp.ClientConnectionError:
            return False  # not listening yet
        body.update(found)
        return status == 200 and len(found["records"]) > 5

    await eventually(snapshot_arrived, timeout=60, interval=0.5)
    for record in body["records"]:
        VALIDATOR.validate(record)


def test_the_example_in_records_md_is_valid() -> None:
    text = (REPO / "docs" / "records.md").read_text()
    example = text.split("```json\n", 1)[1].split("```", 1)[0]
    VALIDATOR.validate(json.loads(example))


def readme_record() -> dict[str, Any]:
    text = (REPO / "README.md").read_text()
    sample = text.split("A record looks like this:", 1)[1]
    found: dict[str, Any] = json.loads(sample.split("```json\n", 1)[1].split("```", 1)[0])
    return found


def test_the_readme_sample_is_a_valid_record() -> None:
    VALIDATOR.validate(readme_record())


def test_the_readme_sample_is_what_the_pipeline_makes_of_its_inputs(tmp_path: Path) -> None:
    """Issue 15: the README's sample record must be one the broker actually produces (it was
    fetched from `dmzbroker demo` 5.5 minutes in, the compressor running). Inputs that make it,
    through the real pipeline on the demo policy: 22.2 degC and 45.4 % outside; the motor at
    18.417418 kW as it starts, unloaded to 8.8 kW, then loading up to 15.712936 kW; the
    discharge pressure rising from 10.10 to 11.25 bar over 5 minutes (half the trend window),
    one scan every 20 s; the compressor's service not yet due."""
    today = date.today()
    maintenance = tmp_path / "maintenance.csv"
    maintenance.write_text(
        "asset,last_service,next_due,open_work_orders\n"
        f"{COMPRESSOR},{today - timedelta(days=60)},{today + timedelta(days=30)},"
        "WO-1042: Replace compressor oil filter\n"
    )
    pipeline = PlantPipeline(
        load(DEMO_POLICY), MaintenanceBook(MaintenanceConfig(file=maintenance))
    )
    centibar = (1010, 1018, 1027, 1035, 1043, 1052, 1059, 1067, 1075, 1083, 1090, 1097, 1104,
                1111, 1118, 1125)  # fmt: skip
    kilowatts = (18.417418, *[8.8] * 13, 11.333364, 15.712936)
    for i, (pressure, power) in enumerate(zip(centibar, kilowatts, strict=True)):
        raw = {
            f"{COMPRESSOR}/running": True,
            f"{COMPRESSOR}/motor_power": words("f", power),
            f"{COMPRESSOR}/discharge_pressure": words("h", pressure),
            f"{COMPRESSOR}/high_pressure_alarm": False,
            "coldstore/outdoor/weather/ambient_temperature": words("h", 222),
            "coldstore/outdoor/weather/relative_humidity": words("H", 454),
        }
        at = T0 + timedelta(seconds=20 * i)
        records = pipeline.process([RawSample(p, v, at, "good") for p, v in raw.items()])
    pressure_path = f"{COMPRESSOR}/discharge_pressure"
    made = json.loads(to_json(next(r for r in records if r.signal == pressure_path)))
    sample = readme_record()

    VALIDATOR.validate({**made, "seq": 1})  # seq is stamped by the channel, after this
    for record in (made, sample):  # what depends on when it runs: the times, today's date
        for key in ("source_time", "broker_time", "seq"):
            record.pop(key)
        for key in ("last_service", "next_due"):
            record["context"]["maintenance"].pop(key)
    assert sample == made
    assert sample["context"]["assessment"] == {
        "expected": 8.65, "deviation_pct": 30.06, "label": "abnormal", "direction": "above",
    }  # fmt: skip
    assert sample["context"]["trend"] == {
        "slope_per_h": 13.812, "direction": "rising", "window": "10m",
    }  # fmt: skip
