"""Shared by the passive discovery tests: the real CLI's --json document, the known plant's
recording and capture made once per test run (whichever xdist worker asks first; the other
waits for it), and Hypothesis without its too_slow health check (a loaded 2-core machine
is slow to generate the stream-shaped examples, which says nothing about the code)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pickle
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.harness import dmzbroker
from tests.passive.plant_capture import Recording, record, write_capture

settings.register_profile("passive", suppress_health_check=[HealthCheck.too_slow])


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """Import this folder's test modules under the "passive" profile: a test's settings take
    the profile in force when its module is imported, and only here is it this one."""
    if not isinstance(collector, pytest.Module):
        return (yield)
    outside = settings.get_current_profile_name()
    settings.load_profile("passive")
    try:
        return (yield)
    finally:
        settings.load_profile(outside)


def run_discover(*args: str) -> subprocess.CompletedProcess[str]:
    """`dmzbroker discover pcap ARGS...` in a child process, whatever its outcome."""
    return dmzbroker("discover", "pcap", *args, check=False)


def discover(capture: Path, *more: str) -> dict[str, Any]:
    """`dmzbroker discover pcap CAPTURE --json MORE...` in a child process: its document, once
    it exited 0 without a traceback."""
    done = run_discover(str(capture), "--json", *more)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def once_per_run(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """The file `name`, made by `make(path)` once per test run: the first worker to ask makes
    it while holding a lock, the others wait on the lock, then read what it made."""
    # every worker's base folder is in the run's own folder (pytest-xdist); alone, the run's
    root = factory.getbasetemp()
    shared = root.parent if "PYTEST_XDIST_WORKER" in os.environ else root
    path = shared / name
    with (shared / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.exists():
            part = shared / f"{name}.part"  # a failed `make` leaves no half-made file
            make(part)
            part.rename(path)
    return path


@pytest.fixture(scope="session")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    """200 s of the refrigeration simulator polled by the scripted SCADA, recorded once."""

    def make(path: Path) -> None:
        path.write_bytes(pickle.dumps(asyncio.run(record())))

    path = once_per_run(tmp_path_factory, "plant.pickle", make)
    recorded: Recording = pickle.loads(path.read_bytes())  # this run wrote it
    return recorded


@pytest.fixture(scope="session")
def plant_pcap(recording: Recording, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recording as a pcap, without impairments."""

    def make(path: Path) -> None:
        write_capture(path, recording)

    return once_per_run(tmp_path_factory, "plant.pcap", make)
