"""The policy gate: only what the policy names crosses, and every drop is counted.

Compiled once from the loaded policy into a frozen set, so the hot path is one set lookup
per sample: no parsing and no policy engine call per sample.
"""

from __future__ import annotations

from collections import Counter

from broker.policy import Policy


class Gate:
    def __init__(self, policy: Policy) -> None:
        self._allowed = frozenset(s.path for s in policy.signals)
        self.dropped: Counter[str] = Counter()  # reason → samples dropped

    def admits(self, signal: str) -> bool:
        if signal in self._allowed:
            return True
        self.dropped["policy_denied"] += 1
        return False
