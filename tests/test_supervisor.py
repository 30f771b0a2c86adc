"""`dmzbroker run` end to end: simulated PLC → plant process → spool → enterprise process → mTLS.

Real parts only: the pymodbus simulator on 127.0.0.1, two broker processes, real TLS with
certificates from our CLI. The simulator counts every request it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import pwd
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest
import yaml

from broker import policy
from broker.config import SupervisorConfig
from broker.deployment.layout import ENTERPRISE_USER, PLANT_USER
from broker.lifecycle import STOP_GRACE_S, SUPERVISOR_PID
from broker.metrics import PLANT_FILE
from broker.plant.connectors.modbus import READ_FUNCTIONS
from broker.policy import ModbusSource
from broker.sim.refrigeration import RefrigerationPlant
from broker.supervisor import (
    ENTERPRISE_NICENESS,
    HALF_PATH,
    RELAY_LINE_BYTES,
    HalfUser,
    _relay,
    half_environment,
    restart_delays,
)
from tests.harness import (
    BrokerProcess,
    Deployment,
    Owners,
    Pki,
    consumer_ssl,
    dmzbroker,
    eventually,
    get_json,
    read_events,
    sign_policy,
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
    await eventually(lambda: snapshot_has_data(deployment, pki), timeout=30)
    return process


async def test_decoded_values_reach_snapshot_and_stream_over_mtls(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, start_broker
) -> None:
    await freeze(plant_sim)
    broker: BrokerProcess = start_broker("run", deployment.config)
    wanted = set(EXPECTED) | {"coldstore/machine-room/condenser-1/approach_temperature"}
    latest: dict[str, dict] = {}

    async def all_signals_served_fresh() -> bool:
        """A snapshot with every wanted signal, none of them older than the store's limit
        (three poll intervals, 0.6 s here): on a loaded machine a scan can take longer than
        that, and the first complete snapshot then serves the scan's first values `stale`,
        as it should; this test is about what was decoded, tests/enterprise/test_store.py
        and the plant-outage test below about staleness."""
        latest.clear()
        latest.update(await snapshot(deployment, pki))
        return wanted <= latest.keys() and all(latest[s]["quality"] != "stale" for s in wanted)

    await eventually(all_signals_served_fresh, timeout=30)
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
    plc_port = plant_sim.address[1]
    seen: dict[str, list[tuple[int, int, str, str]]] = {}

    def plant_reads_the_plc() -> bool:
        """One reading of both halves' TCP sockets; whether it shows the plant's connection
        to the PLC. Data crossing does not mean that connection is open: the BACnet device's
        `bad` records (nothing answers it) can cross before the Modbus connector has
        connected, and a read that times out under load closes the connection until the
        reconnect (a second or more)."""
        plant, enterprise = socket_inodes(plant_pid), socket_inodes(enterprise_pid)
        sockets = tcp_sockets()
        seen["plant"] = [s for s in sockets if s[3] in plant]
        seen["enterprise"] = [s for s in sockets if s[3] in enterprise]
        assert not [s for s in seen["plant"] if s[2] == LISTEN]  # in every reading
        return any(s[1] == plc_port for s in seen["plant"])

    await eventually(plant_reads_the_plc, timeout=30)  # the positive control
    assert not [s for s in seen["enterprise"] if plc_port in (s[0], s[1])]
    assert [s[0] for s in seen["enterprise"] if s[2] == LISTEN] == [deployment.api_port]
    assert broker.stop() == 0


async def test_sigterm_stops_both_halves_cleanly(
    deployment: Deployment, plant_sim: RefrigerationPlant, broker: BrokerProcess
) -> None:
    pids = half_pids(broker)
    assert len(pids) == 2
    assert_plant_comes_first(*pids)
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


async def test_a_half_that_dies_is_restarted_and_audited_while_the_other_keeps_running(
    deployment: Deployment, plant_sim: RefrigerationPlant, owners: Owners, pki: Pki, start_broker
) -> None:
    broker: BrokerProcess = start_broker("run", deployment.config)
    await eventually(lambda: snapshot_has_data(deployment, pki), timeout=30)
    plant_pid, enterprise_pid = half_pids(broker)

    os.kill(plant_pid, signal.SIGKILL)
    await eventually(lambda: current_pid(broker, "plant") != plant_pid, timeout=30)
    assert broker.process.poll() is None  # `run` goes on
    assert current_pid(broker, "enterprise") == enterprise_pid and pid_alive(enterprise_pid)
    # The new plant half reads the PLC again, and its values cross.
    requests = sum(plant_sim.requests.values())
    await eventually(lambda: sum(plant_sim.requests.values()) > requests + 8, timeout=30)
    assert broker.stop() == 0
    assert not pid_alive(current_pid(broker, "plant"))

    exited = [e for e in events(broker) if e["event"] == "half_exited"]
    assert [(e["half"], e["pid"], e["exit_signal"]) for e in exited] == [
        ("plant", plant_pid, "SIGKILL")
    ]
    audit = deployment.directory / "audit"
    shown = dmzbroker("audit", "show", str(audit), "--writer", "supervisor", "--format", "json")
    entries = [json.loads(line) for line in shown.stdout.splitlines()]
    by_event = {e["event"]: e for e in entries}
    assert by_event["half_exited"]["actor"] == "plant"
    assert by_event["half_exited"]["details"]["exit_signal"] == "SIGKILL"
    restarted = by_event["half_restarted"]
    assert restarted["actor"] == "plant" and restarted["details"]["restarts"] == 1
    assert 0 < restarted["details"]["delay_s"] <= 0.5  # the first delay: 0.25 to 0.5 s
    assert {"process_started", "process_stopped", "audit_checkpoint"} <= by_event.keys()
    # --same-user (as every test's `run`): audited once, with what it gives up
    shared = [e for e in entries if e["event"] == "halves_share_user"]
    assert len(shared) == 1 and shared[0]["outcome"] == "unknown"
    assert shared[0]["details"]["user"] == pwd.getpwuid(os.geteuid()).pw_name
    assert "signal or trace the plant process" in shared[0]["details"]["gives_up"]
    verified = dmzbroker(
        "audit", "verify", str(audit), "--pubkey", str(owners.audit_key.with_suffix(".pub")),
        check=False,
    )  # fmt: skip
    verdicts = {
        line.split(":")[0].strip(): line.split(": ", 1)[1]
        for line in verified.stdout.splitlines()
        if line.startswith("  ") and ": " in line
    }
    assert verdicts["supervisor"] == "INTACT" and verdicts["enterprise"] == "INTACT"
    # The killed plant half could not seal its log: an unsealed tail is never adopted, and
    # `audit verify` reports that break for good (unless the kill came right after a checkpoint).
    if verdicts["plant"] != "INTACT":
        assert verdicts["plant"].startswith("UNPROVEN: chain break at seq"), verdicts["plant"]
        assert verified.returncode == 1


async def test_kill_9_of_run_leaves_no_half_running(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, start_broker
) -> None:
    broker: BrokerProcess = start_broker("run", deployment.config)
    await eventually(lambda: snapshot_has_data(deployment, pki), timeout=30)
    pids = half_pids(broker)
    assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)

    broker.kill9()
    # The kernel sends each half SIGTERM: they stop cleanly, within their usual stop time.
    await eventually(lambda: not any(pid_alive(pid) for pid in pids), timeout=15)
    stopped = [e for e in events(broker) if e["event"] == "process_stopped"]
    assert sorted(e["process"] for e in stopped) == ["enterprise", "plant"]


def test_a_half_whose_supervisor_is_already_gone_does_not_start(tmp_path: Path) -> None:
    """The race the parent-death signal cannot cover: the supervisor died before the half
    asked for the signal. The half sees that its parent is not the supervisor and stops
    before the command line is even read (the config named here does not exist)."""
    gone = os.getpid() + 1  # not the half's parent (this process is)
    result = subprocess.run(
        [sys.executable, "-I", "-m", "broker", "plant", "--config", str(tmp_path / "none.yaml")],
        env={**os.environ, SUPERVISOR_PID: str(gone)},
        capture_output=True, text=True, timeout=30, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"dmzbroker: error: supervisor pid {gone} is gone; not starting"
    ]


TRAP = """
import pathlib, sys
pathlib.Path({marker!r}).write_text("imported from the working directory")
sys.exit(99)
"""


async def test_a_broker_folder_in_the_working_directory_is_never_imported(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, tmp_path: Path
) -> None:
    workdir = tmp_path / "workdir"
    (workdir / "broker").mkdir(parents=True)
    marker = tmp_path / "trap-sprung"
    (workdir / "broker" / "__init__.py").write_text(TRAP.format(marker=str(marker)))
    # The trap works: a plain `python -m broker` from there imports it.
    sprung = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "--version", cwd=workdir
    )
    async with asyncio.timeout(30):
        assert await sprung.wait() == 99
    assert marker.exists()
    marker.unlink()

    # The operator's `dmzbroker run` from that directory starts the real halves.
    log = tmp_path / "run.log"
    with open(log, "wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            Path(sys.executable).parent / "dmzbroker", "run", "--config", deployment.config,
            "--reset-state", "--same-user",
            stdout=subprocess.DEVNULL, stderr=stderr, cwd=workdir, start_new_session=True,
        )  # fmt: skip
    try:
        await eventually(lambda: snapshot_has_data(deployment, pki), timeout=30)
        started = [json.loads(line) for line in log.read_text().splitlines() if "half_" in line]
        assert [e["event"] for e in started] == ["half_started", "half_started"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        async with asyncio.timeout(15):
            assert await process.wait() == 0
    assert not marker.exists()


async def test_a_second_instance_is_refused_and_the_first_keeps_serving(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, start_broker, tmp_path: Path
) -> None:
    first: BrokerProcess = start_broker("run", deployment.config)
    await eventually(lambda: snapshot_has_data(deployment, pki), timeout=30)
    plant_pid, enterprise_pid = half_pids(first)
    segments = sorted(deployment.spool.glob("*.seg"))
    directory = deployment.directory

    refused = {
        "run": (directory / "audit" / "supervisor", first.process.pid),
        "plant": (directory / "plant-state", plant_pid),
        "enterprise": (directory / "enterprise-state", enterprise_pid),
    }
    for command, (folder, holder) in refused.items():
        second = dmzbroker(command, "--config", str(deployment.config), check=False, timeout=30)
        assert second.returncode == 1, command
        assert second.stderr.splitlines() == [
            f"dmzbroker: error: {folder}: in use by another dmzbroker process (pid {holder}); "
            "only one instance may write a folder: stop that one, or give this one other folders"
        ], command

    assert sorted(deployment.spool.glob("*.seg")) == segments  # the refused ones wrote nothing
    assert half_pids(first) == [plant_pid, enterprise_pid] and first.process.poll() is None
    seen = await snapshot(deployment, pki)
    await eventually(
        lambda: newer_values(deployment, pki, max(r["seq"] for r in seen.values())), timeout=15
    )

    # A killed holder leaves nothing that blocks the next start: kill every process at once.
    first.kill9()
    for pid in (plant_pid, enterprise_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await eventually(lambda: not pid_alive(plant_pid) and not pid_alive(enterprise_pid))
    again: BrokerProcess = start_broker("run", deployment.config)
    await eventually(
        lambda: newer_values(deployment, pki, max(r["seq"] for r in seen.values())), timeout=30
    )
    assert again.stop() == 0


async def test_run_next_to_a_running_half_is_refused_before_starting_anything(
    deployment: Deployment, plant_sim: RefrigerationPlant, start_broker
) -> None:
    plant: BrokerProcess = start_broker("plant", deployment.config)
    await eventually(lambda: '"device_session_up"' in "".join(plant.events()), timeout=30)
    second = dmzbroker(
        "run", "--config", str(deployment.config), "--same-user", check=False, timeout=30
    )
    assert second.returncode == 1
    assert second.stderr.splitlines()[-1] == (
        f"dmzbroker: error: {deployment.spool}: in use by another dmzbroker process "
        f"(pid {plant.process.pid}); only one instance may write a folder: stop that one, or "
        "give this one other folders"
    )
    assert "half_started" not in second.stderr
    assert plant.process.poll() is None
    assert plant.stop() == 0


@pytest.mark.timeout(150)
async def test_the_enterprise_half_killed_20_times_never_disturbs_the_plant_scans(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, owners: Owners, start_broker
) -> None:
    # Every 0.5 s: on a shared two-core machine, a 0.2 s slot can be missed for reasons of
    # the machine's (the simulator shares this test's process); no slot may be missed here.
    # Each restart is a fresh interpreter: at equal priority the 20 start-ups took the CPU
    # the plant's scans needed (scans of 0.5-0.9 s instead of 0.05 s at load 13-25): the
    # enterprise half runs below the plant's priority, checked at the end.
    interval = 0.5
    document = copy.deepcopy(deployment.document)
    document["devices"][0]["poll_interval_s"] = interval
    assert sign_policy(deployment.directory, document, [owners.ot_key, owners.it_key]) == (
        deployment.policy
    )
    config = with_supervisor(
        deployment.config, restart_initial_s=0.1, restart_max_s=0.2, restart_reset_s=1.0
    )
    broker: BrokerProcess = start_broker("run", config)
    await eventually(lambda: snapshot_has_data(deployment, pki), timeout=30, interval=0.25)
    plant_pid, _ = half_pids(broker)
    await eventually(lambda: plant_scans(deployment.spool) is not None, timeout=15)
    before = plant_scans(deployment.spool)
    assert before is not None

    for round_ in range(20):
        pid = current_pid(broker, "enterprise")
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: current_pid(broker, "enterprise") != pid, timeout=15)  # noqa: B023
        await eventually(lambda: snapshot_has_data(deployment, pki), timeout=20, interval=0.25)
        assert broker.process.poll() is None, f"run ended in round {round_}"

    await eventually(lambda: (plant_scans(deployment.spool) or before)[2] > before[2] + 2)
    after = plant_scans(deployment.spool)
    assert after is not None
    assert current_pid(broker, "plant") == plant_pid and pid_alive(plant_pid)
    assert_plant_comes_first(plant_pid, current_pid(broker, "enterprise"))
    exited = [e for e in events(broker) if e["event"] == "half_exited"]
    assert {e["half"] for e in exited} == {"enterprise"} and len(exited) == 20
    expected = (after[2] - before[2]) / interval
    # No slot skipped, and a scan in (nearly) every slot; the metrics file is written every
    # 2 s, so the two readings can each be up to one write late relative to their scans.
    assert after[1] == 0, f"{after[1]} scans skipped"
    assert after[0] - before[0] >= expected - 2 * 2 / interval - 2, (after, before, expected)
    assert broker.stop() == 0


async def test_consumers_are_served_while_the_plant_half_is_down_and_the_stream_resumes(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, start_broker
) -> None:
    # A first restart delay of 2 to 4 s: the outage outlasts three poll intervals (stale).
    config = with_supervisor(deployment.config, restart_initial_s=4.0, restart_max_s=4.0)
    broker: BrokerProcess = start_broker("run", config)
    await eventually(lambda: snapshot_has_data(deployment, pki), timeout=30)
    plant_pid, enterprise_pid = half_pids(broker)
    streamed: list[tuple[float, dict]] = []

    async def consume() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.get(deployment.base_url + "/v1/stream", ssl=consumer_ssl(pki)) as response,
        ):
            assert response.status == 200
            async for line in response.content:
                if line.startswith(b"data: "):
                    streamed.append((time.monotonic(), json.loads(line[6:])))

    consumer = asyncio.create_task(consume())
    try:
        await eventually(lambda: len(streamed) > 10, timeout=15)
        os.kill(plant_pid, signal.SIGKILL)
        killed_at = time.monotonic()

        async def all_stale() -> bool:
            records = await snapshot(deployment, pki)
            return bool(records) and all(r["quality"] in ("stale", "bad") for r in records.values())

        await eventually(all_stale, timeout=15)  # still served, honestly aged
        assert current_pid(broker, "plant") == plant_pid  # seen before the restart
        await eventually(lambda: current_pid(broker, "plant") != plant_pid, timeout=15)

        def resumed() -> bool:
            return any(t > killed_at and e["quality"] == "good" for t, e in streamed)

        await eventually(resumed, timeout=20)  # the same stream, good values again
        assert not consumer.done()
        last_before = max(e["seq"] for t, e in streamed if t <= killed_at)
        first_after = min(e["seq"] for t, e in streamed if t > killed_at)
        assert first_after > last_before
        assert await newer_values(deployment, pki, last_before)
        assert current_pid(broker, "enterprise") == enterprise_pid
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    assert broker.stop() == 0


def with_supervisor(config: Path, **settings: float) -> Path:
    """The config with these `supervisor` settings."""
    document = yaml.safe_load(config.read_text())
    document["supervisor"] = settings
    config.write_text(yaml.safe_dump(document))
    return config


def plant_scans(spool: Path) -> tuple[float, float, float] | None:
    """Whole scans and skipped scan slots of every device, and when the plant half wrote them
    (its metrics file in the spool); None before the first write."""
    try:
        fd = os.open(spool / PLANT_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd) as f:  # the file is replaced whole: this one is consistent
        written = os.fstat(fd).st_mtime
        lines = f.read().splitlines()

    def total(name: str) -> float:
        return sum(float(line.split()[-1]) for line in lines if line.startswith(name + "{"))

    return (
        total("dmzbroker_device_scans_total"),
        total("dmzbroker_device_skipped_scans_total"),
        written,
    )


def test_restart_delays_double_with_jitter_up_to_the_cap_and_start_over_after_a_good_run() -> None:
    backoff = restart_delays(
        SupervisorConfig(restart_initial_s=0.5, restart_max_s=30.0, restart_reset_s=60.0)
    )
    delays = [backoff.after(ran_s=1.0) for _ in range(12)]
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30, 30, 30]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered
    assert backoff.after(ran_s=60.0) <= 0.5  # it ran fine for a while: a fresh start
    assert 0.5 <= backoff.after(ran_s=0.1) <= 1.0
    for _ in range(2000):  # an hour-long outage never overflows the doubling
        assert backoff.after(ran_s=0.0) <= 30.0


def test_restart_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="restart_max_s"):
        SupervisorConfig(restart_initial_s=5.0, restart_max_s=1.0)


async def newer_values(deployment: Deployment, pki: Pki, after_seq: int) -> bool:
    records = await snapshot(deployment, pki)
    return any(r["seq"] > after_seq and r["quality"] == "good" for r in records.values())


def events(broker: BrokerProcess) -> list[dict]:
    return [json.loads(line) for line in broker.events() if line.startswith("{")]


def current_pid(broker: BrokerProcess, half: str) -> int:
    """The pid of the half's latest start."""
    starts = ("half_started", "half_restarted")
    return [e["pid"] for e in events(broker) if e["event"] in starts and e["half"] == half][-1]


