"""What the audit writers' folders say of them, for `dmzbroker posture`: the audit file
system's free space, and per writer whether a process holds its folder's lock, its last entry
(seq, time), the seq its newest checkpoint covers and how old that is, and whether it is failing
(the plant half's metrics in the spool).

It reads the newest segments' tails only and never verifies them (`dmzbroker audit verify`
does); it never writes, and never holds a writer's lock beyond the instant of the test. It never
trusts what it reads: a half's files are hostile input, so a file of the wrong kind or size, a
line that is not JSON, or a field of the wrong type is an `Unknown` with its reason, never an
exception.
"""

from __future__ import annotations

import functools
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from broker.audit.entry import CHECKPOINT
from broker.audit.log import MIN_FREE_BYTES
from broker.audit.segments import MAX_SEGMENT_BYTES, segment_numbers, segment_path
from broker.deployment import halves as holders
from broker.deployment.unknown import Unknown, guarded, reason
from broker.errors import DmzBrokerError
from broker.metrics import PLANT_FILE
from broker.safe_files import read_regular

METRICS_STALE_S = 30.0  # the plant half rewrites its metrics every 2 s: older is not current
SEGMENTS_READ = 2  # a writer's newest segment may be empty (its next one, made ahead)

T = TypeVar("T")


class WriterState(msgspec.Struct, frozen=True):
    running: bool | Unknown  # a process holds the folder's lock
    last_seq: int | Unknown | None  # None: no entry yet
    last_time: str | Unknown | None
    last_checkpoint_seq: int | Unknown | None  # the seq its newest checkpoint covers
    last_checkpoint_age_s: float | Unknown | None
    failing: bool | Unknown | None  # None: not running


class FileSystem(msgspec.Struct, frozen=True):
    free_bytes: int
    free_pct: float
    read_only: bool


class AuditState(msgspec.Struct, frozen=True):
    dir: str
    file_system: FileSystem | Unknown
    writers: dict[str, WriterState | Unknown]


def audit_state(audit_dir: Path, spool_dir: Path) -> AuditState:
    file_system = guarded(lambda: _file_system(audit_dir))
    writers: dict[str, WriterState | Unknown] = {}
    try:
        names = sorted(n for n in os.listdir(audit_dir) if (audit_dir / n).is_dir())
    except OSError as e:
        return AuditState(str(audit_dir), file_system, {"*": Unknown(reason(e))})
    full = isinstance(file_system, FileSystem) and (
        file_system.read_only or file_system.free_bytes < MIN_FREE_BYTES
    )
    for name in names:
        writers[name] = guarded(functools.partial(_writer, audit_dir / name, spool_dir, full=full))
    return AuditState(str(audit_dir), file_system, writers)


def _file_system(path: Path) -> FileSystem:
    fs = os.statvfs(path)
    free = fs.f_bavail * fs.f_frsize
    share = fs.f_bavail / fs.f_blocks if fs.f_blocks else 1.0
    return FileSystem(free, round(share * 100, 1), bool(fs.f_flag & os.ST_RDONLY))


def _writer(directory: Path, spool_dir: Path, *, full: bool) -> WriterState:
    running = guarded(lambda: holders.holder(directory) is not None)
    try:
        last, checkpoint = _newest(directory)
    except (OSError, DmzBrokerError) as e:
        last = checkpoint = Unknown(reason(e))
    failing: bool | Unknown | None = None
    if isinstance(running, Unknown):
        failing = running
    elif running:
        failing = True if full else _failing(directory.name, spool_dir)
    details = _field(checkpoint, "details", dict, "an object")
    covers = (
        details
        if not isinstance(details, dict)
        else _field(details, "covers_seq", int, "an integer")
    )
    moment = _moment(checkpoint)
    age = (
        moment
        if not isinstance(moment, datetime)
        else round((datetime.now(UTC) - moment).total_seconds(), 1)
    )
    when = _moment(last)
    return WriterState(
        running,
        _field(last, "seq", int, "an integer"),
        when.isoformat() if isinstance(when, datetime) else when,
        covers,
        age,
        failing,
    )  # fmt: skip


Entry = dict[str, Any] | Unknown | None  # None: no entry found


def _newest(directory: Path) -> tuple[Entry, Entry]:
    """The writer's last entry and last checkpoint, from its newest segments."""
    last: Entry = None
    checkpoint: Entry = None
    for number in list(reversed(segment_numbers(directory)))[:SEGMENTS_READ]:
        data = read_regular(segment_path(directory, number), MAX_SEGMENT_BYTES)
        found_last, found_checkpoint = tail(data)
        last = found_last if last is None else last
        checkpoint = found_checkpoint if checkpoint is None else checkpoint
        if checkpoint is not None:
            break
    return last, checkpoint


def tail(segment: bytes) -> tuple[Entry, Entry]:
    """A segment's last whole entry and its last checkpoint, decoded (not verified)."""
    end = segment.rfind(b"\n")
    if end < 0:
        return None, None
    last = _entry(segment[segment.rfind(b"\n", 0, end) + 1 : end])
    at = segment.rfind(b'"event":"' + CHECKPOINT.encode() + b'"', 0, end)
    checkpoint: Entry = None
    if at >= 0:
        stop = segment.find(b"\n", at)
        checkpoint = _entry(segment[segment.rfind(b"\n", 0, at) + 1 : stop])
    return last, checkpoint


def _entry(line: bytes) -> dict[str, Any] | Unknown:
    try:
        entry = msgspec.json.decode(line)
    except (msgspec.DecodeError, RecursionError) as e:  # RecursionError: nested too deep
        return Unknown(f"an entry is not JSON: {e}")
    return entry if isinstance(entry, dict) else Unknown("an entry is not a JSON object")


def _field(entry: Entry, key: str, kind: type[T], what: str) -> T | Unknown | None:
    """`entry[key]` when it is of `kind` (a bool is no integer), else why not."""
    if entry is None or isinstance(entry, Unknown):
        return entry
    value = entry.get(key)
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    return Unknown(f"{key} of an entry is not {what}")


def _moment(entry: Entry) -> datetime | Unknown | None:
    """An entry's time, which the writer writes with its time zone."""
    when = _field(entry, "time", str, "a string")
    if not isinstance(when, str):
        return when
    try:
        moment = datetime.fromisoformat(when)
    except ValueError:
        return Unknown("time of an entry is not an ISO 8601 time")
    if moment.utcoffset() is None:
        return Unknown("time of an entry has no time zone")
    return moment


def _failing(writer: str, spool_dir: Path) -> bool | Unknown:
    """Only the plant half says it in a file (its metrics, in the spool)."""
    if writer != "plant":
        return Unknown(f"the {writer} writer reports it only at /metrics")
    path = spool_dir / PLANT_FILE
    try:
        age = time.time() - os.stat(path).st_mtime
        text = read_regular(path, 16 * 1024 * 1024).decode(errors="replace")
    except OSError as e:
        return Unknown(f"{path}: {reason(e)}")
    if age > METRICS_STALE_S:
        return Unknown(f"{path} is {age:.0f} s old: the plant half does not write it")
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "dmzbroker_plant_audit_failing":
            return value.strip() not in ("0", "0.0")
    return Unknown(f"{path}: no dmzbroker_plant_audit_failing")
