"""Device isolation: every device's connector is built and run under a `SupervisedDevice`,
which contains what either raises.

A connector maps the failures it expects (a device that does not answer, a certificate that
is refused) and retries on its own. Anything else it raises, or that the protocol library
under it raises, ends only that device's run: its signals go `bad`, the failure is logged
(and audited) once, and the connector runs again after the device's own backoff. Building
the connector is supervised the same way: what a device needs from the appliance config (an
OPC UA trust list, a password file, a user entry) may be missing or unreadable, at start or
after a policy reload; that device is `bad` and its connector is built again after the
backoff, so a file fixed later brings it up without a restart. The other devices and the
plant half never see it. This module must never let an exception other than a stop request
leave it, never retry faster than the backoff allows, and never log a failure again while
the device keeps failing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import structlog

from broker.backoff import Backoff
from broker.plant.connectors.base import Connector, Emit, RawSample

FIRST_RETRY_S = 1.0  # the backoff doubles from here, up to MAX_RETRY_S
MAX_RETRY_S = 30.0
STABLE_S = 60.0  # a run that lasted this long before failing starts the backoff afresh


class SupervisedDevice:
    """One device: its connector once built, and the counters /metrics reads from it (a
    failed build counts as an error of the device)."""

    def __init__(self, device: str, build: Callable[[], Connector], signals: Sequence[str]) -> None:
        self.device = device
        self._build = build
        self._signals = signals  # the device's signal paths: all `bad` while it fails
        self.connector: Connector | None = None
        self.failed_builds = 0

    @property
    def scans(self) -> int:
        return self.connector.scans if self.connector is not None else 0

    @property
    def overruns(self) -> int:
        return self.connector.overruns if self.connector is not None else 0

    @property
    def errors(self) -> int:
        return self.failed_builds + (self.connector.errors if self.connector is not None else 0)

    @property
    def last_scan_s(self) -> float:
        return self.connector.last_scan_s if self.connector is not None else 0.0

    async def run(self, emit: Emit, first_retry_s: float = FIRST_RETRY_S) -> None:
        """Build the connector and run it until cancelled, whatever either raises."""
        log = structlog.get_logger("connector").bind(device=self.device)
        backoff = Backoff(first_retry_s, MAX_RETRY_S, fresh_after_s=STABLE_S)
        loop = asyncio.get_running_loop()
        failing = False  # since the last failure, no value other than `bad` was emitted

        async def watched(samples: list[RawSample]) -> None:
            nonlocal failing
            if failing and any(sample.quality != "bad" for sample in samples):
                failing = False
                log.info("device_connector_recovered")
            await emit(samples)

        while True:
            started = loop.time()
            stage = "build" if self.connector is None else "run"
            try:
                if self.connector is None:
                    self.connector = self._build()
                    stage = "run"
                await self.connector.run(watched)
                error = "its connector stopped without being asked to"
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # a stop request: the half is stopping or reloading
                # A library that cancelled one of its own futures, not a stop: a failure.
                error = "CancelledError raised inside the connector, not a stop request"
            except Exception as e:  # containing everything is what this method is for
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            # Each failure counts for /metrics; only the first is logged.
            if self.connector is None:
                self.failed_builds += 1
            else:
                self.connector.errors += 1
            retry_in_s = backoff.after(loop.time() - started)
            if not failing:
                failing = True
                log.warning(
                    "device_connector_failed",
                    stage=stage,
                    error=error if stage == "run" else f"its connector cannot be built: {error}",
                    retry_in_s=round(retry_in_s, 3),
                    signals=len(self._signals),
                )
            now = datetime.now(UTC)
            await emit([RawSample(path, None, now, "bad") for path in self._signals])
            await asyncio.sleep(retry_in_s)
