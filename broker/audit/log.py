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
from pathlib import Path
from typing import Any, Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.entry import (
    CHECKPOINT,
    EXPIRED,
    GENESIS,
    canonical,
    checkpoint_message,
    entry_hash,
    timestamp,
)
from broker.audit.retention import RESERVE, expire
from broker.audit.segments import read_entries, segment_numbers, segment_path
from broker.config import AuditConfig
from broker.errors import ChannelError
from broker.folder_lock import FolderLock
from broker.trust.keys import key_id, load_private

OUTCOMES = ("success", "failure", "unknown")
PENDING_LIMIT = 100_000  # entries kept in memory while the disk refuses them
MIN_FREE_BYTES = 256 * 1024  # less free space than this counts as a full disk
EXPIRY_CHECK_S = 60.0  # in the reserve, how often check() looks for segments that may go
FSYNC_INTERVAL_S = 0.1  # entries are written at once; flushed to disk at least this often


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
            self._used = sum(segment_path(self._dir, n).stat().st_size for n in numbers)
            self._size = 0
            self._since_checkpoint = 0
            self._last_checkpoint = time.monotonic()
            self._last_fsync = 0.0
            self._last_expiry = 0.0
            self._rollover_due = False
            self._number = (numbers[-1] + 1) if numbers else 1
            try:
                self._fd = self._create(self._number)
            except OSError as e:
                path = segment_path(self._dir, self._number)
                raise ChannelError(f"audit log {path}: cannot create: {e.strerror}") from e
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
        elif self._size >= self._segment_bytes and not self._rollover_due:
            self._roll_over()

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
            if self._rollover_due:
                self._roll_over()
            elif self.usage >= RESERVE and time.monotonic() - self._last_expiry >= EXPIRY_CHECK_S:
                self._expire_segments()  # in the reserve few entries come to trigger it
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
            "time": timestamp(),
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
        """Delete the segments retention says must go (broker.audit.retention) and record
        the anchor `audit verify` needs to accept a log that starts later."""
        self._last_expiry = time.monotonic()
        expiry = expire(
            self._dir, self._number, self._used, self._capacity_bytes, self._retention_s
        )
        self._used -= expiry.freed
        if expiry.anchor is not None:
            self._record(
                {
                    "event": EXPIRED,
                    "category": "audit",
                    "outcome": "success",
                    "actor": None,
                    "object": None,
                    "policy_version": None,
                    "details": expiry.anchor,
                }
            )

    def _create(self, number: int) -> int:
        path = segment_path(self._dir, number)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)

    def _roll_over(self) -> None:
        """End the full segment with a checkpoint and continue in a new one.

        The new segment is opened first: when that fails (no descriptor left, a read-only or
        full folder) writing goes on in the current one, whole and chained, and `check()`
        tries again; no descriptor is closed while its number could still be written to.
        """
        try:
            fd = self._create(self._number + 1)
        except OSError:
            self._rollover_due = True
            return
        self._rollover_due = False
        self._checkpoint()  # the last entry of the old segment
        os.close(self._fd)
        self._fd = fd
        self._number += 1
        self._size = 0
        self._expire_segments()

    def _recover(self, numbers: list[int]) -> tuple[int, str]:
        """Continue the chain after the last whole entry on disk."""
        for number in reversed(numbers):
            entries, _ = read_entries(segment_path(self._dir, number))
            if entries:
                last = entries[-1]
                return int(last["seq"]), str(last["hash"])
        return 0, GENESIS

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_: object) -> None:
        with contextlib.suppress(OSError):
            self.close()


class AuditMonitor:
    """Watches a writer's health for its half: logs failure, recovery and 80 % capacity."""

    CAPACITY_WARNING = RESERVE

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
