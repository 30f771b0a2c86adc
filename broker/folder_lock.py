"""One writer per folder: an exclusive lock that every writer holds on the folder it writes.

The lock is flock(2) on `.lock` in the folder. The kernel drops it when the holder's last
descriptor closes, which includes every way a process can end (kill -9 too), so a lock never
outlives its holder and never blocks the next start. The holder writes its pid into the file
only so that a refused second instance can name it; nothing is decided by that pid.

Readers of a folder (the enterprise half reading the spool, `audit verify`, `audit show`)
never take the lock. A writer that finds the lock held tries again for `HELD_GRACE_S` before
it is refused: `check_free` holds the lock for an instant to test it, and a writer starting
at that instant must not be told that another process writes its folder. A real holder
keeps the lock for its whole life, so a second instance is still refused, only a moment
later. This module never waits longer than that, and never deletes a lock file: a writer
that unlinked it could hold a lock on a file the next writer no longer sees, and two
writers would each hold "the" lock.

The lock file is opened without following a symbolic link and must be a regular file with
one link, owned by this process's user: anything else is refused, naming it, so that a
`.lock` planted as a link to another file never has that file truncated and overwritten.
It is private to its writer (0600; a holder makes an older, wider one so): flock(2) needs no
write access, so anyone who could open it, such as the spool readers' group in the plant's
folders, could take the lock while the writer is down and keep it from ever starting again.
Root (`run`'s check, `posture`) still opens it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from pathlib import Path

import structlog

from broker.errors import DmzBrokerError

LOCK_FILE = ".lock"
LOCK_MODE = 0o600  # only the writer opens it (root too): see the module's docstring
HELD_GRACE_S = 0.5  # how long a held lock is tried again: far longer than a check holds it
_RETRY_EVERY_S = 0.01
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # flock's "someone else holds it"

log = structlog.get_logger("folder_lock")


class FolderLockError(DmzBrokerError):
    """A folder another process writes (its pid named), or whose lock cannot be taken."""


class FolderLock:
    """Holds the exclusive lock on `folder` (created if missing) until `release()`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        path = folder / LOCK_FILE
        try:
            folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as e:
            raise FolderLockError(f"{path}: cannot open the folder's lock: {e.strerror}") from e
        self._fd = _open(path, os.O_RDWR | os.O_CREAT)
        try:
            # Before the lock is tried: a file left 0640 by an older version is closed to the
            # group now, although a descriptor someone opened before stays theirs until the
            # writer's next start finds the lock free (or is refused, naming them).
            os.fchmod(self._fd, LOCK_MODE)
            _flock_soon(self._fd)
        except OSError as e:
            holder = _holder(self._fd)
            os.close(self._fd)
            if e.errno in _HELD:
                raise _in_use(folder, holder) from None
            raise FolderLockError(f"{path}: cannot lock: {e.strerror}") from e
        pid = f"{os.getpid()}\n".encode()
        try:
            os.ftruncate(self._fd, 0)
            error = None if os.pwrite(self._fd, pid, 0) == len(pid) else "a short write"
        except OSError as e:
            error = e.strerror
        if error is not None:
            # The lock holds without it; only a refused second instance's message lacks the
            # pid. But a lock file that cannot be written says the folder may not be either.
            log.warning("lock_pid_write_failed", path=str(path), error=error)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def check_free(folder: Path, owner: int | None = None) -> None:
    """Raise FolderLockError if a writer holds `folder` now. Creates nothing, and holds the
    lock only for the instant of the test (a writer starting then waits it out). `owner`:
    the uid whose lock file it must be (`run` as root checks its halves' folders); default,
    this process's."""
    try:
        fd = _open(folder / LOCK_FILE, os.O_RDONLY, owner)
    except FileNotFoundError:
        return  # never locked: no writer has run here
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in _HELD:
            raise _in_use(folder, _holder(fd)) from None
        raise FolderLockError(f"{folder / LOCK_FILE}: cannot lock: {e.strerror}") from e
    finally:
        os.close(fd)


def holder(folder: Path) -> int | None:
    """The pid recorded by the process that holds `folder`'s lock now; None when no process
    holds it (or it was never locked). For `dmzbroker posture`, which finds a running half by
    the folder it writes, as root or as any user who may read the lock file.

    Never creates, writes or needs to own the lock file (root reads a half's); it tests the
    lock as `check_free` does, for an instant (a writer starting then waits it out). Raises
    OSError when the lock file cannot be opened (another user's folder, a symbolic link) and
    FolderLockError for one that is no regular file, or held before its pid is written."""
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FolderLockError(f"{path}: is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in _HELD:
                raise
            pid = _recorded_pid(fd)
            if pid is None:
                raise FolderLockError(
                    f"{path}: held by a process whose pid is not written yet"
                ) from None
            return pid
        return None  # we got it: nobody holds it (closing the descriptor drops ours)
    finally:
        os.close(fd)


def _open(path: Path, flags: int, owner: int | None = None) -> int:
    """A descriptor of the lock file at `path`, refused unless it is a regular file of ours;
    raises FileNotFoundError (without O_CREAT) or FolderLockError."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, LOCK_MODE)
    except FileNotFoundError:
        if flags & os.O_CREAT:
            raise FolderLockError(f"{path}: cannot open the folder's lock: no folder") from None
        raise
    except OSError as e:
        if e.errno == errno.EISDIR:
            raise FolderLockError(
                f"{path}: is not a regular file; a lock file must be a regular file of ours"
            ) from None
        if e.errno == errno.ELOOP:
            raise FolderLockError(
                f"{path}: is a symbolic link; a lock file must be a regular file (remove it)"
            ) from None
        raise FolderLockError(f"{path}: cannot open the folder's lock: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        problem = _not_ours(st, os.geteuid() if owner is None else owner)
    except OSError as e:
        problem = f"cannot inspect: {e.strerror}"
    if problem is not None:
        os.close(fd)
        raise FolderLockError(f"{path}: {problem}; a lock file must be a regular file of ours")
    return fd


def _not_ours(st: os.stat_result, owner: int) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != owner:
        whose = "this process's uid" if owner == os.geteuid() else "its writer's uid"
        return f"is owned by uid {st.st_uid}, not by {whose} {owner}"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} hard links (another name for some other file)"
    return None


def _flock_soon(fd: int) -> None:
    """Take the lock, trying again for HELD_GRACE_S while it is held; raises OSError."""
    deadline = time.monotonic() + HELD_GRACE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in _HELD or time.monotonic() >= deadline:
                raise
        time.sleep(_RETRY_EVERY_S)


def _holder(fd: int) -> str:
    pid = _recorded_pid(fd)
    return f"pid {pid}" if pid is not None else "a process whose pid is not written yet"


def _recorded_pid(fd: int) -> int | None:
    text = b""
    with contextlib.suppress(OSError):
        text = os.pread(fd, 32, 0).strip()
    return int(text) if text.isdigit() else None


def _in_use(folder: Path, holder: str) -> FolderLockError:
    return FolderLockError(
        f"{folder}: in use by another dmzbroker process ({holder}); only one instance may "
        "write a folder: stop that one, or give this one other folders"
    )
