"""The supervisor every connector runs under: what a connector raises stays with its device.

The connectors here are stand-ins that raise on demand: no real device or library produces
an arbitrary exception type when asked. tests/plant/test_run.py shows the same with real
devices in the plant half, tests/plant/connectors/test_opcua_faults.py with a real server.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from broker.audit.catalogue import EVENTS
from broker.errors import TrustError
from broker.plant.connectors.base import Emit, RawSample
from broker.plant.connectors.supervision import SupervisedDevice
from tests.harness import eventually

pytestmark = pytest.mark.timeout(30)

SIGNALS = ["site/line/plc/power", "site/line/plc/running"]


class DeviceGlitch(Exception):
    """Something no connector expects."""


class Flaky:
    """Raises `fault` in its first `failures` runs (after `good_first` good scans), then scans."""

    def __init__(self, fault: BaseException, failures: int, good_first: int = 0) -> None:
        self.scans = self.overruns = self.errors = 0
        self.last_scan_s = 0.0
        self.fault, self.failures, self.good_first = fault, failures, good_first
        self.runs: list[float] = []  # when each run started (monotonic)

    async def run(self, emit: Emit) -> None:
        self.runs.append(time.monotonic())
        failing = len(self.runs) <= self.failures
        for scan in range(10**9):
            if failing and scan == self.good_first:
                raise self.fault
            now = datetime.now(UTC)
            await emit([RawSample(path, 1.0, now, "good") for path in SIGNALS])
            self.scans += 1
            await asyncio.sleep(0.01)


class Collector:
    def __init__(self) -> None:
        self.batches: list[list[RawSample]] = []

    async def emit(self, samples: list[RawSample]) -> None:
        self.batches.append(samples)

    def qualities(self) -> list[str]:
        return [batch[0].quality for batch in self.batches]


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def logged(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events if e["event"].startswith("device_connector")]


@pytest.mark.parametrize(
    "fault",
    [AssertionError(), DeviceGlitch("register map changed"), RuntimeError("bug"), KeyError("x")],
)
async def test_any_exception_marks_the_signals_bad_once_and_the_device_recovers(
    events: list[dict[str, Any]], fault: Exception
) -> None:
    connector = Flaky(fault, failures=3)
    collector = Collector()
    task = asyncio.create_task(
        SupervisedDevice("plc", lambda: connector, SIGNALS).run(collector.emit, 0.01)
    )
    try:
        await eventually(lambda: connector.scans >= 3, timeout=10)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    bad = [batch for batch in collector.batches if batch[0].quality == "bad"]
    assert len(bad) == 3  # one batch per failure, every signal in it, no value
    assert all({s.signal for s in batch} == set(SIGNALS) for batch in bad)
    assert all(s.raw is None and s.quality == "bad" for batch in bad for s in batch)
    assert collector.qualities()[-1] == "good"
    assert connector.errors == 3  # every failure counted for /metrics
    assert logged(events) == [  # once per state change, not per retry
        "device_connector_failed",
        "device_connector_recovered",
    ]
    failed = next(e for e in events if e["event"] == "device_connector_failed")
    assert failed["device"] == "plc" and type(fault).__name__ in failed["error"]
    assert failed["signals"] == len(SIGNALS) and failed["retry_in_s"] > 0
    assert {"device_connector_failed", "device_connector_recovered"} <= set(EVENTS)  # audited


async def test_a_connector_that_fails_after_good_scans_is_logged_at_each_change(
    events: list[dict[str, Any]],
) -> None:
    connector = Flaky(RuntimeError("after a while"), failures=2, good_first=2)
    collector = Collector()
    task = asyncio.create_task(
        SupervisedDevice("plc", lambda: connector, SIGNALS).run(collector.emit, 0.01)
    )
    try:
        await eventually(lambda: len(connector.runs) >= 3 and connector.scans >= 8, timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert logged(events) == [
        "device_connector_failed",
        "device_connector_recovered",
        "device_connector_failed",
        "device_connector_recovered",
    ]


async def test_retries_back_off_exponentially() -> None:
    connector = Flaky(DeviceGlitch(), failures=4)
    task = asyncio.create_task(
        SupervisedDevice("plc", lambda: connector, SIGNALS).run(Collector().emit, 0.05)
    )
    try:
        await eventually(lambda: len(connector.runs) >= 5, timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    gaps = [b - a for a, b in zip(connector.runs, connector.runs[1:], strict=False)]
    for i, gap in enumerate(gaps[:4]):
        assert gap >= 0.8 * 0.05 * 2**i, gaps  # 0.05, 0.1, 0.2, 0.4 s, each ±20 %


async def test_a_stop_request_is_never_contained() -> None:
    connector = Flaky(DeviceGlitch(), failures=0)
    task = asyncio.create_task(
        SupervisedDevice("plc", lambda: connector, SIGNALS).run(Collector().emit, 0.01)
    )
    await eventually(lambda: connector.scans >= 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancellation_raised_inside_a_library_is_a_failure_not_a_stop(
    events: list[dict[str, Any]],
) -> None:
    """A library awaiting a future it cancelled itself raises CancelledError with no stop
    request: left alone, the device's task would end quietly and its signals stay as
    they were."""
    connector = Flaky(asyncio.CancelledError(), failures=1)
    collector = Collector()
    task = asyncio.create_task(
        SupervisedDevice("plc", lambda: connector, SIGNALS).run(collector.emit, 0.01)
    )
    try:
        await eventually(lambda: connector.scans >= 1, timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert collector.qualities()[0] == "bad"
    assert logged(events)[0] == "device_connector_failed"


@pytest.mark.parametrize("fault", [SystemExit(3), KeyboardInterrupt()])
async def test_process_exits_are_not_contained(fault: BaseException) -> None:
    connector = Flaky(fault, failures=1)
    with pytest.raises(type(fault)):
        await SupervisedDevice("plc", lambda: connector, SIGNALS).run(Collector().emit, 0.01)


async def test_a_connector_that_cannot_be_built_is_bad_once_and_built_again_after_backoff(
    events: list[dict[str, Any]],
) -> None:
    """What a device needs from the appliance config (an OPC UA trust list, a password file)
    can be unreadable at start or after a reload: that device is bad, not the half."""
    builds: list[float] = []
    connector = Flaky(DeviceGlitch(), failures=0)

    def build() -> Flaky:
        builds.append(time.monotonic())
        if len(builds) <= 3:
            raise TrustError("/etc/dmzbroker/opcua-trust/plc.pem: not a readable certificate")
        return connector

    device = SupervisedDevice("plc", build, SIGNALS)
    collector = Collector()
    task = asyncio.create_task(device.run(collector.emit, 0.02))
    try:
        await eventually(lambda: device.scans >= 3, timeout=10)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert collector.qualities()[:3] == ["bad", "bad", "bad"]
    assert collector.qualities()[-1] == "good"
    gaps = [b - a for a, b in itertools.pairwise(builds)]
    assert all(gap >= 0.8 * 0.02 * 2**i for i, gap in enumerate(gaps)), gaps  # backed off
    assert len(builds) == 4 and device.connector is connector  # built once it could be
    assert device.failed_builds == 3 and device.errors == 3  # in /metrics as device errors
    assert logged(events) == ["device_connector_failed", "device_connector_recovered"]
    failed = next(e for e in events if e["event"] == "device_connector_failed")
    assert failed["stage"] == "build"
    assert failed["error"] == (
        "its connector cannot be built: TrustError: "
        "/etc/dmzbroker/opcua-trust/plc.pem: not a readable certificate"
    )