def half_pids(broker: BrokerProcess) -> list[int]:
    """The pids of the halves' first starts: the plant's, then the enterprise's."""
    first: dict[str, int] = {}
    for e in events(broker):
        if e["event"] == "half_started":
            first.setdefault(e["half"], e["pid"])
    return [first[half] for half in ("plant", "enterprise") if half in first]


def thread_niceness(pid: int) -> set[int]:
    """The nice values of a process's threads (Linux keeps one per thread)."""
    found = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            found.add(os.getpriority(os.PRIO_PROCESS, int(task)))
    return found


def assert_plant_comes_first(plant_pid: int, enterprise_pid: int) -> None:
    """The plant half at the priority `run` was started with, the enterprise half (every
    thread of it) ENTERPRISE_NICENESS below."""
    own = os.getpriority(os.PRIO_PROCESS, 0)  # `run` inherits this process's
    assert thread_niceness(plant_pid) == {own}
    assert thread_niceness(enterprise_pid) == {min(own + ENTERPRISE_NICENESS, 19)}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        # A zombie still answers kill(0); it is gone for our purposes once defunct.
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def audited(deployment: Deployment, writer: str, event: str) -> list[dict]:
    """A writer's audit entries of one event, through `dmzbroker audit show`."""
    shown = dmzbroker(
        "audit", "show", str(deployment.directory / "audit"), "--writer", writer,
        "--event", event, "--format", "json",
    )  # fmt: skip
    return [json.loads(line) for line in shown.stdout.splitlines()]


