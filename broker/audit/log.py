"""The audit log writer: one hash chain per writer, signed checkpoints, fail-closed signal.

Each entry names its predecessor's hash, so no entry can be edited, removed, reordered or
inserted without breaking the chain. Every `checkpoint_every` entries, every
`checkpoint_s` seconds, at rotation and at shutdown, a checkpoint entry signs the chain's
head with the appliance's audit key, so the chain cannot be rebuilt by someone without it.

The writer starts a new segment file each time it opens (as the spool does), so a torn last
line after a crash sits at the end of a final segment, where `audit verify` reports it.
When the log cannot be written, `failing` turns true: the halves stop data crossing until a
write succeeds again (entries waiting meanwhile are kept, in order, up to `PENDING_LIMIT`, and written by
`check()` once it can).
"""

from __future__ import annotations

import base64
import contextlib
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import msgspec
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.entry import (
    CHECKPOINT,
    EXPIRED,
    GENESIS,
    canonical,
    checkpoint_message,
    entry_hash,
)
from broker.config import AuditConfig
from broker.errors import ChannelError
from broker.folder_lock import FolderLock
from broker.trust.keys import key_id, load_private

SUFFIX = ".jsonl"
OUTCOMES = ("success", "failure", "unknown")
PENDING_LIMIT = 100_000  # entries kept in memory while the disk refuses them
MIN_FREE_BYTES = 256 * 1024  # less free space than this counts as a full disk
CARRIED_POLICY = "last_policy_accepted"  # in an expiry anchor (ADR 0015)
CARRIED_FIELDS = ("seq", "time", "boot_id", "policy_version", "details", "hash")
FSYNC_INTERVAL_S = 0.1  # entries are written at once; flushed to disk at least this often


