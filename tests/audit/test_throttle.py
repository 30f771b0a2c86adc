"""Outsider-caused events: the first few per (event, source) and interval in full, the rest
counted into one summary per interval, with a cap over all sources and a capacity reserve.

The throttle is given a clock the test moves, so intervals end exactly when the test says.
"""

from __future__ import annotations

from typing import Any

from broker.audit.throttle import Limits, Throttle

DENIED = "consumer_denied"
HANDSHAKE = "tls_handshake_failed"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**limits: Any) -> tuple[Throttle, Clock]:
    clock = Clock()
    return Throttle(Limits(**limits), clock), clock


def flood(throttle: Throttle, event: str, source: str, count: int, reserved: bool = False) -> int:
    """Offer `count` events; how many were admitted in full."""
    return sum(throttle.admit(event, source, reserved=reserved) for _ in range(count))


def test_the_first_few_per_source_are_written_and_the_rest_counted_once_per_interval() -> None:
    throttle, clock = make(per_source=5, interval_s=60)
    assert flood(throttle, DENIED, "spiffe://a", 1000) == 5
    assert flood(throttle, HANDSHAKE, "10.0.0.9", 7) == 5  # its own budget
    assert throttle.summary(reserved=False) is None  # the interval is not over
    clock.now += 59.9
    assert throttle.summary(reserved=False) is None
    clock.now += 0.1
    summary = throttle.summary(reserved=False)  # due without any new event
    assert summary is not None
    assert summary["suppressed"] == 997 and summary["written"] == 10
    assert summary["by_event"] == {DENIED: 995, HANDSHAKE: 2}
    assert summary["by_source"] == [
        {"event": DENIED, "source": "spiffe://a", "count": 995},
        {"event": HANDSHAKE, "source": "10.0.0.9", "count": 2},
    ]
    assert summary["other_sources"] == {"pairs": 0, "count": 0}
    assert summary["capacity_reserve"] is False
    assert throttle.summary(reserved=False) is None  # one summary per interval
    assert flood(throttle, DENIED, "spiffe://a", 10) == 5  # a new interval, a new budget
    assert throttle.suppressed == {DENIED: 1000, HANDSHAKE: 2}  # since start


def test_an_interval_without_anything_counted_gives_no_summary() -> None:
    throttle, clock = make(per_source=5)
    flood(throttle, DENIED, "a", 5)
    clock.now += 61
    assert throttle.summary(reserved=False) is None


def test_many_sources_cannot_multiply_the_budget() -> None:
    throttle, clock = make(per_source=10, overall=50)
    written = sum(flood(throttle, DENIED, f"10.0.{i // 256}.{i % 256}", 10) for i in range(1000))
    assert written == 50
    clock.now += 60
    summary = throttle.summary(reserved=False)
    assert summary is not None and summary["suppressed"] == 10_000 - 50


def test_a_summary_names_the_largest_sources_and_sums_the_rest() -> None:
    throttle, _ = make(per_source=0, top_sources=3)
    for i in range(10):
        flood(throttle, DENIED, f"source-{i}", i + 1)  # source-9 sends most
    summary = throttle.summary(reserved=False, final=True)
    assert summary is not None
    assert [s["source"] for s in summary["by_source"]] == ["source-9", "source-8", "source-7"]
    assert summary["other_sources"] == {"pairs": 7, "count": sum(range(1, 8))}
    assert summary["suppressed"] == sum(range(1, 11))


def test_memory_is_bounded_by_the_pairs_tracked() -> None:
    throttle, _ = make(per_source=0, tracked=100, top_sources=5)
    for i in range(5000):
        flood(throttle, HANDSHAKE, f"2001:db8::{i:x}", 1)
    summary = throttle.summary(reserved=False, final=True)
    assert summary is not None
    assert summary["suppressed"] == 5000
    assert summary["other_sources"] == {"pairs": 95, "count": 5000 - 5}


def test_a_long_source_is_counted_by_its_beginning() -> None:
    throttle, _ = make(per_source=1)
    flood(throttle, DENIED, "x" * 10_000 + "1", 3)
    flood(throttle, DENIED, "x" * 10_000 + "2", 3)
    summary = throttle.summary(reserved=False, final=True)
    assert summary is not None
    assert summary["by_source"] == [{"event": DENIED, "source": "x" * 128, "count": 5}]


def test_in_the_capacity_reserve_nothing_is_written_and_an_interval_lasts_longer() -> None:
    throttle, clock = make(per_source=5, interval_s=60, reserve_interval_s=3600)
    assert flood(throttle, DENIED, "a", 100, reserved=True) == 0
    clock.now += 61
    assert throttle.summary(reserved=True) is None  # one summary an hour in the reserve
    clock.now += 3600
    summary = throttle.summary(reserved=True)
    assert summary is not None and summary["capacity_reserve"] is True
    assert summary["suppressed"] == 100


def test_leaving_the_reserve_ends_its_long_interval() -> None:
    throttle, clock = make(per_source=5, reserve_interval_s=3600)
    flood(throttle, DENIED, "a", 10, reserved=True)
    clock.now += 1
    summary = throttle.summary(reserved=False)  # retention made room again
    assert summary is not None and summary["suppressed"] == 10
    assert flood(throttle, DENIED, "a", 10) == 5


def test_the_final_summary_is_due_at_once() -> None:
    throttle, _ = make(per_source=1)
    flood(throttle, DENIED, "a", 3)
    summary = throttle.summary(reserved=False, final=True)
    assert summary is not None and summary["suppressed"] == 2
