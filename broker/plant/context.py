"""Operational context added at the edge: for now, each asset's state.

An asset's state comes from its `state_signal` in the policy: truthy → running, falsy →
stopped, missing or bad → unknown. Context comes only from plant-side knowledge, never
from the enterprise side.
"""

from __future__ import annotations

from broker.policy import Policy
from broker.records import AssetState, Context, Value

_CONTEXTS: dict[AssetState, Context] = {
    state: Context(asset_state=state) for state in ("running", "stopped", "unknown")
}


class ContextTracker:
    def __init__(self, policy: Policy) -> None:
        self._asset_of_state_signal = {
            a.state_signal: a.path for a in policy.assets if a.state_signal is not None
        }
        self._context_of_asset: dict[str, Context] = {}

    def observe(self, signal: str, value: Value, good: bool) -> None:
        """Take note of a sample; updates its asset's state if it is a state signal."""
        asset = self._asset_of_state_signal.get(signal)
        if asset is not None:
            state: AssetState = ("running" if value else "stopped") if good else "unknown"
            self._context_of_asset[asset] = _CONTEXTS[state]

    def context_for(self, signal: str) -> Context:
        return self._context_of_asset.get(signal.rpartition("/")[0], _CONTEXTS["unknown"])
