"""Cyclic garbage collection paused while a policy is built or taken apart, and settled
once it is in use.

A policy of 100,000 signals is millions of new objects, none of them garbage: each 700
allocations would start a collection, and the older generations' collections walk
everything made so far (40 % of `policy verify` at that size). Reference counting still
frees what is dropped meanwhile. Never used around code that runs for long.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

YOUNG_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def paused_throughout(command: Callable[P, R]) -> Callable[P, R]:
    """A short-lived command (`policy compile`, `policy verify`) run with collection paused
    from start to end, not only while it parses: what it does next with the parsed policy
    (the budget report's read plans) would otherwise start collections that walk all of it
    again. The command's own objects are freed when it returns, before collection resumes,
    so the first collection after it finds only what is left."""

    @functools.wraps(command)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        with collection_paused():
            return command(*args, **kwargs)

    return paused


def settle() -> None:
    """Once a half's policy is in use (at start and after each reload): every object alive
    now (hundreds of MB at 100,000 signals) leaves the cyclic collector's view, so no full
    collection walks it again (ADR 0031). What an earlier settle froze, a replaced policy
    among it, is examined once more first, and the cycles a parse left while collection was
    paused are freed, never frozen for good."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def tune_garbage_collector() -> None:
    """Fewer young collections, in each half. Samples and records carry lists and dicts that
    the cyclic collector tracks though they never form cycles; at CPython's default it took
    45 % of the enterprise half's time (docs/performance.md). Reference counting still frees
    each of them as soon as it is done with; only cyclic garbage waits longer."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
