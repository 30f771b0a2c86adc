"""The Modbus connector against a hostile PLC (tests/plant/connectors/hostile_plc.py).

Each case starts healthy, turns hostile, then healthy again, with the real connector running
throughout. Whatever the PLC sends, the connector keeps running, never emits a value from a
wrong answer, marks the signals `bad`, audits one event per state change (not one per retry)
and reports good values again once the PLC answers correctly. No exception reaches the event
loop's handler either: a pymodbus decoding error raised there would close the connection
with a traceback in the log.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import pytest

from broker.audit.catalogue import EVENTS
from broker.plant.connectors import modbus
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.modbus import ModbusConnector
from broker.policy import Signal
from tests.harness import eventually
from tests.plant.connectors.hostile_plc import (
    HOSTILE,
    HostilePLC,
    healthy_bit,
    healthy_register,
)
from tests.plant.connectors.modbus_servers import Scans, events, modbus_device, named

pytestmark = pytest.mark.timeout(60)

# one request: three registers, or ten coils (two bytes, so a byte fewer still holds some)
ADDRESSES = {"holding_register": range(10, 13), "coil": range(10, 20)}
HOSTILE_ANSWERS = 3  # requests answered wrongly before the PLC turns healthy again


@dataclass(frozen=True)
class Case:
    behaviour: str
    # dropped: the connection is closed and the whole device is down until it answers again;
    # refused: only that request's signals are bad, the session stays up;
    # ignored: the frames that answer nothing are skipped and the real answer is data.
    outcome: Literal["dropped", "refused", "ignored"]
    reason: str | None = None  # of device_read_refused
    exception_code: int | None = None
    table: Literal["holding_register", "coil"] = "holding_register"
    unit_id: int = 1

    @property
    def id(self) -> str:
        table = "" if self.table == "holding_register" else f"-{self.table}"
        unit = "" if self.unit_id == 1 else f"-unit{self.unit_id}"
        return f"{self.behaviour}{table}{unit}"


CASES = [
    Case("wrong_transaction_id", "dropped"),
    Case("zero_transaction_id", "dropped"),
    Case("wrong_protocol_id", "dropped"),
    Case("length_too_long", "dropped"),
    Case("length_too_short", "dropped"),
    Case("truncated_then_close", "dropped"),
    Case("truncated_then_silence", "dropped"),
    Case("more_items", "refused", reason="long_response"),
    Case("more_items", "refused", reason="long_response", table="coil"),
    Case("fewer_items", "refused", reason="short_response"),
    Case("fewer_items", "refused", reason="short_response", table="coil"),
    Case("odd_byte_count", "dropped"),
    Case("byte_count_beyond_frame", "dropped"),
    Case("other_function_code", "dropped"),
    Case("unknown_function_code", "dropped"),
    Case("write_function_code", "dropped"),
    Case("exception_code_0x0c", "refused", reason="exception_response", exception_code=0x0C),
    Case("exception_code_0x7f", "refused", reason="exception_response", exception_code=0x7F),
    Case("exception_for_other_function", "dropped"),
    Case("exception_without_code", "dropped"),
    Case("other_unit_id", "dropped"),
    Case("other_unit_id", "dropped", unit_id=0),  # pymodbus checks no unit id for unit 0
    Case("unprompted_around", "ignored"),
    Case("unprompted_zero_tid_first", "dropped"),
    Case("slow_drip", "dropped"),
    Case("garbage_flood", "dropped"),
]


def audited(logs: list[dict[str, Any]]) -> list[str]:
    """The audited session and read events so far, scan overruns aside (load-dependent)."""
    return [
        e["event"]
        for e in logs
        if e["event"] in EVENTS and not e["event"].startswith("scan_overrun")
    ]


AUDITED = {
    "dropped": ["device_session_up", "device_session_down", "device_session_up"],
    "refused": ["device_session_up", "device_read_refused", "device_read_recovered"],
    "ignored": ["device_session_up"],
}


def signals(table: str) -> list[Signal]:
    kind = "bool" if table == "coil" else "uint16"
    return [
        msgspec.convert(
            {
                "path": f"site/plc/{table[0]}{a}",  # h10 or c10
                "device": "plc",
                "source": {"protocol": "modbus", "table": table, "address": a, "type": kind},
            },
            Signal,
        )
        for a in ADDRESSES[table]
    ]


def healthy(sample: RawSample) -> object:
    """What the healthy PLC holds for the sample's signal."""
    name = sample.signal.rsplit("/", 1)[-1]
    address = int(name[1:])
    return healthy_bit(address) if name[0] == "c" else (healthy_register(address),)


