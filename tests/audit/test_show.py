"""`dmzbroker audit show`: filters and the four output formats, through the real CLI.

Two writers (plant and enterprise) record interleaved entries; expectations come from
reading the segment files directly.
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.forward import AuditForwarder
from broker.audit.log import AuditLog
from broker.audit.throttle import Limits, Throttle
from tests.audit.support import read_log, record_many
from tests.audit.test_forward import denied, forward, handshake
from tests.harness import dmzbroker

ODD_EVENT = "valve|override"  # a pipe: must be escaped in a CEF header
ODD_ACTOR = "dom\\ops=admin"  # a backslash and an equals sign: escaped in a CEF extension


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("show") / "audit"
    key = Ed25519PrivateKey.generate()
    with (
        AuditLog(root, "plant", "coldstore-1", key, checkpoint_every=6) as plant,
        AuditLog(root, "enterprise", "coldstore-1", key, checkpoint_every=6) as enterprise,
    ):
        for i in range(12):
            record_many(plant, 1, start=i)
            record_many(enterprise, 1, start=100 + i)
        plant.record(ODD_EVENT, category="device", outcome="failure", actor=ODD_ACTOR)
    return root


def on_disk(root: Path) -> list[dict[str, Any]]:
    """Every entry, in the order `show` lists them: writer by name, then the chain."""
    return [
        e for writer in sorted(p for p in root.iterdir() if p.is_dir()) for e in read_log(writer)
    ]


def show(root: Path, *args: str) -> list[str]:
    return dmzbroker("audit", "show", str(root), *args).stdout.splitlines()


def show_json(root: Path, *args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in show(root, *args, "--format", "json")]


def test_json_lines_parse_and_equal_the_entries_on_disk(root: Path) -> None:
    expected = on_disk(root)
    assert len(expected) == 2 * 12 + 1 + 2 * (12 // 6 + 1)  # with checkpoints
    assert show_json(root) == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("event", "record_published"),
        ("category", "policy"),
        ("outcome", "failure"),
        ("actor", "operator1"),
        ("writer", "enterprise"),
        ("event", ODD_EVENT),
        ("actor", ODD_ACTOR),
    ],
)
def test_a_filter_keeps_exactly_the_entries_with_that_value(
    root: Path, field: str, value: str
) -> None:
    everything = on_disk(root)
    expected = [e for e in everything if e[field] == value]
    assert 0 < len(expected) < len(everything)  # the filter has something to do
    assert show_json(root, f"--{field}", value) == expected


def test_filters_combine(root: Path) -> None:
    expected = [e for e in on_disk(root) if e["writer"] == "plant" and e["outcome"] == "failure"]
    assert len(expected) >= 2
    assert show_json(root, "--writer", "plant", "--outcome", "failure") == expected


def test_since_and_until_keep_the_entries_between_two_written_times(root: Path) -> None:
    everything = on_disk(root)
    chosen = sorted(everything, key=lambda e: datetime.fromisoformat(e["time"]))
    since, until = chosen[8]["time"], chosen[25]["time"]
    first, last = datetime.fromisoformat(since), datetime.fromisoformat(until)
    expected = [e for e in everything if first <= datetime.fromisoformat(e["time"]) <= last]
    assert 18 <= len(expected) < len(everything)
    assert show_json(root, "--since", since, "--until", until) == expected


def test_since_alone_and_until_alone(root: Path) -> None:
    everything = on_disk(root)
    middle = sorted(e["time"] for e in everything)[15]
    at = datetime.fromisoformat(middle)
    after = [e for e in everything if datetime.fromisoformat(e["time"]) >= at]
    before = [e for e in everything if datetime.fromisoformat(e["time"]) <= at]
    assert show_json(root, "--since", middle) == after
    assert show_json(root, "--until", middle) == before


def whole_second(moment: datetime) -> str:
    return moment.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_plus_one_hour(moment: datetime) -> str:
    return moment.astimezone(timezone(timedelta(hours=1))).isoformat()


@pytest.mark.parametrize("spell", [whole_second, as_plus_one_hour], ids=["whole-second", "offset"])
def test_since_given_in_another_rfc3339_spelling_selects_by_instant(root: Path, spell) -> None:
    everything = on_disk(root)
    moment = sorted(datetime.fromisoformat(e["time"]) for e in everything)[15]
    since = spell(moment)
    instant = datetime.fromisoformat(since.replace("Z", "+00:00"))
    expected = [e for e in everything if datetime.fromisoformat(e["time"]) >= instant]
    assert show_json(root, "--since", since) == expected


CSV_HEADER = ["time", "writer", "seq", "event", "category", "outcome", "actor", "object", "details"]


def csv_rows(root: Path, *args: str) -> list[list[str]]:
    """The CSV's records; a blank line is no record (see the blank-line test below)."""
    result = dmzbroker("audit", "show", str(root), "--format", "csv", *args)
    return [row for row in csv.reader(io.StringIO(result.stdout)) if row]


