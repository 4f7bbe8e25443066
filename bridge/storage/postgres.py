"""PostgreSQL at scale: one schema per tenant, named after it; COPY for points; TimescaleDB when present.

The schema and its tables are created on first use (and migrated by
version, under an advisory lock so several bridge processes can start at
once). ``points`` becomes a TimescaleDB hypertable on ``ts`` (epoch ms,
one-day chunks) when the extension is installed in the database.

``value`` is ``double precision``; text values go to ``value_text`` (as do
integers beyond 2^53, which a double cannot hold exactly). A commit window
is one transaction; ``(gw, seq)`` is claimed with ``ON CONFLICT DO NOTHING``,
so two processes racing for the same batch store it once.
"""

from __future__ import annotations

import logging
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
from .base import DataRejected, LatestRow, Store, Table, Tx

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
_MIGRATIONS = {
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
}
MINUTE_MS = 60_000
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

    def open(self, mappings: Sequence[MappingRule] = ()) -> None:
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
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"factory-edge bridge schema {self.tenant}",))
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
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        conn.execute(
                            sql.SQL(statement.replace("{s}", "{}")).format(*[self.schema] * statement.count("{s}"))
                        )
                conn.execute(sql.SQL("INSERT INTO {}.schema_version VALUES (%s)").format(self.schema), (target,))
                if target == 1:
                    self._hypertable(conn)
        self.hypertable = bool(
            conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
        ) and self._is_hypertable(conn)

    def _hypertable(self, conn: psycopg.Connection[Any]) -> None:
        """Make ``points`` a hypertable when TimescaleDB is installed in this database."""
        if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
            return
        conn.execute(
            "SELECT create_hypertable(%s::regclass, 'ts', chunk_time_interval => %s::bigint, if_not_exists => TRUE)",
            (sql.Identifier(self.tenant, "points").as_string(conn), 86_400_000),
        )
        log.info("points is a TimescaleDB hypertable", extra=fields(tenant=self.tenant))

    def _is_hypertable(self, conn: psycopg.Connection[Any]) -> bool:
        try:
            return bool(
                conn.execute(
                    "SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_schema = %s "
                    "AND hypertable_name = 'points'",
                    (self.tenant,),
                ).fetchone()
            )
        except psycopg.Error:
            return False

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
                yield _PostgresTx(self, self._conn)
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
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY table_name",
                (self.tenant,),
            )
        ]
        rows = []
        for name in names:
            (count,) = self._rows(f"SELECT count(*) FROM {{s}}.{sql.Identifier(name).as_string(self._conn)}")[0]
            rows.append((name, count))
        return Table(("table", "rows"), rows)


class _PostgresTx(Tx):
    def __init__(self, store: PostgresStore, conn: psycopg.Connection[Any]) -> None:
        self.store = store
        self.conn = conn
        self.s = store.schema

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
        if not any(b.rows for b in batches):
            return
        with self.conn.cursor() as cursor:
            with cursor.copy(
                self._sql(
                    "COPY {s}.points (gw, device, tag, ts, value, value_text, quality, error, seq) "
                    "FROM STDIN (FORMAT BINARY)"
                )
            ) as copy:
                copy.set_types(["text", "text", "text", "int8", "float8", "text", "text", "text", "int8"])
                write = copy.write_row
                minutes: dict[tuple[str, str, str, int], list[float]] = {}
                for b in batches:
                    for gw, device, tag, ts, value, quality, error, seq in b.rows:
                        if value is None or type(value) is float:
                            number, text = value, None
                        else:
                            number, text = split_value(value)
                        write((gw, device, tag, ts, number, text, quality, error, seq))
                        if number is not None:
                            key = (gw, device, tag, ts // MINUTE_MS)
                            acc = minutes.get(key)
                            if acc is None:
                                minutes[key] = [1, number, number, number]
                            else:
                                acc[0] += 1
                                acc[1] += number
                                acc[2] = min(acc[2], number)
                                acc[3] = max(acc[3], number)
            if minutes:  # in key order, so two processes upserting the same minutes lock them in the same order
                cursor.executemany(
                    self._sql(
                        "INSERT INTO {s}.points_minute VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (gw, device, tag, minute) DO UPDATE SET n = points_minute.n + excluded.n, "
                        "total = points_minute.total + excluded.total, lo = least(points_minute.lo, excluded.lo), "
                        "hi = greatest(points_minute.hi, excluded.hi)"
                    ),
                    [(*key, *minutes[key]) for key in sorted(minutes)],
                )

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
