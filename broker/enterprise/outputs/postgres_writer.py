"""How the PostgreSQL sink puts a batch of records into `<schema>.records`.

New records (the usual case) go by one COPY straight into `records`, its own transaction:
one round trip, and the server parses each row once. A batch that COPY cannot take whole
(a row already there, as after a crash or an outage; a day without its partition; a record
refused) is rolled back by the server and taken the careful way: COPY into the session's
temporary table, `INSERT … SELECT … ON CONFLICT DO NOTHING`, COMMIT. The careful way stays
in use until a batch of it was all new, so a replay does not pay for a COPY that fails.

`encode()` is CPU only (the COPY rows, formatted by psycopg without a COPY under way), so the
sink reads and encodes the next batch while `write()` waits for the server on this one; the
caller moves its spool position past a batch only after `write()` returned for it.

A record the server refuses for its data (SQLSTATE class 22 or 23: a value a column type,
the database's encoding or a constraint the owner added does not take) would otherwise fail
its batch at every try. `write()` then writes the batch again by halves, down to the
refused records, and returns them: every other record is written. A half written again is
a conflict, never a second row. It never reads a row.

A refusal that comes from the database's structure rather than from a record (a NOT NULL
column or CHECK an owner added that every record fails, a day without its partition, a
partition the owner detached) must never cost records: a record is left out only when the
rest of its batch was written without it and the refused stay a small share of the batch
(REFUSED_SHARE); otherwise `write()` raises `Held` and the caller keeps its position. An
error of the partition step is never put on a record. Each write has its own answer
timeout, so a long bisection is never taken for a hung server. `RefusedReport` logs the
records left out, at most once per REFUSED_REPORT_S.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.copy import AsyncCopy, AsyncWriter
from psycopg.pq import TransactionStatus

from broker.channel.spool import Position
from broker.enterprise.outputs import postgres_schema as schema
from broker.records import Record

INCOMING = "dmzbroker_incoming"  # the session's temporary table (pg_temp)
TEXT_LIMIT = 512  # characters of a server-supplied text kept for a log line
REFUSED_SHARE = 100  # more than 1 record in this many (and more than one) refused: held
REFUSED_REPORT_S = 60.0  # records left out: one postgres_refused line per interval at most

log = structlog.get_logger("postgres_sink")


def cut(text: str) -> str:
    """A server-supplied text on one line and at most TEXT_LIMIT characters: the server
    decides how long its messages are."""
    short = " ".join(text[: TEXT_LIMIT * 2].split())
    return short if len(short) <= TEXT_LIMIT else short[: TEXT_LIMIT - 1] + "…"


class Held(Exception):
    """The batch cannot be written as it is and no record can be blamed: the database's
    structure refuses it (the caller holds its position and retries)."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{message} (SQLSTATE {sqlstate})")
        self.sqlstate = sqlstate


@dataclass
class Batch:
    records: list[Record]  # what the grant lets through, in seq order
    mark: Position  # the spool position after the batch
    data: bytes  # `records` as COPY text rows (`encode`)


@dataclass(frozen=True)
class Refusal:
    record: Record
    sqlstate: str
    error: str  # the server's message, cut


def refuses_data(error: psycopg.Error) -> bool:
    """The server refuses the data of a row (class 22 data exception, class 23 integrity
    constraint), not the sink: writing the row again can never succeed. A unique violation
    is no such refusal (ON CONFLICT DO NOTHING takes every unique key)."""
    state = error.sqlstate or ""
    return state[:2] in ("22", "23") and state != "23505" and not _no_partition(error)


def _no_partition(error: psycopg.Error) -> bool:
    """ "no partition of relation … found for row": the database's layout (a partition
    detached or missing), never a record's fault."""
    return error.sqlstate == "23514" and not error.diag.constraint_name


def _held(error: psycopg.Error) -> Held:
    return Held(error.sqlstate or "", cut(error.diag.message_primary or str(error)))


