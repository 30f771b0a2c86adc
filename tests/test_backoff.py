"""Backoff: the delays every retrying part of the broker waits."""

from __future__ import annotations

from broker.backoff import Backoff


def test_backoff_doubles_up_to_the_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(initial_s=0.5, max_s=4.0)
    delays = [backoff.delay() for _ in range(6)]
    for delay, nominal in zip(delays, [0.5, 1, 2, 4, 4, 4], strict=True):
        assert 0.8 * nominal <= delay <= 1.2 * nominal
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.delay() <= 0.6


def test_a_try_that_lasted_long_enough_starts_the_delays_afresh() -> None:
    backoff = Backoff(1.0, 30.0, fresh_after_s=60.0, jitter=(1.0, 1.0))
    assert [backoff.after(ran_s=5.0) for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff.after(ran_s=59.9) == 16.0  # short of fresh_after_s: the same incident
    assert backoff.after(ran_s=60.0) == 1.0  # it worked for a while: a new incident
    assert backoff.after(ran_s=0.0) == 2.0


def test_without_fresh_after_only_reset_starts_over() -> None:
    backoff = Backoff(1.0, 4.0, jitter=(1.0, 1.0))
    assert [backoff.after(ran_s=1e9) for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]
