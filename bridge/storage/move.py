"""Moving a tenant's PostgreSQL schema to another server, once, while every bridge instance waits.

``provisioning tenant move NAME --storage S2`` rewrites the tenant's entry in
``tenants.json`` with ``storage: S2`` and ``storage_previous: S1``. Each
bridge instance then stops the tenant's ingest (its MQTT session is closed
cleanly, so the broker queues what arrives meanwhile) and calls
``move_tenant``:

::

    instance ──try lock──▶ S1: pg_advisory_lock("factory-edge bridge move <tenant>")
       │                     │  holder: fence S1 (a trigger on every table refuses writes),
       │                     │          copy every table of the schema to S2 in ONE transaction,
       │                     │          mark it done on S2 (bridge_move: 'in' from S1)
       ▼                     ▼
    S2 already marked done? ──yes──▶ resume on S2

What makes it exact:

- **The fence.** Before copying, the holder adds to every table of the
  schema on S1 a statement trigger that raises ``tenant … moved to …``.
  Creating a trigger waits for the transactions writing that table, so
  every commit made on S1 before the fence is in the copy, and none can
  follow it: an instance that has not yet seen the new ``tenants.json``
  fails its next commit there, acknowledges nothing, and gets the same
  messages again from the broker once it resumes on S2. The fence stays:
  S1 keeps a read-only copy until the operator drops it.
- **One transaction on S2.** The tables (points, the ``batches`` claims that
  make ``(gw, seq)`` exactly once, alerts and their state, status, events,
  dead letters, mapped tables: everything in the schema, listed from the
  catalogue rather than named here), the sequences behind their ids, and
  the ``done`` mark commit together. A copier that dies leaves nothing on
  S2 and releases the lock with its session; the next instance starts over.
- **Done means done.** An instance that finds S2's newest ``bridge_move``
  row saying ``in`` from S1 resumes at once, without S1 (a server already
  retired, a bridge started after the move).

The interruption is the copy: rows of the tenant divided by the copy rate
(``COPY … (FORMAT BINARY)`` both ways), logged table by table.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from factory_edge.errors import StorageError
from factory_edge.logs import fields

from ..config import StorageConfig
from ..mapping import MappingRule
from .postgres import PostgresStore, describe_dsn, schema_lock

log = logging.getLogger(__name__)

MOVE_TABLE = "bridge_move"
FENCE = "bridge_moved"  # the trigger and its function, on the server moved from
LOCK_POLL_S = 0.5


@dataclass
class MoveReport:
    """What one instance did for a move: the copy (``copied``) or nothing (it was done already)."""

    tenant: str
    source: str
    target: str
    copied: bool = False
    rows: dict[str, int] = field(default_factory=dict)
    waited_s: float = 0.0  # for the lock, while another instance copied
    copy_s: float = 0.0

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _connect(dsn: str, tenant: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            dsn, autocommit=True, connect_timeout=10, application_name=f"factory-edge move {tenant}"[:63]
        )
    except psycopg.Error as exc:
        raise StorageError(f"{describe_dsn(dsn)}: cannot connect: {_first_line(exc)}") from exc


def move_tenant(
    tenant: str,
    source: StorageConfig,
    target: StorageConfig,
    mappings: Sequence[MappingRule] = (),
    *,
    instance: str = "",
    on_table: Callable[[str, int, float], None] | None = None,
) -> MoveReport:
    """Make ``target`` hold the tenant's data, copying it from ``source`` unless an instance already has.

    Blocking (run it on a thread). StorageError with one line when a server
    cannot be reached or refuses: nothing is marked done then, and calling
    again starts over.
    """
    if source.backend != "postgres" or target.backend != "postgres":
        raise StorageError(
            f"tenant {tenant}: a storage move needs PostgreSQL on both servers "
            f"(from {source.backend} to {target.backend}); SQLite files are moved by copying them while "
            "the bridge is stopped"
        )
    assert source.dsn is not None and target.dsn is not None
    src_name, dst_name = describe_dsn(source.dsn), describe_dsn(target.dsn)
    report = MoveReport(tenant, src_name, dst_name)
    if src_name == dst_name:
        return report
    # The tenant's tables as this bridge makes them, on the new server (created empty if new, migrated if old).
    store = PostgresStore(target.dsn, tenant)
    store.open(mappings)
    store.close()
    schema = sql.Identifier(tenant)
    dst = _connect(target.dsn, tenant)
    try:
        _ensure_move_table(dst, schema, tenant)
        if _done(dst, schema, src_name):
            return report
        src = _connect(source.dsn, tenant)
        try:
            started = time.monotonic()
            key = f"factory-edge bridge move {tenant}"
            while not _fetch(src, "SELECT pg_try_advisory_lock(hashtext(%s))", (key,)):
                time.sleep(LOCK_POLL_S)
            report.waited_s = time.monotonic() - started
            try:
                if _done(dst, schema, src_name):  # another instance copied while we waited
                    return report
                if _keep_target(src, dst, schema, tenant, src_name, dst_name):
                    return report
                # Every table there before the fence (an instance that never wrote there yet would create them).
                old = PostgresStore(source.dsn, tenant)
                old.open(mappings)
                old.close()
                fenced_at = _fence(src, schema, tenant, dst_name)
                log.info(
                    "copying the tenant's data to its new storage server",
                    extra=fields(tenant=tenant, source=src_name, target=dst_name),
                )
                copy_started = time.monotonic()
                report.rows = _copy(src, dst, schema, tenant, src_name, fenced_at, instance, on_table)
                report.copy_s = time.monotonic() - copy_started
                report.copied = True
            finally:
                _fetch(src, "SELECT pg_advisory_unlock(hashtext(%s))", (key,))
        finally:
            src.close()
    except psycopg.Error as exc:
        raise StorageError(f"tenant {tenant}: moving {src_name} -> {dst_name}: {_first_line(exc)}") from exc
    finally:
        dst.close()
    return report


def _now_ms() -> int:
    return int(time.time() * 1000)


def _fetch(conn: psycopg.Connection[Any], query: str | sql.Composed, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def _ensure_move_table(conn: psycopg.Connection[Any], schema: sql.Identifier, tenant: str) -> None:
    with conn.transaction():
        schema_lock(conn, tenant)  # every instance comes here at once
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.{} (id bigserial PRIMARY KEY, direction text NOT NULL, "
                "peer text NOT NULL, fenced_at bigint NOT NULL, at bigint NOT NULL, rows bigint, host text)"
            ).format(schema, sql.Identifier(MOVE_TABLE))
        )


def _done(conn: psycopg.Connection[Any], schema: sql.Identifier, source: str) -> bool:
    """Is the newest move recorded on this server the copy in from ``source``?"""
    row = conn.execute(
        sql.SQL("SELECT direction, peer FROM {}.{} ORDER BY id DESC LIMIT 1").format(schema, sql.Identifier(MOVE_TABLE))
    ).fetchone()
    return row is not None and tuple(row) == ("in", source)


def _holds_data(conn: psycopg.Connection[Any], tenant: str) -> bool:
    """Has any of the tenant's tables on this server a row (its schema version aside)?"""
    if not _fetch(conn, "SELECT 1 FROM pg_namespace WHERE nspname = %s", (tenant,)):
        return False
    return any(
        _fetch(conn, sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(tenant, table)))
        for table in _tables(conn, tenant)
        if table != "schema_version"
    )


