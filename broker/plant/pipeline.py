"""Raw samples → records: gate, decode, context. Pure and synchronous; no I/O.

The gate comes first, so a point the policy does not name is not even decoded. Within a
batch, state signals are observed before records are built, so every record of a scan
carries the asset state of that same scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import structlog

from broker.plant.connectors import RawSample
from broker.plant.context import ContextTracker
from broker.plant.decode import DecodeError, decoder_for
from broker.plant.gate import Gate
from broker.policy import Policy
from broker.records import Record, Value

log = structlog.get_logger("pipeline")


class PlantPipeline:
    def __init__(self, policy: Policy) -> None:
        self._version = policy.version
        self.gate = Gate(policy)
        self._context = ContextTracker(policy)
        self._decoders = {s.path: decoder_for(s) for s in policy.signals}
        self._units = {s.path: s.unit for s in policy.signals}

    def process(self, samples: Sequence[RawSample]) -> list[Record]:
        now = datetime.now(UTC)
        decoded: list[tuple[RawSample, Value, bool]] = []
        for sample in self.gate.admit(samples, now):
            value, good = self._decode(sample)
            self._context.observe(sample.signal, value, good)
            decoded.append((sample, value, good))
        return [
            Record(
                signal=sample.signal,
                value=value,
                unit=self._units[sample.signal],
                quality=sample.quality if good else "bad",
                source_time=sample.source_time,
                broker_time=now,
                policy_version=self._version,
                context=self._context.context_for(sample.signal),
            )
            for sample, value, good in decoded
        ]

    def _decode(self, sample: RawSample) -> tuple[Value, bool]:
        if sample.raw is None or sample.quality == "bad":
            return None, False
        try:
            return self._decoders[sample.signal](sample.raw), True
        except DecodeError as e:
            log.warning("sample_undecodable", signal=sample.signal, error=str(e))
            return None, False
