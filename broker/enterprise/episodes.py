"""A fault that can repeat thousands of times a second, logged once per episode.

An episode starts with the first occurrence (logged at once, with what it was) and ends
when the caller says it is over, or after `quiet_s` without another occurrence; the end is
logged with the counts by kind and how long it lasted. In between, occurrences are only
counted. This never logs per occurrence: under a flood, that alone filled the disk.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any


class Episode:
    def __init__(self, log: Any, started: str, ended: str, quiet_s: float | None = None) -> None:
        self._log = log
        self._started = started
        self._ended = ended
        self._quiet_s = quiet_s
        self._counts: Counter[str] = Counter()
        self._since = 0.0
        self._last = 0.0
        self._check: asyncio.TimerHandle | None = None

    @property
    def active(self) -> bool:
        return bool(self._counts)

    def hit(self, kind: str, **first: object) -> None:
        """One occurrence; the first of an episode is logged with `first`."""
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        if not self._counts:
            self._since = self._last
            self._log.warning(self._started, reason=kind, **first)
        self._counts[kind] += 1
        if self._quiet_s is not None and self._check is None:
            self._check = loop.call_at(self._last + self._quiet_s, self._end_if_quiet)

    def end(self, **fields: object) -> None:
        """The fault is over: log the episode's end with its counts (no-op when none)."""
        if self._check is not None:
            self._check.cancel()
            self._check = None
        if not self._counts:
            return
        duration = asyncio.get_running_loop().time() - self._since
        counts, self._counts = dict(sorted(self._counts.items())), Counter()
        self._log.info(self._ended, duration_s=round(duration, 1), counts=counts, **fields)

    def _end_if_quiet(self) -> None:
        assert self._quiet_s is not None
        self._check = None
        loop = asyncio.get_running_loop()
        if loop.time() - self._last >= self._quiet_s:
            self.end()
        else:
            self._check = loop.call_at(self._last + self._quiet_s, self._end_if_quiet)
