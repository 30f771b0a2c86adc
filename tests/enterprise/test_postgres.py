"""The PostgreSQL historian sink against a real PostgreSQL 15 over TLS (verify-full), logging
in by client certificate or password file, as a role that may only INSERT.

The schema is made by the owner login on first start; rows equal the records the API
serves; a replay never duplicates a row; what the identity is not granted is never written;
a missing GRANT is one clear `postgres_refused` line while the API keeps serving; the
SECURITY DEFINER functions take no hostile argument; the database stopped for 30 s
mid-stream loses nothing and duplicates nothing. (The bench is bench/postgres_sink.py.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import psycopg
import pytest
import structlog

from broker import policy
from broker.channel.spool import SpoolSender
from broker.config import PostgresConfig, PostgresLogin
from broker.enterprise.authz import Authorization
from broker.enterprise.outputs import postgres as postgres_output
from broker.enterprise.outputs import postgres_connect
from broker.enterprise.outputs.postgres import PostgresSink
from broker.errors import ConfigError
from broker.metrics import EnterpriseMetrics
from broker.records import Alert, Assessment, Context, QualityIssue, Record
from tests.enterprise.postgres_server import (  # noqa: F401 - fixtures
    PostgresServer,
    postgres,
    postgres_pki,
)
from tests.enterprise.served import POWER, ROOM, Api
from tests.harness import (
    CONSUMER_URI,
    DEMO_POLICY,
    ENERGY_URI,
    Pki,
    eventually,
    read_events,
    running,
)

pytestmark = pytest.mark.timeout(180)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "postgres.md"
SINK, OWNER = "dmzbroker_sink", "historian_owner"
DOOR = "coldstore/storage/cold-room-1/door_open"
WEATHER = "coldstore/outdoor/weather/ambient_temperature"


@dataclass
class Historian:
    """A database `historian` owned by the owner role (password file); the sink's role logs
    in by certificate and has no privilege yet."""

    server: PostgresServer
    owner: PostgresLogin
    sink: PostgresLogin

    def config(self, identity: str = CONSUMER_URI, **changes: Any) -> PostgresConfig:
        changes.setdefault("owner", self.owner)
        return self.server.sink_config(identity, self.sink, **changes)

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        return self.server.sql(query, database="historian")

    def seqs(self) -> list[int]:
        return [seq for (seq,) in self.rows("SELECT seq FROM dmzbroker.records ORDER BY seq")]


@pytest.fixture
def historian(postgres: PostgresServer) -> Historian:  # noqa: F811 - the fixture
    owner = postgres.create_role(OWNER, password="owner secret")
    postgres.create_database("historian", owner=OWNER)
    return Historian(postgres, owner, postgres.create_role(SINK))


def sink_of(
    config: PostgresConfig, tmp_path: Path, state: str = "state", **kwargs: Any
) -> PostgresSink:
    return PostgresSink(
        config, tmp_path / "spool", tmp_path / state, Authorization(policy.load(DEMO_POLICY)),
        EnterpriseMetrics(lambda: 0, lambda: False), **kwargs,
    )  # fmt: skip


def position(tmp_path: Path, state: str = "state") -> int:
    path = tmp_path / state / "spool-position-postgres.json"
    return int(json.loads(path.read_bytes())["seq"]) if path.exists() else 0


def varied(count: int) -> list[Record]:
    """Records of several signals and kinds: numbers, booleans, a bad value without one, and
    context with an assessment, an alert and a quality issue."""
    now = datetime.now(UTC)
    alert = Alert(rule="warm-room", severity="warning", message="too warm", action="check door",
                  outcome="product_quality")  # fmt: skip
    made = []
    for i in range(count):
        signal = (ROOM, POWER, DOOR, WEATHER)[i % 4]
        value: bool | float | None = (-18.5 + i / 100, 12.25, i % 8 == 2, 21.0)[i % 4]
        context = Context(
            asset=signal.rpartition("/")[0], asset_type="cold-room", asset_state="running",
            assessment=Assessment(expected=-18.0, deviation_pct=2.5, label="expected",
                                  direction="above") if i % 4 == 0 else None,
            alerts=[alert] if i % 8 == 0 else [],
            quality_issues=[QualityIssue(check="read_failed", detail="timeout")] if i % 12 == 3
            else [],
        )  # fmt: skip
        quality = "bad" if i % 12 == 3 else "good"
        made.append(Record(
            signal=signal, value=None if quality == "bad" else value, unit="degC",
            quality=quality, source_time=now - timedelta(milliseconds=i),
            broker_time=now, policy_version=1, context=context,
        ))  # fmt: skip
    return made


def spool_of(tmp_path: Path, records: list[Record], retention: int = 64 << 20) -> SpoolSender:
    sender = SpoolSender(tmp_path / "spool", 1 << 20, retention)
    sender.send(records)
    return sender


def events(logs: list[dict[str, Any]], prefix: str = "postgres_") -> list[str]:
    return [e["event"] for e in logs if e["event"].startswith(prefix)]


def documented_columns(table: str) -> set[str]:
    """The columns docs/postgres.md lists for `table` (its `### <table>` table)."""
    section = DOCS.read_text().split(f"### `<schema>.{table}`", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE))


async def test_the_schema_is_made_once_by_the_owner_as_documented_and_the_sink_may_only_insert(
    historian: Historian, tmp_path: Path
) -> None:
    sender = spool_of(tmp_path, varied(40))
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink_of(historian.config(), tmp_path).run()):
                await eventually(lambda: position(tmp_path) == 40, timeout=30)
            # Started again: the schema is there, nothing is made twice.
            async with running(sink_of(historian.config(), tmp_path).run()):
                await eventually(lambda: events(logs).count("postgres_connected") == 2)
    finally:
        sender.close()
    assert events(logs) == ["postgres_schema_created", "postgres_connected", "postgres_connected"]
    created = next(e for e in logs if e["event"] == "postgres_schema_created")
    assert (created["layout"], created["owner"], created["user"]) == ("partitions", OWNER, SINK)
    assert historian.seqs() == list(range(1, 41))
    for table in ("records", "signals", "assets"):
        columns = {c for (c,) in historian.rows(
            "SELECT column_name FROM information_schema.columns "
            f"WHERE table_schema = 'dmzbroker' AND table_name = '{table}'"
        )}  # fmt: skip
        assert columns == documented_columns(table), table
    assert historian.rows("SELECT version, layout FROM dmzbroker.schema_version") == [
        (1, "partitions")
    ]
    today = datetime.now(UTC).strftime("%Y%m%d")
    assert historian.rows(f"SELECT to_regclass('dmzbroker.records_{today}') IS NOT NULL") == [
        (True,)
    ]
    # The owner's view of an asset: numbers and booleans as numbers, context in columns.
    door = historian.server.sql(
        'SELECT measure, value, asset_state, active_alerts FROM '
        'dmzbroker_assets."coldstore/storage/cold-room-1" WHERE signal = %s ORDER BY seq LIMIT 2',
        (DOOR,), database="historian",
    )  # fmt: skip
    assert door == [("door_open", 1.0, "running", 0), ("door_open", 0.0, "running", 0)]
    # INSERT only: the sink's role reads nothing, changes nothing, creates nothing.
    async with await postgres_connect.connect(historian.config()) as c:
        await c.set_autocommit(True)
        for statement in (
            "SELECT count(*) FROM dmzbroker.records",
            'SELECT count(*) FROM dmzbroker_assets."coldstore/storage/cold-room-1"',
            "UPDATE dmzbroker.records SET value = '0'",
            "DELETE FROM dmzbroker.records",
            "TRUNCATE dmzbroker.records",
            "CREATE TABLE dmzbroker.planted (x int)",
            'DROP VIEW dmzbroker_assets."coldstore/storage/cold-room-1"',
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await c.execute(statement.encode())
    assert len(historian.seqs()) == 40


async def test_rows_equal_the_records_the_api_serves(
    historian: Historian, api: Api, tmp_path: Path
) -> None:
    """Every record as /v1/stream serves it (the half applies what it reads from the spool)
    equals its row: seq, value, unit, quality, both times, policy version and context."""
    records = varied(48)
    sender = spool_of(tmp_path, records)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(api.base + "/v1/stream", ssl=api.consumer_ssl()) as response,
        ):
            await eventually(lambda: api.store.subscriptions)
            api.store.apply(records)
            served = await read_events(response, len(records))
        async with running(sink_of(historian.config(), tmp_path).run()):
            await eventually(lambda: position(tmp_path) == 48, timeout=30)
    finally:
        sender.close()
    rows = historian.rows(
        "SELECT seq, signal, value, unit, quality, source_time, broker_time, policy_version,"
        " context FROM dmzbroker.records ORDER BY seq"
    )
    assert len(rows) == len(served) == 48
    for (seq, record), row in zip(served, rows, strict=True):
        stored = dict(zip(("seq", "signal", "value", "unit", "quality", "source_time",
                           "broker_time", "policy_version", "context"), row, strict=True))  # fmt: skip
        for time in ("source_time", "broker_time"):
            stored[time] = stored[time].astimezone(UTC).isoformat().replace("+00:00", "Z")
            record[time] = datetime.fromisoformat(record[time]).isoformat().replace("+00:00", "Z")
        assert seq == record["seq"]
        assert stored == record
    assert any(r["value"] is None for _, r in served) and any(
        r["context"]["alerts"] for _, r in served
    )


async def test_a_replayed_spool_writes_no_row_twice(historian: Historian, tmp_path: Path) -> None:
    """The same spool read again from the start (a lost position file, a crash between the
    COMMIT and saving the position): every row once."""
    sender = spool_of(tmp_path, varied(12_000))
    try:
        for state in ("state", "replay"):
            async with running(sink_of(historian.config(), tmp_path, state).run()):
                await eventually(lambda: position(tmp_path, state) == 12_000, timeout=60)  # noqa: B023
    finally:
        sender.close()
    assert historian.seqs() == list(range(1, 12_001))


async def test_only_what_the_identity_is_granted_is_written(
    historian: Historian, tmp_path: Path
) -> None:
    granted = Authorization(policy.load(DEMO_POLICY)).view(ENERGY_URI)
    sender = spool_of(tmp_path, varied(40))
    try:
        async with running(sink_of(historian.config(ENERGY_URI), tmp_path).run()):
            await eventually(lambda: position(tmp_path) == 40, timeout=30)
    finally:
        sender.close()
    written = {s for (s,) in historian.rows("SELECT DISTINCT signal FROM dmzbroker.records")}
    assert written == {POWER, WEATHER}  # of the four in the spool
    described = {s for (s,) in historian.rows("SELECT path FROM dmzbroker.signals")}
    assert described == set(granted)
    assets = historian.rows(
        "SELECT path, parent, level, view_name FROM dmzbroker.assets ORDER BY path"
    )
    assert ("coldstore", None, "site", None) in assets
    assert ("coldstore/machine-room", "coldstore", "area", None) in assets
    assert ("coldstore/machine-room/compressor-1", "coldstore/machine-room", "work_center",
            "coldstore/machine-room/compressor-1") in assets  # fmt: skip
    assert not [a for a in assets if a[0].startswith("coldstore/storage")]


async def test_a_role_without_insert_is_refused_in_one_line_and_the_api_keeps_serving(
    historian: Historian, api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INSERT revoked from the sink's role before it starts, then given back: one
    `postgres_refused` line naming the GRANT, retried, then every record written once."""
    monkeypatch.setattr(postgres_output, "REFUSED_RETRY_S", 0.3)
    sender = spool_of(tmp_path, varied(20))
    try:
        async with running(sink_of(historian.config(), tmp_path).run()):
            await eventually(lambda: position(tmp_path) == 20, timeout=30)
        historian.rows(f"REVOKE INSERT ON dmzbroker.records FROM {SINK}")
        sender.send(varied(20))
        with structlog.testing.capture_logs() as logs:
            sink = asyncio.create_task(sink_of(historian.config(), tmp_path).run())
            try:
                await asyncio.sleep(2)  # several retries: the refusal is logged once
                api.store.apply(varied(4))
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(api.base + "/v1/snapshot", ssl=api.consumer_ssl()) as response,
                ):
                    assert response.status == 200
                    assert len((await response.json())["records"]) == 4
                assert not sink.done()
                assert position(tmp_path) == 20
                historian.rows(f"GRANT INSERT ON dmzbroker.records TO {SINK}")
                await eventually(lambda: position(tmp_path) == 40, timeout=30)
            finally:
                sink.cancel()
                await asyncio.gather(sink, return_exceptions=True)
    finally:
        sender.close()
    # (a transient postgres_unreachable under load may come between: not what is tested)
    assert [e for e in events(logs) if e != "postgres_unreachable"] == [
        "postgres_refused",
        "postgres_connected",
    ]
    refused = next(e for e in logs if e["event"] == "postgres_refused")
    assert f"GRANT INSERT ON dmzbroker.records TO {SINK}" in refused["error"]
    assert "'historian' at 127.0.0.1" in refused["error"] and "\n" not in refused["error"]
    assert historian.seqs() == list(range(1, 41))


