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

from broker.plant.connectors import RawSample
from broker.policy import Policy


class Gate:
    def __init__(self, policy: Policy) -> None:
        self._allowed = frozenset(s.path for s in policy.signals)
        self._expires = policy.expires
        self.island = False  # set by the plant half from the island flag
        self.audit_failing = False  # fail closed: nothing crosses that cannot be audited
        self.dropped: Counter[str] = Counter()  # reason → samples dropped

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
        return admitted
