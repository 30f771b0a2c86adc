"""The PostgreSQL historian's schema (docs/postgres.md): the DDL the `owner` login runs once,
when the schema is absent; the GRANTs that leave the sink's role INSERT only; the check that
names the GRANT a role lacks; and the rows the semantic model gives the `assets` and
`signals` tables.

Tables, columns, functions and views named here are public contract (BI tools and reports
query them): add, never rename or remove. No string of the policy or the records is ever
spliced into SQL text here: the schema's name is checked against `SCHEMA_NAME` and quoted
by psycopg.sql; values are parameters; the SECURITY DEFINER functions, which run as the
owner, fix their `search_path`, check their argument and build their DDL with format()'s %I
and %L only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import msgspec
import psycopg
from psycopg import sql

from broker.policy import Policy
from broker.records import Record

SCHEMA_VERSION = 1
# The days ensure_partition makes a partition for, around the database's today (UTC): a
# spool older than this is not replayed, a broker clock further ahead is wrong.
PARTITION_DAYS_BEFORE, PARTITION_DAYS_AFTER = 400, 2
# Needs no quoting in BI tools' SQL either; leaves room for VIEWS_SUFFIX within 63 bytes.
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,55}")
# The per-asset views live in a schema of their own, `<schema>_assets`: a view named after
# any asset path can never take the name of a table, a partition or another schema's object.
VIEWS_SUFFIX = "_assets"
TABLES = ("records", "signals", "assets")  # the sink's role INSERTs into these, nothing else
FUNCTIONS = ("ensure_partition(date)", "ensure_asset_view(text)")  # and EXECUTEs these
# `records` columns in COPY order; the session's temporary table holds them as these types.
RECORD_COLUMNS = (("signal", "text"), ("source_time", "timestamptz"),
                  ("broker_time", "timestamptz"), ("value", "jsonb"), ("unit", "text"),
                  ("quality", "text"), ("seq", "bigint"), ("policy_version", "bigint"),
                  ("context", "jsonb"))  # fmt: skip
# The asset hierarchy by depth, as ISA-95's equipment levels (and ISA-88's below a work unit).
ISA95_LEVELS = ("site", "area", "work_center", "work_unit", "equipment_module", "control_module")

_TABLES = """
CREATE SCHEMA {schema};
COMMENT ON SCHEMA {schema} IS 'dmzbroker historian (docs/postgres.md)';
CREATE SCHEMA {views};
COMMENT ON SCHEMA {views} IS 'dmzbroker historian: one view per asset (docs/postgres.md)';
CREATE TABLE {schema}.schema_version (
    version integer PRIMARY KEY,
    layout text NOT NULL,  -- 'partitions' (by day) or 'hypertable' (TimescaleDB)
    created timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {schema}.assets (
    path text NOT NULL,
    policy_version bigint NOT NULL,
    name text NOT NULL,
    parent text,  -- NULL at the top (a site)
    level text NOT NULL,  -- ISA-95: site, area, work_center, work_unit, ...
    depth smallint NOT NULL,
    type text NOT NULL,
    description text NOT NULL,
    view_name text,  -- the asset's view in <schema>_assets; NULL for an asset without signals
    PRIMARY KEY (path, policy_version)
);
CREATE TABLE {schema}.signals (
    path text NOT NULL,
    policy_version bigint NOT NULL,
    asset text NOT NULL,
    measure text NOT NULL,
    unit text NOT NULL,
    type text NOT NULL,
    description text NOT NULL,
    quantity text NOT NULL,
    range_min double precision,
    range_max double precision,
    outcomes text[] NOT NULL,
    PRIMARY KEY (path, policy_version)
);
CREATE TABLE {schema}.records (
    signal text NOT NULL,
    source_time timestamptz NOT NULL,
    broker_time timestamptz NOT NULL,
    value jsonb,  -- as the API serves it: a number, boolean or string; NULL for none
    unit text NOT NULL,
    quality text NOT NULL,
    seq bigint NOT NULL,
    policy_version bigint NOT NULL,
    context jsonb NOT NULL,
    -- a replayed record has the same broker_time: unique on (signal, seq) in effect; the
    -- partition key must be part of any unique key
    CONSTRAINT records_signal_seq UNIQUE (signal, seq, broker_time)
)"""
_BY_DAY = " PARTITION BY RANGE (broker_time);"
# Qualified by the extension's own schema: never resolved through a search_path where
# another role could have planted a function of that name.
_HYPERTABLE = """;
SELECT {timescale}.create_hypertable({records}::regclass, 'broker_time'::name,
                                     chunk_time_interval => interval '1 day');"""

# SECURITY DEFINER: they run as the owner. search_path fixed, every name qualified.
_FUNCTIONS = """
CREATE FUNCTION {schema}.ensure_partition(day date) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC'
AS $fn$
DECLARE
    part text := 'records_' || to_char(day, 'YYYYMMDD');
BEGIN
    IF day IS NULL OR day < current_date - {before} OR day > current_date + {after} THEN
        RAISE EXCEPTION 'no partition for day %: outside [today - {before} days, today + {after} days]',
            day USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = {name} AND c.relname = 'records') <> 'p' THEN
        RETURN;  -- a hypertable: TimescaleDB makes its own chunks
    END IF;
    IF to_regclass(format('%I.%I', {name}, part)) IS NOT NULL THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext(format('%I.%I', {name}, part)));
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I.%I PARTITION OF %I.records '
                   'FOR VALUES FROM (%L) TO (%L)',
                   {name}, part, {name}, day::timestamptz, (day + 1)::timestamptz);