async def test_insert_revoked_mid_stream_is_refused_and_nothing_is_lost(
    historian: Historian, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_output, "REFUSED_RETRY_S", 0.3)
    sender = spool_of(tmp_path, varied(10))
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink_of(historian.config(), tmp_path).run()):
                await eventually(lambda: position(tmp_path) == 10, timeout=30)
                historian.rows(f"REVOKE INSERT ON dmzbroker.records FROM {SINK}")
                sender.send(varied(10))
                await eventually(lambda: "postgres_refused" in events(logs))
                assert position(tmp_path) == 10
                historian.rows(f"GRANT INSERT ON dmzbroker.records TO {SINK}")
                await eventually(lambda: position(tmp_path) == 20, timeout=30)
    finally:
        sender.close()
    refused = next(e for e in logs if e["event"] == "postgres_refused")
    assert f"run GRANT INSERT ON dmzbroker.records TO {SINK}" in refused["error"]
    assert historian.seqs() == list(range(1, 21))


async def test_a_schema_missing_without_an_owner_or_an_owner_without_create_is_refused(
    historian: Historian, tmp_path: Path
) -> None:
    sender = spool_of(tmp_path, varied(5))
    try:
        for config, fix in (
            (historian.config(owner=None), "set enterprise.postgres.owner"),
            (
                historian.config(owner=historian.sink),
                f"GRANT CREATE ON DATABASE historian TO {SINK}",
            ),
        ):
            with structlog.testing.capture_logs() as logs:
                async with running(sink_of(config, tmp_path).run()):
                    await eventually(lambda: "postgres_refused" in events(logs))
            assert events(logs) == ["postgres_refused"]
            assert fix in logs[0]["error"] and "dmzbroker" in logs[0]["error"]
    finally:
        sender.close()
    assert position(tmp_path) == 0


