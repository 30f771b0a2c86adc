"""A reader started before the plant half has made the spool folder, or its first segment,
reads what another process's SpoolSender writes afterwards, in whatever order the folder,
the segment and the reader appear: by polling while there is no folder to watch, then by
the watch alone (`RECHECK_S` an hour: only an inotify event wakes a watched reader before
the test's bound). A bench once saw both readers of the enterprise half read nothing when
the folder came late; these tests show that the watch and the receiver do not miss it."""

from __future__ import annotations

from pathlib import Path

import structlog

from broker.channel.spool import SpoolReceiver
from broker.channel.spool_watch import SpoolWatch
from broker.records import Record
from tests.channel.test_spool_watch import BOUND_S, HOUR, unhurried, writer
from tests.harness import eventually, running

__all__ = ["unhurried"]  # the fixture, used by name

POLL_S = 0.05  # a sink's period where the spool is not watched (IDLE_S)


async def read(spool: Path, state: Path, watch: SpoolWatch, got: list[Record]) -> None:
    """A reader as the enterprise half's: read until caught up, then wait on the watch."""
    receiver = SpoolReceiver(spool, state)
    try:
        while True:
            records = receiver.receive()
            got += records
            receiver.commit()
            if not records:
                await watch.wait()
    finally:
        receiver.close()


async def written(spool: Path, batches: int, size: int) -> None:
    """A real SpoolSender in another process writes `batches` batches of `size` records."""
    process = writer(spool, batches, size)
    try:
        await eventually(lambda: process.poll() is not None, timeout=BOUND_S)
        assert process.returncode == 0
    finally:
        process.kill()
        process.wait()


def seqs(got: list[Record]) -> list[int]:
    return [r.seq for r in got]


async def test_a_folder_and_segment_made_after_the_reader_started_are_read(
    tmp_path: Path, unhurried: None
) -> None:
    """Not even the folder's parent exists when the reader starts."""
    spool = tmp_path / "plant" / "spool"
    got: list[Record] = []
    with structlog.testing.capture_logs() as logs:
        watch = SpoolWatch(spool, POLL_S)
        try:
            assert not watch.watching
            async with running(read(spool, tmp_path / "state", watch, got)):
                await written(spool, 3, 4)
                await eventually(lambda: len(got) == 12, timeout=BOUND_S)
                assert watch.watching  # it started watching once the folder was there
                await written(spool, 2, 5)  # a new segment, seen by the watch alone
                await eventually(lambda: len(got) == 22, timeout=BOUND_S)
            assert seqs(got) == list(range(1, 23))
            assert watch.watching
        finally:
            watch.close()
    assert logs == []  # a folder not made yet is no fault


async def test_a_first_segment_made_after_the_reader_started_wakes_it(
    tmp_path: Path, unhurried: None
) -> None:
    """The folder is there, empty: the watch alone (polling an hour) sees the first segment."""
    spool = tmp_path / "spool"
    got: list[Record] = []
    spool.mkdir()
    watch = SpoolWatch(spool, poll_s=HOUR)
    try:
        assert watch.watching
        async with running(read(spool, tmp_path / "state", watch, got)):
            await written(spool, 3, 4)
            await eventually(lambda: len(got) == 12, timeout=BOUND_S)
        assert seqs(got) == list(range(1, 13))
    finally:
        watch.close()


async def test_a_folder_made_empty_after_the_reader_started_is_watched_for_its_segment(
    tmp_path: Path, unhurried: None
) -> None:
    spool = tmp_path / "spool"
    got: list[Record] = []
    watch = SpoolWatch(spool, POLL_S)
    try:
        async with running(read(spool, tmp_path / "state", watch, got)):
            assert not watch.watching
            spool.mkdir()
            await eventually(lambda: watch.watching, timeout=BOUND_S)
            await written(spool, 3, 4)
            await eventually(lambda: len(got) == 12, timeout=BOUND_S)
        assert seqs(got) == list(range(1, 13))
    finally:
        watch.close()