END
$fn$;
CREATE FUNCTION {schema}.ensure_asset_view(asset text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    view_name text;
    taken_by text;
BEGIN
    IF asset !~ '^[a-z0-9][a-z0-9_-]{{0,62}}(/[a-z0-9][a-z0-9_-]{{0,62}}){{0,6}}$' THEN
        RAISE EXCEPTION 'not an asset path: %', asset USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The path itself; past 63 bytes its start, '~' (never in a path) and 64 bits of its md5.
    view_name := CASE WHEN octet_length(asset) <= 63 THEN asset
                 ELSE left(asset, 46) || '~' || left(md5(asset), 16) END;
    PERFORM pg_advisory_xact_lock(hashtext(format('%I.%I', {views_name}, view_name)));
    SELECT coalesce(obj_description(c.oid, 'pg_class'), '') INTO taken_by
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = {views_name} AND c.relname = view_name;
    IF taken_by = asset THEN
        RETURN view_name;
    ELSIF taken_by IS NOT NULL THEN  -- never by design; refused rather than shared
        RAISE EXCEPTION 'asset %: view name % is taken by %', asset, view_name, taken_by
            USING ERRCODE = 'duplicate_table';
    END IF;
    EXECUTE format($view$
            CREATE VIEW %5$I.%2$I AS
            SELECT r.broker_time, r.source_time, r.signal,
                   substr(r.signal, %3$s) AS measure,
                   CASE jsonb_typeof(r.value)
                       WHEN 'number' THEN r.value::double precision
                       WHEN 'boolean' THEN CASE WHEN r.value::boolean THEN 1.0 ELSE 0.0 END
                   END AS value,
                   CASE WHEN jsonb_typeof(r.value) = 'string' THEN r.value #>> '{{}}' END
                       AS value_text,
                   r.unit, r.quality,
                   r.context ->> 'asset_state' AS asset_state,
                   r.context #>> '{{assessment,label}}' AS assessment,
                   jsonb_array_length(r.context -> 'alerts') AS active_alerts,
                   r.seq, r.policy_version, r.context
            FROM %1$I.records r
            WHERE starts_with(r.signal, %4$L || '/')
              AND strpos(substr(r.signal, %3$s), '/') = 0
            $view$, {name}, view_name, length(asset) + 2, asset, {views_name});
    EXECUTE format('COMMENT ON VIEW %I.%I IS %L', {views_name}, view_name, asset);
    RETURN view_name;
END
$fn$;
"""

_GRANTS = """
REVOKE ALL ON FUNCTION {schema}.ensure_partition(date), {schema}.ensure_asset_view(text)
    FROM PUBLIC;
GRANT USAGE ON SCHEMA {schema} TO {user};
GRANT INSERT ON {schema}.records, {schema}.signals, {schema}.assets TO {user};
GRANT EXECUTE ON FUNCTION {schema}.ensure_partition(date), {schema}.ensure_asset_view(text)
    TO {user};
"""

# What the sink's role needs, each with the GRANT that gives it.
NEEDS = 7  # rows
_NEEDS = """
SELECT need, held FROM (VALUES
    (1, 'USAGE ON SCHEMA {name}', has_schema_privilege({literal}, 'USAGE')),
    (2, 'INSERT ON {name}.records', has_table_privilege({records}, 'INSERT')),
    (3, 'INSERT ON {name}.signals', has_table_privilege({signals}, 'INSERT')),
    (4, 'INSERT ON {name}.assets', has_table_privilege({assets}, 'INSERT')),
    (5, 'EXECUTE ON FUNCTION {name}.ensure_partition(date)',
        has_function_privilege({partition}, 'EXECUTE')),
    (6, 'EXECUTE ON FUNCTION {name}.ensure_asset_view(text)',
        has_function_privilege({view}, 'EXECUTE')),
    (7, 'TEMPORARY ON DATABASE ' || quote_ident(current_database()),
        has_database_privilege(current_database(), 'TEMPORARY'))
) AS needs (n, need, held) ORDER BY n"""


def _names(schema: str) -> dict[str, sql.Composable]:
    if not SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"schema {schema!r}: must be lowercase letters, digits and '_'")
    return {
        "schema": sql.Identifier(schema),
        "name": sql.Literal(schema),  # inside the functions: an argument to format()'s %I
        "views": sql.Identifier(schema + VIEWS_SUFFIX),
        "views_name": sql.Literal(schema + VIEWS_SUFFIX),
        "records": sql.Literal(f"{schema}.records"),
        "before": sql.SQL(str(PARTITION_DAYS_BEFORE)),
        "after": sql.SQL(str(PARTITION_DAYS_AFTER)),
    }


async def answer(
    connection: psycopg.AsyncConnection[Any],
    query: sql.Composed | str,
    params: tuple[Any, ...],
    rows: int,
    columns: int,
) -> list[tuple[Any, ...]]:
    """The answer to `query`, read row by row: exactly `rows` rows of `columns` each.
    Anything else ends the session (OperationalError) without reading the rest, whose size
    the server decides."""
    found: list[tuple[Any, ...]] = []
    async with connection.cursor() as cursor:
        async for row in cursor.stream(query, params):
            if len(found) == rows or len(row) != columns:
                connection.pgconn.finish()  # not drained, not cancelled: dropped
                raise psycopg.OperationalError(
                    f"the server answered more than {rows} rows or rows not of {columns} "
                    "columns to the sink's query: not a PostgreSQL it can write to"
                )
            found.append(tuple(row))
    if len(found) != rows:
        raise psycopg.OperationalError(
            f"the server answered {len(found)} rows where {rows} were asked"
        )
    return found


async def exists(connection: psycopg.AsyncConnection[Any], schema: str) -> bool:
    [(held,)] = await answer(
        connection, "SELECT to_regclass(format('%%I.records', %s::text)) IS NOT NULL",
        (schema,), 1, 1,
    )  # fmt: skip
    return held is True


async def create(connection: psycopg.AsyncConnection[Any], schema: str, user: str) -> str:
    """Create the schema (in the caller's transaction) and grant `user` what the sink needs;
    its layout: 'hypertable' where TimescaleDB is installed in the database, else
    'partitions' (one per day of broker_time)."""
    names = _names(schema)
    # Every name below is qualified; nothing resolves through a schema others may write.
    await connection.execute("SET LOCAL search_path = pg_catalog, pg_temp")
    cursor = await connection.execute(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'timescaledb'"
    )
    timescale = await cursor.fetchone()
    layout = "hypertable" if timescale else "partitions"
    names["timescale"] = sql.Identifier(timescale[0] if timescale else "")
    tables = _TABLES + (_HYPERTABLE if layout == "hypertable" else _BY_DAY)
    for text in (tables, _FUNCTIONS):
        await connection.execute(sql.SQL(text).format(**names))
    await connection.execute(sql.SQL(_GRANTS).format(user=sql.Identifier(user), **names))
    await connection.execute(
        sql.SQL("INSERT INTO {schema}.schema_version (version, layout) VALUES (%s, %s)").format(
            **names
        ),
        (SCHEMA_VERSION, layout),
    )
    return layout


async def missing(connection: psycopg.AsyncConnection[Any], schema: str) -> list[str]:
    """The privileges the connected role lacks for the sink, as the text after GRANT."""
    names = {
        "name": sql.SQL(schema),  # checked by _names: spelled as is in the GRANT text
        "literal": sql.Literal(schema),
        "records": sql.Literal(f"{schema}.records"),
        "signals": sql.Literal(f"{schema}.signals"),
        "assets": sql.Literal(f"{schema}.assets"),
        "partition": sql.Literal(f"{schema}.ensure_partition(date)"),
        "view": sql.Literal(f"{schema}.ensure_asset_view(text)"),
    }
    _names(schema)
    needs = await answer(connection, sql.SQL(_NEEDS).format(**names), (), NEEDS, 2)
    return [str(need) for need, held in needs if held is not True]


def level(depth: int) -> str:
    return ISA95_LEVELS[min(depth, len(ISA95_LEVELS)) - 1]


def signal_rows(policy: Policy, view: frozenset[str]) -> Iterator[tuple[object, ...]]:
    """`signals` rows for the signals `view` grants, in policy order."""
    for s in policy.signals:
        if s.path in view:
            low, high = (s.range.min, s.range.max) if s.range else (None, None)
            yield (s.path, policy.version, s.asset, s.measure, s.unit, s.source.type,
                   s.description, s.quantity, low, high, list(s.outcomes))  # fmt: skip


def asset_paths(view: frozenset[str]) -> list[str]:
    """The assets the granted signals belong to (each has a view)."""
    return sorted({path.rpartition("/")[0] for path in view})


def asset_rows(policy: Policy, view_names: dict[str, str]) -> Iterator[tuple[object, ...]]:
    """`assets` rows: each asset with a view (`view_names`: asset → its view) and every asset
    above it, so the hierarchy is whole."""
    declared = {a.path: a for a in policy.assets}
    paths = {
        "/".join(parts[:depth])
        for parts in (path.split("/") for path in view_names)
        for depth in range(1, len(parts) + 1)
    }
    for path in sorted(paths):
        parent, _, name = path.rpartition("/")
        depth = path.count("/") + 1
        asset = declared.get(path)
        yield (path, policy.version, name, parent or None, level(depth), depth,
               asset.type if asset else "other", asset.description if asset else "",
               view_names.get(path))  # fmt: skip


_json = msgspec.json.Encoder()
# How the driver sends each of RECORD_COLUMNS in COPY: JSON goes as the text it already is.
COPY_TYPES = ("text", "timestamptz", "timestamptz", "text", "text", "text", "int8", "int8",
              "text")  # fmt: skip


def record_rows(records: list[Record]) -> list[tuple[object, ...]]:
    """The records as rows in RECORD_COLUMNS order, for COPY. PostgreSQL's text and jsonb
    cannot hold U+0000: it is left out of strings (a record with one would otherwise stop
    the sink at every try)."""
    return [
        (r.signal, r.source_time, r.broker_time,
         None if r.value is None else _json_text(r.value),
         r.unit.replace("\0", "") if "\0" in r.unit else r.unit,
         r.quality, r.seq, r.policy_version, _json_text(r.context))
        for r in records
    ]  # fmt: skip


def _json_text(obj: object) -> str:
    data = _json.encode(obj)
    if b"\\u0000" in data:  # rare: decoded, cleaned and encoded again
        data = _json.encode(_without_nul(msgspec.json.decode(data)))
    return data.decode()


def _without_nul(obj: object) -> object:
    if isinstance(obj, str):
        return obj.replace("\0", "")
    if isinstance(obj, list):
        return [_without_nul(item) for item in obj]
    if isinstance(obj, dict):
        return {_without_nul(k): _without_nul(v) for k, v in obj.items()}
    return obj
