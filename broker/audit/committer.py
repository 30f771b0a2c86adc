"""Group commit for one audit writer (ADR 0027): one fdatasync for every entry written so far.

The audit log (broker.audit.log) writes each entry to its segment when it is recorded and
says so (`written_to`); the committer's thread fdatasyncs the segment, marks everything
written before that fdatasync began `durable`, and goes round again at once, so entries
written while one fdatasync runs share the next. It witnesses each checkpoint once it is on
disk, in seq order, under the log's lock.

It never writes an entry, and the writer never waits for it: the thread takes the log's lock
only to witness a checkpoint or to report a failed (or recovered) fdatasync, never for an
entry, so the writer and the committer do not hand the lock to each other about every
fdatasync. A failed fdatasync is `sync_error` until one succeeds: the log is failing meanwhile.
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

SYNC_RETRY_S = 0.25  # after a failed fdatasync, the committer's next try (check() tries too)
# Under a flood (a group of at least GATHER_FROM entries), the next fdatasync waits GATHER_S
# so that it covers more entries: each fdatasync round costs the recording thread CPU (GIL
# and lock hand-overs). A trickle of entries never waits (PostgreSQL's commit_delay with
# commit_siblings is the same idea).
GATHER_FROM = 64
GATHER_S = 0.002


class Committer:
    """Makes one writer's segment durable. `witness(entry)` and `health(ok)` are the log's,
    called under its `lock`: each checkpoint entry once on disk, and a failed fdatasync (False)
    or the first success after one (True)."""

    def __init__(
        self,
        name: str,
        fd: int,
        seq: int,
        *,
        lock: threading.RLock,
        witness: Callable[[dict[str, Any]], None],
        health: Callable[[bool], None],
    ) -> None:
        self.written = self.durable = seq  # the last seq written / known to be on disk
        self.sync_error = False  # the last fdatasync failed: what was written may be gone
        self._fd = fd
        self._lock = lock
        self._witness = witness
        self._health = health
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
        Called under the log's lock."""
        target = self.written
        with self._io:
            try:
                os.fdatasync(self._fd)
                synced = True
            except OSError:  # the segment is complete whatever its last fdatasync says
                synced = False
            os.close(self._fd)
            self._fd = fd
            if synced:
                self.durable = max(self.durable, target)
        self._after(synced)

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
        earlier segments were synced by `switch`)."""
        with self._io:
            if self._fd < 0:
                return True
            try:
                os.fdatasync(self._fd)
                synced = True
            except OSError:
                synced = False
            else:
                # Only under _io: every fdatasync is, so `durable` never goes back.
                self.durable = max(self.durable, target)
        if synced and not self.sync_error and not self._awaiting:
            return True  # the common case: nothing to tell the log, so no lock to take
        with self._lock:
            self._after(synced)
        return synced

    def _after(self, synced: bool) -> None:
        """Under the log's lock: report a change of health, witness what is on disk."""
        if synced != (not self.sync_error):
            self.sync_error = not synced
            self._health(synced)
        while self._awaiting and self._awaiting[0]["seq"] <= self.durable:
            self._witness(self._awaiting.popleft())
