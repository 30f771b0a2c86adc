"""`dmzbroker audit show`: filters and the four output formats, through the real CLI.

Two writers (plant and enterprise) record interleaved entries; expectations come from
reading the segment files directly.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from yarl import URL

from broker.audit.forward import AuditForwarder
from broker.audit.log import AuditLog
from broker.audit.throttle import Limits, Throttle
from broker.trust import tls
from tests.audit.support import read_log, record_many
from tests.audit.test_forward import denied, forward, handshake
from tests.harness import (
    BrokerProcess,
    Deployment,
    Pki,
    consumer_ssl,
    dmzbroker,
    eventually,
)

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
    """Every entry, in the order `show` lists them: by time, equal times by writer name (a
    stable sort of the writers' chains, each already in time order)."""
    chains = [
        e for writer in sorted(p for p in root.iterdir() if p.is_dir()) for e in read_log(writer)
    ]
    return sorted(chains, key=lambda e: datetime.fromisoformat(e["time"]))


def show(root: Path, *args: str) -> list[str]:
    return dmzbroker("audit", "show", str(root), *args).stdout.splitlines()


def show_json(root: Path, *args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in show(root, *args, "--format", "json")]


def test_json_lines_parse_and_equal_the_entries_on_disk(root: Path) -> None:
    expected = on_disk(root)
    recorded = [e for e in expected if e["event"] != "audit_checkpoint"]
    assert len(recorded) == 2 * 12 + 1
    assert len(expected) - len(recorded) >= 2 * (12 // 6 + 1)  # every 6 entries and at stop
    assert show_json(root) == expected


def test_two_writers_recording_in_turn_come_out_interleaved_in_time_order(root: Path) -> None:
    shown = [e for e in show_json(root) if e["event"] != "audit_checkpoint"]
    times = [datetime.fromisoformat(e["time"]) for e in show_json(root)]
    assert times == sorted(times)
    # the fixture records plant, enterprise, plant, ... twelve times, then one more plant entry
    assert [e["writer"] for e in shown] == ["plant", "enterprise"] * 12 + ["plant"]
    for writer in ("plant", "enterprise"):  # each writer's chain keeps its order
        seqs = [e["seq"] for e in show_json(root) if e["writer"] == writer]
        assert seqs == sorted(seqs) == [e["seq"] for e in read_log(root / writer)]


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
            assert unescape(cells[name]) == ("" if entry[name] is None else entry[name])
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
    """CEF's escapes: a backslash before any character stands for it, `\\n` and `\\r` for
    a line break."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), text)


def unescape(text: str) -> str:
    """The table's and CSV's escapes (`\\\\`, `\\n`, `\\x1b`, `\\u2028`, ...) read back."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


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


def test_table_columns_line_up(root: Path) -> None:
    header, *rows = show(root)
    expected = on_disk(root)
    assert len(rows) == len(expected)
    # Left-aligned columns start where their header word starts; `seq` is right-aligned
    # and ends where its header word ends.
    start = {name: header.index(name) for name in CSV_HEADER[:-1]}
    seq_end = start["seq"] + len("seq")
    left = ["time", "writer", "event", "category", "outcome", "actor", "object"]
    for row, entry in zip(rows, expected, strict=True):
        cells = {
            name: row[start[name] : start[following] if following else None].rstrip()
            for name, following in zip(left, [*left[1:], None], strict=True)
        }
        cells["writer"], seq = cells["writer"].split()
        assert row[:seq_end].endswith(" " + str(entry["seq"])), row
        assert row[seq_end : seq_end + 2] == "  ", row
        assert seq == str(entry["seq"])
        for name in left:
            assert unescape(cells[name]) == ("" if entry[name] is None else entry[name]), row
    assert len({len(row) for row in rows}) > 1  # the last column is not padded


def display_width(text: str) -> int:
    """Terminal columns: a wide or fullwidth character takes two, a combining mark none."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


def test_table_columns_line_up_on_screen_with_wide_and_combining_characters(
    tmp_path: Path,
) -> None:
    root = tmp_path / "audit"
    actors = ["冷凍庫の操作員", "ｏｐｓ", "cafe\u0301-ops", "ops"]  # CJK, fullwidth, combining
    with AuditLog(root, "plant", "coldstore-1", Ed25519PrivateKey.generate()) as audit:
        for i, actor in enumerate(actors):
            audit.record("valve_moved", category="device", outcome="success", actor=actor,
                         object=f"valve-{i}")  # fmt: skip
    header, *rows = show(root, "--event", "valve_moved")
    column = display_width(header[: header.index("object")])
    for row, actor in zip(rows, actors, strict=True):
        assert actor in row, row
        assert display_width(row[: row.index("valve-")]) == column, row


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
    assert line.endswith(  # category and actor as wide as their headers; no actor
        "events_suppressed  audit     unknown         12 events from 5 sources: "
        "consumer_denied 8, tls_handshake_failed 4"
    ), line


# What an outsider can put into an entry: the path of a refused request (a percent-encoded
# line break decodes to a real one), and a certificate's or a signal's name.
FORGED_LINE = "2026-12-05T00:00:00.000000Z  enterprise  9999  policy_accepted  policy  success"
FORGED_PATH = f"/v1/x\n{FORGED_LINE}"
HOSTILE = {
    "object": FORGED_PATH,
    "actor": '=HYPERLINK("http://evil.example/","open")',
    "details": {"path": "/v1/y\r\x1b[2J\x1b]0;owned\x07 \x85\u2028\u2029\u202e\x7f\t\U000e0001"},
}
FORMULA_OBJECTS = ["+1+2", "-2+3", "@SUM(A1:A9)", "\t=1+1", "\r=1+1", "\\=1+1"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "audit"
    with AuditLog(root, "enterprise", "coldstore-1", Ed25519PrivateKey.generate()) as audit:
        audit.record("consumer_denied", category="access", outcome="failure", **HOSTILE)
        for text in FORMULA_OBJECTS:
            audit.record("consumer_denied", category="access", outcome="failure", object=text)
        audit.record(  # every kind of character a terminal or a viewer acts on, in the event
            "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0)])) + "\u2028\u202e|x=y",
            category="access",
            outcome="failure",
        )
    return root


def stored(writer: Path) -> list[dict[str, Any]]:
    """The writer's entries as stored: lines end at LF only (a raw NEL or U+2028 is inside
    an entry's JSON, where `str.splitlines` would cut it)."""
    return [
        json.loads(line)
        for segment in sorted(writer.glob("[0-9]*.jsonl"))  # not epochs.jsonl
        for line in segment.read_bytes().split(b"\n")
        if line
    ]


def as_text(char: str) -> str:
    """A character as the escape that spells it (`\\x1b`, `\\u2028`), or itself if printable."""
    return char if char.isprintable() else char.encode("unicode_escape").decode()


def assert_inert(stdout: str, entries: int) -> list[str]:
    """One line per entry (plus a header), and nothing but printable characters on them."""
    lines = stdout.split("\n")
    assert lines.pop() == ""
    assert lines == stdout.splitlines()  # no other line break (NEL, U+2028, FS, VT, ...)
    assert len(lines) == entries
    assert [line for line in lines if not line.isprintable()] == []
    return lines


def test_table_shows_a_forged_line_as_part_of_its_entry(hostile: Path) -> None:
    expected = stored(hostile / "enterprise")
    lines = assert_inert(dmzbroker("audit", "show", str(hostile)).stdout, 1 + len(expected))
    for line, entry in zip(lines[1:], expected, strict=True):
        assert line.split()[:3] == [entry["time"], "enterprise", str(entry["seq"])]
    assert not [line for line in lines if line.startswith(FORGED_LINE[:27])]
    denied = lines[1 + next(i for i, e in enumerate(expected) if e["object"] == FORGED_PATH)]
    assert denied.endswith("/v1/x\\n" + FORGED_LINE)
    assert unescape(denied[denied.index("/v1/x") :]) == FORGED_PATH


def test_json_lines_keep_every_value_and_escape_what_json_lets_through(hostile: Path) -> None:
    stdout = dmzbroker("audit", "show", str(hostile), "--format", "json").stdout
    expected = stored(hostile / "enterprise")
    lines = assert_inert(stdout, len(expected))
    assert [json.loads(line) for line in lines] == expected
    for raw in ("\x1b", "\x85", "\u2028", "\u202e", "\x7f"):
        assert raw not in stdout


def test_csv_cells_are_inert_and_never_start_a_formula(hostile: Path) -> None:
    stdout = dmzbroker("audit", "show", str(hostile), "--format", "csv").stdout
    expected = stored(hostile / "enterprise")
    assert_inert(stdout, 1 + len(expected))
    rows = list(csv.reader(io.StringIO(stdout)))[1:]
    for row, entry in zip(rows, expected, strict=True):
        assert [cell for cell in row if cell[:1] in ("=", "+", "-", "@", "\t", "\r")] == []
        cells = dict(zip(CSV_HEADER, row, strict=True))
        for name in ("event", "actor", "object"):
            text = cells[name]
            if entry[name] and entry[name][0] in "=+-@":
                assert text.startswith("'"), text
                text = text[1:]
            assert unescape(text) == (entry[name] or "")
        assert json.loads(cells["details"]) == entry["details"]
    objects = {
        e["object"]: dict(zip(CSV_HEADER, r, strict=True))
        for e, r in zip(expected, rows, strict=True)
    }
    assert objects["+1+2"]["object"] == "'+1+2"
    assert objects["\t=1+1"]["object"] == "\\t=1+1"
    assert objects["\\=1+1"]["object"] == "\\\\=1+1"


def test_cef_is_escaped_as_the_specification_says_and_adds_no_field(hostile: Path) -> None:
    stdout = dmzbroker("audit", "show", str(hostile), "--format", "cef").stdout
    expected = stored(hostile / "enterprise")
    lines = assert_inert(stdout, len(expected))
    keys = {"rt", "cat", "outcome", "cs1Label", "cs2Label", "cs2", "cn1Label", "cn1", "cs3Label"}
    for line, entry in zip(lines, expected, strict=True):
        header, extensions = parse_cef(line)
        assert len(header) == 7
        assert header[4] == header[5] == "".join(map(as_text, entry["event"]))
        assert keys | {"cs3"} <= extensions.keys() <= keys | {"cs1", "cs3", "suser"}
        for key, name in (("suser", "actor"), ("cs1", "object")):
            if entry[name] is not None:
                spelled = "".join(c if c in "\r\n" else as_text(c) for c in entry[name])
                assert extensions[key] == spelled
    forged = next(
        line for line, e in zip(lines, expected, strict=True) if e["object"] == FORGED_PATH
    )
    assert "cs1=/v1/x\\n2026-12-05T00:00:00.000000Z  enterprise" in forged
    odd = next(line for line, e in zip(lines, expected, strict=True) if e["event"].endswith("|x=y"))
    assert odd.count("|") - odd.count("\\|") == 7  # the event's pipe is escaped in the header
    assert "\\\\x1b" in odd and "\\\\u2028" in odd and "|x=y|" in odd


# The attack, percent-encoded as a client sends it; the API decodes the path.
FORGED_REQUEST = (
    "/v1/x%0A2026-12-05T00:00:00.000000Z%20%20enterprise%20%209999%20%20policy_accepted"
    "%20%20policy%20%20success%0D%1B%5B2J%C2%85%E2%80%A8%E2%80%AE"
)
FORMULA_REQUEST = "/v1/signals/=HYPERLINK(%22http://evil.example/%22,%22open%22)"


async def _status(url: str, context: object) -> int | None:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(URL(url, encoded=True), ssl=context) as response,  # sent as written
        ):
            return response.status
    except aiohttp.ClientConnectionError:
        return None  # not listening yet


@pytest.mark.timeout(90)
async def test_a_forged_line_sent_to_a_running_broker_stays_inside_its_entry(
    deployment: Deployment, pki: Pki, start_broker
) -> None:
    enterprise: BrokerProcess = start_broker("enterprise", deployment.config)
    stranger = tls.client_context(pki.ca, pki.stranger_cert, pki.stranger_key)
    base = deployment.base_url
    await eventually(lambda: _status(base + "/v1/snapshot", consumer_ssl(pki)), timeout=30)
    assert await _status(base + FORGED_REQUEST, stranger) == 403
    assert await _status(base + FORMULA_REQUEST, consumer_ssl(pki)) == 403
    audit = deployment.directory / "audit"

    def denials() -> list[dict[str, Any]]:
        shown = show(
            audit, "--writer", "enterprise", "--event", "consumer_denied", "--format", "json"
        )
        return [json.loads(line) for line in shown]

    await eventually(lambda: len(denials()) == 2)
    forged, formula = denials()
    assert forged["object"].startswith("/v1/x\n2026-12-05T00:00:00.000000Z  enterprise  9999")
    assert forged["object"].endswith("success\r\x1b[2J\x85\u2028\u202e")
    assert formula["object"] == '=HYPERLINK("http://evil.example/","open")'
    assert enterprise.stop() == 0  # the log as it stays, for an exact count below

    stored_entries = len(stored(audit / "enterprise"))
    for fmt in ("table", "json", "csv", "cef"):
        stdout = dmzbroker(
            "audit", "show", str(audit), "--writer", "enterprise", "--format", fmt
        ).stdout
        lines = assert_inert(stdout, stored_entries + (fmt in ("table", "csv")))  # + a header
        assert not [line for line in lines if line.startswith("2026-12-05T00:00:00.000000Z")]
        if fmt == "csv":
            cells = [cell for row in csv.reader(io.StringIO(stdout)) for cell in row]
            assert [c for c in cells if c[:1] in ("=", "+", "-", "@")] == []
            assert '\'=HYPERLINK("http://evil.example/","open")' in cells
