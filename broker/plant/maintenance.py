"""Maintenance status per asset, from the file a CMMS exports (CSV or YAML).

The file is provisioned on the plant side, never fed from the enterprise side: a file that
someone other than root or this half's user could have written (it, a folder above it or a
link on the way is another user's, or group- or world-writable, as a share the IT side
writes would be) is refused. It is re-read when it changes (checked at most once a second);
a file that is removed, cannot be read, is refused or does not parse is logged with what and
where, and the last good contents are kept until a good file is back. Never writes the file.

CSV: a header row `asset,last_service,next_due,open_work_orders`, dates as YYYY-MM-DD,
work orders as `ID: title` separated by `;`. YAML: a list of mappings with the same keys,
`open_work_orders` a list of `{id, title}`.
"""

from __future__ import annotations

import csv
import io
import os
import stat
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Literal

import msgspec
import structlog

from broker import documents
from broker.config import MaintenanceConfig
from broker.errors import ConfigError
from broker.records import Maintenance, WorkOrder

RECHECK_S = 1.0
_UNKNOWN = Maintenance(status="unknown")
# (mtime_ns, ctime_ns, size, why others could have written it) of what was looked at
_Seen = tuple[int, int, int, str | None]
_UNREADABLE: _Seen = (-1, -1, -1, None)
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH

log = structlog.get_logger("maintenance")


class _Entry(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    asset: str
    last_service: date | None = None
    next_due: date | None = None
    open_work_orders: list[WorkOrder] = []


class MaintenanceBook:
    def __init__(self, config: MaintenanceConfig | None) -> None:
        self._config = config
        self._entries: dict[str, _Entry] = {}
        # ctime and who could write it too, so that a permission change alone (chmod of the
        # file or of a folder above it) makes the file be tried again
        self._seen: _Seen | None = None
        self._checked = -RECHECK_S
        self._status: dict[str, Maintenance] = {}
        self._today: date | None = None

    def status(self, asset: str) -> Maintenance:
        self._refresh()
        return self._status.get(asset, _UNKNOWN)

    def _refresh(self) -> None:
        if self._config is None:
            return
        now = time.monotonic()
        if now - self._checked < RECHECK_S:  # a new file, or a new day, shows within a second
            return
        self._checked = now
        today = date.today()
        changed = self._reread(self._config.file)
        if changed or today != self._today:
            self._today = today
            self._status = {a: self._judge(e, today) for a, e in self._entries.items()}

    def _reread(self, path: Path) -> bool:
        try:
            status = path.stat()
            others = writable_by_others(path)
        except OSError as e:
            if self._seen != _UNREADABLE:  # once per state change, not every second
                log.warning("maintenance_file_unreadable", file=str(path), error=str(e))
            self._seen = _UNREADABLE
            return False
        seen = (status.st_mtime_ns, status.st_ctime_ns, status.st_size, others)
        if seen == self._seen:
            return False
        self._seen = seen
        if others is not None:
            log.warning(
                "maintenance_file_refused",
                path=str(path),
                reason="writable_by_others",
                error=others,
                kept="the last good contents",
                fix="keep it and each folder above it owned by root or this half's user and"
                " not group- or world-writable: a copy on the plant side, never an IT share",
            )
            return False
        try:
            entries = load_entries(path)
        except ConfigError as e:
            log.warning(
                "maintenance_file_refused",
                path=str(path),
                reason="invalid",
                error=str(e),
                kept="the last good contents",
            )
            return False
        self._entries = {e.asset: e for e in entries}
        log.info("maintenance_file_loaded", file=str(path), assets=len(entries))
        return True

    def _judge(self, entry: _Entry, today: date) -> Maintenance:
        assert self._config is not None
        status: Literal["ok", "due", "overdue", "unknown"]
        if entry.next_due is None:
            status = "unknown"
        elif entry.next_due < today:
            status = "overdue"
        elif entry.next_due <= today + timedelta(days=self._config.due_within_days):
            status = "due"
        else:
            status = "ok"
        return Maintenance(
            status=status,
            last_service=entry.last_service.isoformat() if entry.last_service else None,
            next_due=entry.next_due.isoformat() if entry.next_due else None,
            open_work_orders=entry.open_work_orders,
        )


def writable_by_others(path: Path) -> str | None:
    """Why someone other than root or this process's user could have written `path`: the
    file, a folder above it (which could swap it) or a link on the way, before or after the
    links are followed, is theirs or group- or world-writable; None when nobody else could.
    A world-writable folder with the sticky bit (/tmp) is no such way: only an entry's owner
    may rename or remove it. Raises OSError when a place cannot be looked at."""
    trusted = (0, os.geteuid())
    given = path.absolute()
    real = path.resolve(strict=True)
    for place in dict.fromkeys([given, *given.parents, real, *real.parents]):
        status = os.lstat(place)
        if status.st_uid not in trusted:
            return (
                f"{place} is owned by uid {status.st_uid}, neither root nor this half's user"
                f" (uid {os.geteuid()})"
            )
        if stat.S_ISLNK(status.st_mode):  # a link's own mode bits mean nothing
            continue
        writable = status.st_mode & _OTHERS_WRITE
        if writable and not (stat.S_ISDIR(status.st_mode) and status.st_mode & stat.S_ISVTX):
            who = {stat.S_IWGRP: "group", stat.S_IWOTH: "world"}.get(writable, "group- and world")
            mode = stat.S_IMODE(status.st_mode)
            return f"{place} is {who}-writable (mode {mode:04o})"
    return None


def load_entries(path: Path) -> list[_Entry]:
    """Parse the file; raises ConfigError naming the file, row or key. An asset listed twice
    is refused: which of its rows would be the truth?"""
    if path.suffix.lower() == ".csv":
        located = _from_csv(path)
    else:
        entries = documents.load(path, list[_Entry])
        located = [(f"{path}: entry {n}", e) for n, e in enumerate(entries, start=1)]
    seen: set[str] = set()
    for where, entry in located:
        if entry.asset in seen:
            raise ConfigError(
                f"{where}: {entry.asset} is listed twice; list each asset once"
                " (in CSV its work orders in one cell, separated by ';')"
            )
        seen.add(entry.asset)
    return [entry for _, entry in located]


def _from_csv(path: Path) -> list[tuple[str, _Entry]]:
    """The entries with the line each starts on; rows with every cell empty are skipped."""
    try:  # utf-8-sig: spreadsheet programs start their "CSV UTF-8" with a byte order mark
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    reader = csv.DictReader(io.StringIO(text))
    columns = set(reader.fieldnames or ())
    if unknown := sorted(columns - set(_Entry.__struct_fields__)):
        known = ", ".join(_Entry.__struct_fields__)
        raise ConfigError(f"{path}:1: unknown column {unknown[0]!r} (the columns are: {known})")
    entries = []
    for row in reader:
        if not any(row.values()):  # `,,,` as spreadsheets export their empty rows
            continue
        orders = []
        for item in (row.get("open_work_orders") or "").split(";"):
            if item.strip():
                number, _, title = item.partition(":")
                orders.append({"id": number.strip(), "title": title.strip()})
        data = {
            "asset": row.get("asset"),
            "last_service": row.get("last_service") or None,
            "next_due": row.get("next_due") or None,
            "open_work_orders": orders,
        }
        where = f"{path}:{reader.line_num}"
        entries.append((where, documents.convert(data, _Entry, where)))
    return entries
