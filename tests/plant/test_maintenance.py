"""The CMMS export as spreadsheets and CMMS tools write it, the mistakes that must not read
as "no work orders" or pick one of two truths, and a file the IT side could have written,
reached through a link, or swapped between the check and the read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import structlog

from broker.config import MaintenanceConfig
from broker.errors import ConfigError
from broker.plant import maintenance
from broker.plant.maintenance import MaintenanceBook, parse_entries

HEADER = "asset,last_service,next_due,open_work_orders\n"
ROW = "site/plant/compressor,2026-01-01,2099-01-01,WO-1: Oil filter; WO-2: Belt\n"


def write(tmp_path: Path, text: str, name: str = "cmms.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def load_entries(path: Path) -> list[Any]:
    return parse_entries(path.read_bytes(), path)


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "cmms.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + ROW).encode())  # Excel's "CSV UTF-8"

    (entry,) = load_entries(path)
    assert entry.asset == "site/plant/compressor"
    assert [(w.id, w.title) for w in entry.open_work_orders] == [
        ("WO-1", "Oil filter"), ("WO-2", "Belt"),
    ]  # fmt: skip


def test_an_unknown_column_is_refused_by_name(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER.replace("open_work_orders", "open_work_order") + ROW)

    with pytest.raises(ConfigError, match=r"cmms.csv:1: unknown column 'open_work_order'"):
        load_entries(path)


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        (
            "cmms.csv",
            HEADER + ROW + ROW.replace("WO-1: Oil filter; WO-2: Belt", "WO-3: x"),
            "cmms.csv:3",
        ),
        (
            "cmms.yaml",
            "- {asset: site/plant/compressor}\n- {asset: site/plant/compressor}\n",
            "cmms.yaml: entry 2",
        ),
    ],
)
def test_an_asset_listed_twice_is_refused(tmp_path: Path, name: str, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=f"{where}: site/plant/compressor is listed twice"):
        load_entries(write(tmp_path, text, name))


def test_empty_rows_as_spreadsheets_export_them_are_skipped(tmp_path: Path) -> None:
    (entry,) = load_entries(write(tmp_path, HEADER + ROW + ",,,\n,,,\n"))
    assert entry.asset == "site/plant/compressor"


def test_an_error_names_the_line_of_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "\n" + ROW + "\nsite/plant/pump,,not-a-date,\n")

    with pytest.raises(ConfigError, match=r"cmms.csv:5: next_due"):
        load_entries(path)


def test_a_yaml_error_names_the_line_and_the_nearest_key(tmp_path: Path) -> None:
    text = "- asset: site/plant/compressor\n- asset: site/plant/pump\n  next_dew: 2026-01-01\n"
    with pytest.raises(ConfigError) as refused:
        load_entries(write(tmp_path, text, "cmms.yaml"))
    assert str(refused.value).endswith(
        "cmms.yaml:3: [1]: unknown key 'next_dew' — did you mean 'next_due'?"
    )


# Where the file comes from: only root or the plant user may have written it (an IT share
# would let the enterprise side, or anyone, write what the plant half trusts).


def book_of(path: Path) -> MaintenanceBook:
    return MaintenanceBook(MaintenanceConfig(file=path))


def look_again(book: MaintenanceBook) -> None:
    book._checked = -10.0  # the next look does not wait for its second


def refusals(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in logs if e["event"] == "maintenance_file_refused"]


def test_a_file_only_root_or_this_user_could_write_is_taken(tmp_path: Path) -> None:
    folder = tmp_path / "cmms"
    folder.mkdir(mode=0o755)  # under /tmp: world-writable, but sticky, which is safe
    path = write(folder, HEADER + ROW)
    path.chmod(0o644)

    with structlog.testing.capture_logs() as logs:
        assert book_of(path).status("site/plant/compressor").status == "ok"
    assert refusals(logs) == []


@pytest.mark.parametrize(
    ("mode", "who"),
    [(0o664, "group"), (0o646, "world"), (0o666, "group- and world")],
)
def test_a_file_others_may_write_is_refused_with_its_reason(
    tmp_path: Path, mode: int, who: str
) -> None:
    path = write(tmp_path, HEADER + ROW)
    path.chmod(mode)

    with structlog.testing.capture_logs() as logs:
        assert book_of(path).status("site/plant/compressor").status == "unknown"
    (refused,) = refusals(logs)
    assert refused["reason"] == "writable_by_others"
    assert refused["error"] == f"{path} is {who}-writable (mode {mode:04o})"
    assert refused["path"] == str(path)


def test_a_folder_others_may_write_is_refused_and_fixing_it_alone_is_enough(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "share"
    folder.mkdir()
    path = write(folder, HEADER + ROW)
    folder.chmod(0o775)  # anyone in the group could swap the file, whatever its own mode
    book = book_of(path)

    with structlog.testing.capture_logs() as logs:
        assert book.status("site/plant/compressor").status == "unknown"
        look_again(book)
        book.status("site/plant/compressor")  # nothing changed: not logged again
    (refused,) = refusals(logs)
    assert refused["error"] == f"{folder} is group-writable (mode 0775)"

    folder.chmod(0o755)  # the file itself is untouched (its mtime and ctime too)
    look_again(book)
    assert book.status("site/plant/compressor").status == "ok"


def test_a_good_file_made_writable_drops_every_asset_to_unknown(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + ROW)
    book = book_of(path)
    assert book.status("site/plant/compressor").status == "ok"

    path.chmod(0o666)  # the contents held were read before: still, nothing of it is served
    look_again(book)

    with structlog.testing.capture_logs() as logs:
        assert book.status("site/plant/compressor").status == "unknown"
    (refused,) = refusals(logs)
    assert refused["kept"] == (
        "nothing: every asset's maintenance is unknown until the file passes again"
    )
    assert str(refused["dropped"]).startswith("the last good contents (1 assets, loaded ")

    path.chmod(0o644)
    look_again(book)
    assert book.status("site/plant/compressor").status == "ok"


def test_a_broken_or_removed_file_keeps_the_last_good_contents_and_says_so(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, HEADER + ROW)
    book = book_of(path)
    assert book.status("site/plant/compressor").status == "ok"

    path.write_text(HEADER + "site/plant/compressor,,not-a-date,\n")
    os.utime(path, ns=(0, 10**18))
    look_again(book)
    with structlog.testing.capture_logs() as logs:
        assert book.status("site/plant/compressor").status == "ok"
        path.unlink()  # a copy under way
        look_again(book)
        assert book.status("site/plant/compressor").status == "ok"
    (refused,) = refusals(logs)
    assert refused["reason"] == "invalid"
    assert str(refused["kept"]).startswith("the last good contents (1 assets, loaded ")
    (gone,) = [e for e in logs if e["event"] == "maintenance_file_unreadable"]
    assert gone["kept"] == refused["kept"]


def test_a_link_into_a_folder_others_may_write_is_refused(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    target = write(share, HEADER + ROW)
    share.chmod(0o777)  # world-writable, not sticky: anyone could replace the file
    link = tmp_path / "cmms.csv"
    link.symlink_to(target)

    with structlog.testing.capture_logs() as logs:
        assert book_of(link).status("site/plant/compressor").status == "unknown"
    (refused,) = refusals(logs)
    assert refused["reason"] == "link"
    assert refused["error"] == f"{link} is a symbolic link (to {target}), which is refused"


@pytest.mark.parametrize("where", ["the file", "a folder above it"])
def test_any_symbolic_link_on_the_path_is_refused(tmp_path: Path, where: str) -> None:
    # root's own link, in root's folders, to root's good file: where a link points is
    # whoever last wrote it, so the path must name the file itself
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    target = write(real, HEADER + ROW)
    if where == "the file":
        link = path = tmp_path / "cmms.csv"
        link.symlink_to(target)
    else:
        link = tmp_path / "cmms"
        link.symlink_to(real, target_is_directory=True)
        path = link / "cmms.csv"

    with structlog.testing.capture_logs() as logs:
        assert book_of(path).status("site/plant/compressor").status == "unknown"
    (refused,) = refusals(logs)
    assert (
        refused["error"] == f"{link} is a symbolic link (to {os.readlink(link)}), which is refused"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a link to another user needs root")
def test_a_link_through_another_users_folder_is_refused(tmp_path: Path) -> None:
    # the review's layout: root's name -> a link nobody owns, in nobody's folder -> root's
    # good file; nobody could point it at a file of its own at any time
    for folder in ("etc", "good"):
        (tmp_path / folder).mkdir(mode=0o755)
    good = write(tmp_path / "good", HEADER + ROW)
    share = tmp_path / "share"
    share.mkdir(mode=0o755)
    through = share / "link.csv"
    through.symlink_to(good)
    for place in (share, through):
        os.lchown(place, 65534, 65534)
    path = tmp_path / "etc" / "maintenance.csv"
    path.symlink_to(through)

    with structlog.testing.capture_logs() as logs:
        assert book_of(path).status("site/plant/compressor").status == "unknown"
    (refused,) = refusals(logs)
    assert refused["reason"] == "link"
    assert refused["error"] == f"{path} is a symbolic link (to {through}), which is refused"


def test_a_file_with_a_second_name_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + ROW)
    book = book_of(path)
    assert book.status("site/plant/compressor").status == "ok"

    os.link(path, tmp_path / "elsewhere.csv")  # the inode's ctime changes: looked at again
    look_again(book)

    with structlog.testing.capture_logs() as logs:
        assert book.status("site/plant/compressor").status == "unknown"
    (refused,) = refusals(logs)
    assert refused["reason"] == "link"
    assert refused["error"] == f"{path} has 2 names (hard links), which is refused"


class _SwapAfter:
    """`os` for the maintenance module, except that `path` is replaced by `other` right after
    the module's `step` (lstat: the path's check; open; fstat: the descriptor's check) touches it: a swap at the worst
    moment, which no real writer can be made to hit on demand."""

    def __init__(self, step: str, path: Path, other: Path) -> None:
        self._step, self._path, self._other = step, path, other
        self.swapped = False

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _after(self, step: str, place: Any) -> None:
        if step == self._step and Path(place) == self._path and not self.swapped:
            os.replace(self._other, self._path)
            self.swapped = True

    def lstat(self, place: Any) -> os.stat_result:
        status = os.lstat(place)
        self._after("lstat", place)
        return status

    def open(self, place: Any, flags: int, mode: int = 0o777) -> int:
        fd = os.open(place, flags, mode)
        self._after("open", place)
        return fd

    def fstat(self, fd: int) -> os.stat_result:
        status = os.fstat(fd)
        self._after("fstat", self._path)
        return status


@pytest.mark.parametrize(("step", "served"), [("lstat", "unknown"), ("fstat", "ok")])
def test_what_is_served_is_the_file_that_was_checked_never_one_swapped_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, served: str
) -> None:
    path = write(tmp_path, HEADER + ROW)  # next due 2099: ok
    other = write(tmp_path, HEADER + ROW.replace("2099-01-01", "2000-01-01"), "other.csv")
    swap = _SwapAfter(step, path, other)
    monkeypatch.setattr(maintenance, "os", swap)

    # swapped after the check: the file opened is not the one checked, so nothing is served
    # this time; swapped after the descriptor's checks: what is read is still the checked
    # file, from that descriptor (today's code read the path again by name)
    status = book_of(path).status("site/plant/compressor").status

    assert swap.swapped
    assert status == served


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + ROW)
    os.chown(path, 65534, 65534)  # nobody: as if a CMMS account had put it there

    with structlog.testing.capture_logs() as logs:
        assert book_of(path).status("site/plant/compressor").status == "unknown"
    (refused,) = refusals(logs)
    assert refused["error"] == (
        f"{path} is owned by uid 65534, neither root nor this half's user (uid 0)"
    )


@pytest.mark.parametrize("step", ["lstat", "open"])
def test_a_file_renamed_over_as_an_export_job_does_is_taken_on_the_next_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    path = write(tmp_path, HEADER + ROW)
    other = write(tmp_path, HEADER + ROW.replace("2099-01-01", "2000-01-01"), "other.csv")
    swap = _SwapAfter(step, path, other)
    monkeypatch.setattr(maintenance, "os", swap)
    book = book_of(path)

    with structlog.testing.capture_logs() as logs:
        assert book.status("site/plant/compressor").status == "unknown"  # not this time
        assert swap.swapped
        look_again(book)
        assert book.status("site/plant/compressor").status == "overdue"
    assert refusals(logs) == []  # root's own rename is no reason to refuse the file
