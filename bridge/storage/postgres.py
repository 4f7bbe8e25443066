"""PostgreSQL at scale: one schema per tenant, named after it; COPY for points; TimescaleDB when present.

The schema and its tables are created on first use (and migrated by
version, under an advisory lock so several bridge processes can start at
once).

Readings are stored as ``samples(series, ts, value, value_text, quality,
error, seq)`` with each ``(gw, device, tag)`` named once in ``series``:
the index a reading adds to is ``(series, ts)``, two integers, instead of
three texts and a time, which halved the server's CPU per stored reading.
``points`` is a view with the columns it always had. ``samples`` is
partitioned by day on ``ts`` (epoch ms, UTC days): ``samples_YYYYMMDD``,
created ahead as time moves, and ``samples_default`` for readings outside
every day partition (a clock far off). Retention drops whole day
partitions. When TimescaleDB is installed in the database, ``samples`` is
a hypertable with one-day chunks instead, and retention is
``drop_chunks``.

``value`` is ``double precision``; text values go to ``value_text`` (as do
integers beyond 2^53, which a double cannot hold exactly). A commit window
is one transaction; ``(gw, seq)`` is claimed with ``ON CONFLICT DO NOTHING``,
so two processes racing for the same batch store it once.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.rows
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from factory_edge.errors import StorageError
from factory_edge.logs import fields

from ..alerts.model import Change, Instance, OutboxItem, SeriesLast, State
from ..mapping import MappingRule
from ..messages import DataBatch, DeadLetter, EventRow, MetaRow, StatusRow
from ..metering import HOUR_MS, Usage
from .base import STATUS_EXPIRED, DataRejected, LatestRow, SeriesIds, Store, Table, Tx

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5
_MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE {s}.batches (
            gw text NOT NULL, seq bigint NOT NULL, device text NOT NULL, points integer NOT NULL,
            received_at bigint NOT NULL, PRIMARY KEY (gw, seq));
        CREATE TABLE {s}.points (
            gw text NOT NULL, device text NOT NULL, tag text NOT NULL, ts bigint NOT NULL,
            value double precision, value_text text, quality text NOT NULL, error text, seq bigint NOT NULL);
        CREATE INDEX ON {s}.points (gw, device, tag, ts);
        CREATE TABLE {s}.latest (
            gw text NOT NULL, device text NOT NULL, tag text NOT NULL, ts bigint NOT NULL,
            value double precision, value_text text, quality text NOT NULL, error text,
            received_at bigint NOT NULL, seen_at bigint, PRIMARY KEY (gw, device, tag));
        CREATE TABLE {s}.status (
            gw text NOT NULL, state text NOT NULL, ts bigint NOT NULL, version text, config_hash text,
            received_at bigint NOT NULL, UNIQUE (gw, ts, state));
        CREATE TABLE {s}.events (
            id bigserial PRIMARY KEY, gw text NOT NULL, type text NOT NULL, ts bigint NOT NULL,
            payload jsonb NOT NULL, digest text NOT NULL, received_at bigint NOT NULL, UNIQUE (gw, digest));
        CREATE TABLE {s}.alerts (
            id bigserial PRIMARY KEY, ts bigint NOT NULL, gw text NOT NULL, device text NOT NULL,
            rule text NOT NULL, state text NOT NULL, previous text NOT NULL, severity text NOT NULL,
            tag text, value jsonb, since bigint, condition text NOT NULL, message text NOT NULL);
        CREATE INDEX ON {s}.alerts (gw, device, rule, id);
        CREATE TABLE {s}.alert_state (
            gw text NOT NULL, device text NOT NULL, rule text NOT NULL, state text NOT NULL, since bigint,
            value jsonb, tag text, tags jsonb NOT NULL, fired boolean NOT NULL, changed_at bigint NOT NULL,
            PRIMARY KEY (gw, device, rule));
        CREATE TABLE {s}.alert_series (
            gw text NOT NULL, device text NOT NULL, tag text NOT NULL, ts bigint NOT NULL, value jsonb,
            quality text NOT NULL, seen_at bigint, PRIMARY KEY (gw, device, tag));
        CREATE TABLE {s}.webhook_outbox (
            id bigserial PRIMARY KEY, webhook text NOT NULL, payload bytea NOT NULL, created_at bigint NOT NULL);
        CREATE TABLE {s}.dead_letters (
            id bigserial PRIMARY KEY, topic text NOT NULL, payload bytea NOT NULL, reason text NOT NULL,
            received_at bigint NOT NULL);
    """,
    # Per-minute count, sum, min and max of each series' numeric readings, kept in the commit transaction of
    # their points: the console draws a month-long trend from 43,200 rows per series instead of millions.
    2: """
        CREATE TABLE {s}.points_minute (
            gw text NOT NULL, device text NOT NULL, tag text NOT NULL, minute bigint NOT NULL, n bigint NOT NULL,
            total double precision NOT NULL, lo double precision NOT NULL, hi double precision NOT NULL,
            PRIMARY KEY (gw, device, tag, minute));
        INSERT INTO {s}.points_minute
            SELECT gw, device, tag, ts / 60000, count(*), sum(value), min(value), max(value) FROM {s}.points
            WHERE value IS NOT NULL GROUP BY gw, device, tag, ts / 60000
    """,
    # Each gateway's newest buffer figures (from its status) and each device's tags (from its retained meta).
    3: """
        CREATE TABLE {s}.gateway_buffer (
            gw text PRIMARY KEY, ts bigint NOT NULL, pending_batches bigint NOT NULL, pending_points bigint NOT NULL,
            unconfirmed_batches bigint NOT NULL, dropped_points bigint NOT NULL, oldest_pending_ts bigint,
            oldest_unconfirmed_ts bigint, received_at bigint NOT NULL);
        CREATE TABLE {s}.device_meta (
            gw text NOT NULL, device text NOT NULL, tags jsonb NOT NULL, received_at bigint NOT NULL,
            PRIMARY KEY (gw, device))
    """,
    # 4: readings by series id, in day partitions (or a hypertable): PostgresStore._migrate_series.
    # Metering (bridge/metering.py): what each gateway's new batches added, per hour, in their commit.
    5: """
        CREATE TABLE {s}.usage_hourly (
            hour bigint NOT NULL, gw text NOT NULL, points bigint NOT NULL, messages bigint NOT NULL,
            bytes bigint NOT NULL, delayed_points bigint NOT NULL DEFAULT 0, PRIMARY KEY (hour, gw))
    """,
}
MINUTE_MS = 60_000
DAY_MS = 86_400_000
PARTITION_AHEAD_DAYS = 2  # day partitions kept ready past today (and one before it), so none is created in a rush
STRAY_DAYS = 31  # readings this many days old or newer that landed in the default partition get their day's own
DEFAULT_DELETE_ROWS = 10_000  # readings deleted from the default partition per transaction
LOCK_TIMEOUT = "5s"  # maintenance waits this long for a lock, then tries again at its next run
_SAMPLES = (
    "series bigint NOT NULL, ts bigint NOT NULL, value double precision, value_text text, quality text NOT NULL, "
    "error text, seq bigint NOT NULL"
)
_POINTS_VIEW = """
    CREATE VIEW {s}.points AS
        SELECT s.gw, s.device, s.tag, p.ts, p.value, p.value_text, p.quality, p.error, p.seq
        FROM {s}.samples p JOIN {s}.series s ON s.id = p.series
"""
_BOUND = re.compile(r"FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")
_PG_TYPES = {
    "auto": "jsonb",
    "float": "double precision",
    "int": "bigint",
    "str": "text",
    "bool": "boolean",
    "json": "jsonb",
    "timestamp": "bigint",
}
_EXACT = 2**53


