"""Cyclic garbage collection paused while a policy is built or taken apart, and settled
once it is in use.

A policy of 100,000 signals is millions of new objects, none of them garbage: each 700
allocations would start a collection, and the older generations' collections walk
everything made so far (40 % of `policy verify` at that size). Reference counting still
frees what is dropped meanwhile. Never used around code that runs for long.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def settle() -> None:
    """Once a half's policy is in use (at start and after each reload): every object alive
    now (hundreds of MB at 100,000 signals) leaves the cyclic collector's view, so no full
    collection walks it again (ADR 0031). What an earlier settle froze, a replaced policy
    among it, is examined once more first, and the cycles a parse left while collection was
    paused are freed, never frozen for good."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
