"""`dmzbroker demo`: the printed curl command works and shows both protocols (the Modbus PLC's
and the BACnet room controller's signals, with units, in one asset model), `--seconds` ends
it cleanly, and it warns about nothing it has just made itself; the printed OPC UA command
(asyncua's `uals`, an independent client process) browses the read-only mirror with the
API's values, the posture of the running demo matches its manifest (OPC UA port included),
and Ctrl-C stops it cleanly."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    REPO,
    demo_policy,
    dmzbroker,
    free_port,
    free_udp_port,
    write_policy_yaml,
)

pytestmark = pytest.mark.timeout(90)

CHILL_ROOM = "coldstore/storage/cold-room-2"
# The room controller's signals (BACnet) and the PLC's (Modbus) the chill room reads.
BACNET_UNITS = {
    f"{CHILL_ROOM}/temperature": "degC",
    f"{CHILL_ROOM}/setpoint": "degC",
    f"{CHILL_ROOM}/door_open": "",
    f"{CHILL_ROOM}/evaporator_fan": "",
}


def snapshot(curl_line: str) -> dict[str, dict[str, Any]]:
    result = subprocess.run([*shlex.split(curl_line), "--silent", "--show-error"],
                            capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
    return {r["signal"]: r for r in json.loads(result.stdout)["records"]}


def printed(
    demo: subprocess.Popen[str], out: Path, log: Path, ports: list[int], start: str = "curl "
) -> str:
    """The first whole line the demo prints that contains `start` at a word's start (its curl
    command by default), or "" once it cannot come: the demo ended, or said it cannot listen
    on one of `ports`, or 40 s passed."""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        lines = out.read_text().split("\n")[:-1]
        found = [line for line in lines if line.startswith(start) or f"/{start}" in line]
        if found:
            return found[0]
        errors = log.read_text()
        if demo.poll() is not None or any(
            f"cannot listen on 127.0.0.1:{p}:" in errors for p in ports
        ):
            return ""
        time.sleep(0.2)
    return ""


@contextmanager
def demo_on_free_ports(
    tmp_path: Path, seconds: float = 20, *, opcua: bool = True
) -> Iterator[tuple[subprocess.Popen[str], str, list[int]]]:
    """`dmzbroker demo --seconds N`, its plant, API and OPC UA server (`--opcua-port 0`
    without `opcua`) on free ports, once it printed its curl command: (the process, the
    command, the ports: PLC, room controller, API, OPC UA); stopped with its children if
    still running.
    A port free when picked may be taken by another test before the demo binds it: on that
    error, and on no other, it starts again on other ports, 3 times at most."""
    out, log = tmp_path / "demo.out", tmp_path / "demo.log"  # files: a pipe could fill up
    for attempt in range(3):
        ports = [free_port(), free_udp_port(), free_port(), free_port()]
        document = demo_policy(ports[0], poll_interval_s=0.5, bacnet_port=ports[1])
        policy = write_policy_yaml(tmp_path, document)
        with out.open("w") as stdout, log.open("w") as stderr:
            demo = subprocess.Popen(
                [sys.executable, "-m", "broker", "demo", "--seconds", str(seconds),
                 "--workdir", str(tmp_path / "demo"), "--policy", str(policy),
                 "--port", str(ports[2]), "--opcua-port", str(ports[3] if opcua else 0)],
                stdout=stdout, stderr=stderr, text=True, cwd=REPO,
                start_new_session=True,  # so a failed test can stop the demo and its children
            )  # fmt: skip
        try:
            curl_line = printed(demo, out, log, ports)
            if curl_line:
                yield demo, curl_line, ports
                return
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait(timeout=10)
        errors = log.read_text()
        taken = any(f"cannot listen on 127.0.0.1:{p}:" in errors for p in ports)
        assert taken and attempt < 2, f"the demo printed no curl command: {errors[-2000:]}"


def test_demo_prints_a_curl_command_that_works_then_stops_by_itself(tmp_path: Path) -> None:
    """Without its OPC UA server (`--opcua-port 0`): the API alone, as before it had one."""
    with demo_on_free_ports(tmp_path, opcua=False) as (demo, curl_line, _):
        deadline = time.monotonic() + 40
        records: dict[str, dict[str, Any]] = {}

        wanted = {"coldstore/storage/cold-room-1/temperature", *BACNET_UNITS}
        for _ in range(40):  # both halves may take a few scans to report every device
            records = snapshot(curl_line)
            if wanted <= set(records) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert wanted <= set(records), sorted(records)
        for path, unit in BACNET_UNITS.items():
            record = records[path]
            assert record["quality"] == "good", record
            assert record["unit"] == unit, record
            assert record["context"]["asset"] == CHILL_ROOM
        # One asset, two protocols: the PLC's compressor in the room controller's asset.
        assert type(records[f"{CHILL_ROOM}/temperature"]["value"]) is float
        assert type(records[f"{CHILL_ROOM}/door_open"]["value"]) is bool
        context = records[f"{CHILL_ROOM}/evaporator_fan"]["context"]
        assert type(context["ambient"]["compressor_running"]) is bool
        assert context["asset_state"] in {"door_open", "cooling", "idle"}
        assert demo.wait(timeout=40) == 0
    # The enterprise half looks at its certificates when it starts: the demo's are fresh.
    events = (tmp_path / "demo.log").read_text()
    assert '"logger": "enterprise"' in events or "[enterprise" in events, events[-2000:]
    assert "certificate_expiring" not in events
    assert "opcua" not in (tmp_path / "demo" / "broker.yaml").read_text()
    assert "uals" not in (tmp_path / "demo.out").read_text()


def test_demo_refuses_to_wipe_a_directory_that_is_not_its_own(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = dmzbroker("demo", "--seconds", "1", "--workdir", str(tmp_path), check=False)
    assert result.returncode == 2
    assert "is not a demo directory" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "no-room-controller",
            "the demo plant is one Modbus device and one BACnet device, not modbus",
        ),
        (
            "other-instance",
            "device 'room-controller': the demo's room controller is BACnet device 1001, not 7",
        ),
    ],
)
def test_demo_refuses_a_policy_whose_devices_the_simulated_plant_does_not_serve(
    tmp_path: Path, change: str, message: str
) -> None:
    document = demo_policy(free_port())
    if change == "no-room-controller":
        document["devices"] = document["devices"][:1]
        document["signals"] = [
            s for s in document["signals"] if s.get("device") != "room-controller"
        ]
        document["assets"] = [a for a in document["assets"] if a["path"] != CHILL_ROOM]
    else:
        document["devices"][1]["device_instance"] = 7
    policy = write_policy_yaml(tmp_path, document)
    result = dmzbroker("demo", "--seconds", "1", "--workdir", str(tmp_path / "demo"),
                       "--policy", str(policy), check=False)  # fmt: skip
    assert result.returncode == 2
    assert f"dmzbroker: error: {policy}: {message}" in result.stderr
    assert not (tmp_path / "demo").exists()  # refused before anything was made


def browse(uals_line: str, *, secure: bool = True) -> subprocess.CompletedProcess[str]:
    """The demo's `uals` command, as printed, or without its --security (no certificate)."""
    argv = shlex.split(uals_line)
    if not secure:
        at = argv.index("--security")
        del argv[at : at + 2]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def uals_values(listing: str) -> dict[str, str]:
    """Signal path -> value, from `uals -l`'s variable lines (NodeId `ns=2;s=PATH`, then
    BrowseName, DataType, timestamp, value)."""
    values = {}
    for line in listing.splitlines():
        fields = line.split()
        ids = [f for f in fields if f.startswith("ns=2;s=")]
        if ids and fields[-1] != ids[0]:  # an object's line ends with its NodeId
            values[ids[0].removeprefix("ns=2;s=")] = fields[-1]
    return values


