"""The scripted SCADA (`python -m broker.sim.scada_poller`) as the README starts it: beside a
simulator that may not be listening yet. It waits for it (bounded), then polls and writes;
with nothing there at all it gives up with one error line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker.sim.refrigeration import RefrigerationPlant
from tests.harness import REPO, eventually, free_port, stop_process

pytestmark = pytest.mark.timeout(60)


def poller(port: int, log: Path, *more: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "broker.sim.scada_poller", "--port", str(port), *more],
            cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def test_the_poller_waits_for_a_simulator_that_starts_after_it(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "poller.log"
    process = poller(port, log, "--seconds", "1")
    try:
        # refused at least once: only then does the simulator start
        await eventually(lambda: b"waiting for" in log.read_bytes(), timeout=30)
        plant = RefrigerationPlant(port=port)
        await plant.start()
        try:
            await eventually(lambda: process.poll() is not None, timeout=30)
        finally:
            await plant.stop()
    finally:
        stop_process(process)
    assert process.returncode == 0, log.read_text()
    assert f"exchanges with 127.0.0.1:{port}" in log.read_text()


def test_with_no_simulator_the_poller_gives_up_in_one_line(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "poller.log"
    process = poller(port, log, "--connect-s", "0.5")
    try:
        process.wait(timeout=30)
    finally:
        stop_process(process)
    assert process.returncode == 2
    *waiting, line = log.read_text().splitlines()
    assert waiting == [f"scada_poller: waiting for 127.0.0.1:{port} (up to 0.5 s)"]
    assert line.startswith(f"scada_poller: error: 127.0.0.1:{port}: ")
    assert f"dmzbroker sim refrigeration --port {port}" in line