async def test_sighup_to_run_is_audited_by_the_supervisor_and_by_each_half(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, start_broker
) -> None:
    broker: BrokerProcess = start_broker("run", deployment.config)
    await eventually(lambda: snapshot_has_data(deployment, pki), timeout=30)
    writers = ("supervisor", "plant", "enterprise")
    assert [w for w in writers if audited(deployment, w, "policy_reload_requested")] == []

    broker.process.send_signal(signal.SIGHUP)
    await eventually(
        lambda: all(audited(deployment, w, "policy_reload_requested") for w in writers),
        timeout=20,
    )
    [requested] = audited(deployment, "supervisor", "policy_reload_requested")
    assert (requested["category"], requested["outcome"]) == ("policy", "success")
    assert requested["details"]["halves"] == 2
    for half in ("plant", "enterprise"):
        [received] = audited(deployment, half, "policy_reload_requested")
        assert received["details"]["cause"] == "SIGHUP"
        assert received["policy_version"] == 1  # the version in force when it came
    assert broker.process.poll() is None  # SIGHUP never stops the broker
    assert broker.stop() == 0


async def test_sighup_to_a_half_without_a_supervisor_is_audited_by_that_half(
    deployment: Deployment, plant_sim: RefrigerationPlant, start_broker
) -> None:
    """`systemctl reload` under the units in deploy/systemd: the half gets SIGHUP itself."""
    plant: BrokerProcess = start_broker("plant", deployment.config)
    await eventually(lambda: '"device_session_up"' in "".join(plant.events()), timeout=30)
    assert audited(deployment, "plant", "policy_reload_requested") == []
    plant.process.send_signal(signal.SIGHUP)
    await eventually(lambda: audited(deployment, "plant", "policy_reload_requested"))
    assert plant.process.poll() is None
    assert plant.stop() == 0
    assert len(audited(deployment, "plant", "policy_reload_requested")) == 1
    assert not (deployment.directory / "audit" / "supervisor").exists()


