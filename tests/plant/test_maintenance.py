"""The CMMS export as spreadsheets and CMMS tools write it, and the mistakes that must not
read as "no work orders" or pick one of two truths."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.plant.maintenance import load_entries

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