async def test_verify_full_refuses_a_server_whose_certificate_does_not_name_it(
    historian: Historian, tmp_path: Path, pki: Pki
) -> None:
    sender = spool_of(tmp_path, varied(5))
    try:
        for config, words in (
            (historian.config(server_name="db.example.org"),
             ["does not match host name \"db.example.org\"", "enterprise.postgres.server_name"]),
            (historian.config(ca=pki.ca), ["certificate verify failed"]),  # another CA
        ):  # fmt: skip
            with structlog.testing.capture_logs() as logs:
                async with running(sink_of(config, tmp_path).run()):
                    await eventually(lambda: "postgres_unreachable" in events(logs))
            error = next(e for e in logs if e["event"] == "postgres_unreachable")["error"]
            assert all(word in error for word in words), error
            assert "postgres_connected" not in events(logs)
    finally:
        sender.close()
    assert position(tmp_path) == 0


async def test_a_password_file_login_writes_with_the_documented_grants(
    historian: Historian, tmp_path: Path
) -> None:
    """A second sink, by password, given exactly the GRANTs docs/postgres.md lists; a
    wrong password is refused in one line."""
    sender = spool_of(tmp_path, varied(10))
    try:
        async with running(sink_of(historian.config(), tmp_path).run()):
            await eventually(lambda: position(tmp_path) == 10, timeout=30)
        by_password = historian.server.create_role("dmzbroker_sink2", password="sink secret")
        grants = re.search(r"```sql\n(GRANT USAGE.*?)```", DOCS.read_text(), re.DOTALL)
        assert grants is not None
        historian.rows(grants.group(1).replace(SINK, "dmzbroker_sink2"))
        config = historian.server.sink_config(CONSUMER_URI, by_password, database="historian")
        with structlog.testing.capture_logs() as logs:
            async with running(sink_of(config, tmp_path, "second").run()):
                await eventually(lambda: position(tmp_path, "second") == 10, timeout=30)
        assert events(logs) == ["postgres_connected"]
        assert by_password.password_file is not None
        by_password.password_file.write_text("wrong\n")
        with structlog.testing.capture_logs() as logs:
            async with running(sink_of(config, tmp_path, "third").run()):
                await eventually(lambda: "postgres_refused" in events(logs))
        assert "password authentication failed" in logs[0]["error"]
    finally:
        sender.close()
    assert historian.seqs() == list(range(1, 11))


