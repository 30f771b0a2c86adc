"""SpoolWatch: a reader of the spool woken by inotify when another process writes, a burst
coalesced, and polling (with one warning) where no watch can be had.

Where a test must show that a wake-up came from the watch, `RECHECK_S` and the polling
period are an hour: only an inotify event can end the wait before the test's own bound."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog

from broker.channel import spool_watch
from broker.channel.spool import SpoolReceiver
from broker.channel.spool_watch import SpoolWatch
from tests.channel.test_spool import send

HOUR = 3600.0
BOUND_S = 60.0  # generous: a loaded machine; only a missed wake-up ever comes near it

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from broker.channel.spool import SpoolSender
    from tests.channel.test_spool import record
    spool, batches, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    sender = SpoolSender(spool, segment_bytes=4096, retention_bytes=1 << 30)
    for b in range(batches):
        sender.send([record(b * size + i) for i in range(size)])
        time.sleep(0.001)  # the writer's own pace, like a scan: the reader goes idle between
    sender.close()
""")


@pytest.fixture
def unhurried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_watch, "RECHECK_S", HOUR)


def writer(spool: Path, batches: int, size: int) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-c", WRITER, str(spool), str(batches), str(size)]
    return subprocess.Popen(args, cwd=Path(__file__).resolve().parents[2])


async def test_an_append_by_another_process_wakes_the_waiter(
    tmp_path: Path, unhurried: None
) -> None:
    tmp_path.joinpath("spool").mkdir()
    watch = SpoolWatch(tmp_path / "spool", poll_s=HOUR)
    process = writer(tmp_path / "spool", 1, 3)
    try:
        assert watch.watching
        async with asyncio.timeout(BOUND_S):
            await watch.wait()
        assert process.wait(BOUND_S) == 0
        async with asyncio.timeout(BOUND_S):  # the segment may have been read half written
            while len(SpoolReceiver(tmp_path / "spool", tmp_path / "state").receive()) < 3:
                await watch.wait()
    finally:
        process.kill()
        process.wait()
        watch.close()


