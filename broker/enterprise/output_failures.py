"""An output's failures, logged as `output_failed` once per outage (docs/specs/output.md).

Whatever part of an output fails (its run, its store listener, its `use_policy`, its stop),
the half goes on and the failure is said once, with the output's name and the stage it
failed in; the same failure again within the outage is not logged again. This module only
reports: it never retries, and never decides what the half does next.
"""

from __future__ import annotations

import math
import time

import structlog

MAX_REPORTED = 8  # distinct failures logged per outage: an error naming a value differs each time

log = structlog.get_logger("outputs")


class OutputFailures:
    """The failures of output `name`. An outage ends when the output has gone `quiet_s`
    without failing, or when `recovered()` says it works again."""

    def __init__(self, name: str, quiet_s: float = math.inf) -> None:
        self.name = name
        self._quiet_s = quiet_s
        self._reported: set[tuple[str, str]] = set()
        self._last = -math.inf

    def failed(self, stage: str, error: BaseException | str, **fields: object) -> None:
        """Log `output_failed` unless this failure was logged in this outage already."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        now = time.monotonic()
        if now - self._last >= self._quiet_s:
            self._reported.clear()
        self._last = now
        key = (stage, text)
        if key in self._reported or len(self._reported) >= MAX_REPORTED:
            return
        self._reported.add(key)
        log.error("output_failed", output=self.name, stage=stage, error=text, **fields)

    def recovered(self) -> None:
        """It worked for a while: its next failure starts a new outage."""
        self._reported.clear()