async def test_the_owners_functions_take_no_hostile_argument_and_no_other_role(
    historian: Historian, tmp_path: Path
) -> None:
    sender = spool_of(tmp_path, varied(4))
    try:
        async with running(sink_of(historian.config(), tmp_path).run()):
            await eventually(lambda: position(tmp_path) == 4, timeout=30)
    finally:
        sender.close()
    config = historian.config()
    async with await postgres_connect.connect(config) as c:
        await c.set_autocommit(True)
        for hostile in (
            'x"; DROP TABLE dmzbroker.records; --',
            "",
            "a/../b",
            "A/B",
            "a/" + "b" * 64,
        ):
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                await c.execute("SELECT dmzbroker.ensure_asset_view(%s)", (hostile,))
    # A role of the same database that was granted nothing may not call them.
    other = historian.server.create_role("someone_else")
    config = historian.server.sink_config(CONSUMER_URI, other, database="historian")
    async with await postgres_connect.connect(config) as c:
        await c.set_autocommit(True)
        for call in ("SELECT dmzbroker.ensure_partition('2030-01-01')",
                     "SELECT dmzbroker.ensure_asset_view('a/b')"):  # fmt: skip
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await c.execute(call.encode())
    assert historian.rows("SELECT count(*) FROM dmzbroker.records") == [(4,)]


async def test_records_lost_to_spool_retention_are_logged_and_the_rest_written(
    historian: Historian, tmp_path: Path
) -> None:
    """The spool keeps about 2 MiB; 10 MiB were written before the sink first read it."""
    sender = SpoolSender(tmp_path / "spool", 1 << 20, 2 << 20)
    try:
        for _ in range(40):
            sender.send(varied(250))
        last = sender.next_seq - 1
        with structlog.testing.capture_logs() as logs:
            async with running(sink_of(historian.config(), tmp_path).run()):
                await eventually(lambda: position(tmp_path) == last, timeout=60)
    finally:
        sender.close()
    lost = next(e for e in logs if e["event"] == "spool_records_lost")
    seqs = historian.seqs()
    assert seqs[0] == lost["first_seq"] and seqs == list(range(lost["first_seq"], last + 1))