def segment_numbers(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(
        int(n[: -len(SUFFIX)]) for n in names if n.endswith(SUFFIX) and n[: -len(SUFFIX)].isdigit()
    )


def read_lines(path: Path) -> tuple[list[bytes], bytes]:
    """The whole lines of a segment (without newlines), and any bytes after the last one."""
    data = path.read_bytes()
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


class HeldBack(Protocol):
    """Entries held back before they reach the log (broker.audit.forward): counted, and
    summed up as `events_suppressed` once per interval."""

    @property
    def suppressed(self) -> Mapping[str, int]: ...

    def flush(self, *, final: bool = False) -> None: ...


class AuditLog:
    held_back: HeldBack | None = None  # set by the forwarder; flushed by check() and close()

    def __init__(
        self,
        directory: Path,
        writer: str,
        appliance: str,
        key: Ed25519PrivateKey,
        *,
        checkpoint_every: int = 1000,
        checkpoint_s: float = 60.0,
        segment_bytes: int = 8 * 1024 * 1024,
        capacity_bytes: int = 1024 * 1024 * 1024,
        retention_s: float = 365 * 86_400,
    ) -> None:
        self._dir = directory / writer
        self._writer = writer
        self._appliance = appliance
        self._key = key
        self._keyid = key_id(key.public_key())
        self._checkpoint_every = checkpoint_every
        self._checkpoint_s = checkpoint_s
        self._segment_bytes = segment_bytes
        self._capacity_bytes = capacity_bytes
        self._retention_s = retention_s
        self.boot_id = str(uuid.uuid4())
        self.failing = False
        self._lock = threading.RLock()  # the spool sender logs from its worker thread
        self._pending: deque[bytes] = deque()
        self._partial = 0  # bytes of the first pending line already on disk
        self.dropped = 0  # entries lost because the disk refused them for too long
        try:
            self._dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as e:
            raise ChannelError(f"audit log {self._dir}: cannot create: {e.strerror}") from e
        # One writer per chain: a second one would reuse seq numbers, which `audit verify`
        # cannot tell from tampering. Released by close().
        self._folder_lock = FolderLock(self._dir)
        self._fd = -1
        try:
            numbers = segment_numbers(self._dir)
            self._seq, self._head = self._recover(numbers)
            self._used = sum((self._dir / f"{n:010d}{SUFFIX}").stat().st_size for n in numbers)
            self._size = 0
            self._since_checkpoint = 0
            self._last_checkpoint = time.monotonic()
            self._last_fsync = 0.0
            self._open_segment((numbers[-1] + 1) if numbers else 1)
        except BaseException:
            self._folder_lock.release()
            raise

    @classmethod
    def open(cls, config: AuditConfig, appliance: str, writer: str) -> AuditLog:
        """The log of `writer` as `broker.yaml` configures it."""
        return cls(
            config.dir,
            writer,
            appliance,
            load_private(config.key, passphrase=None),
            checkpoint_every=config.checkpoint_every,
            checkpoint_s=config.checkpoint_s,
            capacity_bytes=config.capacity_mib * 1024 * 1024,
            retention_s=config.retention_days * 86_400,
        )

    @property
    def head(self) -> tuple[int, str]:
        return self._seq, self._head

    def record(
        self,
        event: str,
        *,
        category: str,
        outcome: str,
        actor: str | None = None,
        object: str | None = None,
        policy_version: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
        with self._lock:
            self._record(
                {
                    "event": event,
                    "category": category,
                    "outcome": outcome,
                    "actor": actor,
                    "object": object,
                    "policy_version": policy_version,
                    "details": details or {},
                }
            )

    def _record(self, body: dict[str, Any]) -> None:
        self._append(body)
        self._since_checkpoint += 1
        due = time.monotonic() - self._last_checkpoint >= self._checkpoint_s
        if self._since_checkpoint >= self._checkpoint_every or due:
            self._checkpoint()
        elif self._size >= self._segment_bytes:
            self._checkpoint()
            self._open_segment(self._number + 1)
            self._expire_segments()

    def checkpoint(self) -> None:
        """Sign the chain's head; flushed to disk at once."""
        with self._lock:
            self._checkpoint()

    def _checkpoint(self) -> None:
        seq, head = self._seq, self._head
        signature = self._key.sign(checkpoint_message(self._appliance, self._writer, seq, head))
        details = {
            "appliance": self._appliance,
            "covers_seq": seq,
            "head": head,
            "keyid": self._keyid,
            "signature": base64.b64encode(signature).decode(),
        }
        self._append(
            {
                "event": CHECKPOINT,
                "category": "audit",
                "outcome": "success",
                "actor": None,
                "object": None,
                "policy_version": None,
                "details": details,
            }
        )
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._flush(force=True)

    @property
    def suppressed(self) -> Mapping[str, int]:
        """Entries counted instead of written, by event, since start (for /metrics)."""
        return self.held_back.suppressed if self.held_back is not None else {}

    @property
    def usage(self) -> float:
        """The share of the configured capacity this writer's segments take."""
        return self._used / self._capacity_bytes

    def check(self) -> None:
        """Write what waits, and count a full or read-only file system as failing.

        Call it a few times a second: a disk that fills up while nothing is being audited
        must still close the data path before the next event is lost.
        """
        with self._lock:
            if self.held_back is not None:
                self.held_back.flush()  # an interval's summary is due even if nothing new came
            self._flush(force=bool(self._pending))
            due = time.monotonic() - self._last_checkpoint >= self._checkpoint_s
            if due and self._since_checkpoint and not self.failing:
                self._checkpoint()  # a quiet log still gets its last entries signed in time
            try:
                fs = os.statvfs(self._dir)
            except OSError:
                self.failing = True
                return
            if fs.f_flag & os.ST_RDONLY or fs.f_bavail * fs.f_frsize < MIN_FREE_BYTES:
                self.failing = True

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                if self.held_back is not None:
                    self.held_back.flush(final=True)  # under the closing checkpoint
                self._checkpoint()
                os.close(self._fd)
                self._fd = -1
            self._folder_lock.release()

    def _append(self, body: dict[str, Any]) -> None:
        entry: dict[str, Any] = {
            "seq": self._seq + 1,
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "boot_id": self.boot_id,
            "writer": self._writer,
            **body,
            "prev_hash": self._head,
        }
        entry["hash"] = entry_hash(entry)
        self._seq, self._head = entry["seq"], entry["hash"]
        if len(self._pending) >= PENDING_LIMIT:
            self.dropped += 1  # the chain now has a gap `audit verify` will show
            return
        self._pending.append(canonical(entry) + b"\n")
        self._flush(force=False)

    def _flush(self, *, force: bool) -> None:
        try:
            while self._pending:
                line = self._pending[0]
                while self._partial < len(line):  # a full disk can take part of a line
                    self._partial += os.write(self._fd, memoryview(line)[self._partial :])
                self._partial = 0
                self._size += len(line)
                self._used += len(line)
                self._pending.popleft()
            now = time.monotonic()
            if force or now - self._last_fsync >= FSYNC_INTERVAL_S:
                os.fsync(self._fd)
                self._last_fsync = now
        except OSError:
            self.failing = True
            return
        self.failing = False

    def _expire_segments(self) -> None:
        """Delete the oldest segments past the retention age, or past 90 % of capacity.

        The current segment is never deleted. An `audit_segments_expired` entry records the
        seq and hash of the last deleted entry: `audit verify` accepts a log that starts
        later only when such an anchor, itself in the chain, vouches for where it starts.
        It also carries the newest `policy_accepted` entry among those deleted (or carried
        by an anchor among them), so that no amount of retention removes the record of the
        policy in force (ADR 0015).
        """
        old = [n for n in segment_numbers(self._dir) if n < self._number]
        now = time.time()
        expired: list[int] = []
        anchor: tuple[int, str] | None = None
        policy: dict[str, Any] | None = None
        for number in old:
            path = self._dir / f"{number:010d}{SUFFIX}"
            stat = path.stat()
            too_old = now - stat.st_mtime > self._retention_s
            if not too_old and self._used <= 0.9 * self._capacity_bytes:
                break
            entries, _ = read_entries(path)
            if entries:
                anchor = (int(entries[-1]["seq"]), str(entries[-1]["hash"]))
                policy = _newest_policy(entries, policy)
            path.unlink()
            self._used -= stat.st_size
            expired.append(number)
        if expired and anchor is not None:
            details: dict[str, Any] = {
                "segments": expired,
                "through_seq": anchor[0],
                "head": anchor[1],
            }
            if policy is not None:
                details[CARRIED_POLICY] = policy
            self._record(
                {
                    "event": EXPIRED,
                    "category": "audit",
                    "outcome": "success",
                    "actor": None,
                    "object": None,
                    "policy_version": None,
                    "details": details,
                }
            )

    def _open_segment(self, number: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        path = self._dir / f"{number:010d}{SUFFIX}"
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        except OSError as e:
            raise ChannelError(f"audit log {path}: cannot create: {e.strerror}") from e
        self._number = number
        self._size = 0

    def _recover(self, numbers: list[int]) -> tuple[int, str]:
        """Continue the chain after the last whole entry on disk."""
        for number in reversed(numbers):
            entries, _ = read_entries(self._dir / f"{number:010d}{SUFFIX}")
            if entries:
                last = entries[-1]
                return int(last["seq"]), str(last["hash"])
        return 0, GENESIS

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_: object) -> None:
        with contextlib.suppress(OSError):
            self.close()


def _newest_policy(
    entries: list[dict[str, Any]], carried: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The last `policy_accepted` entry in `entries` or carried by an anchor there, else
    `carried`."""
    for entry in entries:
        details = entry.get("details")
        if entry.get("event") == "policy_accepted":
            carried = {k: entry.get(k) for k in CARRIED_FIELDS}
        elif (
            entry.get("event") == EXPIRED
            and isinstance(details, dict)
            and CARRIED_POLICY in details
        ):
            carried = details[CARRIED_POLICY]
    return carried


class AuditMonitor:
    """Watches a writer's health for its half: logs failure, recovery and 80 % capacity."""

    CAPACITY_WARNING = 0.8

    def __init__(self, audit: AuditLog, consequence: str) -> None:
        self._audit = audit
        self._consequence = consequence
        self.failing = False
        self._warned = False
        self._log = structlog.get_logger("audit")

    def check(self) -> bool:
        """True while the audit log cannot be written: nothing may cross meanwhile."""
        self._audit.check()
        if self._audit.failing != self.failing:
            self.failing = self._audit.failing
            if self.failing:
                self._log.critical(
                    "audit_write_failed",
                    consequence=self._consequence,
                    action="free space on the audit file system or fix the audit directory",
                )
            else:
                self._log.warning("audit_write_recovered")
        usage = self._audit.usage
        if usage >= self.CAPACITY_WARNING and not self._warned:
            self._log.warning("audit_capacity_warning", used_pct=round(usage * 100))
        self._warned = usage >= self.CAPACITY_WARNING
        return self.failing
