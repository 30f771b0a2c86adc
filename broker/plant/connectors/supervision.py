"""Device isolation: every connector runs under `supervise`, which contains what it raises.

A connector maps the failures it expects (a device that does not answer, a certificate that
is refused) and retries on its own. Anything else it raises, or that the protocol library
under it raises, ends only that device's run: its signals go `bad`, the failure is logged
(and audited) once, and the connector runs again after the device's own backoff. The other
devices and the plant half never see it. This module must never let an exception other
than a stop request leave it, never retry faster than the backoff allows, and never log a
failure again while the device keeps failing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import structlog

from broker.plant.connectors.base import Backoff, Connector, Emit, RawSample

FIRST_RETRY_S = 1.0  # the backoff doubles from here, up to MAX_RETRY_S
MAX_RETRY_S = 30.0
STABLE_S = 60.0  # a run that lasted this long before failing starts the backoff afresh


async def supervise(
    device: str,
    connector: Connector,
    signals: Sequence[str],
    emit: Emit,
    first_retry_s: float = FIRST_RETRY_S,
) -> None:
    """Run `connector` until cancelled, whatever it raises; `signals` are its signal paths."""
    log = structlog.get_logger("connector").bind(device=device)
    backoff = Backoff(first_retry_s, MAX_RETRY_S)
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
        try:
            await connector.run(watched)
            error = "its connector stopped without being asked to"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # a stop request: the half is stopping or reloading
            # A library that cancelled one of its own futures, not a stop: a failure.
            error = "CancelledError raised inside the connector, not a stop request"
        except Exception as e:  # containing everything is what this function is for
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        connector.errors += 1  # each failure counts for /metrics; only the first is logged
        if loop.time() - started >= STABLE_S:
            backoff.reset()  # it ran well for a while: this is a new failure, not the same one
        retry_in_s = backoff.delay()
        if not failing:
            failing = True
            log.warning(
                "device_connector_failed",
                error=error,
                retry_in_s=round(retry_in_s, 3),
                signals=len(signals),
            )
        now = datetime.now(UTC)
        await emit([RawSample(path, None, now, "bad") for path in signals])
        await asyncio.sleep(retry_in_s)