async def test_a_server_stop_and_a_crash_mid_stream_lose_nothing_and_duplicate_nothing(
    historian: Historian, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short outages: a clean stop, then a SIGKILL of every server process, while the plant
    writes on. (Each a new outage, logged again: the sessions between are short.)"""
    monkeypatch.setattr(postgres_output, "FRESH_AFTER_S", 0.5)
    sender = SpoolSender(tmp_path / "spool", 1 << 20, 64 << 20)

    async def plant() -> None:
        for _ in range(100_000):
            sender.send(varied(20))
            await asyncio.sleep(0.01)

    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink_of(historian.config(), tmp_path).run(), plant()):
                for outage in (historian.server.stop, historian.server.kill):
                    await eventually(lambda: position(tmp_path) > 0, timeout=30)
                    outage()
                    await eventually(lambda: "postgres_unreachable" in events(logs), timeout=30)
                    historian.server.start()
                    before = sender.next_seq - 1
                    await eventually(lambda: position(tmp_path) >= before, timeout=60)  # noqa: B023
                    logs.clear()
            last = sender.next_seq - 1
        async with running(sink_of(historian.config(), tmp_path).run()):
            await eventually(lambda: position(tmp_path) == last, timeout=60)
    finally:
        sender.close()
    assert historian.seqs() == list(range(1, last + 1))


async def test_a_string_with_nul_is_written_without_it_instead_of_stopping_the_sink(
    historian: Historian, tmp_path: Path
) -> None:
    """PostgreSQL's text and jsonb cannot hold U+0000: a device's string value with one (and
    context text with one) is written without it, and the records after it go on."""
    odd = varied(3)
    odd[0].value = "PUMP\x00\x00A"
    odd[1] = msgspec.structs.replace(
        odd[1], context=Context(quality_issues=[QualityIssue(check="undecodable", detail="\x00x")])
    )
    sender = spool_of(tmp_path, odd)
    try:
        async with running(sink_of(historian.config(), tmp_path).run()):
            await eventually(lambda: position(tmp_path) == 3, timeout=30)
    finally:
        sender.close()
    rows = historian.rows(
        "SELECT value, context -> 'quality_issues' FROM dmzbroker.records ORDER BY seq"
    )
    assert rows[0][0] == "PUMPA"
    assert rows[1][1] == [{"check": "undecodable", "detail": "x"}]
    assert len(rows) == 3


async def test_a_hung_server_is_left_after_the_answer_timeout_and_written_to_once_back(
    historian: Historian, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every server process stopped (SIGSTOP) while batches go in: the kernel still
    acknowledges, so only the sink's own answer timeout notices; nothing lost or doubled."""
    monkeypatch.setattr(postgres_output, "ANSWER_TIMEOUT_S", 2.0)
    sender = SpoolSender(tmp_path / "spool", 1 << 20, 64 << 20)
    sender.send(varied(100))
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink_of(historian.config(), tmp_path).run()):
                await eventually(lambda: position(tmp_path) == 100, timeout=30)
                historian.server.pause()
                try:
                    sender.send(varied(100))
                    await eventually(lambda: "postgres_unreachable" in events(logs), timeout=30)
                    assert position(tmp_path) == 100
                finally:
                    historian.server.resume()
                await eventually(lambda: position(tmp_path) == 200, timeout=60)
    finally:
        sender.close()
    unreachable = next(e for e in logs if e["event"] == "postgres_unreachable")
    assert unreachable["error"] == "no answer within 2 s"
    assert historian.seqs() == list(range(1, 201))


async def test_nothing_new_is_written_while_the_audit_log_fails(
    historian: Historian, tmp_path: Path
) -> None:
    failing = [True]
    sender = spool_of(tmp_path, varied(10))
    try:
        sink = sink_of(historian.config(), tmp_path, held=lambda: failing[0])
        with structlog.testing.capture_logs() as logs:
            async with running(sink.run()):
                await eventually(lambda: "postgres_connected" in events(logs), timeout=30)
                await asyncio.sleep(1)  # it would have written by now (the others take ~0.1 s)
                assert position(tmp_path) == 0
                failing[0] = False
                await eventually(lambda: position(tmp_path) == 10, timeout=30)
    finally:
        sender.close()
    assert historian.seqs() == list(range(1, 11))


async def test_a_schema_name_that_would_need_quoting_stops_the_half_at_start(
    historian: Historian, tmp_path: Path
) -> None:
    for name in ('dmz"; DROP', "historian_assets", "h" * 57):  # the views' schema: 63 bytes
        sink = sink_of(historian.config(schema=name), tmp_path)
        with pytest.raises(ConfigError, match=r"enterprise\.postgres\.schema"):
            await sink.start()
    await sink_of(historian.config(schema="h" * 56), tmp_path).start()


