"""The folder lock: one holder at a time, the holder's pid named, nothing left by a killed one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.folder_lock import LOCK_FILE, FolderLock, FolderLockError, check_free
from tests.harness import REPO

pytestmark = pytest.mark.timeout(60)

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from broker.folder_lock import FolderLock

    lock = FolderLock(Path(sys.argv[1]))
    print("holding", flush=True)
    time.sleep(60)
    """
)


def in_use(folder: Path, pid: int) -> str:
    return (
        f"{folder}: in use by another dmzbroker process (pid {pid}); only one instance may "
        "write a folder: stop that one, or give this one other folders"
    )


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock on tmp_path/held."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "held")],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "holding\n"
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()


def test_a_second_holder_is_refused_naming_the_folder_and_the_holders_pid(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    folder = tmp_path / "held"
    with pytest.raises(FolderLockError) as refused:
        FolderLock(folder)
    assert str(refused.value) == in_use(folder, holder.pid)
    with pytest.raises(FolderLockError) as probed:
        check_free(folder)
    assert str(probed.value) == in_use(folder, holder.pid)


def test_a_killed_holder_leaves_nothing_that_blocks_the_next(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    folder = tmp_path / "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert (folder / LOCK_FILE).read_text() == f"{holder.pid}\n"  # stale, and harmless
    check_free(folder)
    with FolderLock(folder):
        assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_one_process_holds_a_folder_once_and_release_frees_it(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "folder"
    lock = FolderLock(folder)  # creates the folder
    assert oct(folder.stat().st_mode & 0o777) == "0o750"
    with pytest.raises(FolderLockError, match="in use by another dmzbroker process"):
        FolderLock(folder)  # a second writer in the same process is refused too
    lock.release()
    lock.release()  # twice is harmless
    with FolderLock(folder):
        pass
    assert (folder / LOCK_FILE).exists()  # never deleted: see the module docstring


def test_checking_a_folder_takes_nothing_and_creates_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "never-written"
    check_free(folder)
    assert not folder.exists()
    folder.mkdir()
    check_free(folder)
    assert os.listdir(folder) == []
    with FolderLock(folder):
        pass
    check_free(folder)
    with FolderLock(folder):  # the check left no lock behind
        pass


def test_an_unwritable_place_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(FolderLockError, match=r"a-file/\.lock: cannot open the folder's lock"):
        FolderLock(blocker)


def test_the_pid_may_be_missing_while_a_holder_starts(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    folder = tmp_path / "held"
    (folder / LOCK_FILE).write_text("")  # as between the holder's flock and its write
    with pytest.raises(FolderLockError) as refused:
        FolderLock(folder)
    assert "(a process whose pid is not written yet)" in str(refused.value)
