"""Raw samples → records: gate, decode, quality checks, context. Synchronous; no device I/O.

The gate comes first, so a point the policy does not name is not even decoded. A scan's
values are all observed before any record is built, so every record of a scan carries the
asset state and alerts of that same scan. Derived signals are computed from the scan and
leave as records of their own. Proposed signals go all the way through (their quality is
tallied for `dmzbroker validate`) and are dropped at the very end: they never reach the
spool.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import structlog

from broker.plant.connectors import RawSample
from broker.plant.context import ContextEngine
from broker.plant.decode import DecodeError, decoder_for
from broker.plant.gate import Gate
from broker.plant.maintenance import MaintenanceBook
from broker.plant.quality import QualityChecks
from broker.policy import Policy
from broker.policy.schema import DerivedSource
from broker.records import Quality, QualityIssue, Record, Value

log = structlog.get_logger("pipeline")

_READ_FAILED = [QualityIssue(check="read_failed", detail="the device gave no value for this read")]
_UNCERTAIN_AT_SOURCE = QualityIssue(check="device_status", detail="the device marked it uncertain")
_NO_INPUTS = [
    QualityIssue(check="inputs_missing", detail="an input of the expression is missing or bad")
]

# signal, value, quality, source time, why not good
_Decoded = tuple[str, Value, Quality, datetime, list[QualityIssue]]


class PlantPipeline:
    def __init__(self, policy: Policy, maintenance: MaintenanceBook | None = None) -> None:
        self._version = policy.version
        self.gate = Gate(policy)
        self.checks = QualityChecks(policy.signals)
        self._context = ContextEngine(policy, maintenance or MaintenanceBook(None))
        self._decoders = {
            s.path: decoder_for(s)
            for s in policy.signals
            if not isinstance(s.source, DerivedSource)
        }
        self._units = {s.path: s.unit for s in policy.signals}

    def process(self, samples: Sequence[RawSample]) -> list[Record]:
        now = datetime.now(UTC)
        decoded: list[_Decoded] = []
        touched: set[str] = set()
        stamp, t = None, 0.0
        for sample in self.gate.admit(samples, now):
            if sample.source_time is not stamp:  # a scan's samples share one time
                stamp, t = sample.source_time, sample.source_time.timestamp()
            value, quality, issues = self._decode(sample, t)
            self.checks.tally(sample.signal, quality, issues, t)
            asset = self._context.observe(sample.signal, value if quality != "bad" else None, t)
            if asset is not None:
                touched.add(asset)
            decoded.append((sample.signal, value, quality, sample.source_time, issues))
        if decoded:
            decoded.extend(self._derive(touched, max(d[3] for d in decoded)))
        records = []
        for path, value, quality, source_time, issues in decoded:
            records.append(
                Record(
                    signal=path,
                    value=value,
                    unit=self._units[path],
                    quality=quality,
                    source_time=source_time,
                    broker_time=now,
                    policy_version=self._version,
                    context=self._context.context_for(path, value, issues),
                )
            )
        return self.gate.publishable(records)

    def _decode(self, sample: RawSample, t: float) -> tuple[Value, Quality, list[QualityIssue]]:
        if sample.raw is None or sample.quality == "bad":
            return None, "bad", _READ_FAILED
        try:
            value = self._decoders[sample.signal](sample.raw)
        except DecodeError as e:
            log.warning("sample_undecodable", signal=sample.signal, error=str(e))
            return None, "bad", [QualityIssue(check="undecodable", detail=str(e))]
        issues = self.checks.check(sample.signal, value, t)
        if sample.quality == "uncertain":
            issues = [_UNCERTAIN_AT_SOURCE, *issues]
        return value, ("uncertain" if issues else sample.quality), issues

    def _derive(self, assets: set[str], source_time: datetime) -> list[_Decoded]:
        t = source_time.timestamp()
        derived: list[_Decoded] = []
        for signal, value in self._context.refresh(assets, t):
            issues = _NO_INPUTS if value is None else self.checks.check(signal.path, value, t)
            quality: Quality = "bad" if value is None else "uncertain" if issues else "good"
            self.checks.tally(signal.path, quality, issues, t)
            derived.append((signal.path, value, quality, source_time, issues))
        return derived
