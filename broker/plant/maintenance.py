"""Maintenance status per asset, from the file a CMMS exports (CSV or YAML).

The file is provisioned on the plant side, never fed from the enterprise side, and what is
read is judged on the descriptor it is read from, never on a name looked at before: every
place on the path, from / down, must be a real folder (a symbolic link anywhere on the way
is refused: where it points is whoever wrote it), owned by root or this half's user and not
group- or world-writable (unless sticky, as /tmp); the file is opened without following a
link and without blocking, and the open descriptor must be a regular file of one name (a
hard link would be a second way in), owned by root or this half's user, not group- or
world-writable, and the very file (device and inode) the path held when its folders were
checked. The contents are read from that descriptor, at most MAX_DOCUMENT_BYTES, so a swap
after the check changes nothing that is read. It is looked at once a second and re-read when
it changes.

A file that no longer passes those checks drops every asset to `unknown`: the contents held
were read when the place was the plant's alone, but a place now open to others (a link,
an IT share mounted there, a loosened mode) is a broken provisioning path that only a
person can fix, and a status kept from it would hide that, and would keep serving an
attacker's data for as long as the path stays refused should a check ever miss a way in
(as a link through another user's folder once did). A file that is removed, cannot be read
or does not parse is an ordinary hiccup (a copy under way, a bad export): it is logged with
what and where, and the last good contents are kept, named in the event, until a good file
is back. Never writes the file.

CSV: a header row `asset,last_service,next_due,open_work_orders`, dates as YYYY-MM-DD,
work orders as `ID: title` separated by `;`. YAML: a list of mappings with the same keys,
`open_work_orders` a list of `{id, title}`.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import stat
import time
from datetime import UTC, date, datetime, timedelta
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
# What was looked at: (st_dev, st_ino, mtime_ns, ctime_ns, size) of a file whose path passed
# the checks, the refusal's text, or _UNREADABLE; one event per change of it, not per second.
# ctime, because a chmod or chown of the file, or a hard link made to it, changes only that.
_Seen = tuple[int, ...] | str
_UNREADABLE: _Seen = ()
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
_NO_LINK = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FIX = {
    "writable_by_others": "keep it and each folder above it owned by root or this half's user"
    " and not group- or world-writable: a copy on the plant side, never an IT share",
    "link": "name the file itself in plant.maintenance.file, with no symbolic link on its"
    " path, and give it one name (no hard link)",
}

log = structlog.get_logger("maintenance")


class Untrusted(Exception):
    """Someone other than root or this half's user could decide what the path holds."""

    def __init__(self, reason: Literal["writable_by_others", "link"], error: str) -> None:
        super().__init__(error)
        self.reason = reason


class _Replaced(Exception):
    """The path held another file when opened than when its folders were checked."""


