"""`dmzbroker demo`: the printed curl command works, `--seconds` ends it cleanly, and it warns
about nothing it has just made itself."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import REPO, demo_policy, dmzbroker, free_port, write_policy_yaml

pytestmark = pytest.mark.timeout(90)


def test_demo_prints_a_curl_command_that_works_then_stops_by_itself(tmp_path: Path) -> None:
    policy = write_policy_yaml(tmp_path, demo_policy(free_port(), poll_interval_s=0.5))
    workdir = tmp_path / "demo"
    log = (tmp_path / "demo.log").open("w+")  # a file: a pipe nobody reads could fill up
    demo = subprocess.Popen(
        [sys.executable, "-m", "broker", "demo", "--seconds", "12", "--workdir", str(workdir),
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
        result = subprocess.run([*shlex.split(curl_line), "--silent", "--show-error"],
                                capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
        records = json.loads(result.stdout)["records"]
        assert {r["signal"] for r in records} >= {"coldstore/storage/cold-room-1/temperature"}
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