def last(scans: Scans) -> list[RawSample]:
    return scans.batches[-1][1] if scans.batches else []


def all_quality(scans: Scans, quality: str) -> bool:
    batch = last(scans)
    return bool(batch) and all(s.quality == quality for s in batch)


@contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What reaches the event loop's exception handler, e.g. a protocol's data_received error."""
    loop = asyncio.get_running_loop()
    caught: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: caught.append(context))
    try:
        yield caught
    finally:
        loop.set_exception_handler(None)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_a_hostile_answer_is_never_data_and_is_audited_once_per_state_change(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What is under test is what a hostile answer becomes, not the breaker's pace (its own
    # tests below and in test_modbus_budget.py): reconnect after 0.1 s, not 1, 2, 4 s.
    monkeypatch.setattr(modbus, "FIRST_RETRY_S", 0.1)
    with loop_errors() as caught, events() as logs:
        async with HostilePLC() as plc:
            device = modbus_device(
                plc.port,
                unit_id=case.unit_id,
                poll_interval_s=0.1,
                timeout_s=0.3,
                max_requests_per_s=1000,
            )
            connector = ModbusConnector(device, signals(case.table))
            scans = Scans()
            task = asyncio.create_task(connector.run(scans.emit))
            try:
                await eventually(lambda: all_quality(scans, "good"))
                errors = connector.errors
                plc.behaviour = case.behaviour
                await eventually(lambda: plc.answered(case.behaviour) >= HOSTILE_ANSWERS, 30)
                if case.outcome == "ignored":
                    assert all_quality(scans, "good")
                    assert connector.errors == errors
                else:
                    await eventually(lambda: connector.errors >= errors + HOSTILE_ANSWERS)
                    await eventually(lambda: all_quality(scans, "bad"))
                assert not task.done()  # still running, not crashed
                plc.behaviour = "healthy"
                answered = plc.answered("healthy")
                # The recovery is logged once the scan's reads are done, after its batches
                # were handed on (ADR 0032): wait for as many events as the outcome has.
                await eventually(
                    lambda: (
                        plc.answered("healthy") > answered
                        and all_quality(scans, "good")
                        and len(audited(logs)) >= len(AUDITED[case.outcome])
                    ),
                    30,
                )
                assert not task.done()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    samples = [s for _, batch in scans.batches for s in batch]
    assert all(s.raw is None for s in samples if s.quality != "good")
    assert [s for s in samples if s.quality == "good" and s.raw != healthy(s)] == []
    assert not [s for s in samples if isinstance(s.raw, tuple) and HOSTILE in s.raw]
    assert audited(logs) == AUDITED[case.outcome]
    if case.outcome == "refused":
        (refused,) = named(logs, "device_read_refused")
        assert (refused["reason"], refused["exception_code"]) == (
            case.reason,
            case.exception_code,
        )
    assert caught == []


def gateway_signals() -> list[Signal]:
    return [
        msgspec.convert(
            {
                "path": f"site/plc/u{unit}-h10",
                "device": "plc",
                "source": {
                    "protocol": "modbus",
                    "table": "holding_register",
                    "address": 10,
                    "type": "uint16",
                    "unit_id": unit,
                },
            },
            Signal,
        )
        for unit in (1, 2)
    ]


def qualities(scans: Scans) -> dict[str, str]:
    return {s.signal.split("/")[-1]: s.quality for s in last(scans)}


@pytest.mark.parametrize(
    ("behaviour", "hostile_quality", "expected"),
    [
        # no answer in time, the connection holds: only unit 2's breaker trips
        (
            "wrong_transaction_id",
            {"u1-h10": "good", "u2-h10": "bad"},
            ["device_session_up", "device_unit_down", "device_unit_up"],
        ),
        # an answer to no request: the connection no longer lines up, every unit goes down
        (
            "zero_transaction_id",
            {"u1-h10": "bad", "u2-h10": "bad"},
            ["device_session_up", "device_session_down", "device_session_up"],
        ),
    ],
)
async def test_behind_a_gateway_a_silent_unit_trips_its_own_breaker_a_wrong_answer_the_devices(
    behaviour: str, hostile_quality: dict[str, str], expected: list[str]
) -> None:
    with loop_errors() as caught, events() as logs:
        async with HostilePLC(hostile_units=frozenset({2})) as plc:
            device = modbus_device(
                plc.port, poll_interval_s=0.1, timeout_s=0.3, max_requests_per_s=1000
            )
            connector = ModbusConnector(device, gateway_signals())
            scans = Scans()
            task = asyncio.create_task(connector.run(scans.emit))
            try:
                await eventually(lambda: all_quality(scans, "good"))
                errors = connector.errors
                plc.behaviour = behaviour
                await eventually(lambda: plc.answered(behaviour) >= HOSTILE_ANSWERS, 30)
                await eventually(lambda: connector.errors >= errors + HOSTILE_ANSWERS)
                await eventually(lambda: qualities(scans) == hostile_quality)
                plc.behaviour = "healthy"
                await eventually(  # the recovery is logged once the scan's reads are done
                    lambda: all_quality(scans, "good") and len(audited(logs)) >= len(expected), 30
                )
                assert not task.done()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    samples = [s for _, batch in scans.batches for s in batch]
    assert all(s.raw == (healthy_register(10),) for s in samples if s.quality == "good")
    assert audited(logs) == expected
    assert all(e["unit_id"] == 2 for e in named(logs, "device_unit_down"))
    assert caught == []


WINDOW_S = 8.0  # long enough for the old behaviour (a reconnect per 0.2 s) to show


async def test_a_device_that_fails_after_each_good_scan_is_reconnected_at_a_slowing_rate() -> None:
    """Answering one scan well must not reset the breaker: at a 0.1 s poll interval the
    connector used to open a connection (and audit a session up and down) every 0.2 s."""
    with events() as logs:
        async with HostilePLC(behaviour="healthy_once_per_connection") as plc:
            device = modbus_device(
                plc.port, poll_interval_s=0.1, timeout_s=0.3, max_requests_per_s=1000
            )
            connector = ModbusConnector(device, signals("holding_register"))
            scans = Scans()
            task = asyncio.create_task(connector.run(scans.emit))
            try:
                await eventually(lambda: plc.connections >= 1)
                started = asyncio.get_running_loop().time()
                first = plc.connections
                await asyncio.sleep(WINDOW_S)  # the window the rate is measured over
                connects = plc.connections - first + 1
                ran_s = asyncio.get_running_loop().time() - started
                assert not task.done()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    # 1 + 2 + 4 s of backoff (±20 %) fit in 8 s: at most 4 connections, 5 with slack
    assert 2 <= connects <= 5, f"{connects} connections in {ran_s:.1f} s"
    delays = [e["retry_in_s"] for e in logs if e["event"] == "device_session_down"]
    assert len(delays) >= 2
    assert all(later > earlier for earlier, later in itertools.pairwise(delays))
    assert delays[0] >= 0.8  # the first retry waits a second, not one poll interval
    assert [s for _, batch in scans.batches for s in batch if s.raw and HOSTILE in s.raw] == []


async def test_a_session_that_scanned_well_for_the_stable_period_starts_its_backoff_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(modbus, "STABLE_S", 0.5)
    with events() as logs:
        async with HostilePLC() as plc:
            device = modbus_device(
                plc.port, poll_interval_s=0.1, timeout_s=0.3, max_requests_per_s=1000
            )
            connector = ModbusConnector(device, signals("holding_register"))
            scans = Scans()
            task = asyncio.create_task(connector.run(scans.emit))

            def downs() -> list[float]:
                return [e["retry_in_s"] for e in logs if e["event"] == "device_session_down"]

            async def fail_once() -> None:
                before = len(downs())
                plc.behaviour = "zero_transaction_id"
                await eventually(lambda: len(downs()) > before)
                plc.behaviour = "healthy"

            try:
                await eventually(lambda: all_quality(scans, "good"))
                await fail_once()
                await eventually(lambda: all_quality(scans, "good"), 30)
                await fail_once()  # right after it came back: the same incident, it doubles
                await eventually(lambda: all_quality(scans, "good"), 30)
                scanned = connector.scans
                await eventually(lambda: connector.scans >= scanned + 10)  # 1 s > STABLE_S
                await fail_once()  # after a stable session: a fresh incident
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    first, doubled, fresh = downs()
    assert 0.8 <= first <= 1.2
    assert 1.6 <= doubled <= 2.4
    assert 0.8 <= fresh <= 1.2