def test_csv_has_a_header_and_one_row_per_entry(root: Path) -> None:
    rows = csv_rows(root)
    expected = on_disk(root)
    assert rows[0] == CSV_HEADER
    assert len(rows) == 1 + len(expected)
    for row, entry in zip(rows[1:], expected, strict=True):
        cells = dict(zip(CSV_HEADER, row, strict=True))
        assert cells["seq"] == str(entry["seq"])
        assert cells["time"] == entry["time"]
        for name in ("writer", "event", "category", "outcome", "actor", "object"):
            assert cells[name] == ("" if entry[name] is None else entry[name])
        assert json.loads(cells["details"]) == entry["details"]


def test_csv_filtered_by_writer_has_only_its_rows(root: Path) -> None:
    rows = csv_rows(root, "--writer", "plant")
    assert rows[0] == CSV_HEADER
    assert [int(r[2]) for r in rows[1:]] == [e["seq"] for e in read_log(root / "plant")]


def test_csv_has_no_blank_line(root: Path) -> None:
    result = dmzbroker("audit", "show", str(root), "--format", "csv", "--writer", "plant")
    lines = result.stdout.splitlines()
    assert "" not in lines
    assert len(lines) == 1 + len(read_log(root / "plant"))


_HEADER = re.compile(r"^((?:(?:[^|\\]|\\.)*\|){7})(.*)$")
_HEADER_FIELD = re.compile(r"((?:[^|\\]|\\.)*)\|")
_EXTENSION_KEY = re.compile(r"(?:^| )([A-Za-z0-9]+)=")


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def parse_cef(line: str) -> tuple[list[str], dict[str, str]]:
    """Header fields and extensions of one CEF line, unescaped."""
    match = _HEADER.match(line)
    assert match, line
    header = [_unescape(f) for f in _HEADER_FIELD.findall(match.group(1))]
    text = match.group(2)
    keys = list(_EXTENSION_KEY.finditer(text))
    extensions = {}
    for this, following in zip(keys, [*keys[1:], None], strict=True):
        end = following.start() if following else len(text)
        extensions[this.group(1)] = _unescape(text[this.end() : end])
    return header, extensions


def test_cef_lines_carry_seq_and_hash_as_extensions(root: Path) -> None:
    lines = show(root, "--format", "cef")
    expected = on_disk(root)
    assert len(lines) == len(expected)
    for line, entry in zip(lines, expected, strict=True):
        assert line.startswith("CEF:0|dmzbroker|")
        header, extensions = parse_cef(line)
        assert header[4] == header[5] == entry["event"]
        assert extensions["cn1Label"] == "seq"
        assert extensions["cn1"] == str(entry["seq"])
        assert extensions["cs3Label"] == "hash"
        assert extensions["cs3"] == entry["hash"]
        assert extensions["cs2"] == entry["writer"]
        assert extensions["rt"] == entry["time"]
        assert extensions.get("suser") == entry["actor"]


def test_cef_escapes_pipe_in_the_header_and_equals_in_extension_values(root: Path) -> None:
    [line] = show(root, "--format", "cef", "--event", ODD_EVENT)
    assert "|valve\\|override|valve\\|override|" in line
    assert " suser=dom\\\\ops\\=admin " in line
    header, extensions = parse_cef(line)
    assert len(header) == 7
    assert header[4] == ODD_EVENT
    assert extensions["suser"] == ODD_ACTOR
    assert extensions["outcome"] == "failure"


def test_table_has_a_header_and_one_line_per_entry(root: Path) -> None:
    lines = show(root, "--writer", "enterprise")
    expected = read_log(root / "enterprise")
    assert lines[0].split() == CSV_HEADER[:-1]
    assert len(lines) == 1 + len(expected)
    for line, entry in zip(lines[1:], expected, strict=True):
        cells = line.split()
        assert cells[:4] == [entry["time"], "enterprise", str(entry["seq"]), entry["event"]]


def test_table_shows_what_an_events_suppressed_entry_counted(tmp_path: Path) -> None:
    root = tmp_path / "audit"
    with AuditLog(root, "enterprise", "coldstore-1", Ed25519PrivateKey.generate()) as audit:
        forwarder = AuditForwarder(audit, Throttle(Limits(per_source=1)))
        for i in range(4):
            for _ in range(3):
                forward(forwarder, {**denied(), "identity": f"spiffe://site/c{i}"})
        for _ in range(5):
            forward(forwarder, handshake(0))
    (line,) = show(root, "--event", "events_suppressed")[1:]
    assert line.endswith(
        "events_suppressed  audit  unknown    12 events from 5 sources: "
        "consumer_denied 8, tls_handshake_failed 4"
    ), line