@pytest.mark.timeout(180)
def test_demo_prints_an_opcua_command_that_browses_the_apis_values(tmp_path: Path) -> None:
    setpoint = f"{CHILL_ROOM}/setpoint"  # the room controller's, constant in the simulation
    with demo_on_free_ports(tmp_path, seconds=120) as (demo, curl_line, ports):
        uals_line = printed(demo, tmp_path / "demo.out", tmp_path / "demo.log", ports, "uals ")
        assert f"opc.tcp://localhost:{ports[3]}" in uals_line, uals_line
        listing: dict[str, str] = {}
        for _ in range(20):  # the mirror shows a signal once its first record came
            result = browse(uals_line)
            assert result.returncode == 0, result.stderr[-2000:]
            listing = uals_values(result.stdout)
            if setpoint in listing and f"{CHILL_ROOM}/door_open" in listing:
                break
            time.sleep(0.5)
        assert float(listing[setpoint]) == snapshot(curl_line)[setpoint]["value"], listing
        assert listing[f"{CHILL_ROOM}/door_open"] in {"True", "False"}
        assert "coldstore/machine-room/compressor-1/suction_pressure" in listing
        # without the consumer's application certificate, nothing
        refused = browse(uals_line, secure=False)
        assert refused.returncode != 0 and "ns=2;s=" not in refused.stdout

        # the running demo listens on exactly its manifest: the API and the OPC UA port
        config = tmp_path / "demo" / "broker.yaml"
        found = dmzbroker("posture", "--config", str(config), "--json", "--same-user", check=False)
        manifest = json.loads(found.stdout)
        assert found.returncode == 0, manifest["mismatches"]
        assert manifest["manifest"]["enterprise"] == [
            {"protocol": "tcp", "address": "127.0.0.1", "port": port} for port in sorted(ports[2:])
        ]

        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: both halves and the servers stop
        assert demo.wait(timeout=60) == 0
    assert "Traceback" not in (tmp_path / "demo.log").read_text()
