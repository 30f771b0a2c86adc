"""The device budget: poll interval, requests per second, connections, timeout; the breaker;
and a dead device next to a live one. Real pymodbus servers (and a silent TCP server) on
127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import rfc8785

from broker import policy
from broker.plant.connectors.base import RawSample
from broker.plant.connectors.modbus import ModbusConnector
from broker.policy import ModbusDevice, parse
from tests.harness import eventually, free_port, write_policy_yaml
from tests.plant.connectors.modbus_servers import (
    Gateway,
    Scans,
    events,
    input_registers,
    modbus_device,
    named,
    running,
    silent_server,
)

pytestmark = pytest.mark.timeout(60)

FOUR_REQUESTS = [0, 2, 4, 6]  # gaps between them: one request each
DEFAULT_RATE = 20  # requests/s, as docs/modbus.md promises; written here, not imported
UNITS = (1, 2, 3, 4)


def single_register_policy(port: int, **budget: Any) -> dict[str, Any]:
    """1,200 signals of one register each, every other address, so each is its own request
    (the planner never reads the gaps), polled every 0.1 s: 12,000 requests/s if unpaced."""
    signals = [
        {
            "path": f"site/gateway/u{unit}/{table[0]}{address}",
            "device": "gateway",
            "source": {"table": table, "address": address, "type": "uint16", "unit_id": unit},
        }
        for unit in UNITS
        for table in ("input_register", "holding_register")
        for address in range(0, 300, 2)
    ]
    device = {"name": "gateway", "protocol": "modbus", "host": "127.0.0.1", "port": port}
    return {
        "deployment_id": "budget",
        "version": 1,
        "expires": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
        "devices": [{**device, "poll_interval_s": 0.1, "timeout_s": 1.0, **budget}],
        "signals": signals,
    }


async def arrivals_under(tmp_path: Path, requests: int, **budget: Any) -> list[float]:
    """Loop times at which a real server received the first `requests` requests of a
    connector built from the parsed policy, as the plant half builds it."""
    async with Gateway(units=UNITS) as gateway:
        loaded = policy.load(
            write_policy_yaml(tmp_path, single_register_policy(gateway.port, **budget))
        )
        device = loaded.devices[0]
        assert isinstance(device, ModbusDevice)
        connector = ModbusConnector(device, loaded.signals)
        assert len(connector.plan) == len(loaded.signals) == 1200
        async with running((connector, Scans())):
            await eventually(lambda: len(gateway.requests) >= requests, timeout=30)
    return [r.at for r in gateway.requests[:requests]]


def busiest(arrivals: list[float], window_s: float) -> int:
    """The most requests that arrived within any `window_s` seconds."""
    return max(sum(1 for t in arrivals if start <= t < start + window_s) for start in arrivals)


async def test_a_policy_that_sets_no_budget_reads_at_the_default_rate(tmp_path: Path) -> None:
    """Issue 12: this policy sent 4,700-4,900 requests/s to one PLC (740 in 100 ms)."""
    arrivals = await arrivals_under(tmp_path, requests=80)  # 4 s at the default rate

    mean = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    assert 5 < mean <= DEFAULT_RATE * 1.05  # at the budget, not merely slowed by the machine
    assert busiest(arrivals, 1.0) <= DEFAULT_RATE + 2  # + network jitter between two starts
    assert busiest(arrivals, 0.1) <= 4  # spaced (2 a window, + a late one), never a burst


async def test_a_budget_set_in_the_policy_is_the_one_kept(tmp_path: Path) -> None:
    arrivals = await arrivals_under(tmp_path, requests=150, max_requests_per_s=50)

    mean = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    assert DEFAULT_RATE * 1.25 < mean <= 50 * 1.05
    assert busiest(arrivals, 1.0) <= 52


@pytest.mark.parametrize("dead", ["silent", "closed"])
async def test_a_dead_device_never_delays_a_live_one(dead: str) -> None:
    async with Gateway() as live_server, silent_server() as silent:
        dead_port = silent.port if dead == "silent" else free_port()
        live = ModbusConnector(modbus_device(live_server.port, "live"), input_registers([0]))
        slow_to_fail = modbus_device(dead_port, "dead", timeout_s=1.0, poll_interval_s=0.05)
        dying = ModbusConnector(slow_to_fail, input_registers([0], device="dead"))
        live_scans, dead_scans = Scans(), Scans()
        async with running((live, live_scans), (dying, dead_scans)):
            await eventually(lambda: len(dead_scans.bad()) >= 3, timeout=20)
            await eventually(lambda: len(live_scans.good()) >= 10)
    assert not dead_scans.good()
    # The dead device spent ~1 s in each timeout (silent) or retried at once (closed); a wait
    # shared with it would leave a hole of that size between two of the live device's scans,
    # which it makes every 0.05 s.
    good = live_scans.good()
    gaps = [b - a for a, b in itertools.pairwise(good)]
    assert max(gaps) < 0.9
    assert live.errors == 0 and live_scans.bad() == []


async def test_a_hung_device_trips_its_breaker_with_growing_backoff_and_one_audit_event() -> None:
    with events() as logs:
        async with silent_server() as silent:
            device = modbus_device(silent.port, timeout_s=0.1, poll_interval_s=0.05)
            connector = ModbusConnector(device, input_registers([0, 1]))
            scans = Scans()
            async with running((connector, scans)):
                await eventually(lambda: len(silent.accepted) >= 4, timeout=20)
    gaps = [b - a for a, b in itertools.pairwise(silent.accepted)]
    # each retry: a 0.1 s timeout, then a backoff doubling from 1 s (±20 %): 1, 2, 4 s
    assert gaps[0] >= 0.8
    assert gaps[2] > 2 * gaps[0]
    assert all(s.raw is None and s.quality == "bad" for _, batch in scans.batches for s in batch)
    assert len(named(logs, "device_session_down")) == 1  # audited once per outage
    assert len(named(logs, "device_reconnect_failed")) >= 2  # only in the process log
    assert named(logs, "device_session_up") == []  # connected, but it never answered
    assert connector.errors >= 3


async def test_a_device_that_answers_again_closes_the_breaker_and_is_audited_up_once() -> None:
    port = free_port()
    with events() as logs:
        device = modbus_device(port, timeout_s=0.2, poll_interval_s=0.05)
        connector = ModbusConnector(device, input_registers([0]))
        scans = Scans()
        async with running((connector, scans)):
            await eventually(lambda: connector.errors >= 3)
            async with Gateway(port=port):
                await eventually(lambda: len(scans.good()) >= 3)
    session = [e["event"] for e in logs if e["event"].startswith("device_session")]
    assert session[:2] == ["device_session_down", "device_session_up"]
    assert len(named(logs, "device_reconnect_failed")) >= 2


@pytest.mark.parametrize("connections", [1, 2, 3])
async def test_a_scan_uses_at_most_max_connections_in_parallel(connections: int) -> None:
    async with Gateway(delay_s=0.05) as gateway:
        # The rate is raised so that only the connections limit how many requests overlap.
        device = modbus_device(
            gateway.port, max_connections=connections, poll_interval_s=0.05, max_requests_per_s=1000
        )
        connector = ModbusConnector(device, input_registers(FOUR_REQUESTS))
        scans = Scans()
        async with running((connector, scans)):
            await eventually(lambda: len(scans.good()) >= 3)
    assert gateway.most_in_flight == connections
    assert gateway.connections == connections
    values = {s.signal: s.raw for s in scans.batches[-1][1]}
    assert values == {f"site/plc/udefault-ir{a}": (1000 + a,) for a in FOUR_REQUESTS}


async def test_requests_per_second_never_exceed_the_budget_and_late_scans_are_skipped() -> None:
    async with Gateway() as gateway:
        # 4 requests every 0.05 s would be 80 requests/s; the budget allows 20.
        device = modbus_device(gateway.port, max_requests_per_s=20, max_connections=2)
        connector = ModbusConnector(device, input_registers(FOUR_REQUESTS))
        scans = Scans()
        async with running((connector, scans)):
            await eventually(lambda: len(gateway.requests) >= 50, timeout=20)
    arrivals = [r.at for r in gateway.requests]
    busiest = max(sum(1 for t in arrivals if start <= t < start + 1.0) for start in arrivals)
    assert busiest <= 21  # 20, plus one that network jitter moved closer to its predecessor
    assert connector.overruns >= connector.scans  # each 0.2 s scan skipped 3 of its 0.05 s slots
    assert all(s.quality == "good" for s in scans.batches[-1][1])


async def test_overruns_are_audited_once_per_streak_and_the_streak_end_too() -> None:
    with events() as logs:
        async with Gateway(delay_s=0.04) as gateway:  # 4 requests: ~0.16 s per scan
            # Raised: the streak must end when the device answers fast, not stay for the rate.
            device = modbus_device(gateway.port, poll_interval_s=0.1, max_requests_per_s=1000)
            connector = ModbusConnector(device, input_registers(FOUR_REQUESTS))
            async with running((connector, Scans())):
                await eventually(lambda: connector.overruns >= 4)
                gateway.delay_s = 0.0
                await eventually(lambda: named(logs, "scan_overrun_ended"))
                skipped_in_streak = connector.overruns
                gateway.delay_s = 0.04
                await eventually(lambda: connector.overruns >= skipped_in_streak + 2)
    assert len(named(logs, "scan_overrun")) == 2  # one per streak, not one per overrun
    (ended,) = named(logs, "scan_overrun_ended")
    assert ended["skipped_scans"] == skipped_in_streak


async def test_a_slow_consumer_makes_scans_skip_never_queue() -> None:
    """When the spool is behind, emit waits: the device is read no more often, nothing piles up."""
    emitted = 0

    async def slow_emit(samples: list[RawSample]) -> None:
        nonlocal emitted
        await asyncio.sleep(0.3)  # six 0.05 s slots
        emitted += 1

    async with Gateway() as gateway:
        connector = ModbusConnector(modbus_device(gateway.port), input_registers(FOUR_REQUESTS))
        task = asyncio.create_task(connector.run(slow_emit))
        try:
            await eventually(lambda: emitted >= 4)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert connector.scans <= emitted + 1  # one scan per emit, none read ahead
    assert len(gateway.requests) <= 4 * (emitted + 1)
    assert connector.overruns >= 4 * emitted


async def test_an_upgraded_policy_that_no_longer_fits_its_budget_is_audited_once() -> None:
    """An envelope signed before the default budget existed spells the budget null: after the
    upgrade the device gets 20 requests/s, and 50 requests every 0.1 s are scanned every
    2.5 s. That is audited when the device starts, once however often its connector runs."""
    document = single_register_policy(0, max_requests_per_s=None)
    document["signals"] = document["signals"][:50]  # unit 1 input registers 0-98: 50 requests
    async with Gateway(units=UNITS) as gateway:
        document["devices"][0]["port"] = gateway.port
        loaded = parse.from_payload(rfc8785.dumps(document), "old.dsse.json")
        device = loaded.devices[0]
        assert isinstance(device, ModbusDevice) and device.max_requests_per_s == DEFAULT_RATE
        connector = ModbusConnector(device, loaded.signals)
        fitting = ModbusConnector(
            modbus_device(gateway.port, "fits", poll_interval_s=1.0), input_registers([0])
        )
        with events() as logs:
            for _ in range(2):  # the supervisor runs a connector again after a failure
                before = (connector.scans, fitting.scans)
                async with running((connector, Scans()), (fitting, Scans())):
                    await eventually(
                        lambda before=before: (
                            connector.scans > before[0] and fitting.scans > before[1]
                        )
                    )
    (exceeded,) = named(logs, "device_budget_exceeded")
    assert exceeded["device"] == "gateway"
    assert (exceeded["requests_per_scan"], exceeded["max_requests_per_s"]) == (50, DEFAULT_RATE)
    assert exceeded["warnings"][0].startswith(
        "device gateway needs 50 requests every 0.1 s = 500 requests/s, but its budget is 20/s"
    )
