"""`dmzbroker audit show`: filter the writers' entries, merged in time order, and print them
as an aligned table, JSON, CSV or CEF.

Entries hold text that outsiders chose (a requested path, a certificate's name), so this module
never prints a character a terminal, a spreadsheet or a SIEM would act on: one entry is one
line in every format, control and other non-printable characters (C0, DEL, C1, U+2028/2029,
bidi overrides, zero-width and other format characters) are spelled out as escapes, CSV cells
cannot start a formula (OWASP CSV injection) and CEF fields are escaped as the ArcSight CEF
specification says.
"""

from __future__ import annotations

import csv
import heapq
import io
import math
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from broker import __version__
from broker.audit.catalogue import SUPPRESSED
from broker.audit.segments import SUFFIX, read_entries, segment_numbers
from broker.audit.verify import writers
from broker.errors import ConfigError

COLUMNS = ("time", "writer", "seq", "event", "category", "outcome", "actor", "object")
# A table column is as wide as its widest cell up to this, in terminal columns (`_width`); a
# longer cell (free text an outsider chose) pushes the rest of its own line only. The last
# column is never padded.
MAX_WIDTH = 40
_SEVERITY = {"failure": 7, "unknown": 5, "success": 3}


@dataclass(frozen=True)
class Filters:
    since: datetime | None = None
    until: datetime | None = None
    event: str | None = None
    category: str | None = None
    outcome: str | None = None
    actor: str | None = None
    writer: str | None = None

    def keep(self, entry: dict[str, Any]) -> bool:
        time = _parse_time(entry.get("time"))
        return (
            (self.since is None or (time is not None and time >= self.since))
            and (self.until is None or (time is not None and time <= self.until))
            and all(
                wanted is None or entry.get(name) == wanted
                for name, wanted in (
                    ("event", self.event),
                    ("category", self.category),
                    ("outcome", self.outcome),
                    ("actor", self.actor),
                    ("writer", self.writer),
                )
            )
        )


def parse_filter_time(text: str | None, option: str) -> datetime | None:
    """An RFC 3339 time from the command line; without a zone it is taken as UTC."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as e:
        raise ConfigError(
            f"{option} {text!r}: not an RFC 3339 time, e.g. 2026-11-25T08:00:00Z"
        ) from e
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _parse_time(value: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


@dataclass(frozen=True)
class Entries:
    """The kept entries of every writer, merged in time order; each writer's own entries
    stay in chain order. Read from the files again each time it is iterated (the table is
    laid out in two passes without holding the log in memory)."""

    root: Path
    filters: Filters

    def __iter__(self) -> Iterator[dict[str, Any]]:
        chains = [
            self._chain(directory)
            for directory in writers(self.root)
            if self.filters.writer is None or directory.name == self.filters.writer
        ]
        # Ties keep the writers' order (by name); an entry without a readable time follows
        # the entry before it in its chain.
        return heapq.merge(*chains, key=_sort_key)

    def _chain(self, directory: Path) -> Iterator[dict[str, Any]]:
        for number in segment_numbers(directory):
            found, _ = read_entries(directory / f"{number:010d}{SUFFIX}")
            yield from (e for e in found if self.filters.keep(e))


def entries(root: Path, filters: Filters) -> Entries:
    return Entries(root, filters)


def _sort_key(entry: dict[str, Any]) -> float:
    time = _parse_time(entry.get("time"))
    if time is None:
        return -math.inf
    return (time if time.tzinfo else time.replace(tzinfo=UTC)).timestamp()


def render(found: Iterable[dict[str, Any]], fmt: str) -> Iterator[str]:
    if fmt == "json":
        yield from (_json_inert(msgspec.json.encode(e).decode()) for e in found)
    elif fmt == "csv":
        out = io.StringIO()
        table = csv.writer(out, lineterminator="\n")
        table.writerow([*COLUMNS, "details"])
        yield out.getvalue().rstrip("\n")
        for entry in found:
            out.seek(0)
            out.truncate()
            details = _json_inert(msgspec.json.encode(entry.get("details") or {}).decode())
            cells = [*(inert(_text(entry.get(c))) for c in COLUMNS), details]
            table.writerow([_no_formula(cell) for cell in cells])
            yield out.getvalue().rstrip("\n")
    elif fmt == "cef":
        yield from (_cef(e) for e in found)
    else:
        yield from _table(found)


def _table(found: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Aligned columns: a first pass over the entries measures them, a second prints."""
    if isinstance(found, Iterator):
        raise RuntimeError("the table reads the entries twice: pass an Entries, not an iterator")
    widths = [len(c) for c in COLUMNS]
    for cells in map(_cells, found):
        widths = [
            max(w, min(_width(cell), MAX_WIDTH)) for w, cell in zip(widths, cells, strict=True)
        ]
    yield _line(COLUMNS, widths)
    yield from (_line(_cells(entry), widths) for entry in found)