@pytest.mark.timeout(120)
async def test_a_half_that_will_not_stop_is_killed_and_the_kill_audited(
    deployment: Deployment, plant_sim: RefrigerationPlant, pki: Pki, start_broker
) -> None:
    broker: BrokerProcess = start_broker("run", deployment.config)
    await eventually(lambda: snapshot_has_data(deployment, pki), timeout=30)
    _, enterprise_pid = half_pids(broker)
    os.kill(enterprise_pid, signal.SIGSTOP)  # a half hung so hard it cannot act on SIGTERM
    started = time.monotonic()
    assert broker.stop(timeout=STOP_GRACE_S + 30) == 0
    assert time.monotonic() - started >= STOP_GRACE_S  # it was given its grace first
    assert not pid_alive(enterprise_pid)
    [killed] = audited(deployment, "supervisor", "half_killed")
    assert (killed["actor"], killed["outcome"]) == ("enterprise", "failure")
    assert killed["details"] == {"pid": enterprise_pid, "after_s": STOP_GRACE_S}
    assert audited(deployment, "supervisor", "process_stopped")  # written after the kill


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run the halves as their users")
def test_run_as_root_without_the_halves_users_is_refused_before_starting_anything(
    deployment: Deployment,
) -> None:
    for name in (PLANT_USER, ENTERPRISE_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            pytest.skip(f"{name} exists on this machine (deploy/install.sh ran here)")
    result = dmzbroker("run", "--config", str(deployment.config), "--reset-state", check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"dmzbroker: error: user {PLANT_USER} (or its group) does not exist: create the halves' "
        "users with deploy/install.sh, or start both halves as one user with --same-user"
    )
    assert "half_started" not in result.stderr
    assert not deployment.spool.exists()


def test_a_half_of_its_own_user_gets_none_of_roots_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review r1 #6: root's session (credentials, LD_*, SSL_*, HOME) never reaches a half."""
    for name, value in (("AWS_SECRET_ACCESS_KEY", "s3cr3t"), ("LD_PRELOAD", "/tmp/x.so"),
                        ("SSL_CERT_FILE", "/tmp/ca.pem"), ("HOME", "/root"), ("TZ", "UTC"),
                        ("LANG", "C.UTF-8")):  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LC_ALL", raising=False)
    user = HalfUser("dmzbroker-plant", 4242, 4242, (), 0o027, "/nonexistent")

    assert half_environment(user) == {
        "PATH": HALF_PATH,
        "HOME": "/nonexistent",
        "LANG": "C.UTF-8",
        "TZ": "UTC",
        SUPERVISOR_PID: str(os.getpid()),
    }
    # One user for both (--same-user, the demo): the halves are that user, as before.
    assert half_environment(None)["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"


async def test_relayed_output_keeps_lines_whole_and_bounds_a_long_one(
    capfd: pytest.CaptureFixture[str],
) -> None:
    reader = asyncio.StreamReader(limit=RELAY_LINE_BYTES)
    long_line = b"x" * (3 * RELAY_LINE_BYTES) + b"\n"
    reader.feed_data(b'{"event": "one"}\n' + long_line + b"no newline at the end")
    reader.feed_eof()

    await asyncio.wait_for(_relay(reader), timeout=10)

    assert capfd.readouterr().err == (
        '{"event": "one"}\n' + long_line.decode() + "no newline at the end"
    )
    assert reader.at_eof()  # all read: nothing held back


def test_run_refuses_a_rolled_back_policy_in_its_checks_before_starting_a_half(
    deployment: Deployment,
) -> None:
    """`run`'s checks run in a child of their own (ADR 0031): still before any half, with the
    same one line, exit code and audit entry under the supervisor's writer."""
    state = deployment.directory / "plant-state"
    state.mkdir()
    deployment_id = deployment.document["deployment_id"]
    record = {"version": 99, "sha256": "ab" * 32, "deployment_id": deployment_id}
    (state / "policy-accepted.json").write_text(json.dumps(record))
    result = dmzbroker(
        "run", "--config", str(deployment.config), "--same-user", "--reset-state", check=False
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"dmzbroker: error: {deployment.policy}: version 1 is lower than version 99, already "
        "accepted here (rollback refused)"
    )
    assert "half_started" not in result.stderr
    assert not deployment.spool.exists()
    [refused] = audited(deployment, "supervisor", "policy_refused")
    assert refused["details"]["reason"] == "rollback"
    assert audited(deployment, "supervisor", "process_stopped") == []  # the checks' child
