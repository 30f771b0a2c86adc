"""Cyclic garbage collection paused while a policy is built or taken apart.

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