async def test_a_burst_of_thousands_of_events_wakes_the_waiter_a_few_times(
    tmp_path: Path, unhurried: None
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    watch = SpoolWatch(spool, poll_s=HOUR)
    try:
        for n in range(3000):  # distinct names: the kernel merges none of these events
            spool.joinpath(f"{n:010d}.seg").write_bytes(b"x")
        wakes = 0
        for _ in range(100):
            try:
                async with asyncio.timeout(0.5):
                    await watch.wait()
            except TimeoutError:
                break
            wakes += 1
        assert 1 <= wakes <= 5  # one per buffer of events read at most, not one per event
        assert watch.watching
    finally:
        watch.close()


async def test_every_record_is_read_once_in_order_while_another_process_writes(
    tmp_path: Path, unhurried: None
) -> None:
    """The reader waits on the watch whenever it has caught up: a wake-up lost between its
    read and its wait would stall it here for an hour."""
    spool, batches, size = tmp_path / "spool", 300, 7
    spool.mkdir()
    watch = SpoolWatch(spool, poll_s=HOUR)
    receiver = SpoolReceiver(spool, tmp_path / "state")
    process = writer(spool, batches, size)
    seqs: list[int] = []
    try:
        async with asyncio.timeout(BOUND_S * 2):
            while len(seqs) < batches * size:
                records = receiver.receive()
                seqs += [r.seq for r in records]
                receiver.commit()
                if not records:
                    await watch.wait()
        assert process.wait(BOUND_S) == 0
        assert seqs == list(range(1, batches * size + 1))
        assert watch.watching
    finally:
        process.kill()
        process.wait()
        receiver.close()
        watch.close()


async def test_a_spool_folder_not_made_yet_is_polled_quietly_then_watched(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    with structlog.testing.capture_logs() as logs:
        watch = SpoolWatch(spool, poll_s=0.01)
        try:
            assert not watch.watching
            await watch.wait()  # a poll
            send(spool, [1.0])
            async with asyncio.timeout(BOUND_S):
                while not watch.watching:
                    await watch.wait()
        finally:
            watch.close()
    assert logs == []  # not made yet is no fault


async def test_a_watched_folder_removed_falls_back_to_polling_with_one_warning(
    tmp_path: Path, unhurried: None
) -> None:
    spool = tmp_path / "spool"
    send(spool, [1.0])
    with structlog.testing.capture_logs() as logs:
        watch = SpoolWatch(spool, poll_s=0.01)
        try:
            assert watch.watching
            shutil.rmtree(spool)
            async with asyncio.timeout(BOUND_S):
                await watch.wait()
            assert not watch.watching
            send(spool, [2.0])  # made again: read by polling
            receiver = SpoolReceiver(spool, tmp_path / "state")
            async with asyncio.timeout(BOUND_S):
                while not receiver.receive():
                    await watch.wait()
            receiver.close()
        finally:
            watch.close()
    warnings = [e for e in logs if e["event"] == "spool_watch_unavailable"]
    assert len(warnings) == 1
    assert "removed" in warnings[0]["reason"] and warnings[0]["polling_every_ms"] == 10.0


# A real limit, in a child so that no other test loses descriptors: with every descriptor
# the process may have in use, inotify_init1 fails (EMFILE, as at fs.inotify.max_user_instances).
NO_DESCRIPTORS = textwrap.dedent("""
    import asyncio, json, os, resource, sys
    from pathlib import Path
    import structlog
    from broker.channel.spool import SpoolReceiver
    from broker.channel.spool_watch import SpoolWatch
    from tests.channel.test_spool import send
    spool, state = Path(sys.argv[1]), Path(sys.argv[2])

    async def main():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        hoard = []
        try:
            while len(hoard) < 1000:
                hoard.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        with structlog.testing.capture_logs() as logs:
            watch = SpoolWatch(spool, poll_s=0.01)
        for fd in hoard:
            os.close(fd)
        send(spool, [1.0, 2.0])
        receiver = SpoolReceiver(spool, state)
        got = []
        for _ in range(10_000):
            got += receiver.receive()
            if len(got) == 2:
                break
            await watch.wait()
        print(json.dumps({"watching": watch.watching, "logs": logs, "read": len(got)}))

    asyncio.run(main())
""")


def test_with_no_descriptor_left_for_inotify_it_polls_and_says_so_once(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    args = [sys.executable, "-c", NO_DESCRIPTORS, str(tmp_path / "spool"), str(tmp_path / "st")]
    done = subprocess.run(
        args,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        timeout=BOUND_S,
    )
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert result["read"] == 2 and not result["watching"]
    [warning] = result["logs"]
    assert warning["event"] == "spool_watch_unavailable"
    assert "inotify_init1" in warning["reason"] and "open-file limit" in warning["reason"]


async def test_a_file_system_that_reports_no_writes_is_noticed_and_polled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network file system's writes from another host raise no event here. No such file
    system is at hand: the watch is made to see no event (the only fault mocked here)."""
    monkeypatch.setattr(spool_watch, "RECHECK_S", 0.05)
    monkeypatch.setattr(SpoolWatch, "_pending", lambda self: False)
    monkeypatch.setattr(SpoolWatch, "_on_events", _swallow)
    spool = tmp_path / "spool"
    spool.mkdir()
    with structlog.testing.capture_logs() as logs:
        watch = SpoolWatch(spool, poll_s=0.01)
        try:
            assert watch.watching
            send(spool, [1.0])
            async with asyncio.timeout(BOUND_S):
                while watch.watching:
                    await watch.wait()
        finally:
            watch.close()
    [warning] = logs
    assert (
        warning["event"] == "spool_watch_unavailable"
        and "without an inotify event" in (warning["reason"])
    )


def _swallow(self: SpoolWatch) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(self._fd, spool_watch.READ_BYTES)
