"""The building blocks every section of the policy's schema uses: the strict struct (unknown
keys refused, ADR 0002), the spelling of names, and the bounds of a time in seconds.

Pure: nothing here touches the network or the file system, and nothing here knows a section
of the policy (devices: `device_schema`; sources, the semantic model, access: `schema`).
"""

from __future__ import annotations

import math
import re
from typing import Annotated

import msgspec
from msgspec import Meta

SEGMENT = r"[a-z0-9][a-z0-9_-]{0,62}"
NAME = re.compile(SEGMENT)
SPELLING = "lowercase letters, digits, '-' and '_'"

Seconds = Annotated[float, Meta(ge=0.05, le=86_400)]


class Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


def check_name(field: str, value: str, pattern: re.Pattern[str], shape: str) -> None:
    if not pattern.fullmatch(value):
        raise ValueError(f"{field} {value!r}: must be {shape} of {SPELLING}")


def check_finite(field: str, *values: float) -> None:
    """A number of the policy is finite: JSON, the signed form, holds no other (YAML's `.inf`
    and `.nan` do), and a bound of infinity means no bound at all."""
    for value in values:
        if not math.isfinite(value):
            raise ValueError(f"{field}: must be a finite number, not {value}")
