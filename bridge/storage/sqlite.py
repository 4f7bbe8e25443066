"""The embedded default: one SQLite file per tenant, ``<path>/<tenant>.db`` (WAL, batched commits).

A commit window is one ``BEGIN IMMEDIATE`` transaction, so several bridge
processes sharing a tenant (shared subscriptions) on one host serialize on
the file's write lock, and ``(gw, seq)`` is claimed exactly once. With
``fsync: true`` (the default) each commit is on the disk before its
messages are acknowledged; ``false`` still survives a crash of the process.
Tables are STRICT: a value column declared ``ANY`` keeps numbers as numbers
and text as text, exactly as received.

Readings are stored as ``samples(series, ts, value, quality, error, seq)``
with each ``(gw, device, tag)`` named once in ``series``: the index a
reading joins is ``(series, ts)``, two integers, instead of three texts
and a time, which is what bounded the insert rate (some 1.6x fewer CPU
seconds per row). ``points`` is a view with the columns it always had, so
SQL written against it reads the same rows.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from factory_edge.errors import StorageError
from factory_edge.logs import fields

from ..alerts.model import Change, Instance, OutboxItem, SeriesLast, State
from ..mapping import MappingRule
from ..messages import DataBatch, DeadLetter, EventRow, MetaRow, StatusRow
from ..metering import HOUR_MS, Usage
from .base import STATUS_EXPIRED, DataRejected, LatestRow, SeriesIds, Store, Table, Tx

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
_MIGRATIONS = {
    1: """
        CREATE TABLE batches (
            gw TEXT NOT NULL, seq INTEGER NOT NULL, device TEXT NOT NULL, points INTEGER NOT NULL,
            received_at INTEGER NOT NULL, PRIMARY KEY (gw, seq)) WITHOUT ROWID, STRICT;
        CREATE TABLE points (
            gw TEXT NOT NULL, device TEXT NOT NULL, tag TEXT NOT NULL, ts INTEGER NOT NULL, value ANY,
            quality TEXT NOT NULL, error TEXT, seq INTEGER NOT NULL) STRICT;
        CREATE INDEX points_series ON points (gw, device, tag, ts);
        CREATE TABLE latest (
            gw TEXT NOT NULL, device TEXT NOT NULL, tag TEXT NOT NULL, ts INTEGER NOT NULL, value ANY,
            quality TEXT NOT NULL, error TEXT, received_at INTEGER NOT NULL, seen_at INTEGER,
            PRIMARY KEY (gw, device, tag)) WITHOUT ROWID, STRICT;
        CREATE TABLE status (
            gw TEXT NOT NULL, state TEXT NOT NULL, ts INTEGER NOT NULL, version TEXT, config_hash TEXT,
            received_at INTEGER NOT NULL, UNIQUE (gw, ts, state)) STRICT;
        CREATE TABLE events (
            id INTEGER PRIMARY KEY, gw TEXT NOT NULL, type TEXT NOT NULL, ts INTEGER NOT NULL,
            payload TEXT NOT NULL, digest TEXT NOT NULL, received_at INTEGER NOT NULL, UNIQUE (gw, digest)) STRICT;
        CREATE TABLE alerts (
            id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, gw TEXT NOT NULL, device TEXT NOT NULL,
            rule TEXT NOT NULL, state TEXT NOT NULL, previous TEXT NOT NULL, severity TEXT NOT NULL,
            tag TEXT, value ANY, since INTEGER, condition TEXT NOT NULL, message TEXT NOT NULL) STRICT;
        CREATE INDEX alerts_instance ON alerts (gw, device, rule, id);
        CREATE TABLE alert_state (
            gw TEXT NOT NULL, device TEXT NOT NULL, rule TEXT NOT NULL, state TEXT NOT NULL, since INTEGER,
            value ANY, tag TEXT, tags TEXT NOT NULL, fired INTEGER NOT NULL, changed_at INTEGER NOT NULL,
            PRIMARY KEY (gw, device, rule)) WITHOUT ROWID, STRICT;
        CREATE TABLE alert_series (
            gw TEXT NOT NULL, device TEXT NOT NULL, tag TEXT NOT NULL, ts INTEGER NOT NULL, value ANY,
            quality TEXT NOT NULL, seen_at INTEGER, PRIMARY KEY (gw, device, tag)) WITHOUT ROWID, STRICT;
        CREATE TABLE webhook_outbox (
            id INTEGER PRIMARY KEY, webhook TEXT NOT NULL, payload BLOB NOT NULL,
            created_at INTEGER NOT NULL) STRICT;
        CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL, reason TEXT NOT NULL,
            received_at INTEGER NOT NULL) STRICT;
    """,
    # Readings by series id: the same rows, in the same order, behind a view of the old shape.
    2: """
        CREATE TABLE series (
            id INTEGER PRIMARY KEY, gw TEXT NOT NULL, device TEXT NOT NULL, tag TEXT NOT NULL,
            UNIQUE (gw, device, tag)) STRICT;
        CREATE TABLE samples (
            series INTEGER NOT NULL, ts INTEGER NOT NULL, value ANY, quality TEXT NOT NULL, error TEXT,
            seq INTEGER NOT NULL) STRICT;
        INSERT INTO series (gw, device, tag) SELECT DISTINCT gw, device, tag FROM points ORDER BY gw, device, tag;
        INSERT INTO samples SELECT s.id, p.ts, p.value, p.quality, p.error, p.seq
            FROM points p JOIN series s ON s.gw = p.gw AND s.device = p.device AND s.tag = p.tag ORDER BY p.rowid;
        DROP TABLE points;
        CREATE INDEX samples_series ON samples (series, ts);
        CREATE VIEW points AS
            SELECT s.gw AS gw, s.device AS device, s.tag AS tag, p.ts AS ts, p.value AS value,
                p.quality AS quality, p.error AS error, p.seq AS seq
            FROM samples p JOIN series s ON s.id = p.series;
    """,
    # Each gateway's newest buffer figures (from its status) and each device's tags (from its retained meta).
    3: """
        CREATE TABLE gateway_buffer (
            gw TEXT PRIMARY KEY, ts INTEGER NOT NULL, pending_batches INTEGER NOT NULL,
            pending_points INTEGER NOT NULL, unconfirmed_batches INTEGER NOT NULL, dropped_points INTEGER NOT NULL,
            oldest_pending_ts INTEGER, oldest_unconfirmed_ts INTEGER, received_at INTEGER NOT NULL) WITHOUT ROWID, STRICT;
        CREATE TABLE device_meta (
            gw TEXT NOT NULL, device TEXT NOT NULL, tags TEXT NOT NULL, received_at INTEGER NOT NULL,
            PRIMARY KEY (gw, device)) WITHOUT ROWID, STRICT;
    """,
    # Metering (bridge/metering.py): what each gateway's new batches added, per hour, in their commit.
    4: """
        CREATE TABLE usage_hourly (
            hour INTEGER NOT NULL, gw TEXT NOT NULL, points INTEGER NOT NULL, messages INTEGER NOT NULL,
            bytes INTEGER NOT NULL, delayed_points INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (hour, gw)) WITHOUT ROWID, STRICT;
    """,
}
EXPIRE_ROWS = 10_000  # readings deleted per transaction by the retention job, at most
EXPIRE_SERIES = 1_000  # series looked at per transaction, at most (most have nothing to delete)
EXPIRE_PAUSE_S = 0.05  # between two such transactions: SQLite's lock is not fair, a waiting writer needs the gap
_SQLITE_TYPES = {
    "auto": "ANY",
    "float": "REAL",
    "int": "INTEGER",
    "str": "TEXT",
    "bool": "INTEGER",
    "json": "TEXT",
    "timestamp": "INTEGER",
}


def db_path(directory: str | Path, tenant: str) -> Path:
    return Path(directory) / f"{tenant}.db"


class SqliteStore(Store):
    """One tenant's SQLite file."""

    def __init__(self, directory: str | Path, tenant: str, *, fsync: bool = True, busy_timeout_s: float = 30.0) -> None:
        self.tenant = tenant
        self.path = db_path(directory, tenant)
        self.where = str(self.path)
        self.fsync = fsync
        self.busy_timeout_s = busy_timeout_s
        self._db: sqlite3.Connection | None = None
        self._utils: sqlite_utils.Database | None = None
        self._mapped_keys: dict[str, list[str]] = {}
        self._mapped_types: dict[str, dict[str, str]] = {}
        self._series = SeriesIds()

    # ---------------------------------------------------------------- lifecycle

    def open(self, mappings: Sequence[MappingRule] = ()) -> None:
        directory = self.path.parent
        if directory.exists() and not directory.is_dir():
            raise StorageError(f"{directory}: not a directory (storage.path)")
        try:
            if not directory.exists():  # private whatever the umask: it holds every reading of the tenant
                directory.mkdir(mode=0o700, parents=True)
                os.chmod(directory, 0o700)
            if not self.path.exists():  # 0600 from the first byte; SQLite gives its -wal and -shm the same mode
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                os.chmod(self.path, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StorageError(f"{directory}: cannot create the storage directory: {exc.strerror or exc}") from exc
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout_s)
            self._db = db
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            # Checkpoint the WAL every ~40 MB instead of 4 MB: fewer stalls under a stream of batches.
            db.execute("PRAGMA wal_autocheckpoint=10000")
            db.execute("PRAGMA cache_size=-65536")
            self._migrate()
            self._utils = sqlite_utils.Database(db)
            self._create_mapped(mappings)
        except sqlite3.Error as exc:
            self.close()
            raise StorageError(f"{self.path}: cannot open the tenant's database: {exc}") from exc
        except OSError as exc:
            self.close()
            raise StorageError(f"{self.path}: {exc.strerror or exc}") from exc

    def open_read(self) -> None:
        """Open an existing file read-only (``bridge query``): never creates or migrates anything."""
        if not self.path.exists():
            raise StorageError(f"tenant {self.tenant}: no data yet ({self.path} does not exist)")
        try:
            self._db = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=self.busy_timeout_s
            )
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: cannot read: {exc}") from exc
        if version == 0:
            raise StorageError(f"{self.path}: not a bridge database (no schema)")
        self._utils = sqlite_utils.Database(self._db)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _migrate(self) -> None:
        assert self._db is not None
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(f"{self.path}: schema version {version} is newer than this bridge ({SCHEMA_VERSION})")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = 0
                if target == 2:  # rewrites every reading: say so, it can take minutes on a big file
                    rows = self._db.execute("SELECT coalesce(max(rowid), 0) FROM points").fetchone()[0]
                    if rows:
                        log.info(
                            "converting stored readings to series ids (once)",
                            extra=fields(tenant=self.tenant, path=str(self.path), readings=rows),
                        )
                started = time.monotonic()
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={target}")
                self._db.execute("COMMIT")
                if rows:
                    log.info(
                        "stored readings converted",
                        extra=fields(tenant=self.tenant, readings=rows, seconds=round(time.monotonic() - started, 1)),
                    )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _create_mapped(self, mappings: Sequence[MappingRule]) -> None:
        """Each mapping's table, with its columns (new fields are added; nothing is dropped)."""
        assert self._utils is not None
        for rule in mappings:
            table = self._utils.table(rule.table)
            types = {name: _SQLITE_TYPES[kind] for name, kind in rule.column_types().items()}
            with self._utils.atomic():
                if not table.exists():
                    table.create(types, strict=True, not_null={"ts", "received_at"})
                else:
                    for name, sql_type in types.items():
                        if name not in table.columns_dict:
                            table.add_column(name, sql_type)
                if rule.key:
                    table.create_index(rule.key, index_name=f"{rule.table}_key", unique=True, if_not_exists=True)
            self._mapped_keys[rule.table] = list(rule.key)
            self._mapped_types[rule.table] = rule.column_types()

    # ---------------------------------------------------------------- writing

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        if self._db is None:
            raise StorageError(f"{self.path}: not open")
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            tx = _SqliteTx(self)
            try:
                yield tx
            except BaseException:
                self._rollback()
                raise
            db.execute("COMMIT")
            self._series.remember(tx.new_series)
        except (
            sqlite3.IntegrityError,
            sqlite3.DataError,
            sqlite3.InterfaceError,
            OverflowError,
            UnicodeEncodeError,
        ) as exc:
            self._rollback()
            raise DataRejected(f"{self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            self._rollback()
            raise StorageError(f"{self.path}: {exc}") from exc

    def expire(self, before_ms: int, after_ms: int | None = None) -> int:
        """Delete the readings before ``before_ms`` (and from ``after_ms`` on), series by series through the ``(series, ts)`` index, at most
        ``EXPIRE_ROWS`` readings and ``EXPIRE_SERIES`` series per transaction, ``EXPIRE_PAUSE_S`` apart: the
        write lock is held for tens of milliseconds at a time, and ingest commits in between. Returns the
        readings removed."""
        if self._db is None:
            raise StorageError(f"{self.path}: not open")
        db = self._db
        try:
            ranges = [(-(2**63), before_ms)] + ([(after_ms, 2**63 - 1)] if after_ms is not None else [])
            series = [(row[0], lo, hi) for row in db.execute("SELECT id FROM series ORDER BY id") for lo, hi in ranges]
            # The row stored last stays whatever its age: SQLite numbers a new row after the highest one left, and
            # the console's rollup follows the rowids, so they must never start again from 1 on an emptied table.
            top = db.execute("SELECT coalesce(max(rowid), 0) FROM samples").fetchone()[0]
            removed = position = 0
            while position < len(series):
                budget, probed = EXPIRE_ROWS, 0
                db.execute("BEGIN IMMEDIATE")
                try:
                    while position < len(series) and budget > 0 and probed < EXPIRE_SERIES:
                        deleted = db.execute(
                            "DELETE FROM samples WHERE rowid IN "
                            "(SELECT rowid FROM samples WHERE series = ? AND ts >= ? AND ts < ? AND rowid < ? LIMIT ?)",
                            (*series[position], top, budget),
                        ).rowcount
                        probed += 1
                        if deleted < budget:
                            position += 1  # this series has no older readings left
                        budget -= deleted
                    db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
                removed += EXPIRE_ROWS - budget
                if position < len(series):
                    time.sleep(EXPIRE_PAUSE_S)  # a waiting ingest commit takes the lock before the next batch
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: retention: {exc}") from exc
        return removed

    def newest_receipt_hour(self) -> int | None:
        if self._db is None:
            raise StorageError(f"{self.path}: not open")
        try:
            newest: int | None = self._db.execute("SELECT max(hour) FROM usage_hourly").fetchone()[0]
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: retention: {exc}") from exc
        return newest

    def expire_received(self, before_ms: int) -> int:
        if self._db is None:
            raise StorageError(f"{self.path}: not open")
        removed = 0
        try:
            for table in ("dead_letters", "events"):
                # The newest row stays whatever its age, as for the readings: ids never start again from 1.
                removed += self._delete_in_batches(
                    f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE received_at < ? "
                    f"AND id < (SELECT coalesce(max(id), 0) FROM {table}) ORDER BY id LIMIT ?)",
                    before_ms,
                )
            # Status history: each gateway's newest status, and newest naming a version, stay.
            removed += self._delete_in_batches(
                "DELETE FROM status WHERE rowid IN (SELECT s.rowid FROM status s WHERE "
                + STATUS_EXPIRED.format(ph="?", t="status")
                + " LIMIT ?)",
                before_ms,
            )
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: retention: {exc}") from exc
        return removed

    def _delete_in_batches(self, statement: str, before_ms: int) -> int:
        """Run a ``DELETE … LIMIT ?`` of at most EXPIRE_ROWS rows per transaction until it removes fewer."""
        assert self._db is not None
        db, removed = self._db, 0
        while True:
            db.execute("BEGIN IMMEDIATE")
            try:
                deleted = db.execute(statement, (before_ms, EXPIRE_ROWS)).rowcount
                db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            removed += deleted
            if deleted < EXPIRE_ROWS:
                return removed
            time.sleep(EXPIRE_PAUSE_S)

    def _rollback(self) -> None:
        if self._db is not None and self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    # ---------------------------------------------------------------- resuming

    def load_alert_states(self) -> list[Instance]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT gw, device, rule, state, since, value, tag, tags, fired, changed_at FROM alert_state"
        )
        return [
            Instance(gw, device, rule, State(state), since, value, tag, json.loads(tags), bool(fired), changed)
            for gw, device, rule, state, since, value, tag, tags, fired, changed in rows
        ]

    def load_alert_series(self) -> Iterator[SeriesLast]:
        assert self._db is not None
        for row in self._db.execute("SELECT gw, device, tag, ts, value, quality, seen_at FROM alert_series"):
            yield SeriesLast(*row)

    def load_outbox(self) -> list[OutboxItem]:
        assert self._db is not None
        return [
            OutboxItem(*row)
            for row in self._db.execute("SELECT id, webhook, payload, created_at FROM webhook_outbox ORDER BY id")
        ]

    def last_alerts(self) -> list[dict[str, Any]]:
        assert self._utils is not None
        return list(
            self._utils.query(
                "SELECT * FROM alerts WHERE id IN (SELECT max(id) FROM alerts GROUP BY gw, device, rule) ORDER BY id"
            )
        )

    # ---------------------------------------------------------------- reading

    def usage(self, *, gw: str | None = None, since_ms: int | None = None, totals: bool = False) -> list[Usage]:
        assert self._db is not None
        query = (
            "SELECT 0, gw, sum(points), sum(messages), sum(bytes), sum(delayed_points) FROM usage_hourly "
            "WHERE hour >= ?"
            if totals
            else "SELECT hour, gw, points, messages, bytes, delayed_points FROM usage_hourly WHERE hour >= ?"
        )
        params: list[Any] = [0 if since_ms is None else since_ms - since_ms % HOUR_MS]
        if gw is not None:
            query, params = query + " AND gw = ?", [*params, gw]
        try:
            return [
                Usage(*row)
                for row in self._db.execute(
                    query + (" GROUP BY gw ORDER BY gw" if totals else " ORDER BY hour, gw"), params
                )
            ]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # written by a bridge before metering, opened read-only
            raise StorageError(f"{self.path}: {exc}") from exc

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
        assert self._utils is not None
        where: list[str] = []
        params: list[object] = []
        for column, value in (("gw", gw), ("device", device), ("tag", tag)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if what == "values":
            sql = "SELECT gw, device, tag, ts, value, quality, error FROM latest{w} ORDER BY gw, device, tag LIMIT ?"
        elif what == "points":
            if since_ms is not None:
                where.append("ts >= ?")
                params.append(since_ms)
            where = [f"s.{w}" if not w.startswith("ts") else f"p.{w}" for w in where]
            sql = (
                "SELECT s.gw AS gw, s.device AS device, s.tag AS tag, p.ts AS ts, p.value AS value, "
                "p.quality AS quality, p.error AS error FROM samples p JOIN series s ON s.id = p.series{w} "
                "ORDER BY p.ts DESC, p.rowid DESC LIMIT ?"
            )
        elif what == "alerts" and active:
            where.append("state IN ('pending', 'firing')")
            sql = "SELECT changed_at AS ts, gw, device, rule, state, since, tag, value FROM alert_state{w} ORDER BY since DESC LIMIT ?"
        elif what == "alerts":
            if since_ms is not None:
                where.append("ts >= ?")
                params.append(since_ms)
            sql = (
                "SELECT id, ts, gw, device, rule, state, severity, tag, value, message FROM alerts{w} "
                "ORDER BY id DESC LIMIT ?"
            )
        elif what == "dead-letters":
            where = []
            params = []
            if since_ms is not None:
                where.append("received_at >= ?")
                params.append(since_ms)
            sql = "SELECT id, received_at, topic, reason, payload FROM dead_letters{w} ORDER BY id DESC LIMIT ?"
        elif what == "counts":
            return self._counts()
        else:
            raise StorageError(f"unknown query {what!r}")
        sql = sql.format(w=(" WHERE " + " AND ".join(where)) if where else "")
        try:
            cursor = self._utils.execute(sql, [*params, limit])
            columns = tuple(d[0] for d in cursor.description)
            return Table(columns, [tuple(r) for r in cursor.fetchall()])
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: {exc}") from exc

    def _counts(self) -> Table:
        assert self._utils is not None
        rows = []
        for name in sorted([*self._utils.table_names(), *self._utils.view_names()]):
            if name.startswith("sqlite_"):
                continue
            rows.append((name, self._utils.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]))
        return Table(("table", "rows"), rows)


