"""The compressor the plant-context tests share: an 80 psi compressor on one Modbus PLC
(float32 input registers), its ambient and load, a derived ratio, and one scan of it."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from broker import policy
from broker.plant.connectors.base import RawSample
from broker.policy import Policy
from broker.records import Record

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


def edited(tmp_path: Path, change: Any) -> Policy:
    """The compressor policy, changed by `change(document)` before it is loaded."""
    compressor_policy(tmp_path)
    path = tmp_path / "policy.yaml"
    document = yaml.safe_load(path.read_text())
    change(document)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return policy.load(path)


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
