"""The policy gate: only what the policy names crosses, and every drop is counted.

Compiled once from the accepted policy into a frozen set and an expiry time, so the hot path
is one comparison per batch and one set lookup per sample: no parsing and no policy engine
call per sample. Island mode, a failing audit log and an expired policy close the gate for
everything.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime

import structlog

from broker.plant.connectors.base import RawSample
from broker.policy import Policy
from broker.records import Record

log = structlog.get_logger("gate")


class Gate:
    def __init__(self, policy: Policy) -> None:
        self._allowed = frozenset(s.path for s in policy.signals)
        self._proposed = frozenset(s.path for s in policy.signals if s.lifecycle == "proposed")
        self._expires = policy.expires
        self.island = False  # set by the plant half from the island flag
        self.audit_failing = False  # fail closed: nothing crosses that cannot be audited
        self.dropped: Counter[str] = Counter()  # reason → samples dropped
        self._reported: set[str] = set()

    def admit(self, samples: Sequence[RawSample], now: datetime) -> list[RawSample]:
        if self.island:
            self.dropped["island_mode"] += len(samples)
            return []
        if self.audit_failing:
            self.dropped["audit_failure"] += len(samples)
            return []
        if now >= self._expires:
            self.dropped["policy_expired"] += len(samples)
            return []
        admitted = [s for s in samples if s.signal in self._allowed]
        if len(admitted) != len(samples):
            self.dropped["policy_denied"] += len(samples) - len(admitted)
            for sample in samples:
                if sample.signal not in self._allowed and sample.signal not in self._reported:
                    self._reported.add(sample.signal)  # audited once per point, not per sample
                    log.warning("point_denied", signal=sample.signal, reason="not in the policy")
        return admitted

    def publishable(self, records: list[Record]) -> list[Record]:
        """The records that may cross: a proposed signal is validated here, never published."""
        if not self._proposed:
            return records
        kept = [r for r in records if r.signal not in self._proposed]
        if len(kept) != len(records):
            self.dropped["proposed_signal"] += len(records) - len(kept)
        return kept
