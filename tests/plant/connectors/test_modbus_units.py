"""Several unit ids behind one gateway address, and exception responses mapped to `bad` with
their code, audited once per state change per unit id. Real pymodbus servers on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from pymodbus.constants import ExcCodes

from broker.plant.connectors.modbus import ModbusConnector
from tests.harness import eventually
from tests.plant.connectors.modbus_servers import (
    Gateway,
    Scans,
    input_registers,
    modbus_device,
    named,
    register_value,
    running,
)

pytestmark = pytest.mark.timeout(60)


def quality(scans: Scans) -> dict[str, str]:
    return {s.signal: s.quality for s in scans.batches[-1][1]} if scans.batches else {}


async def test_several_unit_ids_are_read_over_one_connection_each_with_its_own_requests() -> None:
    signals = [
        *input_registers([0, 1]),  # the device's unit id
        *input_registers([0, 1], unit_id=2),
        *input_registers([5], unit_id=3),
    ]
    async with Gateway(units=(1, 2, 3)) as gateway:
        connector = ModbusConnector(modbus_device(gateway.port, unit_id=1), signals)
        scans = Scans()
        async with running((connector, scans)):
            await eventually(lambda: len(scans.good()) >= 2)
    assert gateway.connections == 1
    assert {(r.unit_id, r.function_code, r.address, r.count) for r in gateway.requests} == {
        (1, 4, 0, 2),
        (2, 4, 0, 2),
        (3, 4, 5, 1),
    }
    values = {s.signal: s.raw for s in scans.batches[-1][1]}
    assert values == {
        "site/plc/udefault-ir0": (register_value(1, 0),),
        "site/plc/udefault-ir1": (register_value(1, 1),),
        "site/plc/u2-ir0": (register_value(2, 0),),
        "site/plc/u2-ir1": (register_value(2, 1),),
        "site/plc/u3-ir5": (register_value(3, 5),),
    }


async def test_an_exception_is_bad_with_its_code_and_audited_once_per_change_per_unit() -> None:
    signals = [*input_registers([0]), *input_registers([0], unit_id=2)]
    unit_1, unit_2 = "site/plc/udefault-ir0", "site/plc/u2-ir0"
    with structlog.testing.capture_logs() as logs:
        async with Gateway(units=(1, 2), refuse={2: ExcCodes.DEVICE_BUSY}) as gateway:
            connector = ModbusConnector(modbus_device(gateway.port), signals)
            scans = Scans()
            async with running((connector, scans)):
                await eventually(lambda: len(scans.batches) >= 5)
                assert quality(scans) == {unit_1: "good", unit_2: "bad"}
                gateway.refuse.clear()
                await eventually(lambda: quality(scans) == {unit_1: "good", unit_2: "good"})
                gateway.refuse[2] = ExcCodes.ILLEGAL_ADDRESS
                await eventually(lambda: quality(scans)[unit_2] == "bad")
                polls = len(scans.batches)
                await eventually(lambda: len(scans.batches) >= polls + 5)
    refused = [
        pick(e, "unit_id", "exception_code", "exception")
        for e in named(logs, "device_read_refused")
    ]
    assert refused == [(2, 6, "device_busy"), (2, 2, "illegal_address")]  # not one per poll
    assert [e["unit_id"] for e in named(logs, "device_read_recovered")] == [2]
    assert named(logs, "device_read_refused")[0]["signals"] == [unit_2]
    assert named(logs, "device_session_down") == []  # a refusal is an answer: the session stays
    assert all(s.raw is None for t, batch in scans.batches for s in batch if s.quality == "bad")


async def test_a_unit_missing_behind_the_gateway_is_bad_and_the_others_stay_good() -> None:
    signals = [*input_registers([3]), *input_registers([3], unit_id=9)]
    with structlog.testing.capture_logs() as logs:
        async with Gateway(units=(1,)) as gateway:
            connector = ModbusConnector(modbus_device(gateway.port), signals)
            scans = Scans()
            async with running((connector, scans)):
                await eventually(lambda: len(scans.batches) >= 3)
    assert quality(scans) == {"site/plc/udefault-ir3": "good", "site/plc/u9-ir3": "bad"}
    (refused,) = named(logs, "device_read_refused")
    # A serial gateway answers 11 (target failed to respond); pymodbus's server answers 4.
    assert refused["unit_id"] == 9
    assert refused["exception_code"] in {ExcCodes.GATEWAY_NO_RESPONSE, ExcCodes.DEVICE_FAILURE}
    assert refused["exception"] == ExcCodes(refused["exception_code"]).name.lower()


def pick(event: dict[str, Any], *keys: str) -> tuple[Any, ...]:
    return tuple(event[k] for k in keys)


async def test_a_silent_unit_behind_the_gateway_trips_its_own_breaker_not_the_devices() -> None:
    signals = [*input_registers([3]), *input_registers([3], unit_id=9)]
    with structlog.testing.capture_logs() as logs:
        async with Gateway(units=(1, 9), silent={9}) as gateway:
            device = modbus_device(gateway.port, poll_interval_s=0.1, timeout_s=0.2)
            connector = ModbusConnector(device, signals)
            scans = Scans()
            async with running((connector, scans)):
                await eventually(lambda: len(scans.batches) >= 15, timeout=20)
                quiet = quality(scans)
                unit_9_asked = sum(1 for r in gateway.requests if r.unit_id == 9)
                unit_1_asked = sum(1 for r in gateway.requests if r.unit_id == 1)
                gateway.wake()  # the slave is back
                await eventually(lambda: quality(scans)["site/plc/u9-ir3"] == "good", timeout=20)
    assert quiet == {"site/plc/udefault-ir3": "good", "site/plc/u9-ir3": "bad"}
    # late answers from unit 9 on the kept connection are never taken for unit 1's
    read = [(s.signal, s.raw) for _, batch in scans.batches for s in batch if s.quality == "good"]
    assert {raw for signal, raw in read if signal == "site/plc/udefault-ir3"} == {
        (register_value(1, 3),)
    }
    last = {s.signal: s.raw for s in scans.batches[-1][1]}
    assert last == {
        "site/plc/udefault-ir3": (register_value(1, 3),),
        "site/plc/u9-ir3": (register_value(9, 3),),
    }
    assert unit_1_asked >= 15  # the live unit kept its rate: one read a scan
    assert unit_9_asked < unit_1_asked / 2  # the silent one rested between tries
    assert gateway.connections == 1  # the session was never torn down
    assert len(named(logs, "device_unit_down")) == 1  # once per state change, not per try
    assert named(logs, "device_unit_down")[0]["unit_id"] == 9
    assert len(named(logs, "device_unit_up")) == 1
    assert not named(logs, "device_session_down")