async def test_records_the_server_refuses_for_their_data_are_left_out_and_the_rest_written(
    historian: Historian, tmp_path: Path
) -> None:
    """A database in LATIN1 cannot hold '€' (22P05, refused by the COPY), and a CHECK the
    owner added refuses a device clock at 1970 (23514, refused by the INSERT): each such
    record is left out, logged and counted once; every other record is written, and the
    stream goes on after them."""
    historian.server.sql(
        f"CREATE DATABASE latin OWNER \"{OWNER}\" ENCODING 'LATIN1' LC_COLLATE 'C' "
        "LC_CTYPE 'C' TEMPLATE template0"
    )
    metrics = EnterpriseMetrics(lambda: 0, lambda: False)
    sink = PostgresSink(
        historian.config(database="latin"), tmp_path / "spool", tmp_path / "state",
        Authorization(policy.load(DEMO_POLICY)), metrics,
    )  # fmt: skip
    odd = varied(3000)
    odd[1234].value = "5 €"  # seq 1245
    odd[2345].source_time = datetime(1970, 1, 1, tzinfo=UTC)  # seq 2356
    sender = spool_of(tmp_path, varied(10))
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink.run()):
                await eventually(lambda: position(tmp_path) == 10, timeout=30)
                historian.server.sql(
                    "ALTER TABLE dmzbroker.records ADD CONSTRAINT plausible_clock "
                    "CHECK (source_time >= '2000-01-01')",
                    database="latin",
                )
                sender.send(odd)
                sender.send(varied(10))
                await eventually(lambda: position(tmp_path) == 3020, timeout=120)
    finally:
        sender.close()
    # One line for the episode (a second only if the records came in two batches a minute
    # apart): the first refused record and the counts by SQLSTATE.
    refused = [e for e in logs if e["event"] == "postgres_refused"]
    assert (refused[0]["seq"], refused[0]["signal"], refused[0]["sqlstate"]) == (
        1245, DOOR, "22P05",
    )  # fmt: skip
    assert "no equivalent in encoding" in refused[0]["error"]
    assert sum(e["records"] for e in refused) <= 2 and len(refused) <= 2
    assert refused[0]["by_sqlstate"] in ({"22P05": 1, "23514": 1}, {"22P05": 1})
    assert all("\n" not in e["error"] and "left out" in e["what_to_do"] for e in refused)
    seqs = [s for (s,) in historian.server.sql(
        "SELECT seq FROM dmzbroker.records ORDER BY seq", database="latin"
    )]  # fmt: skip
    assert seqs == [s for s in range(1, 3021) if s not in (1245, 2356)]
    sample = metrics.registry.get_sample_value
    assert sample("dmzbroker_output_refused_total", {"output": "postgres"}) == 2
    assert sample("dmzbroker_output_records_total", {"output": "postgres"}) == 3018


async def test_asset_views_take_no_name_of_a_table_nor_of_each_other(
    historian: Historian, tmp_path: Path
) -> None:
    """Views live in `<schema>_assets`: an asset named like a table of the schema gets a view,
    the tables stay; assets longer than 63 bytes that share their first 63 get names of their
    own (the start, '~', 64 bits of the path's md5), each reading its own asset's rows; a name
    already taken (not by that asset's view) is refused, never shared."""
    sender = spool_of(tmp_path, varied(4))
    try:
        async with running(sink_of(historian.config(), tmp_path).run()):
            await eventually(lambda: position(tmp_path) == 4, timeout=30)
    finally:
        sender.close()
    long_one, long_two = (f"site/{'a' * 58}/{end}" for end in ("x", "y"))
    assets = ["records", "signals", "assets", "schema_version", "records_20260101",
              long_one, long_two, long_one[:63]]  # fmt: skip
    config = historian.config()
    async with await postgres_connect.connect(config) as c:
        await c.set_autocommit(True)
        call = "SELECT dmzbroker.ensure_asset_view(%s)"
        names = [(await (await c.execute(call, (a,))).fetchone() or [""])[0] for a in assets]
        again = [(await (await c.execute(call, (a,))).fetchone() or [""])[0] for a in assets]
        historian.rows('CREATE TABLE dmzbroker_assets."site/planted" (x int)')
        with pytest.raises(psycopg.errors.DuplicateTable, match="taken by"):
            await c.execute(call, ("site/planted",))
    assert names == again and len(set(names)) == len(assets)
    assert names[:5] == assets[:5] and names[7] == long_one[:63]
    assert [len(n) for n in names[5:7]] == [63, 63] and names[5][46] == "~"
    views = dict(historian.rows(
        "SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'dmzbroker_assets' AND c.relkind = 'v'"
    ))  # fmt: skip
    assert {name: views[name] for name in names} == dict(zip(names, assets, strict=True))
    tables = historian.server.sql(
        "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = 'dmzbroker' AND c.relname = ANY(%s) "
        "ORDER BY 1", (assets[:4],), database="historian",
    )  # fmt: skip
    assert tables == [("assets", "r"), ("records", "p"), ("schema_version", "r"), ("signals", "r")]
    # Each view reads its own asset's rows, and only those.
    now = datetime.now(UTC)
    for asset in ("records", long_one, long_two):
        historian.rows(
            "INSERT INTO dmzbroker.signals VALUES "
            f"('{asset}/m', 1, '{asset}', 'm', '', 'float32', '', 'other', NULL, NULL, '{{}}')"
        )
        historian.server.sql(
            "INSERT INTO dmzbroker.records VALUES (%s, %s, %s, '1', '', 'good', 99, 1, '{}')",
            (f"{asset}/m", now, now), database="historian",
        )  # fmt: skip
    for asset, name in zip(assets, names, strict=True):
        if asset in ("records", long_one, long_two):
            rows = historian.rows(f'SELECT signal, measure FROM dmzbroker_assets."{name}"')
            assert rows == [(f"{asset}/m", "m")], asset
    assert len(historian.seqs()) == 4 + 3


