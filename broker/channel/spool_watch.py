"""Waking a spool reader when the spool grows, instead of polling it (ADR 0028).

`SpoolWatch.wait()` returns when the spool folder may hold something new: a Linux inotify
watch on the folder (a write to a segment, a new segment) wakes it, a flood of writes
coalescing into one wake-up. Where no watch can be had (inotify unavailable, its limits
reached, the folder not there yet) it sleeps `poll_s`, as the readers always did, with one
`spool_watch_unavailable` warning; a watch on a file system that never reports another
host's writes is noticed at the next `RECHECK_S` and given up the same way.

The watch is read-only: inotify needs only read access to the folder and tells nothing to
the writer, so this never gives the enterprise half a way to write or signal anything of
the plant's. It uses libc through ctypes (already loaded in the half): no dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import struct
import sys
from pathlib import Path

import structlog

# <sys/inotify.h>
IN_MODIFY, IN_MOVED_TO, IN_CREATE = 0x2, 0x80, 0x100
IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED = 0x400, 0x800, 0x8000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
MASK = IN_MODIFY | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)

RECHECK_S = 1.0  # a watched reader still looks this often: a missed event costs at most this
READ_BYTES = 64 * 1024  # events read from the watch per turn; the rest wakes the next turn

log = structlog.get_logger("spool")


class _Libc:
    """inotify's three calls, from the libc this interpreter runs on; None off Linux."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.init1 = libc.inotify_init1
        self.init1.argtypes, self.init1.restype = [ctypes.c_int], ctypes.c_int
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int


@functools.cache
def _libc() -> _Libc | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return _Libc()
    except (OSError, AttributeError):  # a libc without inotify (an old or unusual one)
        return None


class SpoolWatch:
    """Wakes one reader of the spool in `directory`; falls back to sleeping `poll_s`.

    Use: read until nothing is new, then `await wait()`, and read again. A write after
    `wait()` returned wakes the next `wait()`: nothing written is left unread."""

    def __init__(self, directory: Path, poll_s: float) -> None:
        self._dir = directory
        self._poll_s = poll_s
        self._fd = -1
        self._woken = asyncio.Event()
        self._gave_up = False  # a warning was logged: polling from now on
        self._seen: tuple[str, int] | None = None  # the spool at the last wake-up
        self._watch()

    @property
    def watching(self) -> bool:
        return self._fd >= 0

    async def wait(self) -> None:
        """Until the spool may have grown, `RECHECK_S` at most; `poll_s` while unwatched."""
        if not self.watching:
            await asyncio.sleep(self._poll_s)
            if not self._gave_up:
                self._watch()  # the folder may exist now
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RECHECK_S):
                await self._woken.wait()
        if self._woken.is_set():
            self._woken.clear()  # before the caller reads: a write from now on wakes again
            self._seen = self._fingerprint()
        elif self.watching:
            self._check_missed()

    def close(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _watch(self) -> None:
        """Start watching, or say once why polling goes on (a missing folder: silently)."""
        libc = _libc()
        if libc is None:
            self._give_up("inotify is not available on this system")
            return
        fd = libc.init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            self._give_up(_os_error(ctypes.get_errno(), "inotify_init1"))
            return
        if libc.add_watch(fd, os.fsencode(self._dir), MASK) < 0:
            code = ctypes.get_errno()
            os.close(fd)
            if code != errno.ENOENT:  # the writer has not made the folder yet: tried again
                self._give_up(_os_error(code, "inotify_add_watch"))
            return
        self._fd = fd
        self._seen = self._fingerprint()
        asyncio.get_running_loop().add_reader(fd, self._on_events)

    def _on_events(self) -> None:
        """Read what is queued, one buffer a turn (the loop calls again while more waits),
        and wake the reader once however many events there were."""
        try:
            data = os.read(self._fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError as e:
            self._lost(f"reading the watch failed: {e}")
            return
        if _folder_gone(data):
            self._lost("the spool folder was removed or moved")
        self._woken.set()

    def _check_missed(self) -> None:
        """The spool changed with no event (a network file system that does not report
        another host's writes): events cannot be trusted here, so poll."""
        now = self._fingerprint()
        if now != self._seen and not self._pending():
            self._lost("the spool changed without an inotify event (a network file system?)")
        self._seen = now

    def _pending(self) -> bool:
        try:
            return bool(os.read(self._fd, READ_BYTES))
        except OSError:  # BlockingIOError: nothing queued
            return False

    def _fingerprint(self) -> tuple[str, int] | None:
        """The newest segment's name and size: what a write changes."""
        try:
            names = sorted(n for n in os.listdir(self._dir) if n.endswith(".seg"))
            return (names[-1], os.stat(self._dir / names[-1]).st_size) if names else None
        except OSError:
            return None

    def _lost(self, why: str) -> None:
        self.close()
        self._give_up(why)
        self._woken.set()  # the reader looks at once, then polls

    def _give_up(self, why: str) -> None:
        if not self._gave_up:
            self._gave_up = True
            log.warning(
                "spool_watch_unavailable",
                spool=str(self._dir),
                reason=why,
                polling_every_ms=round(self._poll_s * 1000, 1),
            )


def _folder_gone(data: bytes) -> bool:
    """Whether the events in `data` say the watched folder itself went away."""
    offset = 0
    while offset + EVENT.size <= len(data):
        _, mask, _, name_len = EVENT.unpack_from(data, offset)
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
            return True
        offset += EVENT.size + name_len
    return False


def _os_error(code: int, call: str) -> str:
    hint = {
        errno.ENOSPC: " (fs.inotify.max_user_watches reached)",
        errno.EMFILE: " (fs.inotify.max_user_instances or the open-file limit reached)",
    }.get(code, "")
    return f"{call}: {os.strerror(code)}{hint}"
