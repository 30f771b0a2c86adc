"""`dmzbroker demo`: the printed curl command works and shows both protocols (the Modbus PLC's
and the BACnet room controller's signals, with units, in one asset model), `--seconds` ends
it cleanly, and it warns about nothing it has just made itself."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
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


def test_demo_prints_a_curl_command_that_works_then_stops_by_itself(tmp_path: Path) -> None:
    document = demo_policy(free_port(), poll_interval_s=0.5, bacnet_port=free_udp_port())
    policy = write_policy_yaml(tmp_path, document)
    workdir = tmp_path / "demo"
    log = (tmp_path / "demo.log").open("w+")  # a file: a pipe nobody reads could fill up
    demo = subprocess.Popen(
        [sys.executable, "-m", "broker", "demo", "--seconds", "20", "--workdir", str(workdir),
         "--policy", str(policy), "--port", str(free_port())],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
        start_new_session=True,  # so a failed test can stop the demo and its children together
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        curl_line = ""
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not curl_line:
            line = demo.stdout.readline()
            if not line:
                break
            if line.startswith("curl "):
                curl_line = line.strip()
        assert curl_line, "the demo printed no curl command"
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
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(timeout=10)
        demo.stdout.close()
        log.close()
    # The enterprise half looks at its certificates when it starts: the demo's are fresh.
    events = (tmp_path / "demo.log").read_text()
    assert '"logger": "enterprise"' in events or "[enterprise" in events, events[-2000:]
    assert "certificate_expiring" not in events


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