def describe_dsn(dsn: str) -> str:
    """``postgresql://host:port/db`` without user or password, for messages."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgresql (unparsable dsn)"
    return f"postgresql://{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


def _fetch_one(conn: psycopg.Connection[Any], query: sql.Composed) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def split_value(value: Any) -> tuple[float | None, str | None]:
    """``value`` -> (double precision column, text column)."""
    if value is None:
        return None, None
    if isinstance(value, str):
        return None, value
    if isinstance(value, int) and not isinstance(value, bool) and not -_EXACT <= value <= _EXACT:
        return float(value), str(value)
    return float(value), None


def join_value(number: float | None, text: str | None) -> Any:
    """The inverse of ``split_value``."""
    if text is not None and number is not None:
        return int(text)  # an integer too large for a double, kept exactly
    return text if text is not None else number


def schema_lock(conn: psycopg.Connection[Any], tenant: str) -> None:
    """Held until the transaction ends: one process at a time changes the tenant's tables
    (``CREATE ... IF NOT EXISTS`` alone races: two creators collide in the catalogue)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"factory-edge bridge schema {tenant}",))


class PostgresStore(Store):
    """One tenant's schema in a PostgreSQL database."""

    def __init__(self, dsn: str, tenant: str) -> None:
        self.dsn = dsn
        self.tenant = tenant
        self.where = f"{describe_dsn(dsn)} schema {tenant}"
        self.schema = sql.Identifier(tenant)
        self._conn: psycopg.Connection[Any] | None = None
        self._mappings: dict[str, MappingRule] = {}
        self.hypertable = False
        self.timescale = False
        self._series = SeriesIds()

    # ---------------------------------------------------------------- lifecycle

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=10,
                application_name=f"factory-edge bridge {self.tenant}"[:63],
            )
        except psycopg.Error as exc:
            raise StorageError(f"{describe_dsn(self.dsn)}: cannot connect: {_first_line(exc)}") from exc

    def _check_schema_name(self) -> None:
        """A tenant's schema is its name: never one PostgreSQL owns or every database has (``public``)."""
        lowered = self.tenant.lower()
        if lowered == "public" or lowered == "information_schema" or lowered.startswith("pg_"):
            raise StorageError(
                f"tenant {self.tenant}: its schema would be {self.tenant!r}, one PostgreSQL keeps for itself or "
                "for every database's own tables; rename the tenant"
            )

    def open(self, mappings: Sequence[MappingRule] = ()) -> None:
        self._check_schema_name()
        self._conn = self._connect()
        try:
            self._migrate()
            for rule in mappings:
                self._create_mapped(rule)
                self._mappings[rule.table] = rule
        except psycopg.Error as exc:
            self.close()
            raise StorageError(f"{self.where}: cannot create the tenant's tables: {_first_line(exc)}") from exc

    def open_read(self) -> None:
        self._check_schema_name()
        self._conn = self._connect()
        found = self._conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.tenant,)).fetchone()
        if not found:
            self.close()
            raise StorageError(
                f"tenant {self.tenant}: no data yet (no schema {self.tenant} in {describe_dsn(self.dsn)})"
            )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _migrate(self) -> None:
        conn = self._conn
        assert conn is not None
        with conn.transaction():
            # Two processes opening the same tenant at once: one creates, the other waits and sees it.
            self._schema_lock(conn)
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(self.schema))
            conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {}.schema_version (version integer NOT NULL)").format(self.schema)
            )
            row = conn.execute(sql.SQL("SELECT max(version) FROM {}.schema_version").format(self.schema)).fetchone()
            version = (row[0] if row else None) or 0
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.where}: schema version {version} is newer than this bridge ({SCHEMA_VERSION})"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                if target == 4:
                    self._migrate_series(conn)
                else:
                    self._run(conn, _MIGRATIONS[target])
                conn.execute(sql.SQL("INSERT INTO {}.schema_version VALUES (%s)").format(self.schema), (target,))
            self.timescale = bool(conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone())
            self.hypertable = self.timescale and self._is_hypertable(conn)
        if not self.hypertable:
            try:
                self.maintain(int(time.time() * 1000))
            except StorageError as exc:  # readings wait in the default partition; the next run makes them
                log.warning("cannot create day partitions now", extra=fields(tenant=self.tenant, err=str(exc)))

    def _schema_lock(self, conn: psycopg.Connection[Any]) -> None:
        schema_lock(conn, self.tenant)

    def _run(self, conn: psycopg.Connection[Any], statements: str) -> None:
        for statement in statements.split(";"):
            if statement.strip():
                conn.execute(sql.SQL(statement.replace("{s}", "{}")).format(*[self.schema] * statement.count("{s}")))

    def _migrate_series(self, conn: psycopg.Connection[Any]) -> None:
        """Version 4: ``points`` (a table) becomes ``series`` + ``samples`` (by day, or a hypertable) and a view."""
        rows = conn.execute(
            "SELECT coalesce(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass(%s)",
            (sql.Identifier(self.tenant, "points").as_string(conn),),
        ).fetchone()
        estimate = max(0, rows[0]) if rows else 0
        if estimate:  # rewrites every reading: say so, it can take minutes on a big schema
            log.info(
                "converting stored readings to series ids (once)", extra=fields(tenant=self.tenant, readings=estimate)
            )
        started = time.monotonic()
        timescale = bool(conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone())
        self._run(
            conn,
            "CREATE TABLE {s}.series (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, gw text NOT NULL, "
            "device text NOT NULL, tag text NOT NULL, UNIQUE (gw, device, tag))",
        )
        partitioning = "" if timescale else " PARTITION BY RANGE (ts)"
        self._run(conn, f"CREATE TABLE {{s}}.samples ({_SAMPLES}){partitioning}")
        self._run(conn, "CREATE INDEX samples_series ON {s}.samples (series, ts)")
        if timescale:
            conn.execute(
                "SELECT create_hypertable(%s::regclass, 'ts', chunk_time_interval => %s::bigint)",
                (sql.Identifier(self.tenant, "samples").as_string(conn), DAY_MS),
            )
            log.info("samples is a TimescaleDB hypertable", extra=fields(tenant=self.tenant))
        else:
            self._run(conn, "CREATE TABLE {s}.samples_default PARTITION OF {s}.samples DEFAULT")
            horizon = int(time.time() * 1000) // DAY_MS + PARTITION_AHEAD_DAYS
            days = conn.execute(
                sql.SQL("SELECT DISTINCT ts / %s FROM {}.points WHERE ts >= 0 AND ts / %s <= %s ORDER BY 1").format(
                    self.schema
                ),
                (DAY_MS, DAY_MS, horizon),
            ).fetchall()
            for (day,) in days:
                self._add_partition(conn, int(day))
        self._run(
            conn,
            "INSERT INTO {s}.series (gw, device, tag) SELECT DISTINCT gw, device, tag FROM {s}.points ORDER BY 1, 2, 3",
        )
        self._run(
            conn,
            "INSERT INTO {s}.samples SELECT s.id, p.ts, p.value, p.value_text, p.quality, p.error, p.seq "
            "FROM {s}.points p JOIN {s}.series s ON s.gw = p.gw AND s.device = p.device AND s.tag = p.tag",
        )
        self._run(conn, "DROP TABLE {s}.points")
        self._run(conn, _POINTS_VIEW)
        if estimate:
            log.info(
                "stored readings converted",
                extra=fields(tenant=self.tenant, readings=estimate, seconds=round(time.monotonic() - started, 1)),
            )

    def _is_hypertable(self, conn: psycopg.Connection[Any]) -> bool:
        try:
            return bool(
                conn.execute(
                    "SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_schema = %s "
                    "AND hypertable_name = 'samples'",
                    (self.tenant,),
                ).fetchone()
            )
        except psycopg.Error:
            return False

    # ---------------------------------------------------------------- day partitions and retention

    def partitions(self) -> list[tuple[str, int, int]]:
        """``(name, first ms, end ms)`` of each day partition of ``samples``, oldest first (the default excluded)."""
        assert self._conn is not None
        found = self._conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)",
            (sql.Identifier(self.tenant, "samples").as_string(self._conn),),
        ).fetchall()
        out = []
        for name, bound in found:
            match = _BOUND.search(bound or "")
            if match:
                out.append((name, int(match.group(1)), int(match.group(2))))
        return sorted(out, key=lambda p: p[1])

    def _add_partition(self, conn: psycopg.Connection[Any], day: int) -> None:
        """The partition of UTC ``day`` (days since the epoch), with the readings of that day moved out of
        the default partition: it is made apart and attached, which locks the readers and writers of
        ``samples`` out only for the moment of the attach, not for the copy."""
        name = "samples_" + datetime.datetime.fromtimestamp(day * 86400, datetime.UTC).strftime("%Y%m%d")
        table = sql.Identifier(self.tenant, name)
        first, end = day * DAY_MS, (day + 1) * DAY_MS
        conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
                table, sql.Identifier(self.tenant, "samples")
            )
        )
        conn.execute(
            sql.SQL(
                "WITH moved AS (DELETE FROM {} WHERE ts >= %s AND ts < %s RETURNING *) INSERT INTO {} SELECT * FROM moved"
            ).format(sql.Identifier(self.tenant, "samples_default"), table),
            (first, end),
        )
        conn.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                sql.Identifier(self.tenant, "samples"), table, sql.Literal(first), sql.Literal(end)
            )
        )

    def maintain(self, now_ms: int) -> list[str]:
        """Create the day partitions from yesterday to ``PARTITION_AHEAD_DAYS`` after today, and one for each
        day of the last ``STRAY_DAYS`` whose readings landed in the default partition (a gateway's backlog
        after an outage); returns the partitions created. Older strays stay in the default partition: a clock
        gone wrong must not make a partition per day it invents."""
        if self.hypertable:
            return []
        conn = self._conn
        assert conn is not None
        today = now_ms // DAY_MS
        horizon = today + PARTITION_AHEAD_DAYS
        try:
            have = {first // DAY_MS for _, first, _ in self.partitions()}
            strays = conn.execute(
                sql.SQL("SELECT DISTINCT ts / %s FROM {}.samples_default WHERE ts >= %s AND ts < %s").format(
                    self.schema
                ),
                (DAY_MS, max(0, today - STRAY_DAYS) * DAY_MS, (horizon + 1) * DAY_MS),
            ).fetchall()
            wanted = sorted(({*range(today - 1, horizon + 1)} | {int(d) for (d,) in strays}) - have)
            created = []
            for day in wanted:
                with conn.transaction():
                    conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                    self._schema_lock(conn)
                    if day * DAY_MS in {first for _, first, _ in self.partitions()}:
                        continue  # another process made it meanwhile
                    self._add_partition(conn, day)
                created.append(day)
        except psycopg.Error as exc:
            raise StorageError(f"{self.where}: cannot create day partitions: {_first_line(exc)}") from exc
        names = [
            "samples_" + datetime.datetime.fromtimestamp(d * 86400, datetime.UTC).strftime("%Y%m%d") for d in created
        ]
        if names:
            log.info("day partitions created", extra=fields(tenant=self.tenant, partitions=",".join(names)))
        return names

    @property
    def expire_unit(self) -> str:
        return "chunks" if self.hypertable else "day partitions"

    def expire(self, before_ms: int, after_ms: int | None = None) -> int:
        """Drop every day partition (or TimescaleDB chunk) wholly before ``before_ms``; readings before it in
        the default partition are deleted in bounded transactions, and so are those dated at or after
        ``after_ms`` (beyond the day partitions made ahead, they can only be in the default partition; with
        TimescaleDB, chunks newer than it are dropped). Returns the partitions or chunks dropped."""
        conn = self._conn
        assert conn is not None
        try:
            if self.hypertable:
                dropped = conn.execute(
                    "SELECT drop_chunks(%s::regclass, older_than => %s::bigint)",
                    (sql.Identifier(self.tenant, "samples").as_string(conn), before_ms),
                ).fetchall()
                if after_ms is not None:
                    dropped += conn.execute(
                        "SELECT drop_chunks(%s::regclass, newer_than => %s::bigint)",
                        (sql.Identifier(self.tenant, "samples").as_string(conn), after_ms),
                    ).fetchall()
                if dropped:
                    log.info(
                        "retention: chunks dropped",
                        extra=fields(tenant=self.tenant, chunks=len(dropped), before=before_ms),
                    )
                self._expire_minutes(before_ms, 2**63 - 1 if after_ms is None else after_ms)
                return len(dropped)
            names, estimate = [], 0
            for name, _, end in self.partitions():
                if end > before_ms:
                    break
                with conn.transaction():
                    conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                    self._schema_lock(conn)
                    row = conn.execute(
                        "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)",
                        (sql.Identifier(self.tenant, name).as_string(conn),),
                    ).fetchone()
                    if row is None:
                        continue  # dropped by another process meanwhile
                    conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(self.tenant, name)))
                names.append(name)
                estimate += max(0, row[0])
            strays = 0
            ahead = 2**63 - 1 if after_ms is None else after_ms
            while True:
                with conn.transaction():
                    cursor = conn.execute(
                        sql.SQL(
                            "DELETE FROM {} WHERE ctid IN (SELECT ctid FROM {} WHERE ts < %s OR ts >= %s LIMIT %s)"
                        ).format(*[sql.Identifier(self.tenant, "samples_default")] * 2),
                        (before_ms, ahead, DEFAULT_DELETE_ROWS),
                    )
                strays += cursor.rowcount
                if cursor.rowcount < DEFAULT_DELETE_ROWS:
                    break
            minutes = self._expire_minutes(before_ms, ahead)
        except psycopg.Error as exc:
            raise StorageError(f"{self.where}: retention: {_first_line(exc)}") from exc
        if minutes:
            log.info(
                "retention: per-minute sums deleted",
                extra=fields(tenant=self.tenant, rows=minutes, before=before_ms, after=after_ms),
            )
        if names or strays:
            log.info(
                "retention: day partitions dropped",
                extra=fields(
                    tenant=self.tenant,
                    partitions=",".join(names) or None,
                    readings_estimate=estimate,
                    default_rows_deleted=strays,
                    before=before_ms,
                ),
            )
        return len(names)

    def _expire_minutes(self, before_ms: int, after_ms: int) -> int:
        """The ``points_minute`` rows of minutes before ``before_ms`` or from ``after_ms`` on, through its primary
        key series by series (1,000 series at a time), at most ``DEFAULT_DELETE_ROWS`` rows per transaction."""
        conn = self._conn
        assert conn is not None
        before, after = before_ms // MINUTE_MS, -(-after_ms // MINUTE_MS)
        last = _fetch_one(conn, sql.SQL("SELECT coalesce(max(id), 0) FROM {}.series").format(self.schema))
        removed, first = 0, 0
        statement = sql.SQL(
            "DELETE FROM {pm} WHERE ctid IN (SELECT p.ctid FROM {series} s JOIN {pm} p ON p.gw = s.gw AND "
            "p.device = s.device AND p.tag = s.tag WHERE s.id > %s AND s.id <= %s AND (p.minute < %s OR "
            "p.minute >= %s) LIMIT %s)"
        ).format(pm=sql.Identifier(self.tenant, "points_minute"), series=sql.Identifier(self.tenant, "series"))
        while first < last:
            with conn.transaction():
                cursor = conn.execute(statement, (first, first + 1000, before, after, DEFAULT_DELETE_ROWS))
            removed += cursor.rowcount
            if cursor.rowcount < DEFAULT_DELETE_ROWS:
                first += 1000
        return removed

    def newest_receipt_hour(self) -> int | None:
        conn = self._conn
        assert conn is not None
        try:
            row = conn.execute(
                sql.SQL("SELECT max(hour) FROM {}").format(sql.Identifier(self.tenant, "usage_hourly"))
            ).fetchone()
        except psycopg.Error as exc:
            raise StorageError(f"{self.where}: retention: {_first_line(exc)}") from exc
        return None if row is None or row[0] is None else int(row[0])

    def expire_received(self, before_ms: int) -> int:
        conn = self._conn
        assert conn is not None
        removed = 0
        try:
            for table in ("dead_letters", "events"):
                while True:
                    with conn.transaction():
                        cursor = conn.execute(
                            sql.SQL(
                                "DELETE FROM {} WHERE id IN (SELECT id FROM {} WHERE received_at < %s ORDER BY id "
                                "LIMIT %s)"
                            ).format(*[sql.Identifier(self.tenant, table)] * 2),
                            (before_ms, DEFAULT_DELETE_ROWS),
                        )
                    removed += cursor.rowcount
                    if cursor.rowcount < DEFAULT_DELETE_ROWS:
                        break
            status = sql.Identifier(self.tenant, "status").as_string(conn)
            while True:  # status history: each gateway's newest status, and newest naming a version, stay
                with conn.transaction():
                    cursor = conn.execute(
                        f"DELETE FROM {status} WHERE ctid IN (SELECT s.ctid FROM {status} s WHERE "
                        + STATUS_EXPIRED.format(ph="%s", t=status)
                        + " LIMIT %s)",
                        (before_ms, DEFAULT_DELETE_ROWS),
                    )
                removed += cursor.rowcount
                if cursor.rowcount < DEFAULT_DELETE_ROWS:
                    break
        except psycopg.Error as exc:
            raise StorageError(f"{self.where}: retention: {_first_line(exc)}") from exc
        return removed

    def _create_mapped(self, rule: MappingRule) -> None:
        conn = self._conn
        assert conn is not None
        table = sql.Identifier(self.tenant, rule.table)
        types = rule.column_types()
        columns = sql.SQL(", ").join(
            sql.SQL("{} {}{}").format(
                sql.Identifier(name),
                sql.SQL(_PG_TYPES[kind]),
                sql.SQL(" NOT NULL" if name in ("ts", "received_at") else ""),
            )
            for name, kind in types.items()
        )
        with conn.transaction():
            self._schema_lock(conn)  # several processes starting at once: one creates, the others see it
            conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(table, columns))
            for name, kind in types.items():
                conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                        table, sql.Identifier(name), sql.SQL(_PG_TYPES[kind])
                    )
                )
            if rule.key:
                conn.execute(
                    sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({})").format(
                        sql.Identifier(f"{rule.table}_key"), table, sql.SQL(", ").join(map(sql.Identifier, rule.key))
                    )
                )

    # ---------------------------------------------------------------- writing

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        try:
            if self._conn is None or self._conn.closed or self._conn.broken:
                if self._conn is not None:
                    self._conn.close()
                self._conn = self._connect()
            with self._conn.transaction():
                tx = _PostgresTx(self, self._conn)
                yield tx
            self._series.remember(tx.new_series)
        except (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.ProgramLimitExceeded) as exc:
            raise DataRejected(f"{self.where}: {_first_line(exc)}") from exc
        except psycopg.Error as exc:
            raise StorageError(f"{self.where}: {_first_line(exc)}") from exc

    # ---------------------------------------------------------------- resuming

    def _rows(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        assert self._conn is not None
        try:
            return self._conn.execute(sql.SQL(query).format(s=self.schema), params).fetchall()
        except psycopg.Error as exc:
            raise StorageError(f"{self.where}: {_first_line(exc)}") from exc

    def load_alert_states(self) -> list[Instance]:
        rows = self._rows(
            "SELECT gw, device, rule, state, since, value, tag, tags, fired, changed_at FROM {s}.alert_state"
        )
        return [
            Instance(gw, device, rule, State(state), since, value, tag, dict(tags), fired, changed)
            for gw, device, rule, state, since, value, tag, tags, fired, changed in rows
        ]

    def load_alert_series(self) -> Iterator[SeriesLast]:
        for row in self._rows("SELECT gw, device, tag, ts, value, quality, seen_at FROM {s}.alert_series"):
            yield SeriesLast(*row)

    def load_outbox(self) -> list[OutboxItem]:
        return [
            OutboxItem(i, w, bytes(p), c)
            for i, w, p, c in self._rows("SELECT id, webhook, payload, created_at FROM {s}.webhook_outbox ORDER BY id")
        ]

    def last_alerts(self) -> list[dict[str, Any]]:
        assert self._conn is not None
        try:
            with self._conn.cursor(row_factory=psycopg.rows.dict_row) as cursor:
                cursor.execute(
                    sql.SQL(
                        "SELECT * FROM {s}.alerts WHERE id IN (SELECT max(id) FROM {s}.alerts GROUP BY gw, device, rule) "
                        "ORDER BY id"
                    ).format(s=self.schema)
                )
                return list(cursor.fetchall())
        except psycopg.Error as exc:
            raise StorageError(f"{self.where}: {_first_line(exc)}") from exc

    # ---------------------------------------------------------------- reading

    def usage(self, *, gw: str | None = None, since_ms: int | None = None, totals: bool = False) -> list[Usage]:
        assert self._conn is not None
        if not self._conn.execute(
            "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'usage_hourly'", (self.tenant,)
        ).fetchone():
            return []  # written by a bridge before metering, opened read-only
        query = (
            "SELECT 0, gw, sum(points)::bigint, sum(messages)::bigint, sum(bytes)::bigint, sum(delayed_points)::bigint "
            "FROM {s}.usage_hourly "
            "WHERE hour >= %s"
            if totals
            else "SELECT hour, gw, points, messages, bytes, delayed_points FROM {s}.usage_hourly WHERE hour >= %s"
        )
        params: list[Any] = [0 if since_ms is None else since_ms - since_ms % HOUR_MS]
        if gw is not None:
            query, params = query + " AND gw = %s", [*params, gw]
        return [
            Usage(*row)
            for row in self._rows(query + (" GROUP BY gw ORDER BY gw" if totals else " ORDER BY hour, gw"), params)
        ]

    def query(
        self,
        what: str,
        *,
        gw: str | None = None,
        device: str | None = None,
        tag: str | None = None,
        since_ms: int | None = None,
        limit: int = 100,
        active: bool = False,
    ) -> Table:
        where: list[str] = []
        params: list[object] = []
        for column, value in (("gw", gw), ("device", device), ("tag", tag)):
            if value is not None:
                where.append(f"{column} = %s")
                params.append(value)
        # One JSON value per row: numbers as numbers, text as text, big integers exactly.
        value = (
            "CASE WHEN value_text IS NULL THEN to_jsonb(value) WHEN value IS NOT NULL "
            "THEN to_jsonb(value_text::numeric) ELSE to_jsonb(value_text) END AS value"
        )
        if what == "values":
            query = f"SELECT gw, device, tag, ts, {value}, quality, error FROM {{s}}.latest{{w}} ORDER BY gw, device, tag LIMIT %s"
        elif what == "points":
            if since_ms is not None:
                where.append("ts >= %s")
                params.append(since_ms)
            query = (
                f"SELECT gw, device, tag, ts, {value}, quality, error FROM {{s}}.points{{w}} ORDER BY ts DESC LIMIT %s"
            )
        elif what == "alerts" and active:
            where.append("state IN ('pending', 'firing')")
            query = (
                "SELECT changed_at AS ts, gw, device, rule, state, since, tag, value FROM {s}.alert_state{w} "
                "ORDER BY since DESC LIMIT %s"
            )
        elif what == "alerts":
            if since_ms is not None:
                where.append("ts >= %s")
                params.append(since_ms)
            query = (
                "SELECT id, ts, gw, device, rule, state, severity, tag, value, message FROM {s}.alerts{w} "
                "ORDER BY id DESC LIMIT %s"
            )
        elif what == "dead-letters":
            where, params = [], []
            if since_ms is not None:
                where.append("received_at >= %s")
                params.append(since_ms)
            query = "SELECT id, received_at, topic, reason, payload FROM {s}.dead_letters{w} ORDER BY id DESC LIMIT %s"
        elif what == "counts":
            return self._counts()
        else:
            raise StorageError(f"unknown query {what!r}")
        query = query.replace("{w}", (" WHERE " + " AND ".join(where)) if where else "")
        assert self._conn is not None
        try:
            cursor = self._conn.execute(sql.SQL(query).format(s=self.schema), [*params, limit])
            columns = tuple(d.name for d in cursor.description or ())
            rows = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in cursor.fetchall()]
            return Table(columns, rows)
        except psycopg.Error as exc:
            raise StorageError(f"{self.where}: {_first_line(exc)}") from exc

    def _counts(self) -> Table:
        names = [
            r[0]
            for r in self._rows(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s "
                "AND c.relkind IN ('r', 'p', 'v') AND NOT c.relispartition ORDER BY c.relname",
                (self.tenant,),
            )
        ]
        rows = []
        for name in names:
            (count,) = self._rows(f"SELECT count(*) FROM {{s}}.{sql.Identifier(name).as_string(self._conn)}")[0]
            rows.append((name, count))
        return Table(("table", "rows"), rows)


