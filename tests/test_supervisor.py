"""`dmzbroker run` end to end: simulated PLC → plant process → spool → enterprise process → mTLS.

Real parts only: the pymodbus simulator on 127.0.0.1, two broker processes, real TLS with
certificates from our CLI. The simulator counts every request it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest

from broker import policy
from broker.plant.connectors.modbus import READ_FUNCTIONS
from broker.policy import ModbusSource
from broker.sim.refrigeration import RefrigerationPlant
from tests.harness import (
    BrokerProcess,
    Deployment,
    Pki,
    consumer_ssl,
    eventually,
    get_json,
    read_events,
)

pytestmark = pytest.mark.timeout(90)

# Values far from the simulation's own, so a wrong decode cannot pass by accident.
FROZEN_STATE = {
    "room_c": -21.3,
    "setpoint_c": -19.5,
    "discharge_bar": 9.87,
    "suction_bar": 1.23,
    "power_kw": 12.5,
    "run_seconds": 70_001.0,  # above 65535: the uint32's words must be in the right order
    "energy_kwh": 1234.56,
    "ambient_c": 31.4,
    "compressor_on": True,
    "door_open": True,
}
EXPECTED = {
    "coldstore/storage/cold-room-1/temperature": -21.3,
    "coldstore/storage/cold-room-1/setpoint": -19.5,
    "coldstore/storage/cold-room-1/door_open": True,
    "coldstore/machine-room/compressor-1/discharge_pressure": 9.87,
    "coldstore/machine-room/compressor-1/suction_pressure": 1.23,
    "coldstore/machine-room/compressor-1/motor_power": 12.5,
    "coldstore/machine-room/compressor-1/run_time": 70_001,
    "coldstore/machine-room/compressor-1/energy": 1234.56,
    "coldstore/machine-room/compressor-1/running": True,
    "coldstore/outdoor/weather/ambient_temperature": 31.4,
}


async def freeze(sim: RefrigerationPlant) -> None:
    await sim.freeze()
    for name, value in FROZEN_STATE.items():
        setattr(sim.state, name, value)
    await sim.publish()


async def snapshot(deployment: Deployment, pki: Pki) -> dict[str, dict]:
    try:
        status, body = await get_json(deployment.base_url + "/v1/snapshot", consumer_ssl(pki))
    except aiohttp.ClientConnectionError:
        return {}  # not listening yet
    assert status == 200
    return {r["signal"]: r for r in body["records"]}


def assert_expected(records: dict[str, dict]) -> None:
    for path, value in EXPECTED.items():
        assert records[path]["value"] == pytest.approx(value, abs=1e-6), path
        assert records[path]["quality"] == "good", path
    assert records["coldstore/machine-room/compressor-1/motor_power"]["unit"] == "kW"
    context = records["coldstore/machine-room/compressor-1/motor_power"]["context"]
    assert context["asset"] == "coldstore/machine-room/compressor-1"
    assert (context["asset_type"], context["asset_state"]) == ("compressor", "running")
    assert context["ambient"]["temperature"] == pytest.approx(31.4)
    assert context["load"]["signal"] == "coldstore/machine-room/compressor-1/motor_power"
    # computed at the edge from the outlet and ambient temperatures (+8 K while running)
    approach = records["coldstore/machine-room/condenser-1/approach_temperature"]
    assert approach["value"] == pytest.approx(8.0) and approach["unit"] == "K"
    # read and validated in the plant half, never published
    assert "coldstore/storage/cold-room-1/defrost_heater_current" not in records


async def snapshot_has_data(deployment: Deployment, pki: Pki) -> bool:
    return bool(await snapshot(deployment, pki))


@pytest.fixture
async def broker(deployment: Deployment, pki: Pki, start_broker) -> BrokerProcess:
    """`dmzbroker run`, once data has crossed to the API."""
    process: BrokerProcess = start_broker("run", deployment.config)
    await eventually(lambda: snapshot_has_data(deployment, pki))
    return process


async def test_decoded_values_reach_snapshot_and_stream_over_mtls(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, start_broker
) -> None:
    await freeze(plant_sim)
    broker: BrokerProcess = start_broker("run", deployment.config)
    latest: dict[str, dict] = {}

    async def all_signals_arrived() -> bool:
        latest.update(await snapshot(deployment, pki))
        return set(EXPECTED) | {"coldstore/machine-room/condenser-1/approach_temperature"} <= set(
            latest
        )

    await eventually(all_signals_arrived)
    assert_expected(latest)

    async with (
        aiohttp.ClientSession() as session,
        session.get(deployment.base_url + "/v1/stream", ssl=consumer_ssl(pki)) as response,
    ):
        events = await read_events(response, 3 * len(latest))  # three scans' worth
    streamed = {e["signal"]: e for _, e in events}
    assert_expected(streamed)
    ids = [i for i, _ in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert broker.stop() == 0


async def test_only_modelled_addresses_are_read_and_only_with_read_functions(
    deployment: Deployment, plant_sim: RefrigerationPlant, broker: BrokerProcess
) -> None:
    await eventually(lambda: sum(plant_sim.requests.values()) >= 3 * 8)  # several scans
    assert broker.stop() == 0

    modelled: dict[int, set[int]] = defaultdict(set)
    for modelled_signal in policy.load(deployment.directory / "policy.yaml").signals:
        source = modelled_signal.source
        if not isinstance(source, ModbusSource):
            continue  # derived: computed, never read
        code = READ_FUNCTIONS[source.table][0]
        modelled[code].update(range(source.address, source.address + source.width))
    assert plant_sim.function_codes <= {1, 2, 3, 4}, "a non-read function code reached the PLC"
    for code in (1, 2, 3, 4):
        assert plant_sim.addresses_read(code) == modelled[code], f"function {code}"


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def tcp_sockets() -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) of every TCP socket on this host."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            rows.append(
                (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state, inode)
            )
    return rows


LISTEN = "0A"


async def test_plant_half_listens_nowhere_and_enterprise_half_never_touches_the_plc(
    deployment: Deployment, plant_sim: RefrigerationPlant, broker: BrokerProcess
) -> None:
    plant_pid, enterprise_pid = half_pids(broker)
    plant_sockets, enterprise_sockets = socket_inodes(plant_pid), socket_inodes(enterprise_pid)
    sockets = tcp_sockets()
    plc_port = plant_sim.address[1]
    assert not [s for s in sockets if s[3] in plant_sockets and s[2] == LISTEN]
    assert [
        s for s in sockets if s[3] in plant_sockets and s[1] == plc_port
    ]  # it does read the PLC
    assert not [s for s in sockets if s[3] in enterprise_sockets and plc_port in (s[0], s[1])]
    assert [s[0] for s in sockets if s[3] in enterprise_sockets and s[2] == LISTEN] == [
        deployment.api_port
    ]
    assert broker.stop() == 0


async def test_sigterm_stops_both_halves_cleanly(
    deployment: Deployment, plant_sim: RefrigerationPlant, broker: BrokerProcess
) -> None:
    pids = half_pids(broker)
    assert len(pids) == 2
    assert broker.stop() == 0
    for pid in pids:
        assert not pid_alive(pid)


async def test_ctrl_c_to_the_process_group_stops_every_process_with_exit_0(
    deployment: Deployment, plant_sim: RefrigerationPlant, broker: BrokerProcess
) -> None:
    os.killpg(broker.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    await eventually(lambda: broker.process.poll() is not None)
    assert broker.process.returncode == 0
    stopped = [json.loads(line) for line in broker.events() if '"half_stopped"' in line]
    assert sorted((e["half"], e["exit_code"]) for e in stopped) == [("enterprise", 0), ("plant", 0)]
    # A stop request arriving while a half closes its loop printed an OSError traceback (seen
    # in half of the runs of an interrupted `make demo`; rarer here).
    assert not [line for line in broker.events() if "Traceback" in line]


async def test_a_second_sigterm_during_shutdown_still_stops_both_halves(
    deployment: Deployment, plant_sim: RefrigerationPlant, broker: BrokerProcess
) -> None:
    pids = half_pids(broker)
    broker.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.02)
    broker.process.send_signal(signal.SIGTERM)
    await eventually(lambda: broker.process.poll() is not None)
    await eventually(lambda: not any(pid_alive(pid) for pid in pids), timeout=15)


async def test_when_one_half_dies_the_other_is_stopped_and_run_fails(
    deployment: Deployment, plant_sim: RefrigerationPlant, broker: BrokerProcess
) -> None:
    plant_pid, enterprise_pid = half_pids(broker)
    os.kill(plant_pid, 9)
    await eventually(lambda: broker.process.poll() is not None)
    assert broker.process.returncode != 0
    assert not pid_alive(enterprise_pid)
    assert any('"half_exited"' in line and '"plant"' in line for line in broker.events())


def half_pids(broker: BrokerProcess) -> list[int]:
    events = [json.loads(line) for line in broker.events() if line.startswith("{")]
    return [e["pid"] for e in events if e["event"] == "half_started"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes once reaped or defunct.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"