def _newest_move(conn: psycopg.Connection[Any], schema: sql.Identifier, tenant: str) -> tuple[str, str] | None:
    if not _fetch(conn, "SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(tenant, MOVE_TABLE).as_string(conn),)):
        return None
    row = conn.execute(
        sql.SQL("SELECT direction, peer FROM {}.{} ORDER BY id DESC LIMIT 1").format(schema, sql.Identifier(MOVE_TABLE))
    ).fetchone()
    return (row[0], row[1]) if row else None


def _keep_target(
    src: psycopg.Connection[Any],
    dst: psycopg.Connection[Any],
    schema: sql.Identifier,
    tenant: str,
    source: str,
    target: str,
) -> bool:
    """Before anything is fenced or emptied: True when the target already holds the tenant's live data and the
    source none (a move undone before any bridge copied it): resume there, copy nothing. StorageError when the
    copy would empty what may be the only copy of data: both servers hold data never moved out, or the source
    holds nothing and the target the copy it left behind."""
    if not _holds_data(dst, tenant):
        return False  # a new or empty server: the copy fills it
    src_has = _holds_data(src, tenant)
    newest = _newest_move(dst, schema, tenant)
    target_live = newest is None or newest[0] != "out"
    if target_live and not src_has:
        log.warning(
            "the tenant's data is already on its new storage server and the old one holds none (a move undone "
            "before it was copied): nothing copied, ingest resumes there",
            extra=fields(tenant=tenant, source=source, target=target),
        )
        return True
    if target_live:
        raise StorageError(
            f"tenant {tenant}: both {source} and {target} hold data of the tenant, neither moved out: nothing "
            "copied, ingest stays paused; keep the server that holds the tenant's data (provisioning tenant move "
            "--storage) after checking both"
        )
    if not src_has and newest is not None:
        raise StorageError(
            f"tenant {tenant}: {source} holds no data of the tenant, and {target} holds the copy it left for "
            f"{newest[1]}: nothing copied or emptied, ingest stays paused; place the tenant where its data is "
            "(provisioning tenant move --storage)"
        )
    return False


def _tables(conn: psycopg.Connection[Any], tenant: str, *, partitions: bool = False) -> list[str]:
    """The schema's tables without the move records: a partitioned table once, as its parent (with
    ``partitions``, its partitions too)."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND (%s OR NOT c.relispartition) AND c.relname <> %s "
        "ORDER BY c.relname",
        (tenant, partitions, MOVE_TABLE),
    ).fetchall()
    return [r[0] for r in rows]


def _partitions(conn: psycopg.Connection[Any], tenant: str, table: str) -> list[tuple[str, str, str | None]]:
    """``(partition, bound, its own partition key or None)`` of a partitioned table, as the catalogue has them."""
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), "
        "CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass ORDER BY c.relname",
        (sql.Identifier(tenant, table).as_string(conn),),
    ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def _create_partitions(src: psycopg.Connection[Any], dst: psycopg.Connection[Any], tenant: str, table: str) -> None:
    """The partitions S1 has and S2 lacks (older days, say), so that the copied rows find theirs."""
    for part, bound, key in _partitions(src, tenant, table):
        by = sql.SQL(f" PARTITION BY {key}") if key else sql.SQL("")
        dst.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} {}{}").format(
                sql.Identifier(tenant, part), sql.Identifier(tenant, table), sql.SQL(bound), by
            )
        )
        if key:
            _create_partitions(src, dst, tenant, part)


def _fence(src: psycopg.Connection[Any], schema: sql.Identifier, tenant: str, target: str) -> int:
    """Refuse every later write to the tenant's tables on the old server; returns when it was fenced (ms)."""
    _ensure_move_table(src, schema, tenant)
    moves = sql.Identifier(MOVE_TABLE)
    with src.transaction():
        row = src.execute(
            sql.SQL("SELECT direction, peer, fenced_at FROM {}.{} ORDER BY id DESC LIMIT 1").format(schema, moves)
        ).fetchone()
        if row is not None and row[0] == "out" and row[1] == target:
            return int(row[2])  # fenced by an attempt that did not finish: the same fence
        fenced_at = _now_ms()
        src.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {}.{}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION 'tenant % moved to %: this server keeps a read-only copy', "
                "TG_TABLE_SCHEMA, TG_ARGV[0]; END $$"
            ).format(schema, sql.Identifier(FENCE))
        )
        # Every table, partitions too (a store may write into a partition directly). Every commit of data
        # claims its batches in the same transaction, so the fence on ``batches`` stops even a write into
        # a partition created after the fence.
        for table in _tables(src, tenant, partitions=True):
            name = sql.Identifier(tenant, table)
            # Waits for the transactions writing the table: what they commit is before the fence.
            src.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(FENCE), name))
            src.execute(
                sql.SQL(
                    "CREATE TRIGGER {} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {} "
                    "FOR EACH STATEMENT EXECUTE FUNCTION {}.{}({})"
                ).format(sql.Identifier(FENCE), name, schema, sql.Identifier(FENCE), sql.Literal(target))
            )
        src.execute(
            sql.SQL("INSERT INTO {}.{} (direction, peer, fenced_at, at, host) VALUES ('out', %s, %s, %s, %s)").format(
                schema, moves
            ),
            (target, fenced_at, fenced_at, socket.gethostname()),
        )
    return fenced_at


