"""A half's watch over its audit writer: tells the operator when it fails, recovers or fills.

The half calls `check()` a few times a second (it runs the log's own `check()` first) and
stops data crossing while it returns True. Each change is logged once, with structlog:
`audit_write_failed` (critical, saying what to do), `audit_write_recovered`, and
`audit_capacity_warning` once the segments take 80 % of the configured capacity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from broker.audit.retention import RESERVE

if TYPE_CHECKING:
    from broker.audit.log import AuditLog


class AuditMonitor:
    """Watches a writer's health for its half: logs failure, recovery and 80 % capacity."""

    CAPACITY_WARNING = RESERVE

    def __init__(self, audit: AuditLog, consequence: str) -> None:
        self._audit = audit
        self._consequence = consequence
        self.failing = False
        self._sync_told = False  # the operator was told of a failed fdatasync
        self._warned = False
        self._log = structlog.get_logger("audit")

    def check(self) -> bool:
        """True while the audit log cannot be written: nothing may cross meanwhile."""
        self._audit.check()
        failing = self._audit.failing
        # Read after `failing`: once set it stays, so a failure found between the two reads is
        # failing now and told now, not one interval later and a second time.
        sync_error = self._audit.sync_error
        failing = failing or sync_error is not None
        if failing != self.failing or (sync_error is not None and not self._sync_told):
            self.failing = failing
            if sync_error is not None:
                self._sync_told = True
                self._log.critical(
                    "audit_write_failed",
                    consequence=self._consequence,
                    error=f"fdatasync: {sync_error.strerror or sync_error}",
                    durable_seq=self._audit.durable,
                    action=(
                        f"entries after seq {self._audit.durable} may not be on disk, and no "
                        "later fdatasync can show they are: check the audit disk (dmesg), "
                        "restart dmzbroker, then run `dmzbroker audit verify`"
                    ),
                )
            elif self.failing:
                self._log.critical(
                    "audit_write_failed",
                    consequence=self._consequence,
                    action="free space on the audit file system or fix the audit directory",
                )
            else:
                self._log.warning("audit_write_recovered")
        usage = self._audit.usage
        if usage >= self.CAPACITY_WARNING and not self._warned:
            self._log.warning("audit_capacity_warning", used_pct=round(usage * 100))
        self._warned = usage >= self.CAPACITY_WARNING
        return self.failing
