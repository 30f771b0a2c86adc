"""Reading and replacing the small files a half trusts (state records, keys, audit segments)
in folders someone else on the box might also write.

A read never follows a symbolic link at the path (a link to /dev/zero would never end) unless
its caller allows one for files an operator links on purpose (certificates), never blocks on
a FIFO or a device put in its place (a link is judged by what it points to: a regular file or
a refusal), and never reads more than its limit. A
replacement is atomic and durable: a temporary file made new by this call (a stale one, or a
link planted in its place, is removed first, never followed), fsynced, renamed over the
path, and the folder fsynced, so the record is on disk before what it records takes effect.
Both raise OSError; callers say what the file is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

_NO_LINK = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def read_regular(path: Path, limit: int, *, follow_links: bool = False) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them, else OSError."""
    flags = _NO_LINK & ~os.O_NOFOLLOW if follow_links else _NO_LINK
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if status.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # grown since fstat
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data


def replace_durably(path: Path, data: bytes, *, mode: int = 0o640) -> None:
    """Replace `path` with `data`, atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by a crash; unlink removes a link itself, never its target
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_LINK, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_folder(path.parent)


def fsync_folder(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