def _cells(entry: dict[str, Any]) -> list[str]:
    cells = [_text(entry.get(c)) for c in COLUMNS]
    if entry.get("event") == SUPPRESSED and not cells[-1]:
        cells[-1] = _counted(entry.get("details"))
    return [inert(cell) for cell in cells]


def _line(cells: Sequence[str], widths: list[int]) -> str:
    padded = [
        pad + cell if name == "seq" else cell + pad
        for name, cell, width in zip(COLUMNS[:-1], cells[:-1], widths, strict=False)
        for pad in [" " * (width - _width(cell))]
    ]
    return "  ".join([*padded, cells[-1]]).rstrip()


def _width(cell: str) -> int:
    """The terminal columns `cell` takes: a wide or fullwidth character (CJK, East Asian
    Width W or F) two, a combining mark none (it sits on the character before), others one."""
    if cell.isascii():  # nearly every cell: no lookup per character
        return len(cell)
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in cell
    )


_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# OWASP's list of characters that make a spreadsheet read a cell as a formula. TAB and CR
# cannot start a cell here (`inert` spelled them out), but the list is kept whole.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def inert(text: str) -> str:
    """`text` with backslashes doubled and every non-printable character spelled out as
    `\\n`, `\\r`, `\\t`, `\\xNN`, `\\uNNNN` or `\\UNNNNNNNN` (so the text says which it was)."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_SHORT.get(c) or (c if c.isprintable() else _spelled(c)) for c in text)


def _spelled(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _json_inert(line: str) -> str:
    """A JSON line with the non-printable characters JSON lets through raw (DEL, C1, U+2028,
    bidi overrides, ...) written as `\\u` escapes: it decodes to the same value."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else _json_escape(ord(c)) for c in line)


def _json_escape(code: int) -> str:
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # beyond the BMP: a UTF-16 surrogate pair, as JSON spells it
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _no_formula(cell: str) -> str:
    """A CSV cell a spreadsheet shows as text: one that would start a formula gets a single
    quote in front (OWASP's recommendation), which spreadsheets display as text."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def _counted(details: object) -> str:
    """An `events_suppressed` entry in a few words: what it counted, from how many sources,
    and the events most counted."""
    if not isinstance(details, dict):
        return ""
    named = details.get("by_source")
    named = named if isinstance(named, list) else []
    sources = len({(s.get("kind"), s.get("source")) for s in named if isinstance(s, dict)})
    others = details.get("other_sources")
    if isinstance(others, dict):  # {"pairs", "count"} per kind of source
        sources += sum(o.get("pairs", 0) for o in others.values() if isinstance(o, dict))
    text = f"{details.get('suppressed', '?')} events from {sources} sources"
    if details.get("capacity_reserve"):
        text += " (capacity reserve)"
    by_event = details.get("by_event")
    if isinstance(by_event, dict) and by_event:
        most = sorted(by_event.items(), key=lambda item: -item[1])[:3]
        text += ": " + ", ".join(f"{event} {count}" for event, count in most)
    return text


def _text(value: object) -> str:
    return "" if value is None else str(value)


# ArcSight CEF: a backslash is escaped everywhere; a pipe in header fields; an equals sign,
# CR and LF (as \r and \n) in extension values. Any other non-printable character (and CR or
# LF in a header field, where the specification allows none) becomes the text of its escape,
# e.g. \x1b, with that backslash escaped: a SIEM shows the text, never the character. Extension
# keys are fixed names of the CEF dictionary: nothing from an entry becomes a key.
_CEF_HEADER = {"\\": "\\\\", "|": "\\|"}
_CEF_EXTENSION = {"\\": "\\\\", "=": "\\=", "\n": "\\n", "\r": "\\r"}


def _cef_escape(value: object, *, header: bool) -> str:
    escapes = _CEF_HEADER if header else _CEF_EXTENSION
    return "".join(
        escapes.get(c) or (c if c.isprintable() else "\\" + inert(c)) for c in _text(value)
    )


def _cef(entry: dict[str, Any]) -> str:
    """ArcSight CEF: header fields, then extensions with the chain position."""
    header = "|".join(
        _cef_escape(v, header=True)
        for v in (
            "CEF:0",
            "dmzbroker",
            "dmzbroker",
            __version__,
            entry.get("event"),
            entry.get("event"),
            _SEVERITY.get(str(entry.get("outcome")), 5),
        )
    )
    extensions = {
        "rt": entry.get("time"),
        "cat": entry.get("category"),
        "outcome": entry.get("outcome"),
        "suser": entry.get("actor"),
        "cs1Label": "object",
        "cs1": entry.get("object"),
        "cs2Label": "writer",
        "cs2": entry.get("writer"),
        "cn1Label": "seq",
        "cn1": entry.get("seq"),
        "cs3Label": "hash",
        "cs3": entry.get("hash"),
    }
    tail = " ".join(
        f"{k}={_cef_escape(v, header=False)}" for k, v in extensions.items() if v is not None
    )
    return f"{header}|{tail}"