async def test_a_refusal_of_the_databases_structure_holds_the_position_and_loses_nothing(
    historian: Historian, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NOT NULL column the owner added fails every record, and today's partition detached
    leaves rows nowhere to go: neither is blamed on the records. The position is held, one
    `postgres_refused` line each names the problem, and once the owner fixes it every record
    is written once. Each write has its own answer timeout (a long bisection is no hang)."""
    monkeypatch.setattr(postgres_output, "REFUSED_RETRY_S", 0.3)
    today = datetime.now(UTC).strftime("%Y%m%d")
    sender = spool_of(tmp_path, varied(4))
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink_of(historian.config(), tmp_path).run()):
                await eventually(lambda: position(tmp_path) == 4, timeout=30)
                historian.rows("ALTER TABLE dmzbroker.records ADD COLUMN site text NOT NULL "
                               "DEFAULT 'x'; ALTER TABLE dmzbroker.records ALTER site DROP DEFAULT")  # fmt: skip
                sender.send(varied(20))
                await eventually(lambda: "postgres_refused" in events(logs), timeout=30)
                assert position(tmp_path) == 4
                historian.rows("ALTER TABLE dmzbroker.records DROP COLUMN site")
                await eventually(lambda: position(tmp_path) == 24, timeout=60)
                historian.rows(f"ALTER TABLE dmzbroker.records DETACH PARTITION "
                               f"dmzbroker.records_{today}")  # fmt: skip
                sender.send(varied(20))
                await eventually(lambda: events(logs).count("postgres_refused") >= 2, timeout=30)
                assert position(tmp_path) == 24
                historian.rows(
                    f"ALTER TABLE dmzbroker.records ATTACH PARTITION dmzbroker.records_{today} "
                    f"FOR VALUES FROM ('{today}') TO ('{today}'::date + 1)"
                )
                await eventually(lambda: position(tmp_path) == 44, timeout=60)
    finally:
        sender.close()
    refused = [e for e in logs if e["event"] == "postgres_refused"]
    assert len(refused) == 2  # once per problem, not once per record or per retry
    assert "23502" in refused[0]["error"] and "position is held" in refused[0]["error"]
    assert "23514" in refused[1]["error"] and "no partition" in refused[1]["error"]
    assert historian.seqs() == list(range(1, 45))


async def test_a_hostile_servers_long_messages_are_cut_before_they_are_logged(
    historian: Historian, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trigger the owner added raises a 4 MB message at every insert: the sink logs it
    cut to a bounded line (never whole, never escaping to output_failed), and holds."""
    monkeypatch.setattr(postgres_output, "RETRY_MAX_S", 0.3)
    sender = spool_of(tmp_path, varied(4))
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink_of(historian.config(), tmp_path).run()):
                await eventually(lambda: position(tmp_path) == 4, timeout=30)
                historian.rows(
                    "CREATE FUNCTION dmzbroker.loud() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN RAISE EXCEPTION '%%', repeat('x', 4000000) USING DETAIL = "
                    "repeat('y', 4000000); END $$; CREATE TRIGGER loud BEFORE INSERT ON "
                    "dmzbroker.records FOR EACH ROW EXECUTE FUNCTION dmzbroker.loud()"
                )
                sender.send(varied(10))
                await eventually(lambda: "postgres_unreachable" in events(logs), timeout=30)
                assert position(tmp_path) == 4
                historian.rows("DROP TRIGGER loud ON dmzbroker.records")
                await eventually(lambda: position(tmp_path) == 14, timeout=60)
    finally:
        sender.close()
    assert all(len(str(e.get("error", ""))) < 2000 for e in logs)
    assert historian.seqs() == list(range(1, 15))


async def test_an_identity_the_policy_does_not_know_is_refused_and_moves_no_position(
    historian: Historian, tmp_path: Path
) -> None:
    sender = spool_of(tmp_path, varied(10))
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink_of(historian.config("spiffe://x/typo"), tmp_path).run()):
                await eventually(lambda: "postgres_refused" in events(logs), timeout=30)
    finally:
        sender.close()
    refused = next(e for e in logs if e["event"] == "postgres_refused")
    assert "'spiffe://x/typo' (enterprise.postgres.identity)" in refused["error"]
    assert position(tmp_path) == 0