def _columns(conn: psycopg.Connection[Any], tenant: str, table: str) -> list[tuple[str, str, bool]]:
    """``(name, type, not null)`` of a table's stored columns, in order."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a "
        "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' "
        "ORDER BY a.attnum",
        (sql.Identifier(tenant, table).as_string(conn),),
    ).fetchall()
    return [(r[0], r[1], bool(r[2])) for r in rows]


def _create_like(src: psycopg.Connection[Any], dst: psycopg.Connection[Any], tenant: str, table: str) -> None:
    """A table this bridge does not make (an older mapping's): its columns, constraints and indexes, as on S1."""
    name = sql.Identifier(tenant, table)
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}{}").format(sql.Identifier(c), sql.SQL(t), sql.SQL(" NOT NULL" if nn else ""))
        for c, t, nn in _columns(src, tenant, table)
    )
    key = _fetch(src, "SELECT pg_get_partkeydef(%s::regclass)", (name.as_string(src),))
    by = sql.SQL(f" PARTITION BY {key}") if key else sql.SQL("")
    dst.execute(sql.SQL("CREATE TABLE {} ({}){}").format(name, columns, by))
    for (definition,) in src.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass AND contype IN ('p', 'u')",
        (name.as_string(src),),
    ).fetchall():
        dst.execute(sql.SQL("ALTER TABLE {} ADD {}").format(name, sql.SQL(definition)))
    for (definition,) in src.execute(
        "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i WHERE i.indrelid = %s::regclass "
        "AND NOT i.indisprimary AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
        (name.as_string(src),),
    ).fetchall():
        dst.execute(sql.SQL(definition))


