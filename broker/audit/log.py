"""The audit log writer: one hash chain per writer, signed checkpoints, fail-closed signal.

Each entry names its predecessor's hash, so no entry can be edited, removed, reordered or
inserted without breaking the chain. At start, every `checkpoint_every` entries, every
`checkpoint_s` seconds, at rotation and at shutdown, a checkpoint entry signs the chain's
head with the writer's current epoch key (broker.audit.epochs, ADR 0016), so the chain
cannot be rebuilt by someone without it, and a key taken today cannot sign for yesterday.

The writer starts a new segment file each time it opens (as the spool does). It continues
its chain only when the log ends with a checkpoint that verifies (broker.audit.resume);
never otherwise: what follows that checkpoint is left as it is, unadopted, and the new
segment starts with an `audit_chain_break` entry naming it, which `audit verify` reports.
When the log cannot be written, `failing` turns true: the halves (broker.audit.monitor) stop
data crossing until a write succeeds again, or `check()` finds room with nothing waiting
(entries waiting meanwhile are kept, in order, up to `PENDING_LIMIT`, and written by `check()`
once it can).

Group commit (ADR 0027): each entry is written to its segment when it is recorded (a crash of
the process loses none), and a committer thread (broker.audit.committer) makes everything
written so far durable with one fdatasync, then the next batch, without waiting in between:
`durable` is the last seq on disk, `sync()` waits for it, and a checkpoint is witnessed only
once it is on disk. A failed fdatasync is `failing` too, and for good: no later fdatasync can
show that what it covered is on disk (broker.audit.committer), so only a new start clears it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import epochs
from broker.audit.committer import Committer
from broker.audit.entry import (
    CHAIN_BREAK,
    CHECKPOINT,
    DROPPED,
    EXPIRED,
    checkpoint_message,
    sealed_line,
    timestamp,
)

# Importable from here for the halves and the supervisor (broker.plant.run,
# broker.enterprise.run, broker.supervisor), which import it so today.
from broker.audit.resume import resume
from broker.audit.retention import RESERVE, expire
from broker.audit.segments import segment_numbers, segment_path
from broker.config import AuditConfig
from broker.errors import ChannelError
from broker.folder_lock import FolderLock

OUTCOMES = ("success", "failure", "unknown")
PENDING_LIMIT = 100_000  # entries kept in memory while the disk refuses them
MIN_FREE_BYTES = 256 * 1024  # less free space than this counts as a full disk
EXPIRY_CHECK_S = 60.0  # in the reserve, how often check() looks for segments that may go


class HeldBack(Protocol):
    """Entries held back before they reach the log (broker.audit.forward): counted, and
    summed up as `events_suppressed` once per interval."""

    @property
    def suppressed(self) -> Mapping[str, int]: ...

    def flush(self, *, final: bool = False) -> None: ...


class AuditLog:
    held_back: HeldBack | None = None  # set by the forwarder; flushed by check() and close()
    # Witnesses (broker.plant.run, the SIEM export): called with each checkpoint entry (every
    # field, seq and hash too) once it is written and fsynced, in seq order, under the log's
    # lock, from the thread that made it durable (the caller's or the committer's). It must be
    # cheap; what it raises is counted in `hook_failures`, never passed on to the writer.
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None
    # Set by _start(): the seq of the last checkpoint start-up recovery found valid
    # (broker.audit.recovery): where the log was adopted, or the last good seq of its chain
    # break; 0 for a new log.
    adopted_seq: int
    # Set by _start(): where the chain continues, and the epoch whose key signs from there.
    _seq: int
    _head: str
    _epochs: list[epochs.Epoch]
    _epoch: epochs.Epoch
    _epoch_key: Ed25519PrivateKey
    _epoch_started: float
    _next_fd = -1  # the segment a rollover opened, used once its checkpoint is written
    _switch_after = 0  # pending lines up to and including that checkpoint
    _committer: Committer  # set by _begin, with the segment's descriptor

    def __init__(
        self,
        directory: Path,
        writer: str,
        appliance: str,
        key: Ed25519PrivateKey | epochs.RootKey,
        *,
        checkpoint_every: int = 1000,
        checkpoint_s: float = 60.0,
        segment_bytes: int = 8 * 1024 * 1024,
        capacity_bytes: int = 1024 * 1024 * 1024,
        retention_s: float = 365 * 86_400,
        epoch_s: float = epochs.EPOCH_S,
    ) -> None:
        """`key` is the root audit key (the private half is loaded only when a first epoch
        must be certified); the checkpoints are signed by the writer's epoch keys."""
        self._dir = directory / writer
        self._writer = writer
        self._appliance = appliance
        self._root = key if isinstance(key, epochs.RootKey) else epochs.RootKey.of(key)
        self._epoch_s = epoch_s
        self.hook_failures = 0
        self.chain_break: dict[str, Any] | None = None  # the details of the break at start
        self._checkpoint_every = checkpoint_every
        self._checkpoint_s = checkpoint_s
        self._segment_bytes = segment_bytes
        self._capacity_bytes = capacity_bytes
        self._retention_s = retention_s
        self.boot_id = str(uuid.uuid4())
        self._refused = False  # the disk refused a write, or has no room (see `failing`)
        self._lock = threading.RLock()  # the spool sender logs from its worker thread
        self._pending: deque[bytes] = deque()
        self._partial = 0  # bytes of the first pending line already on disk
        self.dropped = 0  # entries lost because the disk refused them for too long
        self._lost: Lost | None = None  # those not yet reported in `audit_entries_dropped`
        try:
            self._dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as e:
            raise ChannelError(f"audit log {self._dir}: cannot create: {e.strerror}") from e
        # One writer per chain: a second one would reuse seq numbers, which `audit verify`
        # cannot tell from tampering. Released by close().
        self._folder_lock = FolderLock(self._dir)
        self._fd = -1
        try:
            self._begin()
        except BaseException:
            if self._fd >= 0:
                os.close(self._fd)
            self._folder_lock.release()
            raise
        self._committer.start()

    def _begin(self) -> None:
        """Open a new segment where the chain continues (or breaks), and seal the start."""
        numbers = segment_numbers(self._dir)
        self._used = sum(_size(segment_path(self._dir, n)) for n in numbers)
        self._size = 0
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._last_expiry = 0.0
        self._rollover_due = False
        self._number = (numbers[-1] + 1) if numbers else 1
        try:
            self._start(numbers)
            self._fd = self._create(self._number)
        except OSError as e:
            raise ChannelError(f"audit log {self._dir}: cannot start: {e}") from e
        self._committer = Committer(
            f"audit {self._writer}",
            self._fd,
            self._seq,
            lock=self._lock,
            witness=self._witness,
        )
        with self._lock:
            if self.chain_break is not None:
                self._append(self._event(CHAIN_BREAK, "failure", self.chain_break))
                structlog.get_logger("audit").error(
                    CHAIN_BREAK, writer=self._writer, seq=self._seq, **self.chain_break
                )
            self._checkpoint("start")

    @classmethod
    def open(cls, config: AuditConfig, appliance: str, writer: str) -> AuditLog:
        """The log of `writer` as `broker.yaml` configures it. The root key file is read only
        when the writer must certify a first epoch key; `audit.pub` beside it is enough
        otherwise."""
        return cls(
            config.dir,
            writer,
            appliance,
            epochs.RootKey.from_files(config.key),
            checkpoint_every=config.checkpoint_every,
            checkpoint_s=config.checkpoint_s,
            capacity_bytes=config.capacity_mib * 1024 * 1024,
            retention_s=config.retention_days * 86_400,
        )

    @property
    def head(self) -> tuple[int, str]:
        return self._seq, self._head

    @property
    def failing(self) -> bool:
        """True while nothing may cross: the disk refuses entries or has no room, or an
        fdatasync failed (read from the committer at once, so no check sees one without the
        other)."""
        return self._refused or self._committer.sync_error is not None

    @failing.setter
    def failing(self, refused: bool) -> None:
        """Say the disk refuses (or takes again) entries; a failed fdatasync stays failing."""
        self._refused = refused

    @property
    def sync_error(self) -> OSError | None:
        """The fdatasync that failed, if one did: the log is failing until the next start."""
        return self._committer.sync_error

    @property
    def durable(self) -> int:
        """The seq of the last entry known to be on disk (an fdatasync returned after its
        write)."""
        return self._committer.durable

    def sync(self) -> bool:
        """Make everything recorded so far durable now, in the caller's thread: True when it
        is on disk, False when the disk refused it (then `failing` says so)."""
        with self._lock:
            return self._sync()

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
        if event == CHAIN_BREAK:
            # Written only by the writer whose chain broke, at its start (above); this is the
            # process log's copy coming back through the forwarder.
            return
        body = {
            "event": event,
            "category": category,
            "outcome": outcome,
            "actor": actor,
            "object": object,
            "policy_version": policy_version,
            "details": details or {},
        }
        with self._lock:
            self._append(body)
            self._since_checkpoint += 1
            if self._since_checkpoint >= self._checkpoint_every:
                self._checkpoint("count", wait=False)
            elif time.monotonic() - self._last_checkpoint >= self._checkpoint_s:
                self._checkpoint("time", wait=False)
            elif self._size >= self._segment_bytes and not self._rollover_due and self._next_fd < 0:
                self._roll_over()

    def checkpoint(self, reason: str = "time") -> None:
        """Sign the chain's head; on disk and witnessed when this returns (unless failing)."""
        with self._lock:
            self._checkpoint(reason)

    def _checkpoint(self, reason: str, *, wait: bool = True) -> None:
        """Sign the chain's head. `wait`: make it durable now, in this thread; else the
        committer does within one fdatasync, and witnesses it then."""
        seq, head, epoch = self._seq, self._head, self._epoch
        details: dict[str, Any] = {
            "appliance": self._appliance,
            "covers_seq": seq,
            "head": head,
            "epoch": epoch.number,
            "keyid": epoch.keyid,
            "reason": reason,
        }
        message = checkpoint_message(self._writer, details)
        details["signature"] = base64.b64encode(self._epoch_key.sign(message)).decode()
        self._append(self._event(CHECKPOINT, "success", details), witnessed=True)
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        # Not at "stop": an epoch certified after the last entry would make the log look cut
        # short of it (`audit verify` checks that the log reaches the last epoch). The new
        # epoch starts right after this checkpoint, once it is on disk (else the old key,
        # still the certified one, is kept until the next checkpoint tries again).
        due = reason != "stop" and time.monotonic() - self._epoch_started >= self._epoch_s
        if (wait or due) and self._sync() and due:
            self._next_epoch(self._epoch_key)

    def _next_epoch(self, certifier: Ed25519PrivateKey) -> None:
        """Certify a new epoch key from the next seq on; the old key object is dropped, so
        nothing in this process can sign for the seqs before it any more. A failure keeps
        the old key, still the certified one, until the next checkpoint tries again."""
        with contextlib.suppress(OSError):
            epoch, key = epochs.advance(
                self._dir, self._appliance, self._epochs, self._seq + 1, certifier
            )
            self._epochs.append(epoch)
            self._epoch, self._epoch_key = epoch, key
            self._epoch_started = time.monotonic()

    def _event(self, event: str, outcome: str, details: dict[str, Any]) -> dict[str, Any]:
        return {
            "event": event,
            "category": "audit",
            "outcome": outcome,
            "actor": None,
            "object": None,
            "policy_version": None,
            "details": details,
        }

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
            if self._pending:
                self._sync()  # what waited for the disk is written and synced at once
            if self._rollover_due:
                self._roll_over()
            elif self.usage >= RESERVE and time.monotonic() - self._last_expiry >= EXPIRY_CHECK_S:
                self._expire_segments()  # in the reserve few entries come to trigger it
            due = time.monotonic() - self._last_checkpoint >= self._checkpoint_s
            if due and self._since_checkpoint and not self.failing:
                self._checkpoint(
                    "time", wait=False
                )  # a quiet log still gets its last entries signed in time
            try:
                fs = os.statvfs(self._dir)
            except OSError:
                self._refused = True
                return
            if fs.f_flag & os.ST_RDONLY or fs.f_bavail * fs.f_frsize < MIN_FREE_BYTES:
                self._refused = True
            elif not self._pending:
                # Room again and nothing waits: a disk found full while every entry was
                # written (no later write to clear it) must not stay failing forever.
                self.failing = False

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                if self.held_back is not None:
                    self.held_back.flush(final=True)  # under the closing checkpoint
                self._checkpoint("stop")
            self._committer.close()  # the segment, and the thread, whatever state it is in
            self._fd = -1
            if self._next_fd >= 0:  # a rollover whose checkpoint never reached the disk
                os.close(self._next_fd)
                self._next_fd = -1
                with contextlib.suppress(OSError):
                    segment_path(self._dir, self._number + 1).unlink()  # empty, never used
            self._folder_lock.release()
        self._committer.join()

    def _append(self, body: dict[str, Any], *, witnessed: bool = False) -> dict[str, Any]:
        """Chain, seal and write an entry; `witnessed`: a checkpoint, witnessed once on disk."""
        entry: dict[str, Any] = {
            "seq": self._seq + 1,
            "time": timestamp(),
            "boot_id": self.boot_id,
            "writer": self._writer,
            **body,
            "prev_hash": self._head,
        }
        line = sealed_line(entry)
        if len(self._pending) >= PENDING_LIMIT:
            # Not chained: the chain stays whole, and what was lost is said in one entry
            # once the disk takes entries again (_flush).
            self.dropped += 1
            self._lost = self._lost or Lost(entry["time"])
            self._lost.add(entry)
            return entry
        self._seq, self._head = entry["seq"], entry["hash"]
        if witnessed:
            self._committer.awaiting(entry)
        self._pending.append(line)
        if self._next_fd >= 0 and not self._switch_after:  # the rollover checkpoint
            self._switch_after = len(self._pending)
        self._flush()
        return entry

    def _flush(self) -> None:
        """Write what is pending, in order, to the segment (not yet synced: the committer)."""
        try:
            while self._pending:
                line = self._pending[0]
                while self._partial < len(line):  # a full disk can take part of a line
                    rest = memoryview(line)[self._partial :] if self._partial else line
                    self._partial += os.write(self._fd, rest)
                self._partial = 0
                self._size += len(line)
                self._used += len(line)
                self._pending.popleft()
                self._committer.written_to(self._seq - len(self._pending))  # pending: up to _seq
                if self._switch_after:
                    self._switch_after -= 1
                    if not self._switch_after:
                        self._switch_segment()
        except OSError:
            self._refused = True
            return
        self._refused = False
        if self._lost is not None:  # writing resumed: say what could not be kept
            lost, self._lost = self._lost, None
            self._append(self._event(DROPPED, "failure", lost.details()))

    def _sync(self) -> bool:
        """Write what is pending and fdatasync it now; True when everything is on disk."""
        self._flush()
        if self._pending:
            return False
        if self._committer.written > self._committer.durable:
            self._committer.sync()
        return self._committer.durable >= self._seq

    def _witness(self, entry: dict[str, Any]) -> None:
        """A checkpoint is on disk (the committer calls this under the lock, in seq order)."""
        if self.on_checkpoint is not None:
            try:
                self.on_checkpoint(entry)
            except Exception:  # a witness must never stop the writer
                self.hook_failures += 1

    def _expire_segments(self) -> None:
        """Delete the segments retention says must go (broker.audit.retention) and record
        the anchor `audit verify` needs to accept a log that starts later."""
        self._last_expiry = time.monotonic()
        expiry = expire(
            self._dir, self._number, self._used, self._capacity_bytes, self._retention_s
        )
        self._used -= expiry.freed
        if expiry.anchor is not None:
            self._append(self._event(EXPIRED, "success", expiry.anchor))
            # Sealed at once: `audit verify` trusts an anchor only under a later checkpoint,
            # so a healthy log must not read UNPROVEN until the next one comes.
            self._checkpoint("expiry")

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
        self._next_fd = fd
        # The last entry of the old segment: _flush switches, and syncs the old segment.
        self._checkpoint("rollover", wait=False)
        if self._next_fd < 0:  # switched (else the disk refused the checkpoint: see _flush)
            self._expire_segments()

    def _switch_segment(self) -> None:
        """Continue in the segment the rollover opened, right after its checkpoint is
        written whole: a checkpoint (or part of a line) the disk refused stays due for the
        old segment, so every segment but the first still opens after a rollover checkpoint
        and no line is ever split between two segments."""
        self._committer.switch(self._next_fd)  # syncs and closes the old segment
        self._fd, self._next_fd = self._next_fd, -1
        self._number += 1
        self._size = 0

    def _start(self, numbers: list[int]) -> None:
        """Continue the chain where broker.audit.resume finds it may (or break it there),
        signed by the epoch it certifies."""
        resumed = resume(self._dir, self._root, self._appliance, self._writer, numbers)
        self._seq, self._head = resumed.seq, resumed.head
        self._epochs, self._epoch, self._epoch_key = resumed.chain, resumed.epoch, resumed.key
        self._epoch_started = time.monotonic()
        self.adopted_seq = resumed.adopted_seq
        self.chain_break = resumed.chain_break

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_: object) -> None:
        with contextlib.suppress(OSError):
            self.close()


class Lost:
    """Entries dropped at PENDING_LIMIT, summed up for their `audit_entries_dropped` entry."""

    def __init__(self, first: str) -> None:
        self.first = self.last = first
        self.events: dict[str, int] = {}

    def add(self, entry: dict[str, Any]) -> None:
        self.last = entry["time"]
        event = str(entry["event"])
        self.events[event] = self.events.get(event, 0) + 1

    def details(self) -> dict[str, Any]:
        return {
            "count": sum(self.events.values()),
            "first": self.first,
            "last": self.last,
            "events": self.events,
        }


def _size(path: Path) -> int:
    """A segment's size on disk; 0 for one that went or is no file (recovery reports it)."""
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0