class _Collected(AsyncWriter):
    """COPY rows into memory, formatted by psycopg without a COPY under way."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, data: Any) -> None:
        self.data += data

    async def finish(self, exc: BaseException | None = None) -> None:
        pass


class BatchWriter:
    """Writes batches on one connection (autocommit: each batch is a BEGIN … COMMIT of its
    own), one at a time."""

    def __init__(
        self, connection: psycopg.AsyncConnection[Any], schema_name: str, answer_s: float
    ) -> None:
        self._connection = connection
        self._answer_s = answer_s  # for each write, not for a whole bisection
        names = {
            "schema": sql.Identifier(schema_name),
            "incoming": sql.Identifier(INCOMING),
            "columns": sql.SQL(", ").join(sql.Identifier(c) for c, _ in schema.RECORD_COLUMNS),
        }
        self._partitions = sql.SQL(
            "BEGIN; SELECT {schema}.ensure_partition(d) FROM unnest({days}::date[]) d"
        )
        self._names = names
        self._copy = sql.SQL("COPY pg_temp.{incoming} ({columns}) FROM STDIN").format(**names)
        self._direct = sql.SQL("COPY {schema}.records ({columns}) FROM STDIN").format(**names)
        self._new = True  # the last batch was all new rows: the next is tried by one COPY
        # One simple query, one round trip: if the INSERT fails, COMMIT is never run.
        self._insert = sql.SQL(
            "INSERT INTO {schema}.records ({columns}) SELECT {columns} "
            "FROM pg_temp.{incoming} ON CONFLICT DO NOTHING; COMMIT"
        ).format(**names)

    async def encode(self, records: list[Record]) -> bytes:
        """`records` as COPY text rows (CPU only: nothing is sent)."""
        async with self._connection.cursor() as cursor:
            written = _Collected()
            async with AsyncCopy(cursor, binary=False, writer=written) as copy:
                copy.set_types(schema.COPY_TYPES)
                for row in schema.record_rows(records):
                    await copy.write_row(row)
        return bytes(written.data)

    async def write(self, batch: Batch) -> list[Refusal]:
        """The batch in a transaction of its own, committed; on a row refused for its data,
        by halves down to the refused records, which it returns. Held when no record can be
        blamed (see the module's docstring); any other error is raised (the batch not
        written)."""
        if self._new and await self._copied(batch.data):
            return []
        try:
            self._new = await self._write(batch.records, batch.data) == len(batch.records)
            return []
        except psycopg.Error as e:
            if _no_partition(e):
                raise _held(e) from None
            if not refuses_data(e):
                raise
            first = e
        return await self._bisect(batch.records, first)

    async def _bisect(self, records: list[Record], first: psycopg.Error) -> list[Refusal]:
        """Each refused record alone, in at most 2·log2(n) writes per refused record; the
        rest committed. A part known to fail is split, not written whole again."""
        refused: list[Refusal] = []
        allowed = max(1, len(records) // REFUSED_SHARE)
        written = 0
        half = len(records) // 2
        parts = [records[half:], records[:half]] if half else [records]
        while parts:  # ends: each part is written, or refused alone, or split in two
            part = parts.pop()
            try:
                await self._write(part, await self.encode(part))
                written += len(part)
            except psycopg.Error as e:
                if _no_partition(e):
                    raise _held(e) from None
                if not refuses_data(e):
                    raise
                if len(part) > 1:
                    middle = len(part) // 2
                    parts += [part[middle:], part[:middle]]
                elif len(refused) == allowed:  # too many to blame on records
                    raise _held(e) from None
                else:
                    message = cut(e.diag.message_primary or str(e))
                    refused.append(Refusal(part[0], e.sqlstate or "", message))
        if not written:  # nothing to compare with: it may be the database, not the record
            raise _held(first)
        return refused

    async def _copied(self, data: bytes) -> bool:
        """Whether one COPY into `records` took the whole batch; when the server refused it
        (nothing written), the careful way decides what to do with it."""
        try:
            async with (
                asyncio.timeout(self._answer_s),
                self._connection.cursor() as cursor,
                cursor.copy(self._direct) as copy,
            ):
                await copy.write(data)
            return True
        except psycopg.Error as e:
            if e.sqlstate is None:
                raise  # the connection, not the database's answer
            self._new = False
            return False

    async def _write(self, records: list[Record], data: bytes) -> int:
        """BEGIN, the days' partitions, COPY, INSERT, COMMIT, within the answer timeout;
        rolled back on an error; the number of rows inserted (the others were there). A
        partition refused is Held, never a record's fault."""
        days = sorted({r.broker_time.astimezone(UTC).date() for r in records})
        async with asyncio.timeout(self._answer_s):
            try:
                try:
                    await self._connection.execute(
                        self._partitions.format(days=sql.Literal(days), **self._names)
                    )
                except psycopg.Error as e:
                    if e.sqlstate is None:
                        raise  # the connection, not the database's answer
                    raise _held(e) from e
                async with self._connection.cursor() as cursor:
                    async with cursor.copy(self._copy) as copy:
                        await copy.write(data)
                    await cursor.execute(self._insert)  # the INSERT's result first
                    return cursor.rowcount
            except (psycopg.Error, Held):
                if self._connection.info.transaction_status != TransactionStatus.IDLE:
                    await self._connection.execute("ROLLBACK")
                raise


class RefusedReport:
    """Records left out, reported as one `postgres_refused` line with their counts and the
    first of them, at most once per REFUSED_REPORT_S: a database refusing record after
    record must not turn the record rate into the audit log's rate."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._pending: Counter[str] = Counter()  # left out since the last line, by SQLSTATE
        self._first: Refusal | None = None
        self._at = -REFUSED_REPORT_S

    def add(self, refused: list[Refusal]) -> None:
        for refusal in refused:
            self._pending[refusal.sqlstate[:5]] += 1
            self._first = self._first or refusal
        if self._first is None or time.monotonic() - self._at < REFUSED_REPORT_S:
            return
        first = self._first.record
        log.error("postgres_refused", records=self._pending.total(), seq=first.seq,
                  signal=first.signal, sqlstate=self._first.sqlstate[:5],
                  error=self._first.error, by_sqlstate=dict(self._pending),
                  what_to_do=f"left out: see why {self._where} refuses them (a constraint, "
                  "the database's encoding, a column's type); "
                  "dmzbroker_output_refused_total counts them")  # fmt: skip
        self._pending, self._first, self._at = Counter(), None, time.monotonic()