def _copy(
    src: psycopg.Connection[Any],
    dst: psycopg.Connection[Any],
    schema: sql.Identifier,
    tenant: str,
    source: str,
    fenced_at: int,
    instance: str,
    on_table: Callable[[str, int, float], None] | None,
) -> dict[str, int]:
    """Every table and sequence of the schema, S1 -> S2, and the done mark, in one transaction on S2."""
    rows: dict[str, int] = {}
    with src.transaction():
        src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        tables = _tables(src, tenant) if _fetch(src, "SELECT 1 FROM pg_namespace WHERE nspname = %s", (tenant,)) else []
        with dst.transaction():
            existing = set(_tables(dst, tenant))
            for table in _tables(dst, tenant, partitions=True):  # S2 may be a server the tenant left: fenced
                dst.execute(
                    sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                        sql.Identifier(FENCE), sql.Identifier(tenant, table)
                    )
                )
            for table in tables:
                if table not in existing:
                    _create_like(src, dst, tenant, table)
                _create_partitions(src, dst, tenant, table)
            if existing | set(tables):
                dst.execute(
                    sql.SQL("TRUNCATE {}").format(
                        sql.SQL(", ").join(sql.Identifier(tenant, t) for t in sorted(existing | set(tables)))
                    )
                )
            for table in tables:
                started = time.monotonic()
                names = [c for c, _, _ in _columns(src, tenant, table)]
                wanted = {c for c, _, _ in _columns(dst, tenant, table)}
                missing = [c for c in names if c not in wanted]
                if missing:
                    raise StorageError(
                        f"tenant {tenant}: table {table}: column {missing[0]} on {source} is not on the new server"
                    )
                listed = sql.SQL(", ").join(map(sql.Identifier, names))
                name = sql.Identifier(tenant, table)
                with src.cursor() as out_cur, dst.cursor() as in_cur:
                    with (
                        out_cur.copy(
                            sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT BINARY)").format(listed, name)
                        ) as out,
                        in_cur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(name, listed)) as into,
                    ):
                        for block in out:
                            into.write(block)
                    rows[table] = max(in_cur.rowcount, 0)
                elapsed = time.monotonic() - started
                log.info(
                    "table copied",
                    extra=fields(tenant=tenant, table=table, rows=rows[table], seconds=round(elapsed, 2)),
                )
                if on_table is not None:
                    on_table(table, rows[table], elapsed)
            for seq, last, called in _sequences(src, tenant):
                dst.execute(
                    "SELECT setval(c.oid, %s, %s) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %s AND c.relname = %s AND c.relkind = 'S'",
                    (last, called, tenant, seq),
                )
            dst.execute(
                sql.SQL(
                    "INSERT INTO {}.{} (direction, peer, fenced_at, at, rows, host) VALUES ('in', %s, %s, %s, %s, %s)"
                ).format(schema, sql.Identifier(MOVE_TABLE)),
                (source, fenced_at, _now_ms(), sum(rows.values()), f"{socket.gethostname()}/{instance or os.getpid()}"),
            )
    return rows


def _sequences(conn: psycopg.Connection[Any], tenant: str) -> list[tuple[str, int, bool]]:
    names = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind = 'S' AND c.relname NOT LIKE %s",
        (tenant, f"{MOVE_TABLE}%"),
    ).fetchall()
    out = []
    for (name,) in names:
        row = conn.execute(
            sql.SQL("SELECT last_value, is_called FROM {}").format(sql.Identifier(tenant, name))
        ).fetchone()
        if row is not None:
            out.append((name, int(row[0]), bool(row[1])))
    return out
