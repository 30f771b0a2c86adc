"""Gate: only policy signals pass, island mode and an expired policy close it, drops are counted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
import structlog

from broker import policy
from broker.plant.connectors.base import RawSample
from broker.plant.gate import Gate
from broker.policy import Policy
from tests.harness import DEMO_POLICY

EXPIRES = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
BEFORE = EXPIRES - timedelta(days=1)
NOT_IN_POLICY = ["coldstore/machine-room/compressor-1/oil_level", "elsewhere/pump-9/flow"]


@pytest.fixture(scope="module")
def demo() -> Policy:
    return msgspec.structs.replace(policy.load(DEMO_POLICY), expires=EXPIRES)


def sample(signal: str) -> RawSample:
    return RawSample(signal=signal, raw=(1,), source_time=BEFORE, quality="good")


def allowed_paths(p: Policy) -> list[str]:
    return [s.path for s in p.signals]


def test_admits_every_policy_signal_in_order(demo: Policy) -> None:
    samples = [sample(path) for path in allowed_paths(demo)]
    gate = Gate(demo)
    assert gate.admit(samples, BEFORE) == samples
    assert sum(gate.dropped.values()) == 0


def test_drops_signals_the_policy_does_not_name_and_counts_them(demo: Policy) -> None:
    allowed = [sample(path) for path in allowed_paths(demo)[:3]]
    denied = [sample(path) for path in NOT_IN_POLICY]
    mixed = [denied[0], allowed[0], allowed[1], denied[1], allowed[2]]
    gate = Gate(demo)
    assert gate.admit(mixed, BEFORE) == allowed
    assert gate.dropped == {"policy_denied": len(denied)}


def test_denied_counts_add_up_over_batches(demo: Policy) -> None:
    gate = Gate(demo)
    for _ in range(3):
        gate.admit([sample(path) for path in NOT_IN_POLICY], BEFORE)
    assert gate.dropped["policy_denied"] == 3 * len(NOT_IN_POLICY)


def test_an_asset_path_is_not_a_signal(demo: Policy) -> None:
    asset = demo.assets[0].path
    gate = Gate(demo)
    assert gate.admit([sample(asset)], BEFORE) == []
    assert gate.dropped == {"policy_denied": 1}


def test_island_mode_drops_everything_even_allowed_signals(demo: Policy) -> None:
    samples = [sample(path) for path in allowed_paths(demo)] + [sample(NOT_IN_POLICY[0])]
    gate = Gate(demo)
    gate.island = True
    assert gate.admit(samples, BEFORE) == []
    assert gate.dropped == {"island_mode": len(samples)}


def test_leaving_island_mode_opens_the_gate_again(demo: Policy) -> None:
    samples = [sample(allowed_paths(demo)[0])]
    gate = Gate(demo)
    gate.island = True
    gate.admit(samples, BEFORE)
    gate.island = False
    assert gate.admit(samples, BEFORE) == samples
    assert gate.dropped == {"island_mode": 1}


@pytest.mark.parametrize(
    "now", [EXPIRES, EXPIRES + timedelta(microseconds=1), EXPIRES.replace(year=2031)]
)
def test_at_or_after_expiry_everything_is_dropped(demo: Policy, now: datetime) -> None:
    samples = [sample(path) for path in allowed_paths(demo)]
    gate = Gate(demo)
    assert gate.admit(samples, now) == []
    assert gate.dropped == {"policy_expired": len(samples)}


def test_one_microsecond_before_expiry_the_gate_is_open(demo: Policy) -> None:
    samples = [sample(path) for path in allowed_paths(demo)]
    gate = Gate(demo)
    assert gate.admit(samples, EXPIRES - timedelta(microseconds=1)) == samples
    assert "policy_expired" not in gate.dropped


def test_expiry_compares_instants_not_wall_clock_digits(demo: Policy) -> None:
    # 13:30 in UTC+01:30 is 12:00 UTC, exactly the expiry instant
    same_instant = EXPIRES.astimezone(timezone(timedelta(minutes=90)))
    gate = Gate(demo)
    assert gate.admit([sample(allowed_paths(demo)[0])], same_instant) == []
    assert gate.dropped == {"policy_expired": 1}


def test_an_empty_batch_counts_nothing(demo: Policy) -> None:
    gate = Gate(demo)
    assert gate.admit([], BEFORE) == []
    assert sum(gate.dropped.values()) == 0


def test_a_failing_audit_log_closes_the_gate_until_it_works_again(demo: Policy) -> None:
    gate = Gate(demo)
    samples = [sample(path) for path in allowed_paths(demo)[:3]]
    gate.audit_failing = True
    assert gate.admit(samples, BEFORE) == []
    assert gate.dropped["audit_failure"] == 3
    gate.audit_failing = False
    assert gate.admit(samples, BEFORE) == samples


def test_a_denied_point_is_logged_once_not_per_sample(demo: Policy) -> None:
    gate = Gate(demo)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            gate.admit([sample(path) for path in NOT_IN_POLICY], BEFORE)
    denied = [e["signal"] for e in logs if e["event"] == "point_denied"]
    assert denied == NOT_IN_POLICY
    assert gate.dropped["policy_denied"] == 3 * len(NOT_IN_POLICY)
