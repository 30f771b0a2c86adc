"""Where a writer's audit segments are and how their lines are read back.

Shared by the writer, its retention, the verifier, `audit show` and the SIEM exporter, so
all of them agree on names and on what counts as a whole line. This module only reads: it
never creates, changes or deletes a segment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import msgspec

from broker.safe_files import read_regular

SUFFIX = ".jsonl"
# A writer ends a segment at `segment_bytes` (8 MiB by default) plus one entry; a "segment"
# far larger was not written by it, and is refused rather than read into memory whole.
MAX_SEGMENT_BYTES = 256 * 1024 * 1024


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"{number:010d}{SUFFIX}"


# Exactly what segment_path writes: ten ASCII digits (str.isdigit also takes `²` and `١`,
# which int() then refuses or reads as another number).
_NAME = re.compile(r"[0-9]{10}\.jsonl")


def segment_numbers(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(n[: -len(SUFFIX)]) for n in names if _NAME.fullmatch(n))


def read_lines(path: Path) -> tuple[list[bytes], bytes]:
    """The whole lines of a segment (without newlines), and any bytes after the last one.

    OSError for a segment that is not a regular file or is over MAX_SEGMENT_BYTES."""
    data = read_regular(path, MAX_SEGMENT_BYTES)
    end = data.rfind(b"\n") + 1
    return data[:end].split(b"\n")[:-1], data[end:]


def read_entries(path: Path) -> tuple[list[dict[str, Any]], bytes]:
    """The parseable lines of a segment as entries, and any bytes after them."""
    lines, tail = read_lines(path)
    entries: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            entries.append(msgspec.json.decode(line))
        except msgspec.DecodeError:
            return entries, b"\n".join(lines[i:]) + b"\n" + tail
    return entries, tail