class _PostgresTx(Tx):
    def record_usage(self, rows: Sequence[Usage]) -> None:
        if rows:
            with self.conn.cursor() as cursor:
                cursor.executemany(
                    self._sql(
                        "INSERT INTO {s}.usage_hourly AS u VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (hour, gw) "
                        "DO UPDATE SET points = u.points + excluded.points, messages = u.messages + excluded.messages, "
                        "bytes = u.bytes + excluded.bytes, delayed_points = u.delayed_points + excluded.delayed_points"
                    ),
                    [u.row() for u in rows],
                )

    def __init__(self, store: PostgresStore, conn: psycopg.Connection[Any]) -> None:
        self.store = store
        self.conn = conn
        self.s = store.schema
        self.new_series: dict[tuple[str, str], dict[str, int]] = {}

    def _sql(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(s=self.s)

    def claim_batches(self, batches: Sequence[DataBatch]) -> list[DataBatch]:
        if not batches:
            return []
        unique = {(b.gw, b.seq): b for b in reversed(batches)}  # the first of duplicates wins
        keys = sorted(unique)  # one lock order for every process: no deadlocks between bridges
        cursor = self.conn.execute(
            self._sql(
                "INSERT INTO {s}.batches (gw, seq, device, points, received_at) "
                "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::integer[], %s::bigint[]) "
                "ON CONFLICT DO NOTHING RETURNING gw, seq"
            ),
            (
                [k[0] for k in keys],
                [k[1] for k in keys],
                [unique[k].device for k in keys],
                [len(unique[k].rows) for k in keys],
                [unique[k].received_at for k in keys],
            ),
        )
        claimed = set(cursor.fetchall())
        new, seen = [], set()
        for b in batches:
            key = (b.gw, b.seq)
            if key in claimed and key not in seen:
                seen.add(key)
                new.append(b)
        return new

    def differing(self, batches: Sequence[DataBatch]) -> set[tuple[str, int]]:
        if not batches:
            return set()
        rows = self.conn.execute(
            self._sql(
                "SELECT b.gw, b.seq FROM {s}.batches b JOIN unnest(%s::text[], %s::bigint[], %s::text[], %s::integer[]) "
                "AS n(gw, seq, device, points) ON b.gw = n.gw AND b.seq = n.seq "
                "WHERE b.device <> n.device OR b.points <> n.points"
            ),
            (
                [b.gw for b in batches],
                [b.seq for b in batches],
                [b.device for b in batches],
                [len(b.rows) for b in batches],
            ),
        ).fetchall()
        return {(gw, seq) for gw, seq in rows}

    def insert_points(self, batches: Sequence[DataBatch]) -> None:
        """Each batch's rows as samples of their series (a batch's rows are all of its gateway and device)."""
        if not any(b.rows for b in batches):
            return
        ids = self._series_ids(batches)
        with self.conn.cursor() as cursor:
            with cursor.copy(
                self._sql(
                    "COPY {s}.samples (series, ts, value, value_text, quality, error, seq) FROM STDIN (FORMAT BINARY)"
                )
            ) as copy:
                copy.set_types(["int8", "int8", "float8", "text", "text", "text", "int8"])
                write = copy.write_row
                # Per (gw, device): (tag, minute) -> [count, sum, min, max] of the numeric readings.
                minutes: dict[tuple[str, str], dict[tuple[str, int], list[float]]] = {}
                for b in batches:
                    tags = ids[(b.gw, b.device)]
                    device_minutes = minutes.setdefault((b.gw, b.device), {})
                    for _, _, tag, ts, value, quality, error, seq in b.rows:
                        if value is None or type(value) is float:
                            number, text = value, None
                        else:
                            number, text = split_value(value)
                        write((tags[tag], ts, number, text, quality, error, seq))
                        if number is not None:
                            key = (tag, ts // MINUTE_MS)
                            acc = device_minutes.get(key)
                            if acc is None:
                                device_minutes[key] = [1, number, number, number]
                            else:
                                acc[0] += 1
                                acc[1] += number
                                if number < acc[2]:
                                    acc[2] = number
                                elif number > acc[3]:
                                    acc[3] = number
            rows = sorted(
                (gw, device, tag, minute, *acc)
                for (gw, device), device_minutes in minutes.items()
                for (tag, minute), acc in device_minutes.items()
            )
            if rows:  # in key order, so two processes upserting the same minutes lock them in the same order
                cursor.executemany(
                    self._sql(
                        "INSERT INTO {s}.points_minute VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (gw, device, tag, minute) DO UPDATE SET n = points_minute.n + excluded.n, "
                        "total = points_minute.total + excluded.total, lo = least(points_minute.lo, excluded.lo), "
                        "hi = greatest(points_minute.hi, excluded.hi)"
                    ),
                    rows,
                )

    def _series_ids(self, batches: Sequence[DataBatch]) -> dict[tuple[str, str], dict[str, int]]:
        """``(gw, device)`` -> tag -> series id for every row of ``batches``: from the committed ids the store
        remembers, else looked up or created in this transaction (remembered once it commits)."""
        known = self.store._series.known
        out: dict[tuple[str, str], dict[str, int]] = {}
        missing: set[tuple[str, str, str]] = set()
        for b in batches:
            key = (b.gw, b.device)
            ids = out.get(key)
            if ids is None:  # the store's own dict, not a copy: it is copied below before anything is added
                ids = known.get(key) or {}
                fresh = self.new_series.get(key)
                out[key] = ids = {**ids, **fresh} if fresh else ids
            for tag in {r[2] for r in b.rows}.difference(ids):
                missing.add((b.gw, b.device, tag))
        if missing:
            wanted = sorted(missing)  # one lock order for every process: no deadlocks between bridges
            columns = ([k[0] for k in wanted], [k[1] for k in wanted], [k[2] for k in wanted])
            found = self.conn.execute(
                self._sql(
                    "SELECT s.id, s.gw, s.device, s.tag FROM {s}.series s JOIN unnest(%s::text[], %s::text[], "
                    "%s::text[]) AS w(gw, device, tag) ON s.gw = w.gw AND s.device = w.device AND s.tag = w.tag"
                ),
                columns,
            ).fetchall()
            if len(found) < len(wanted):
                got = {(gw, device, tag) for _, gw, device, tag in found}
                new = [k for k in wanted if k not in got]
                # Another process may add the same series at once: it waits for ours (or we for its) to commit,
                # then skips it, and the select after sees the id either way.
                self.conn.execute(
                    self._sql(
                        "INSERT INTO {s}.series (gw, device, tag) SELECT * FROM unnest(%s::text[], %s::text[], "
                        "%s::text[]) ON CONFLICT DO NOTHING"
                    ),
                    ([k[0] for k in new], [k[1] for k in new], [k[2] for k in new]),
                )
                found = self.conn.execute(
                    self._sql(
                        "SELECT s.id, s.gw, s.device, s.tag FROM {s}.series s JOIN unnest(%s::text[], %s::text[], "
                        "%s::text[]) AS w(gw, device, tag) ON s.gw = w.gw AND s.device = w.device AND s.tag = w.tag"
                    ),
                    columns,
                ).fetchall()
            copied: set[tuple[str, str]] = set()
            for series, gw, device, tag in found:
                key = (gw, device)
                if key not in copied:  # never add to the ids the store remembers: this transaction may fail
                    out[key] = dict(out[key])
                    copied.add(key)
                out[key][tag] = series
                self.new_series.setdefault(key, {})[tag] = series
        return out

    def insert_status(self, rows: Sequence[StatusRow]) -> None:
        if rows:
            with self.conn.cursor() as cursor:
                cursor.executemany(
                    self._sql("INSERT INTO {s}.status VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"),
                    [(r.gw, r.state, r.ts, r.version, r.config_hash, r.received_at) for r in rows],
                )
                figures = [(r.gw, *_buffer_values(r), r.received_at) for r in rows if r.buffer is not None]
                if figures:
                    cursor.executemany(
                        self._sql(
                            "INSERT INTO {s}.gateway_buffer AS b VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                            "ON CONFLICT (gw) DO UPDATE SET ts = excluded.ts, "
                            "pending_batches = excluded.pending_batches, pending_points = excluded.pending_points, "
                            "unconfirmed_batches = excluded.unconfirmed_batches, "
                            "dropped_points = excluded.dropped_points, oldest_pending_ts = excluded.oldest_pending_ts, "
                            "oldest_unconfirmed_ts = excluded.oldest_unconfirmed_ts, "
                            "received_at = excluded.received_at WHERE excluded.ts >= b.ts"
                        ),
                        figures,
                    )

    def save_meta(self, rows: Sequence[MetaRow]) -> None:
        with self.conn.cursor() as cursor:
            for r in rows:
                if r.tags is None:
                    cursor.execute(
                        self._sql("DELETE FROM {s}.device_meta WHERE gw = %s AND device = %s"), (r.gw, r.device)
                    )
                else:
                    cursor.execute(
                        self._sql(
                            "INSERT INTO {s}.device_meta VALUES (%s, %s, %s::jsonb, %s) ON CONFLICT (gw, device) "
                            "DO UPDATE SET tags = excluded.tags, received_at = excluded.received_at"
                        ),
                        (r.gw, r.device, r.tags, r.received_at),
                    )

    def insert_events(self, rows: Sequence[EventRow]) -> None:
        if rows:
            with self.conn.cursor() as cursor:
                cursor.executemany(
                    self._sql(
                        "INSERT INTO {s}.events (gw, type, ts, payload, digest, received_at) "
                        "VALUES (%s, %s, %s, %s::jsonb, %s, %s) ON CONFLICT DO NOTHING"
                    ),
                    [(r.gw, r.type, r.ts, r.payload, r.digest, r.received_at) for r in rows],
                )

    def insert_mapped(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        rule = self.store._mappings[table]
        types = rule.column_types()
        columns = list(types)
        statement = sql.SQL("INSERT INTO {} ({}) VALUES ({}){}").format(
            sql.Identifier(self.store.tenant, table),
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(columns)),
            sql.SQL(" ON CONFLICT DO NOTHING" if rule.key else ""),
        )
        wrap = [types[c] in ("auto", "json") for c in columns]
        values = [
            tuple(Jsonb(row.get(c)) if w and row.get(c) is not None else row.get(c) for c, w in zip(columns, wrap))
            for row in rows
        ]
        with self.conn.cursor() as cursor:
            cursor.executemany(statement, values)

    def insert_dead_letters(self, rows: Sequence[DeadLetter]) -> None:
        if rows:
            with self.conn.cursor() as cursor:
                cursor.executemany(
                    self._sql(
                        "INSERT INTO {s}.dead_letters (topic, payload, reason, received_at) VALUES (%s, %s, %s, %s)"
                    ),
                    [(r.topic, r.payload, r.reason, r.received_at) for r in rows],
                )

    def upsert_latest(self, rows: Sequence[LatestRow]) -> None:
        if not rows:
            return
        values = []
        for gw, device, tag, ts, value, quality, error, received, seen in sorted(rows, key=lambda r: r[:3]):
            number, text = split_value(value)
            values.append((gw, device, tag, ts, number, text, quality, error, received, seen))
        with self.conn.cursor() as cursor:
            cursor.executemany(
                self._sql(
                    "INSERT INTO {s}.latest AS l VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (gw, device, tag) DO UPDATE SET ts = excluded.ts, value = excluded.value, "
                    "value_text = excluded.value_text, quality = excluded.quality, error = excluded.error, "
                    "received_at = excluded.received_at, seen_at = coalesce(excluded.seen_at, l.seen_at) "
                    "WHERE excluded.ts > l.ts"
                ),
                values,
            )

    def record_alerts(self, changes: Sequence[Change]) -> list[int]:
        ids = []
        for c in changes:
            row = self.conn.execute(
                self._sql(
                    "INSERT INTO {s}.alerts (ts, gw, device, rule, state, previous, severity, tag, value, since, "
                    "condition, message) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id"
                ),
                (
                    c.ts,
                    c.gw,
                    c.device,
                    c.rule,
                    str(c.state),
                    str(c.previous),
                    c.severity,
                    c.tag,
                    Jsonb(c.value),
                    c.since,
                    c.condition,
                    c.message,
                ),
            ).fetchone()
            ids.append(int(row[0]) if row else 0)
        return ids

    def save_alert_states(self, states: Sequence[Instance]) -> None:
        if not states:
            return
        with self.conn.cursor() as cursor:
            cursor.executemany(
                self._sql(
                    "INSERT INTO {s}.alert_state VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (gw, device, rule) DO UPDATE SET state = excluded.state, since = excluded.since, "
                    "value = excluded.value, tag = excluded.tag, tags = excluded.tags, fired = excluded.fired, "
                    "changed_at = excluded.changed_at"
                ),
                [
                    (
                        s.gw,
                        s.device,
                        s.rule,
                        str(s.state),
                        s.since,
                        Jsonb(s.value),
                        s.tag,
                        Jsonb(s.tags),
                        s.fired,
                        s.changed_at,
                    )
                    for s in sorted(states, key=lambda s: s.key)
                ],
            )

    def save_alert_series(self, rows: Sequence[SeriesLast]) -> None:
        if not rows:
            return
        with self.conn.cursor() as cursor:
            cursor.executemany(
                self._sql(
                    "INSERT INTO {s}.alert_series AS a VALUES (%s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (gw, device, tag) DO UPDATE SET ts = excluded.ts, value = excluded.value, "
                    "quality = excluded.quality, seen_at = excluded.seen_at WHERE excluded.ts > a.ts"
                ),
                [
                    (r.gw, r.device, r.tag, r.ts, Jsonb(r.value), r.quality, r.seen_at)
                    for r in sorted(rows, key=lambda r: (r.gw, r.device, r.tag))
                ],
            )

    def queue_webhooks(self, items: Sequence[tuple[str, bytes, int]]) -> list[int]:
        ids = []
        for webhook, payload, created in items:
            row = self.conn.execute(
                self._sql(
                    "INSERT INTO {s}.webhook_outbox (webhook, payload, created_at) VALUES (%s, %s, %s) RETURNING id"
                ),
                (webhook, payload, created),
            ).fetchone()
            ids.append(int(row[0]) if row else 0)
        return ids

    def delete_outbox(self, ids: Sequence[int]) -> None:
        if ids:
            self.conn.execute(self._sql("DELETE FROM {s}.webhook_outbox WHERE id = ANY(%s)"), (list(ids),))


def _buffer_values(row: StatusRow) -> tuple[Any, ...]:
    b = row.buffer
    assert b is not None
    return (
        b.ts,
        b.pending_batches,
        b.pending_points,
        b.unconfirmed_batches,
        b.dropped_points,
        b.oldest_pending_ts,
        b.oldest_unconfirmed_ts,
    )
