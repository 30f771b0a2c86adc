"""Which processes make up a running half, as the kernel records them.

A half is found by the kernel's record of who holds its audit folder's lock (/proc/locks,
matched by the lock file's device and inode), never by the pid the half writes into that file:
the half owns the file and could name a decoy there. Its processes are the holder, the
holder's descendants and every process whose real or effective uid is one of the holder's: what
a half's user runs beside it acts in the half's name. When two halves share a user, those
sets cannot be told apart; each half is then only its holder and its descendants, and the
caller reports that they are not separated.

It only reads /proc; it never opens, locks, signals or writes anything of a half.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection
from pathlib import Path

import msgspec
import psutil

from broker.errors import DmzBrokerError
from broker.folder_lock import LOCK_FILE
from broker.safe_files import read_regular

LOCKS = Path("/proc/locks")
_LOCKS_LIMIT = 64 * 1024 * 1024  # one short line per lock held on the host


class HolderError(DmzBrokerError):
    """A lock the kernel records but whose holder cannot be named."""


class Holder(msgspec.Struct, frozen=True):
    pid: int
    real_uid: int
    effective_uid: int


def holder(folder: Path) -> Holder | None:
    """The process that holds `folder`'s lock exclusively now; None when none does (or the
    folder was never locked). OSError when the lock file or the process cannot be inspected,
    HolderError when the kernel's record names no visible process."""
    path = folder / LOCK_FILE
    try:
        status = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(status.st_mode):
        raise HolderError(f"{path}: is not a regular file")
    pids = writers(read_regular(LOCKS, _LOCKS_LIMIT).decode("ascii", "replace"), status)
    if not pids:
        return None
    if len(pids) > 1 or pids[0] <= 0:
        # 0: a holder in another pid namespace (or one that is gone); flock is exclusive, so
        # more than one is a record this reader cannot interpret.
        raise HolderError(f"{path}: held by {pids}, no process visible here")
    try:
        uids = psutil.Process(pids[0]).uids()
    except psutil.NoSuchProcess:
        return None  # exited since /proc/locks was read: its lock went with it
    except psutil.Error as e:
        raise HolderError(f"pid {pids[0]}, holding {path}: cannot be inspected: {e}") from e
    return Holder(pids[0], uids.real, uids.effective)


def writers(proc_locks: str, lock: os.stat_result) -> list[int]:
    """The pids holding an exclusive flock on the file `lock` describes, from the text of
    /proc/locks (`1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF`, major and
    minor in hex; a waiter's line has `->` after the number and holds nothing)."""
    wanted = (os.major(lock.st_dev), os.minor(lock.st_dev), lock.st_ino)
    found = []
    for line in proc_locks.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1:4] != ["FLOCK", "ADVISORY", "WRITE"]:
            continue
        device = fields[5].split(":")
        try:
            where = (int(device[0], 16), int(device[1], 16), int(device[2]))
            pid = int(fields[4])
        except (ValueError, IndexError):
            continue
        if where == wanted:
            found.append(pid)
    return found


def members(held: Holder, *, shared: bool) -> list[psutil.Process]:
    """The processes of the half `held` holds the lock for: with `shared` (its user runs
    another half too), the holder and its descendants only; otherwise also every process of
    its user. psutil.Error when the holder is gone."""
    process = psutil.Process(held.pid)
    found = {p.pid: p for p in [process, *process.children(recursive=True)]}
    if not shared:
        found.update((p.pid, p) for p in of_users({held.real_uid, held.effective_uid}))
    return [found[pid] for pid in sorted(found)]


def of_users(uids: Collection[int]) -> list[psutil.Process]:
    """Every visible process whose real or effective uid is in `uids`."""
    found = []
    for process in psutil.process_iter(["uids"]):
        ids = process.info["uids"]
        if ids is not None and (ids.real in uids or ids.effective in uids):
            found.append(process)
    return found
