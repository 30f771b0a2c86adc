"""One writer per folder: an exclusive lock that every writer holds on the folder it writes.

The lock is flock(2) on `.lock` in the folder. The kernel drops it when the holder's last
descriptor closes, which includes every way a process can end (kill -9 too), so a lock never
outlives its holder and never blocks the next start. The holder writes its pid into the file
only so that a refused second instance can name it; nothing is decided by that pid.

Readers of a folder (the enterprise half reading the spool, `audit verify`, `audit show`)
never take the lock. This module never waits for a lock (a second instance is refused at
once) and never deletes a lock file: a writer that unlinked it could hold a lock on a file
the next writer no longer sees, and two writers would each hold "the" lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from broker.errors import DmzBrokerError

LOCK_FILE = ".lock"
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # flock's "someone else holds it"


class FolderLockError(DmzBrokerError):
    """A folder another process writes (its pid named), or whose lock cannot be taken."""


class FolderLock:
    """Holds the exclusive lock on `folder` (created if missing) until `release()`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        path = folder / LOCK_FILE
        try:
            folder.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise FolderLockError(f"{path}: cannot open the folder's lock: {e.strerror}") from e
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(self._fd)
            os.close(self._fd)
            if e.errno in _HELD:
                raise _in_use(folder, holder) from None
            raise FolderLockError(f"{path}: cannot lock: {e.strerror}") from e
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for the message a second instance prints

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def check_free(folder: Path) -> None:
    """Raise FolderLockError if a writer holds `folder` now; takes nothing and creates nothing."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # never locked: no writer has run here
    except OSError as e:
        raise FolderLockError(f"{folder / LOCK_FILE}: cannot read: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in _HELD:
            raise _in_use(folder, _holder(fd)) from None
        raise FolderLockError(f"{folder / LOCK_FILE}: cannot lock: {e.strerror}") from e
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    text = b""
    with contextlib.suppress(OSError):
        text = os.pread(fd, 32, 0).strip()
    return f"pid {int(text)}" if text.isdigit() else "a process whose pid is not written yet"


def _in_use(folder: Path, holder: str) -> FolderLockError:
    return FolderLockError(
        f"{folder}: in use by another dmzbroker process ({holder}); only one instance may "
        "write a folder: stop that one, or give this one other folders"
    )
