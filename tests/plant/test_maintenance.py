"""The CMMS export as spreadsheets and CMMS tools write it, the mistakes that must not read
as "no work orders" or pick one of two truths, and a file the IT side could have written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog

from broker.config import MaintenanceConfig
from broker.errors import ConfigError
from broker.plant.maintenance import MaintenanceBook, load_entries

HEADER = "asset,last_service,next_due,open_work_orders\n"
ROW = "site/plant/compressor,2026-01-01,2099-01-01,WO-1: Oil filter; WO-2: Belt\n"


def write(tmp_path: Path, text: str, name: str = "cmms.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


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


def test_a_good_file_made_writable_keeps_its_last_good_contents(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + ROW)
    book = book_of(path)
    assert book.status("site/plant/compressor").status == "ok"

    path.write_text(HEADER + ROW.replace("2099-01-01", "2000-01-01"))  # would be overdue
    path.chmod(0o666)
    look_again(book)

    with structlog.testing.capture_logs() as logs:
        assert book.status("site/plant/compressor").status == "ok"
    (refused,) = refusals(logs)
    assert refused["kept"] == "the last good contents"


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
    assert refused["error"] == f"{share} is group- and world-writable (mode 0777)"


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
