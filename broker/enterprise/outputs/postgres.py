"""The PostgreSQL historian sink: records into an existing PostgreSQL, over TLS
(sslmode=verify-full), as a role that may only INSERT (docs/postgres.md).

It writes what the co-signed policy grants the sink's consumer identity, asked per batch, so
a narrower policy applies from the next batch. Store-and-forward: it reads the spool with a
position of its own (`spool-position-postgres.json`); a batch goes in by COPY, falling back
to `INSERT … SELECT … ON CONFLICT DO NOTHING` on `(signal, seq, broker_time)` when a row is
already there (postgres_writer.py), and the position moves only after the COMMIT. A batch
replayed after a crash or an outage therefore never duplicates a row. A record the server
refuses for its data is left out only when the rest of its batch was written without it
(postgres_writer.py); such records are counted and reported in one `postgres_refused` line
per REFUSED_REPORT_S with their counts (`RefusedReport`). A refusal no record can be blamed
for (the database's structure) holds the position. Records the spool's retention drops before the
sink read them are counted and logged (`spool_records_lost`), as for any reader.

The schema is created once, when absent, by the `owner` login (postgres_schema.py); the
sink's role never creates anything but its session's temporary table and, through the
owner's SECURITY DEFINER functions, a day's partition and an asset's view.

An unreachable server is retried every few seconds (`postgres_unreachable`, once per
outage); a refusal an owner must fix (a missing GRANT, no schema, a login the server
refuses) is one `postgres_refused` line naming the GRANT or setting that fixes it, retried
every `REFUSED_RETRY_S`. Neither ever stops the half. While the audit log cannot be written
or the policy has expired, nothing new is written. It reads no row from the database (only
whether its schema exists and which privileges it holds, each answer bounded and checked),
logs the server's texts cut to a bounded length, and never writes anywhere the plant half
reads. Interrupted (shutdown, an answer timeout), it drops the session at once rather than
asking a server that may be hung to cancel (postgres_connect.py opens the sessions).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import structlog
from psycopg import sql

from broker.backoff import Backoff
from broker.channel.spool import SpoolReceiver
from broker.channel.spool_watch import SpoolWatch
from broker.config import PostgresConfig
from broker.enterprise.authz import Authorization
from broker.enterprise.outputs import postgres_schema as schema
from broker.enterprise.outputs.base import OutputContext
from broker.enterprise.outputs.postgres_connect import Refused, check_hosts, connect
from broker.enterprise.outputs.postgres_writer import (
    INCOMING,
    Batch,
    BatchWriter,
    Held,
    RefusedReport,
    cut,
)
from broker.errors import ConfigError
from broker.metrics import EnterpriseMetrics
from broker.policy import Policy

BATCH = 5000
SLICE = 128  # records read and encoded between two turns of the event loop (~1.5 ms)
IDLE_S = 0.05  # how often it looks for new records where the spool is not watched
HELD_S = 0.5  # how often a sink held back (audit log failing, policy expired) looks again
# Each statement of a write: a server that accepts and then hangs (no FIN, keepalives
# answered) is noticed this soon; a 5,000-record batch takes ~0.1-0.5 s (docs/postgres.md).
ANSWER_TIMEOUT_S = 15.0
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 2.0  # as the MQTT sink: a refused connection is cheap, and the sink is back soon
FRESH_AFTER_S = 30.0  # a session that held this long ended an outage: its loss is a new one
REFUSED_RETRY_S = 30.0  # an owner must act first: asking again often only fills logs
REPORTED_MAX = 8  # distinct failures logged per outage (grouped by SQLSTATE)
REFUSING = ("authentication failed", "no pg_hba.conf entry", "does not exist")  # libpq's words

log = structlog.get_logger("postgres_sink")


def configured(context: OutputContext) -> PostgresSink | None:
    """The sink, where `enterprise.postgres` is set."""
    config = context.config.enterprise.postgres
    if config is None:
        return None
    return PostgresSink(
        config, context.spool_dir, context.state_dir, context.authz, context.metrics,
        held=lambda: context.audit.failing,
    )  # fmt: skip


class PostgresSink:
    name = "postgres"

    def __init__(
        self,
        config: PostgresConfig,
        spool_dir: Path,
        state_dir: Path,
        authz: Authorization,
        metrics: EnterpriseMetrics,
        *,
        held: Callable[[], bool] = lambda: False,
    ) -> None:
        self._config = config
        self._spool_dir = spool_dir
        self._state_dir = state_dir
        self._authz = authz
        self._metrics = metrics
        self._held = held  # the audit log cannot be written: nothing new goes out
        self._where = (
            f"database {config.database!r} at {config.host}:{config.port} (enterprise.postgres)"
        )

    async def start(self) -> None:
        """Nothing to bind; only a setting that can never work stops the half here."""
        check_hosts(self._config)
        name = self._config.schema
        if not schema.SCHEMA_NAME.fullmatch(name) or name.endswith(schema.VIEWS_SUFFIX):
            raise ConfigError(
                f"enterprise.postgres.schema {name!r}: must be lowercase letters, digits and "
                "'_', not starting with a digit, at most 56 bytes and not ending in "
                f"'{schema.VIEWS_SUFFIX}' (the asset views go into '<schema>{schema.VIEWS_SUFFIX}')"
            )

    def use_policy(self, policy: Policy) -> None:
        """Nothing to do: each batch asks `authz` for the view and the version in force."""

    async def close(self) -> None:
        """Nothing held between sessions: the position is saved after each commit."""

    async def run(self) -> NoReturn:
        # One watch for the sink's life: a fallback to polling is logged once, not per session.
        watch = SpoolWatch(self._spool_dir, IDLE_S)
        try:
            await self._sessions(watch)
        finally:
            watch.close()

    async def _sessions(self, watch: SpoolWatch) -> NoReturn:
        config = self._config
        address = f"{config.host}:{config.port}"
        backoff = Backoff(RETRY_FIRST_S, RETRY_MAX_S, fresh_after_s=FRESH_AFTER_S)
        down_since: float | None = None
        reported: set[str] = set()  # the failures logged in this outage, by kind (bounded)
        announced = False
        while True:
            receiver: SpoolReceiver | None = None
            connected_at: float | None = None
            try:
                self._check_identity()
                # From the saved position: what an uncommitted batch had read is read again.
                receiver = SpoolReceiver(self._spool_dir, self._state_dir, reader=self.name)
                async with await connect(config) as connection:
                    async with asyncio.timeout(ANSWER_TIMEOUT_S):
                        await self._prepare(connection)
                    connected_at = time.monotonic()
                    if not announced:
                        after = {} if down_since is None else {"down_s": _since(down_since)}
                        log.info("postgres_connected", address=address, database=config.database,
                                 user=config.user, schema=config.schema, **after)  # fmt: skip
                        announced = True
                    try:
                        await self._forward(connection, receiver, watch)
                    except psycopg.errors.InsufficientPrivilege as e:  # revoked while it ran
                        async with asyncio.timeout(ANSWER_TIMEOUT_S):
                            refusal = await self._refusal(connection)
                        raise refusal or Refused(self._explained(e)[1]) from None
            except (Refused, Held, psycopg.Error) as e:  # any psycopg.Error: its text is cut
                refused, error, kind = self._failure(e)
            except TimeoutError:
                refused, error = False, f"no answer within {ANSWER_TIMEOUT_S:g} s"
                kind = "timeout"
            finally:
                if receiver is not None:
                    receiver.close()
            held_s = 0.0 if connected_at is None else time.monotonic() - connected_at
            if held_s >= FRESH_AFTER_S:
                down_since = None
            if down_since is None:
                down_since, reported, announced = time.monotonic(), set(), False
            delay = REFUSED_RETRY_S if refused else backoff.after(held_s)
            event = "postgres_refused" if refused else "postgres_unreachable"
            if kind not in reported and len(reported) < REPORTED_MAX:
                log.warning(event, address=address, error=error, retry_in_s=round(delay, 2))
                reported.add(kind)
            await asyncio.sleep(delay)

    async def _prepare(self, connection: psycopg.AsyncConnection[Any]) -> None:
        """The schema there (made by the owner if absent), every privilege the sink needs
        held, and this session's temporary table; else Refused, naming the fix."""
        config = self._config
        if not await schema.exists(connection, config.schema):
            await self._create_schema()
        if refusal := await self._refusal(connection):
            raise refusal
        columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind))
            for name, kind in schema.RECORD_COLUMNS
        )
        await connection.execute(
            sql.SQL("CREATE TEMPORARY TABLE {} ({}) ON COMMIT DELETE ROWS").format(
                sql.Identifier(INCOMING), columns
            )
        )

    def _check_identity(self) -> None:
        """An identity the policy does not know would be granted nothing: every record
        would be read past and lost to the historian. Refused, the position held."""
        identity = self._config.identity
        if not self._authz.knows(identity):
            raise Refused(
                f"identity {identity!r} (enterprise.postgres.identity) is not a consumer in "
                f"the policy version {self._authz.policy.version}: nothing is written and the "
                "position is held; name a consumer the policy grants signals to"
            )

    def _failure(self, error: Exception) -> tuple[bool, str, str]:
        """Whether an owner must act, the line to log, and its kind: failures are logged
        once per kind in an outage, and a server's varying texts are one kind per SQLSTATE."""
        if isinstance(error, Held):
            return True, self._held_line(error), f"held {error.sqlstate[:5]}"
        if isinstance(error, psycopg.Error):
            refused, line = self._explained(error)
            return refused, line, f"{refused} {(error.sqlstate or type(error).__name__)[:40]}"
        return True, str(error), str(error)

    def _held_line(self, held: Held) -> str:
        return (
            f"{self._where} refuses a batch as a whole and no record can be blamed ({held}): "
            "nothing is left out and the position is held; as the owner, fix what every "
            "record fails (a NOT NULL column or CHECK added, a partition missing or "
            "detached, a day out of ensure_partition's range: docs/postgres.md#refused-records)"
        )

    async def _refusal(self, connection: psycopg.AsyncConnection[Any]) -> Refused | None:
        """Refused, naming the first privilege the sink's role lacks and the GRANT that gives
        it; None when it lacks none."""
        config = self._config
        needs = await schema.missing(connection, config.schema)
        if not needs:
            return None
        return Refused(
            f"role {config.user!r} lacks {needs[0]} in {self._where}: as the owner of "
            f"schema {config.schema!r}, run GRANT {needs[0]} TO {config.user} "
            "(docs/postgres.md#roles-and-grants)"
        )

    async def _create_schema(self) -> None:
        config = self._config
        if config.owner is None:
            raise Refused(
                f"schema {config.schema!r} does not exist in {self._where}: set "
                "enterprise.postgres.owner to a role that may create it there, or create it "
                "as docs/postgres.md#the-schema shows"
            )
        async with await connect(config, config.owner) as owner, owner.transaction():
            # One creator at a time (two halves started together): the second finds it.
            await owner.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (config.schema,))
            if await schema.exists(owner, config.schema):
                return
            try:
                layout = await schema.create(owner, config.schema, config.user)
            except psycopg.errors.InsufficientPrivilege as e:
                raise Refused(
                    f"owner role {config.owner.user!r} may not create schema "
                    f"{config.schema!r} in {self._where} ({e.diag.message_primary}): "
                    f"GRANT CREATE ON DATABASE {config.database} TO {config.owner.user}"
                ) from None
        log.info("postgres_schema_created", schema=config.schema, database=config.database,
                 layout=layout, owner=config.owner.user, user=config.user)  # fmt: skip

    async def _forward(
        self,
        connection: psycopg.AsyncConnection[Any],
        receiver: SpoolReceiver,
        watch: SpoolWatch,
    ) -> NoReturn:
        """Two tasks: one reads and encodes batches, yielding between slices; the other
        writes them in turn. So the sink reads batch n + 1 while the server takes batch n,
        and a batch's mark is committed only after its COMMIT (at most one batch written
        past the saved position)."""
        writer = BatchWriter(connection, self._config.schema, ANSWER_TIMEOUT_S)
        batches: asyncio.Queue[Batch] = asyncio.Queue(maxsize=1)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._read(connection, receiver, writer, batches, watch))
                tasks.create_task(self._write(receiver, writer, batches))
        except ExceptionGroup as failed:  # the first failure ends the session, as one would
            raise failed.exceptions[0] from None
        raise AssertionError("unreachable: both tasks loop until they fail")

    async def _read(
        self,
        connection: psycopg.AsyncConnection[Any],
        receiver: SpoolReceiver,
        writer: BatchWriter,
        batches: asyncio.Queue[Batch],
        watch: SpoolWatch,
    ) -> NoReturn:
        described: int | None = None  # the policy version the assets and signals rows are for
        while True:
            if self._holding():
                await asyncio.sleep(HELD_S)
                continue
            self._check_identity()  # the policy in force may have dropped it
            policy = self._authz.policy
            view = self._authz.view(self._config.identity)
            if described != policy.version:
                await batches.join()  # the connection is free: no batch queued or written
                async with asyncio.timeout(ANSWER_TIMEOUT_S), connection.transaction():
                    await self._describe(connection, policy, view)
                described = policy.version
            batch = await self._next_batch(receiver, writer, view)
            if batch is None:
                await watch.wait()  # the spool grew, or IDLE_S where it is not watched
                continue
            await batches.put(batch)

    async def _next_batch(
        self, receiver: SpoolReceiver, writer: BatchWriter, view: frozenset[str]
    ) -> Batch | None:
        """Up to BATCH records read, those `view` grants encoded, a slice at a time with a
        turn of the event loop between slices (the writer answers the server meanwhile);
        None when there is nothing new."""
        read, allowed, data = 0, [], bytearray()
        while read < BATCH:
            records = receiver.receive(max_records=min(SLICE, BATCH - read))
            if not records:
                break
            read += len(records)
            if granted := [r for r in records if r.signal in view]:
                allowed += granted
                data += await writer.encode(granted)
            await asyncio.sleep(0)
        return Batch(allowed, receiver.mark(), bytes(data)) if read else None

    async def _write(
        self, receiver: SpoolReceiver, writer: BatchWriter, batches: asyncio.Queue[Batch]
    ) -> NoReturn:
        report = RefusedReport(self._where)
        while True:
            batch = await batches.get()
            # Read before it held: written once allowed again (polled, as the reader does:
            # neither the audit log's state nor the policy's expiry is an event to wait on).
            while self._holding():  # noqa: ASYNC110
                await asyncio.sleep(HELD_S)
            refused = await writer.write(batch) if batch.records else []
            report.add(refused)
            receiver.commit(batch.mark)  # committed: the position moves past the batch
            self._metrics.output_records.labels(self.name).inc(len(batch.records) - len(refused))
            self._metrics.output_refused.labels(self.name).inc(len(refused))
            self._metrics.output_seq.labels(self.name).set(batch.mark.seq)
            batches.task_done()

    def _holding(self) -> bool:
        """Nothing new goes out: the audit log cannot be written, or the policy expired."""
        return self._held() or datetime.now(UTC) >= self._authz.policy.expires

    async def _describe(
        self, connection: psycopg.AsyncConnection[Any], policy: Policy, view: frozenset[str]
    ) -> None:
        """The assets and signals rows of this policy version, and a view per asset."""
        names = {"schema": sql.Identifier(self._config.schema)}
        assets = schema.asset_paths(view)
        query = sql.SQL("SELECT a, {schema}.ensure_asset_view(a) FROM unnest(%s::text[]) a")
        answered = await schema.answer(connection, query.format(**names), (assets,), len(assets), 2)
        view_names = {str(a): str(v) for a, v in answered}
        for table, rows in (
            ("signals", list(schema.signal_rows(policy, view))),
            ("assets", list(schema.asset_rows(policy, view_names))),
        ):
            if not rows:
                continue
            placeholders = sql.SQL(", ").join(sql.Placeholder() * len(rows[0]))
            async with connection.cursor() as cursor:
                await cursor.executemany(
                    sql.SQL("INSERT INTO {schema}.{table} VALUES ({values}) ON CONFLICT DO NOTHING")
                    .format(table=sql.Identifier(table), values=placeholders, **names),
                    rows,
                )  # fmt: skip

    def _explained(self, error: psycopg.Error) -> tuple[bool, str]:
        """Whether an owner or operator must act (a refusal, retried slowly), and one line:
        what failed, where, and what fixes it."""
        text = cut(str(error))  # libpq's message spans lines; the server's has no bound
        if isinstance(error, psycopg.errors.InsufficientPrivilege):
            return True, (
                f"{text} in {self._where}: as the owner of schema {self._config.schema!r}, "
                f"GRANT what docs/postgres.md#roles-and-grants lists TO {self._config.user}"
            )
        if "does not match host name" in text:
            key = "server_name" if self._config.server_name else "host"
            return False, (
                f"{text}: the server's certificate does not name "
                f"{self._config.server_name or self._config.host!r} (enterprise.postgres.{key}): "
                "set enterprise.postgres.server_name to a DNS name or IP address it carries"
            )
        if any(words in text for words in REFUSING):
            return True, f"{text}: check enterprise.postgres.user, its login and the database"
        return False, text


def _since(start: float) -> float:
    return round(time.monotonic() - start, 1)
