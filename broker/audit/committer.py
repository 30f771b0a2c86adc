"""Group commit for one audit writer (ADR 0027): one fdatasync for every entry written so far.

The audit log (broker.audit.log) writes each entry to its segment when it is recorded and
says so (`written_to`); the committer's thread fdatasyncs the segment, marks everything
written before that fdatasync began `durable`, and goes round again at once, so entries
written while one fdatasync runs share the next. It witnesses each checkpoint once it is on
disk, in seq order, under the log's lock.

It never writes an entry, and the writer never waits for it: the thread takes the log's lock
only to witness a checkpoint, never for an entry, so the writer and the committer do not hand
the lock to each other about every fdatasync.

A failed fdatasync is final for this process (`sync_error`): Linux marks the pages it could
not write clean, so a later fdatasync returns 0 without writing them, and a read-back finds
them in the page cache whether or not the disk has them. Nothing after `durable` can be
shown to be on disk again, so `durable` stays where it was, later checkpoints are never
witnessed, and the log stays failing until the process starts again (ADR 0027, amendment 3):
the log's `failing` reads `sync_error` itself, so it is failing the moment it is set.
This holds for the last fdatasync of a segment at rollover as for any other.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

# After a failed fdatasync the committer still syncs what is written, this often: best effort
# (the kernel's own writeback would do it later), never counted as durable again.
SYNC_RETRY_S = 0.25
# Under a flood (a group of at least GATHER_FROM entries), the next fdatasync waits GATHER_S
# so that it covers more entries: each fdatasync round costs the recording thread CPU (GIL
# and lock hand-overs). A trickle of entries never waits (PostgreSQL's commit_delay with
# commit_siblings is the same idea).
GATHER_FROM = 64
GATHER_S = 0.002


class Committer:
    """Makes one writer's segment durable. `witness(entry)` is the log's, called under its
    `lock` with each checkpoint entry once it is on disk."""

    def __init__(
        self,
        name: str,
        fd: int,
        seq: int,
        *,
        lock: threading.RLock,
        witness: Callable[[dict[str, Any]], None],
    ) -> None:
        self.written = self.durable = seq  # the last seq written / known to be on disk
        # The first failed fdatasync: what was written after `durable` may be gone, and
        # `durable` no longer moves. Set under _io, so no later fdatasync can move it first.
        self.sync_error: OSError | None = None
        self._fd = fd
        self._lock = lock
        self._witness = witness
        self._io = threading.Lock()  # held over an fdatasync, and to switch or close the fd
        self._awaiting: deque[dict[str, Any]] = deque()  # checkpoints not yet witnessed
        self._idle = False  # the thread waits for an entry: `written_to` wakes it
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()  # no lock shared with writers
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def awaiting(self, entry: dict[str, Any]) -> None:
        """A checkpoint about to be written: witnessed once on disk. Before its write, so the
        fdatasync that covers it always finds it here (the rollover's included)."""
        self._awaiting.append(entry)

    def written_to(self, seq: int) -> None:
        """Entries up to `seq` are written to the current segment (called for each)."""
        self.written = seq
        if self._idle:
            self._idle = False
            self._wake.put(None)

    def sync(self) -> None:
        """fdatasync now, in the caller's thread (which holds the log's lock)."""
        self._sync_to(self.written)

    def switch(self, fd: int) -> None:
        """Continue in the segment `fd` (a rollover); the current one, complete, is synced
        and closed first, and everything written so far counts as on disk if that worked.
        If it failed, the segment is closed all the same (it is complete, and its descriptor
        is of no more use: a second fdatasync would not write the pages the first could
        not), and the failure is final. Called under the log's lock."""
        target = self.written
        with self._io:
            self._fdatasync(target)
            os.close(self._fd)
            self._fd = fd
        self._after()

    def close(self) -> None:
        """Stop the thread and close the segment (under the log's lock); `join` after
        releasing it: the thread may be waiting for the lock to witness."""
        self._closing = True
        self._wake.put(None)
        with self._io:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def join(self) -> None:
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join()  # a witness may close the log from this thread

    def _run(self) -> None:
        while not self._closing:
            target, before = self.written, self.durable
            if target <= before:
                self._idle = True
                if self.written <= self.durable and not self._closing:  # no lost wake-up
                    self._wake.get()
                self._idle = False
            elif not self._sync_to(target):  # a failing disk is retried, not spun on
                with contextlib.suppress(queue.Empty):
                    self._wake.get(timeout=SYNC_RETRY_S)
            elif target - before >= GATHER_FROM:
                time.sleep(GATHER_S)

    def _sync_to(self, target: int) -> bool:
        """fdatasync the segment, which holds every entry up to seq `target` (those of
        earlier segments were synced by `switch`); True when they are now durable."""
        with self._io:
            if self._fd < 0:
                return True
            durable = self._fdatasync(target)
        if not durable or not self._awaiting:
            return durable  # nothing moved, or nothing to witness: no lock to take
        with self._lock:
            self._after()
        return True

    def _fdatasync(self, target: int) -> bool:
        """Under _io (every fdatasync is, so `durable` never goes back): sync the segment and
        move `durable` to `target`, unless this or an earlier fdatasync failed."""
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            if self.sync_error is None:
                self.sync_error = e
            return False
        if self.sync_error is not None:
            return False  # written back now, perhaps, but not what the failed one lost
        self.durable = max(self.durable, target)
        return True

    def _after(self) -> None:
        """Under the log's lock: witness what is on disk."""
        while self._awaiting and self._awaiting[0]["seq"] <= self.durable:
            self._witness(self._awaiting.popleft())