class _Entry(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    asset: str
    last_service: date | None = None
    next_due: date | None = None
    open_work_orders: list[WorkOrder] = []


class MaintenanceBook:
    def __init__(self, config: MaintenanceConfig | None) -> None:
        self._config = config
        self._entries: dict[str, _Entry] = {}
        self._loaded: str | None = None  # when the entries held were read, for the events
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
        changed = self._reread(Path(os.path.abspath(self._config.file)))
        if changed or today != self._today:
            self._today = today
            self._status = {a: self._judge(e, today) for a, e in self._entries.items()}

    def _reread(self, path: Path) -> bool:
        """Look at the file; True when the entries held changed."""
        try:
            checked = check_path(path)
        except Untrusted as e:
            return self._refuse(path, e)
        except OSError as e:
            if self._seen != _UNREADABLE:
                log.warning(
                    "maintenance_file_unreadable", file=str(path), error=str(e), kept=self._kept()
                )
            self._seen = _UNREADABLE
            return False
        seen = (
            checked.st_dev,
            checked.st_ino,
            checked.st_mtime_ns,
            checked.st_ctime_ns,
            checked.st_size,
        )
        if seen == self._seen:
            return False
        return self._load(path, checked, seen)

    def _load(self, path: Path, checked: os.stat_result, seen: _Seen) -> bool:
        try:
            entries = parse_entries(read_checked(path, checked), path)
        except Untrusted as e:
            return self._refuse(path, e)
        except _Replaced:  # by root or this user (nobody else can): look again next time
            return False
        except OSError as e:
            error = f"{path}: cannot read: {e}"
        except ConfigError as e:
            error = str(e)
        else:
            self._seen = seen
            self._entries = {e.asset: e for e in entries}
            self._loaded = datetime.now(UTC).isoformat(timespec="seconds")
            log.info("maintenance_file_loaded", file=str(path), assets=len(entries))
            return True
        self._seen = seen
        log.warning(
            "maintenance_file_refused",
            path=str(path),
            reason="invalid",
            error=error,
            kept=self._kept(),
        )
        return False

    def _refuse(self, path: Path, refusal: Untrusted) -> bool:
        """Drop every asset to unknown (the module docstring says why); True when that is a
        change."""
        if self._seen == str(refusal):
            return False
        self._seen = str(refusal)
        log.warning(
            "maintenance_file_refused",
            path=str(path),
            reason=refusal.reason,
            error=str(refusal),
            kept="nothing: every asset's maintenance is unknown until the file passes again",
            dropped=self._kept(),
            fix=_FIX[refusal.reason],
        )
        changed = bool(self._entries)
        self._entries, self._loaded = {}, None
        return changed

    def _kept(self) -> str:
        if not self._entries:
            return "nothing: no good file has been read"
        return f"the last good contents ({len(self._entries)} assets, loaded {self._loaded})"

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


def check_path(path: Path) -> os.stat_result:
    """Check every folder of the absolute `path`, from / down, and that nothing on it is a
    symbolic link; the path's own lstat. Raises Untrusted naming the first place that fails,
    OSError when a place cannot be looked at."""
    *folders, _ = places = [*reversed(path.parents), path]
    for place in places:
        status = os.lstat(place)
        if stat.S_ISLNK(status.st_mode):
            raise Untrusted(
                "link", f"{place} is a symbolic link (to {os.readlink(place)}), which is refused"
            )
        if place in folders:
            _judge_owner_and_mode(place, status)
    return status


def read_checked(path: Path, checked: os.stat_result) -> bytes:
    """The contents of the file `check_path` found at `path`, read from one descriptor that is
    judged itself. Raises Untrusted, _Replaced, or OSError."""
    fd = os.open(path, os.O_RDONLY | _NO_LINK)
    try:
        status = os.fstat(fd)
        if (status.st_dev, status.st_ino) != (checked.st_dev, checked.st_ino):
            raise _Replaced  # whatever this other file is, it is not what was checked
        if status.st_nlink == 0:
            raise _Replaced  # renamed over since it was opened, as an export job does
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        _judge_owner_and_mode(path, status)
        if status.st_nlink != 1:
            raise Untrusted(
                "link", f"{path} has {status.st_nlink} names (hard links), which is refused"
            )
        limit = documents.MAX_DOCUMENT_BYTES
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data


def _judge_owner_and_mode(place: Path, status: os.stat_result) -> None:
    """Raise Untrusted when someone other than root or this process's user could write
    `place`. A world-writable folder with the sticky bit (/tmp) is no such way: only an
    entry's owner may rename or remove it."""
    if status.st_uid not in (0, os.geteuid()):
        raise Untrusted(
            "writable_by_others",
            f"{place} is owned by uid {status.st_uid}, neither root nor this half's user"
            f" (uid {os.geteuid()})",
        )
    writable = status.st_mode & _OTHERS_WRITE
    if writable and not (stat.S_ISDIR(status.st_mode) and status.st_mode & stat.S_ISVTX):
        who = {stat.S_IWGRP: "group", stat.S_IWOTH: "world"}.get(writable, "group- and world")
        mode = stat.S_IMODE(status.st_mode)
        raise Untrusted("writable_by_others", f"{place} is {who}-writable (mode {mode:04o})")


def parse_entries(data: bytes, path: Path) -> list[_Entry]:
    """Parse the contents of the file `path`; raises ConfigError naming the file, row or key.
    An asset listed twice is refused: which of its rows would be the truth?"""
    if path.suffix.lower() == ".csv":
        located = _from_csv(data, path)
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: cannot read: {e}") from e
        entries = documents.from_text(text, list[_Entry], str(path))
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


def _from_csv(data: bytes, path: Path) -> list[tuple[str, _Entry]]:
    """The entries with the line each starts on; rows with every cell empty are skipped."""
    try:  # utf-8-sig: spreadsheet programs start their "CSV UTF-8" with a byte order mark
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
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
        fields = {
            "asset": row.get("asset"),
            "last_service": row.get("last_service") or None,
            "next_due": row.get("next_due") or None,
            "open_work_orders": orders,
        }
        where = f"{path}:{reader.line_num}"
        entries.append((where, documents.convert(fields, _Entry, where)))
    return entries