async def test_the_sink_role_cannot_widen_a_view_nor_make_partitions_far_from_today(
    historian: Historian, tmp_path: Path
) -> None:
    """A `signals` row the sink's role may insert cannot put another asset's signal into an
    asset's view (the view filters on the record's own path); ensure_partition makes no
    partition outside [today - 400 days, today + 2 days]."""
    sender = spool_of(tmp_path, varied(8))
    try:
        async with running(sink_of(historian.config(), tmp_path).run()):
            await eventually(lambda: position(tmp_path) == 8, timeout=30)
    finally:
        sender.close()
    room = 'dmzbroker_assets."coldstore/storage/cold-room-1"'
    before = historian.rows(f"SELECT DISTINCT signal FROM {room} ORDER BY 1")
    config = historian.config()
    async with await postgres_connect.connect(config) as c:
        await c.set_autocommit(True)
        await c.execute(
            "INSERT INTO dmzbroker.signals VALUES (%s, 99, 'coldstore/storage/cold-room-1', "
            "'x', '', 'number', '', '', NULL, NULL, '{}')",
            (WEATHER,),
        )
        for day in ("current_date + 3", "current_date - 401", "'2999-01-01'::date"):
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                await c.execute(f"SELECT dmzbroker.ensure_partition({day})".encode())
        await c.execute(b"SELECT dmzbroker.ensure_partition(current_date + 2)")
    assert historian.rows(f"SELECT DISTINCT signal FROM {room} ORDER BY 1") == before
    assert (WEATHER,) not in before and len(before) == 2


async def test_a_host_libpq_would_take_for_a_socket_or_a_list_stops_the_half_at_start(
    historian: Historian, tmp_path: Path
) -> None:
    for key, value in (("host", "/var/run/postgresql"), ("host", "@abstract"),
                       ("host", "a.example,b.example"), ("server_name", "x/y")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"enterprise\.postgres\.{key}"):
            await sink_of(historian.config(**{key: value}), tmp_path).start()
    await sink_of(historian.config(host="db.example.org"), tmp_path).start()


async def test_a_password_is_never_sent_to_a_server_asking_for_it_in_clear(
    historian: Historian, tmp_path: Path
) -> None:
    """require_auth=scram-sha-256 and channel_binding=require: a server (with a certificate
    the CA signed) asking for the password in clear is refused before it gets it."""
    login = historian.server.create_role("cleartext_sink", password="s3cret", cleartext=True)
    config = historian.server.sink_config(CONSUMER_URI, login, database="historian")
    sender = spool_of(tmp_path, varied(2))
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink_of(config, tmp_path).run()):
                await eventually(lambda: "postgres_unreachable" in events(logs)
                                 or "postgres_refused" in events(logs), timeout=30)  # fmt: skip
    finally:
        sender.close()
    failed = next(e for e in logs if e["event"] in ("postgres_unreachable", "postgres_refused"))
    assert "scram-sha-256" in failed["error"] and "password" in failed["error"]
    assert "postgres_connected" not in events(logs)


async def test_shutdown_with_a_hung_server_drops_the_session_without_asking_it_to_cancel(
    historian: Historian, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled (the half stopping) while a write waits on a paused server: the session is
    dropped at once; psycopg's cancel request and its 5 + 5 s waits are never run."""
    sender = spool_of(tmp_path, varied(10))
    sink = asyncio.create_task(sink_of(historian.config(), tmp_path).run())
    try:
        await eventually(lambda: position(tmp_path) == 10, timeout=30)
        historian.server.pause()
        sender.send(varied(10))
        await asyncio.sleep(0.5)  # the write is sent and waits on the paused server
        with caplog.at_level(logging.WARNING, logger="psycopg"):
            sink.cancel()
            await asyncio.gather(sink, return_exceptions=True)
    finally:
        historian.server.resume()
        sink.cancel()
        sender.close()
    # psycopg's own path logs "query cancellation failed" after 5 s against a paused server
    assert not [r for r in caplog.records if "cancel" in r.getMessage()]
    assert position(tmp_path) == 10


async def test_the_database_stopped_for_30_s_mid_stream_loses_nothing_and_duplicates_nothing(
    historian: Historian, tmp_path: Path
) -> None:
    """The issue's test: the plant writes on while the database is down for 30 s; once it is
    back, every record is in `records` exactly once."""
    sender = SpoolSender(tmp_path / "spool", 1 << 20, 256 << 20)

    async def plant() -> None:
        for _ in range(1_000_000):
            sender.send(varied(20))
            await asyncio.sleep(0.02)

    try:
        with structlog.testing.capture_logs() as logs:
            async with running(sink_of(historian.config(), tmp_path).run(), plant()):
                await eventually(lambda: position(tmp_path) > 500, timeout=30)
                historian.server.stop()
                stopped_at = sender.next_seq - 1
                await asyncio.sleep(30)  # the outage itself: its length is what is tested
                written_meanwhile = sender.next_seq - 1 - stopped_at
                historian.server.start()
                back_at = sender.next_seq - 1
                await eventually(lambda: position(tmp_path) >= back_at, timeout=120)
            last = sender.next_seq - 1
        async with running(sink_of(historian.config(), tmp_path).run()):
            await eventually(lambda: position(tmp_path) == last, timeout=60)
    finally:
        sender.close()
    assert written_meanwhile > 1000
    assert "postgres_unreachable" in events(logs)
    seqs = historian.seqs()
    assert len(seqs) == len(set(seqs)) == last
    assert seqs == list(range(1, last + 1))
