"""What a reading of the running appliance could not learn, and why (`Unknown`).

`dmzbroker posture` reads what the halves write and what the kernel shows of them; a read that
fails becomes an `Unknown` with its reason, so one lost item never costs the whole report. It
never raises for what it reads, and never hides that something could not be read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import msgspec

T = TypeVar("T")


class Unknown(msgspec.Struct, frozen=True):
    """What could not be read, and why."""

    unknown: str


def guarded(read: Callable[[], T]) -> T | Unknown:
    """`read()`, or why it failed. Whatever it reads is a half's to write and may be made to
    fail in ways no parser documents: one item lost is better than the whole report."""
    try:
        return read()
    except Exception as e:  # see above
        return Unknown(reason(e))


def reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return str(error)
