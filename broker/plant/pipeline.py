"""Raw samples → records: gate, decode, quality checks, context. Synchronous; no device I/O.

The gate comes first, so a point the policy does not name is not even decoded. A scan's
values are all observed before any record is built, so every record of a scan carries the
asset state and alerts of that same scan. Derived signals are computed from the scan and
leave as records of their own. Proposed signals go all the way through (their quality is
tallied for `dmzbroker validate`) and are dropped at the very end: they never reach the
spool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

import structlog

from broker.plant.connectors.base import RawSample
from broker.plant.context import ContextEngine
from broker.plant.decode import DecodeError, decoders_for
from broker.plant.gate import Gate
from broker.plant.maintenance import MaintenanceBook
from broker.plant.quality import NO_ISSUES, QualityChecks
from broker.policy import Policy
from broker.policy.schema import DerivedSource
from broker.records import Context, Quality, QualityIssue, Record, Value

log = structlog.get_logger("pipeline")

_READ_FAILED = [QualityIssue(check="read_failed", detail="the device gave no value for this read")]
_UNCERTAIN_AT_SOURCE = QualityIssue(check="device_status", detail="the device marked it uncertain")
_NO_INPUTS = [
    QualityIssue(
        check="inputs_missing",
        detail="no value: an input of the expression is missing or bad, or its arithmetic "
        "failed (division by zero, overflow)",
    )
]

_NO_CONTEXT = Context()
# A source time further ahead of the broker's clock is a device clock that is wrong: the
# value is uncertain and kept out of history (one such time would hold every window still).
AHEAD_TOLERANCE_S = 60.0


class PlantPipeline:
    def __init__(self, policy: Policy, maintenance: MaintenanceBook | None = None) -> None:
        self._version = policy.version
        self.gate = Gate(policy)
        self.checks = QualityChecks(policy.signals)
        self._context = ContextEngine(policy, maintenance or MaintenanceBook(None))
        self._decoders = decoders_for(
            s for s in policy.signals if not isinstance(s.source, DerivedSource)
        )
        self._units = {s.path: s.unit for s in policy.signals}

    def process(self, samples: Sequence[RawSample]) -> list[Record]:
        now = datetime.now(UTC)
        clock = now.timestamp()
        records: list[Record] = []
        issues_of: list[list[QualityIssue]] = []  # each record's, for its context
        touched: set[str | None] = set()
        stamp, read, t, seen, ahead = None, None, 0.0, 0.0, False
        newest_read = -math.inf  # the derived signals' checks go by it
        newest: datetime | None = None  # the latest source time: the derived signals'
        # bound once: the loop runs for every sample, and does what one sample needs in
        # place (its decoding, its record) rather than in calls of its own
        decoders, units, version = self._decoders, self._units, self._version
        check, checked = self.checks.check, self.checks.checked
        tally, observe = self.checks.tally, self._context.observe
        add_record, add_issues = records.append, issues_of.append
        for sample in self.gate.admit(samples, now):
            # A scan's samples share their times. History follows the source time `t`; the
            # checks and tallies (flatline, rate, gaps) follow `seen`, when it was read.
            if sample.source_time is not stamp or sample.read_time is not read:
                stamp, read = sample.source_time, sample.read_time
                t = stamp.timestamp()
                seen = t if read is None else read.timestamp()
                newest_read = max(newest_read, seen)
                newest = stamp if newest is None or stamp > newest else newest
                ahead = t - clock > AHEAD_TOLERANCE_S
            signal, raw, quality = sample.signal, sample.raw, sample.quality
            value: Value = None
            if raw is None or quality == "bad":
                quality, issues = "bad", _unread(sample.reason)
            else:
                try:
                    value = decoders[signal](raw)
                except DecodeError as e:
                    log.warning("sample_undecodable", signal=signal, error=str(e))
                    quality, issues = "bad", [QualityIssue(check="undecodable", detail=str(e))]
                else:
                    issues = check(signal, value, seen) if signal in checked else NO_ISSUES
                    if quality == "uncertain":
                        issues = [_said_uncertain(sample.reason), *issues]
                    elif issues:
                        quality = "uncertain"
            if ahead and quality != "bad":
                quality, issues = "uncertain", [_ahead_of(t - clock), *issues]
            tally(signal, quality, issues, seen)
            touched.add(observe(signal, value, quality, t))  # None: no modelled asset
            add_record(
                Record(
                    signal=signal,
                    value=value,
                    unit=units[signal],
                    quality=quality,
                    source_time=stamp,
                    broker_time=now,
                    policy_version=version,
                    context=_NO_CONTEXT,  # set once the whole scan is observed
                )
            )
            add_issues(issues)
        touched.discard(None)
        if touched and newest is not None:
            assets = cast("set[str]", touched)  # None left out above
            # at the scan's time, or the broker's if a device clock is ahead of it
            at = min(newest, now)
            for record, issues in self._derive(assets, at, newest_read, now):
                records.append(record)
                issues_of.append(issues)
        # The context last: every record of a scan carries the state and alerts of the scan.
        context_for = self._context.context_for
        for record, issues in zip(records, issues_of, strict=True):
            record.context = context_for(record.signal, record.value, issues)
        return self.gate.publishable(records)

    def _record(
        self, signal: str, value: Value, quality: Quality, source_time: datetime, now: datetime
    ) -> Record:
        """A derived signal's record (a sample's is made in `process`, as this one is)."""
        return Record(
            signal=signal,
            value=value,
            unit=self._units[signal],
            quality=quality,
            source_time=source_time,
            broker_time=now,
            policy_version=self._version,
            context=_NO_CONTEXT,  # set once the whole scan is observed
        )

    def _derive(
        self, assets: set[str], source_time: datetime, seen: float, now: datetime
    ) -> list[tuple[Record, list[QualityIssue]]]:
        """The derived signals of these assets at `source_time`, checked as read at `seen`."""
        t = source_time.timestamp()
        checks = self.checks
        derived = []
        for signal, value in self._context.refresh(assets, t):
            issues = _NO_INPUTS if value is None else checks.check(signal.path, value, seen)
            quality: Quality = "bad" if value is None else "uncertain" if issues else "good"
            checks.tally(signal.path, quality, issues, seen)
            self._context.observe(signal.path, value, quality, t)
            derived.append((self._record(signal.path, value, quality, source_time, now), issues))
        return derived


def _unread(reason: str | None) -> list[QualityIssue]:
    """Why a sample the device gave no good value for is bad: in its own words if it said."""
    if reason is None:
        return _READ_FAILED
    return [QualityIssue(check="device_status", detail=reason)]


def _said_uncertain(reason: str | None) -> QualityIssue:
    """The device marked the value uncertain, in its own words if it said why."""
    return (
        _UNCERTAIN_AT_SOURCE
        if reason is None
        else QualityIssue(check="device_status", detail=reason)
    )


def _ahead_of(seconds: float) -> QualityIssue:
    return QualityIssue(
        check="clock_ahead",
        detail=f"stamped {seconds:.0f} s ahead of the broker's clock: check the device's clock",
    )