def _sqlite_value(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "json" or (kind == "auto" and isinstance(value, (dict, list))):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return value


class _SqliteTx(Tx):
    def record_usage(self, rows: Sequence[Usage]) -> None:
        self.db.executemany(
            "INSERT INTO usage_hourly VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hour, gw) DO UPDATE SET "
            "points = points + excluded.points, messages = messages + excluded.messages, "
            "bytes = bytes + excluded.bytes, delayed_points = delayed_points + excluded.delayed_points",
            [u.row() for u in rows],
        )

    def __init__(self, store: SqliteStore) -> None:
        assert store._db is not None and store._utils is not None
        self.store = store
        self.db = store._db
        self.new_series: dict[tuple[str, str], dict[str, int]] = {}

    def claim_batches(self, batches: Sequence[DataBatch]) -> list[DataBatch]:
        new = []
        execute = self.db.execute
        for b in batches:
            cursor = execute(
                "INSERT OR IGNORE INTO batches VALUES (?, ?, ?, ?, ?)",
                (b.gw, b.seq, b.device, len(b.rows), b.received_at),
            )
            if cursor.rowcount == 1:
                new.append(b)
        return new

    def differing(self, batches: Sequence[DataBatch]) -> set[tuple[str, int]]:
        out = set()
        for b in batches:
            row = self.db.execute(
                "SELECT device, points FROM batches WHERE gw = ? AND seq = ?", (b.gw, b.seq)
            ).fetchone()
            if row is not None and (row[0], row[1]) != (b.device, len(b.rows)):
                out.add((b.gw, b.seq))
        return out

    def insert_points(self, batches: Sequence[DataBatch]) -> None:
        """Each batch's rows as samples of their series (a batch's rows are all of its gateway and device)."""
        if any(b.rows for b in batches):
            # A generator, not a list: each row is made, inserted and freed in turn.
            self.db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?)", self._samples(batches))

    def _samples(self, batches: Sequence[DataBatch]) -> Iterator[tuple[Any, ...]]:
        known = self.store._series.known
        for b in batches:
            key = (b.gw, b.device)
            ids = known.get(key)
            if ids is None:
                ids = known[key] = {}
            for _, _, tag, ts, value, quality, error, seq in b.rows:
                series = ids.get(tag)
                if series is None:
                    series = self._series_id(key, tag)
                yield (series, ts, value, quality, error, seq)

    def _series_id(self, key: tuple[str, str], tag: str) -> int:
        mine = self.new_series.setdefault(key, {})
        series = mine.get(tag)
        if series is None:
            gw, device = key
            self.db.execute("INSERT OR IGNORE INTO series (gw, device, tag) VALUES (?, ?, ?)", (gw, device, tag))
            (series,) = self.db.execute(
                "SELECT id FROM series WHERE gw = ? AND device = ? AND tag = ?", (gw, device, tag)
            ).fetchone()
            mine[tag] = series
        return int(series)

    def insert_status(self, rows: Sequence[StatusRow]) -> None:
        self.db.executemany(
            "INSERT OR IGNORE INTO status VALUES (?, ?, ?, ?, ?, ?)",
            [(r.gw, r.state, r.ts, r.version, r.config_hash, r.received_at) for r in rows],
        )
        self.db.executemany(
            "INSERT INTO gateway_buffer VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (gw) DO UPDATE SET "
            "ts = excluded.ts, pending_batches = excluded.pending_batches, pending_points = excluded.pending_points, "
            "unconfirmed_batches = excluded.unconfirmed_batches, dropped_points = excluded.dropped_points, "
            "oldest_pending_ts = excluded.oldest_pending_ts, oldest_unconfirmed_ts = excluded.oldest_unconfirmed_ts, "
            "received_at = excluded.received_at WHERE excluded.ts >= gateway_buffer.ts",
            [(r.gw, *_buffer_values(r), r.received_at) for r in rows if r.buffer is not None],
        )

    def save_meta(self, rows: Sequence[MetaRow]) -> None:
        for r in rows:
            if r.tags is None:
                self.db.execute("DELETE FROM device_meta WHERE gw = ? AND device = ?", (r.gw, r.device))
            else:
                self.db.execute(
                    "INSERT INTO device_meta VALUES (?, ?, ?, ?) ON CONFLICT (gw, device) DO UPDATE SET "
                    "tags = excluded.tags, received_at = excluded.received_at",
                    (r.gw, r.device, r.tags, r.received_at),
                )

    def insert_events(self, rows: Sequence[EventRow]) -> None:
        self.db.executemany(
            "INSERT OR IGNORE INTO events (gw, type, ts, payload, digest, received_at) VALUES (?, ?, ?, ?, ?, ?)",
            [(r.gw, r.type, r.ts, r.payload, r.digest, r.received_at) for r in rows],
        )

    def insert_mapped(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        assert self.store._utils is not None
        kinds = self.store._mapped_types[table]
        rows = [{k: _sqlite_value(v, kinds[k]) for k, v in row.items()} for row in rows]
        self.store._utils.table(table).insert_all(rows, ignore=bool(self.store._mapped_keys.get(table)))

    def insert_dead_letters(self, rows: Sequence[DeadLetter]) -> None:
        self.db.executemany(
            "INSERT INTO dead_letters (topic, payload, reason, received_at) VALUES (?, ?, ?, ?)",
            [(r.topic, r.payload, r.reason, r.received_at) for r in rows],
        )

    def upsert_latest(self, rows: Sequence[LatestRow]) -> None:
        self.db.executemany(
            "INSERT INTO latest VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (gw, device, tag) DO UPDATE SET "
            "ts = excluded.ts, value = excluded.value, quality = excluded.quality, error = excluded.error, "
            "received_at = excluded.received_at, seen_at = coalesce(excluded.seen_at, latest.seen_at) "
            "WHERE excluded.ts > latest.ts",
            rows,
        )

    def record_alerts(self, changes: Sequence[Change]) -> list[int]:
        ids = []
        for c in changes:
            cursor = self.db.execute(
                "INSERT INTO alerts (ts, gw, device, rule, state, previous, severity, tag, value, since, condition, "
                "message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    c.ts,
                    c.gw,
                    c.device,
                    c.rule,
                    str(c.state),
                    str(c.previous),
                    c.severity,
                    c.tag,
                    c.value,
                    c.since,
                    c.condition,
                    c.message,
                ),
            )
            ids.append(int(cursor.lastrowid or 0))
        return ids

    def save_alert_states(self, states: Sequence[Instance]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO alert_state VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    s.gw,
                    s.device,
                    s.rule,
                    str(s.state),
                    s.since,
                    s.value,
                    s.tag,
                    json.dumps(s.tags),
                    int(s.fired),
                    s.changed_at,
                )
                for s in states
            ],
        )

    def save_alert_series(self, rows: Sequence[SeriesLast]) -> None:
        self.db.executemany(
            "INSERT INTO alert_series VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (gw, device, tag) DO UPDATE SET "
            "ts = excluded.ts, value = excluded.value, quality = excluded.quality, seen_at = excluded.seen_at "
            "WHERE excluded.ts > alert_series.ts",
            [(r.gw, r.device, r.tag, r.ts, r.value, r.quality, r.seen_at) for r in rows],
        )

    def queue_webhooks(self, items: Sequence[tuple[str, bytes, int]]) -> list[int]:
        ids = []
        for webhook, payload, created in items:
            cursor = self.db.execute(
                "INSERT INTO webhook_outbox (webhook, payload, created_at) VALUES (?, ?, ?)",
                (webhook, payload, created),
            )
            ids.append(int(cursor.lastrowid or 0))
        return ids

    def delete_outbox(self, ids: Sequence[int]) -> None:
        self.db.executemany("DELETE FROM webhook_outbox WHERE id = ?", [(i,) for i in ids])


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
