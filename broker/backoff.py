"""Waiting before trying again: exponential backoff with jitter, for everything that retries
(device connectors and their supervision, the half supervisor, the SIEM export).

It only computes delays: it never sleeps, never retries, and never gives up on its own.
"""

from __future__ import annotations

import math
import random


class Backoff:
    """Delays that double from `initial_s` up to `max_s`, each scaled by a random factor in
    `jitter` so that peers failing together do not retry in step."""

    def __init__(
        self,
        initial_s: float,
        max_s: float = 30.0,
        *,
        fresh_after_s: float = math.inf,
        jitter: tuple[float, float] = (0.8, 1.2),
    ) -> None:
        self._initial = initial_s
        self._max = max_s
        self._fresh_after = fresh_after_s
        self._jitter = jitter
        self._next = initial_s

    def delay(self) -> float:
        """The next wait in seconds; each call doubles the following one up to the cap."""
        current = self._next
        self._next = min(self._max, self._next * 2)
        return current * random.uniform(*self._jitter)  # noqa: S311 - jitter, not secrecy

    def after(self, ran_s: float) -> float:
        """The wait after a try that lasted `ran_s`: one that lasted `fresh_after_s` or more
        worked for a while, so its failure is a new incident and the delays start afresh."""
        if ran_s >= self._fresh_after:
            self.reset()
        return self.delay()

    def reset(self) -> None:
        self._next = self._initial
