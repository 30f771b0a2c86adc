"""The folder lock: one holder at a time, the holder's pid named, nothing left by a killed one,
no lock file planted by someone else followed, and a check never taken for a holder."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
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


# --- a lock file planted by someone else is never followed or overwritten -------------------


def _planted(tmp_path: Path) -> tuple[Path, Path]:
    folder, victim = tmp_path / "spool", tmp_path / "victim"
    folder.mkdir()
    victim.write_text("precious\n")
    return folder, victim


def test_a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    folder, victim = _planted(tmp_path)
    (folder / LOCK_FILE).symlink_to("../victim")

    for take in (FolderLock, check_free):
        with pytest.raises(FolderLockError) as refused:
            take(folder)
        assert str(refused.value) == (
            f"{folder / LOCK_FILE}: is a symbolic link; a lock file must be a regular file "
            "(remove it)"
        )
    assert victim.read_text() == "precious\n"


def test_a_lock_file_that_is_another_name_for_some_file_is_refused(tmp_path: Path) -> None:
    folder, victim = _planted(tmp_path)
    os.link(victim, folder / LOCK_FILE)

    with pytest.raises(FolderLockError, match=r"\.lock: has 2 hard links"):
        FolderLock(folder)
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_lock_file_that_is_no_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    if kind == "directory":
        (folder / LOCK_FILE).mkdir()
    else:
        os.mkfifo(folder / LOCK_FILE)

    for take in (FolderLock, check_free):
        with pytest.raises(FolderLockError) as refused:
            take(folder)
        assert str(refused.value).startswith(f"{folder / LOCK_FILE}: ")
        assert "regular file" in str(refused.value)
        assert len(str(refused.value).splitlines()) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_lock_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    folder, _ = _planted(tmp_path)
    (folder / LOCK_FILE).write_text("")
    os.chown(folder / LOCK_FILE, 4242, 4242)

    with pytest.raises(FolderLockError, match="is owned by uid 4242, not by this process's uid 0"):
        FolderLock(folder)
    assert (folder / LOCK_FILE).read_text() == ""


def test_a_writer_starting_while_a_check_holds_the_lock_for_an_instant_is_not_refused(
    tmp_path: Path,
) -> None:
    """`check_free` takes the lock to test it; a writer must not take that for a holder."""
    folder = tmp_path / "spool"
    folder.mkdir()
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as check_free does, for an instant
    release = threading.Timer(0.05, os.close, (fd,))
    release.start()
    try:
        with FolderLock(folder):
            assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        release.join(timeout=5)


def test_the_lock_file_is_the_writers_alone_and_an_older_wider_one_is_narrowed(
    tmp_path: Path,
) -> None:
    """Review r1 #1: flock needs no write access, so a lock file the spool readers' group can
    open lets them take it while the writer is down and keep the writer from starting."""
    new, old = tmp_path / "new", tmp_path / "old"
    old.mkdir()
    (old / LOCK_FILE).write_text("")
    (old / LOCK_FILE).chmod(0o640)  # as every version before this one made it
    previous = os.umask(0)
    try:
        with FolderLock(new), FolderLock(old):
            assert stat.S_IMODE((new / LOCK_FILE).stat().st_mode) == 0o600
            assert stat.S_IMODE((old / LOCK_FILE).stat().st_mode) == 0o600
    finally:
        os.umask(previous)


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root")
def test_another_user_cannot_open_the_lock_file_to_take_it() -> None:
    # Not under tmp_path, whose parents are 0700: the folder open to everyone, so that only
    # the file's mode keeps another user out.
    with tempfile.TemporaryDirectory(prefix="dmzbroker-lock-", dir="/tmp") as place:
        folder = Path(place)
        folder.chmod(0o755)
        FolderLock(folder).release()
        group = (folder / LOCK_FILE).stat().st_gid  # in the file's group, as spool readers are
        opened = subprocess.run(
            ["/usr/bin/python3", "-I", "-c", f"import os; os.open({place!r} + '/.lock', 0)"],
            user=65534, group=65534, extra_groups=[group], capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
    assert opened.returncode == 1
    assert "PermissionError" in opened.stderr


PID_UNWRITABLE = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from broker.folder_lock import FolderLock

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    lock = FolderLock(Path(sys.argv[1]))
    print("holding", flush=True)
    """
)


def test_a_pid_that_cannot_be_written_is_said_and_the_lock_still_held(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PID_UNWRITABLE, str(tmp_path / "spool")],
        capture_output=True, text=True, cwd=REPO, timeout=30, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "lock_pid_write_failed" in result.stdout + result.stderr
    assert "File too large" in result.stdout + result.stderr
    assert result.stdout.strip().endswith("holding")
