"""ContextTracker: an asset's state from its state signal, and each signal's context from its asset."""

from __future__ import annotations

import msgspec
import pytest

from broker import policy
from broker.plant.context import ContextTracker
from broker.policy import Asset, Policy
from broker.records import Context
from tests.harness import DEMO_POLICY


@pytest.fixture(scope="module")
def demo() -> Policy:
    return policy.load(DEMO_POLICY)


@pytest.fixture(scope="module")
def compressor(demo: Policy):
    """The first asset of the demo policy that has a state signal."""
    return next(a for a in demo.assets if a.state_signal is not None)


def signals_of(demo: Policy, asset_path: str) -> list[str]:
    return [s.path for s in demo.signals if s.path.rpartition("/")[0] == asset_path]


def state_of(tracker: ContextTracker, signal: str) -> str:
    return tracker.context_for(signal).asset_state


def test_unknown_before_the_state_signal_is_seen(demo: Policy, compressor) -> None:
    tracker = ContextTracker(demo)
    for signal in signals_of(demo, compressor.path):
        assert tracker.context_for(signal) == Context(asset_state="unknown")


@pytest.mark.parametrize("value", [True, 1, 2.5, -1, "on"])
def test_a_truthy_good_state_value_means_running(demo: Policy, compressor, value) -> None:
    tracker = ContextTracker(demo)
    tracker.observe(compressor.state_signal, value, good=True)
    assert state_of(tracker, compressor.state_signal) == "running"


@pytest.mark.parametrize("value", [False, 0, 0.0, "", None])
def test_a_falsy_good_state_value_means_stopped(demo: Policy, compressor, value) -> None:
    tracker = ContextTracker(demo)
    tracker.observe(compressor.state_signal, value, good=True)
    assert state_of(tracker, compressor.state_signal) == "stopped"


@pytest.mark.parametrize("value", [True, False])
def test_a_bad_state_sample_makes_the_state_unknown(demo: Policy, compressor, value) -> None:
    tracker = ContextTracker(demo)
    tracker.observe(compressor.state_signal, True, good=True)
    tracker.observe(compressor.state_signal, value, good=False)
    assert state_of(tracker, compressor.state_signal) == "unknown"


def test_the_latest_state_sample_wins(demo: Policy, compressor) -> None:
    tracker = ContextTracker(demo)
    expected = None
    for value in (True, False, True, False):
        tracker.observe(compressor.state_signal, value, good=True)
        expected = "running" if value else "stopped"
        assert state_of(tracker, compressor.state_signal) == expected


def test_every_signal_of_the_asset_gets_its_state(demo: Policy, compressor) -> None:
    tracker = ContextTracker(demo)
    tracker.observe(compressor.state_signal, True, good=True)
    siblings = signals_of(demo, compressor.path)
    assert len(siblings) > 1
    assert {state_of(tracker, signal) for signal in siblings} == {"running"}


def test_each_asset_follows_only_its_own_state_signal(demo: Policy) -> None:
    with_state = [a for a in demo.assets if a.state_signal is not None]
    assert len(with_state) >= 2
    first, second = with_state[:2]
    tracker = ContextTracker(demo)
    tracker.observe(first.state_signal, True, good=True)
    tracker.observe(second.state_signal, False, good=True)
    for signal in signals_of(demo, first.path):
        assert state_of(tracker, signal) == "running"
    for signal in signals_of(demo, second.path):
        assert state_of(tracker, signal) == "stopped"


def test_assets_without_a_state_signal_stay_unknown(demo: Policy) -> None:
    cold_room = "coldstore/storage/cold-room-1"
    listed = msgspec.structs.replace(demo, assets=[*demo.assets, Asset(path=cold_room)])
    tracker = ContextTracker(listed)
    for asset in demo.assets:
        tracker.observe(asset.state_signal, True, good=True)
    for signal in signals_of(listed, cold_room):
        tracker.observe(signal, True, good=True)  # door_open is truthy, but not a state
    assert signals_of(listed, cold_room)
    for signal in signals_of(listed, cold_room):
        assert state_of(tracker, signal) == "unknown"


def test_signals_of_assets_the_policy_does_not_list_stay_unknown(demo: Policy) -> None:
    listed = {a.path for a in demo.assets}
    others = [s.path for s in demo.signals if s.path.rpartition("/")[0] not in listed]
    assert others
    tracker = ContextTracker(demo)
    for asset in demo.assets:
        tracker.observe(asset.state_signal, True, good=True)
    for signal in others:
        assert state_of(tracker, signal) == "unknown"


def test_a_value_of_an_ordinary_signal_does_not_set_the_state(demo: Policy, compressor) -> None:
    ordinary = next(s for s in signals_of(demo, compressor.path) if s != compressor.state_signal)
    tracker = ContextTracker(demo)
    tracker.observe(ordinary, True, good=True)
    assert state_of(tracker, compressor.state_signal) == "unknown"


def test_context_follows_the_signal_path_not_a_prefix_of_it(demo: Policy, compressor) -> None:
    # a signal one level deeper belongs to another asset (its path without the last segment)
    tracker = ContextTracker(demo)
    tracker.observe(compressor.state_signal, True, good=True)
    assert state_of(tracker, f"{compressor.path}/sub-unit/temperature") == "unknown"
    assert state_of(tracker, f"{compressor.path}/anything") == "running"
