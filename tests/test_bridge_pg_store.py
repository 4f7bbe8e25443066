"""The PostgreSQL store's readings: series ids behind the ``points`` view, day partitions made ahead, the
in-place migration of older schemas, and retention that drops whole partitions while ingest goes on."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from bridge.messages import DataBatch
from bridge.storage.base import DataRejected
from bridge.storage.postgres import _MIGRATIONS, DAY_MS, SCHEMA_VERSION, PostgresStore
from factory_edge.errors import StorageError
from tests.bridge_fixtures import pg_dsn, pg_schemas, unique_tenant

__all__ = ["pg_dsn", "pg_schemas"]  # fixtures used here

GW = "gw-01"


def rows(device: str, seq: int, readings: list[tuple[str, int, Any]]) -> DataBatch:
    return DataBatch(GW, device, seq, [(GW, device, tag, ts, v, "good", None, seq) for tag, ts, v in readings], 0)


def store_batches(store: PostgresStore, *batches: DataBatch) -> list[DataBatch]:
    with store.transaction() as tx:
        claimed = tx.claim_batches(batches)
        tx.insert_points(claimed)
    return claimed


def sql(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def partitions(dsn: str, tenant: str) -> list[str]:
    """The catalog's partitions of ``samples``, by name."""
    return sorted(
        name
        for (name,) in sql(
            dsn,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(%s)",
            (f'"{tenant}".samples',),
        )
    )


def day_name(ms: int) -> str:
    return "samples_" + time.strftime("%Y%m%d", time.gmtime(ms / 1000))


@pytest.fixture
def tenant(pg_schemas: list[str]) -> str:
    name = unique_tenant("pgstore")
    pg_schemas.append(name)
    return name


def test_readings_read_back_through_points_with_every_column(pg_dsn: str, tenant: str) -> None:
    now = int(time.time() * 1000)
    store = PostgresStore(pg_dsn, tenant)
    store.open()
    try:
        store_batches(
            store, rows("press-1", 1, [("temp", now, 71.5), ("recipe", now, "PN-7"), ("count", now + 1, 2**60)])
        )
        store_batches(store, rows("press-2", 2, [("temp", now + 2, None)]), rows("press-1", 3, [("temp", now + 3, 7)]))
        assert store_batches(store, rows("press-1", 1, [("temp", now, 71.5)])) == []  # (gw, seq) stored once
        table = store.query("points", device="press-1", tag="temp")
    finally:
        store.close()
    assert sql(
        pg_dsn,
        f'SELECT gw, device, tag, ts, value, value_text, quality, error, seq FROM "{tenant}".points ORDER BY seq, ts',
    ) == [
        (GW, "press-1", "temp", now, 71.5, None, "good", None, 1),
        (GW, "press-1", "recipe", now, None, "PN-7", "good", None, 1),
        (GW, "press-1", "count", now + 1, float(2**60), str(2**60), "good", None, 1),
        (GW, "press-2", "temp", now + 2, None, None, "good", None, 2),
        (GW, "press-1", "temp", now + 3, 7.0, None, "good", None, 3),
    ]
    assert table.rows == [
        (GW, "press-1", "temp", now + 3, 7, "good", None),
        (GW, "press-1", "temp", now, 71.5, "good", None),
    ]
    # Each series is named once; the readings carry its id.
    assert sql(pg_dsn, f'SELECT count(*) FROM "{tenant}".series') == [(4,)]
    kinds = dict(
        sql(pg_dsn, "SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = %s", (tenant,))
    )
    assert kinds["points"] == "VIEW" and "samples" in kinds and "series" in kinds


def test_day_partitions_are_made_ahead_and_a_reading_outside_them_waits_in_the_default(
    pg_dsn: str, tenant: str
) -> None:
    now = int(time.time() * 1000)
    store = PostgresStore(pg_dsn, tenant)
    store.open()
    try:
        # Yesterday, today and the next two days exist from the start, and the default for the rest.
        expected = {day_name(now + d * DAY_MS) for d in (-1, 0, 1, 2)}
        assert set(partitions(pg_dsn, tenant)) == expected | {"samples_default"}
        later = now + 5 * DAY_MS  # a gateway whose clock is days ahead
        store_batches(store, rows("press-1", 1, [("temp", now, 1.0), ("temp", later, 2.0)]))
        assert sql(pg_dsn, f'SELECT ts FROM "{tenant}".samples_default') == [(later,)]
        # Time moves: the day comes within reach, gets its partition, and the reading moves into it.
        created = store.maintain(later - 2 * DAY_MS)
        assert day_name(later) in created
        assert sql(pg_dsn, f'SELECT count(*) FROM "{tenant}".samples_default') == [(0,)]
        assert sql(pg_dsn, f'SELECT ts FROM "{tenant}".{day_name(later)}') == [(later,)]
        assert sql(pg_dsn, f'SELECT ts, value FROM "{tenant}".points ORDER BY ts') == [(now, 1.0), (later, 2.0)]
        # A reading two months old (a clock gone wrong, or a very long outage) stays in the default.
        store_batches(store, rows("press-1", 2, [("temp", now - 60 * DAY_MS, 3.0)]))
        assert store.maintain(now) == []
        assert sql(pg_dsn, f'SELECT value FROM "{tenant}".samples_default') == [(3.0,)]
    finally:
        store.close()


def test_an_older_schema_is_migrated_in_place(pg_dsn: str, tenant: str) -> None:
    """A schema of version 3 (``points`` a table keyed by names) keeps every reading, now in day partitions."""
    now = int(time.time() * 1000)
    old = [
        (GW, "press-1", "temp", now - 3 * DAY_MS, 1.5, None, "good", None, 1),
        (GW, "press-1", "recipe", now - 3 * DAY_MS, None, "PN-7", "good", None, 1),
        (GW, "press-2", "temp", now, 2.5, None, "bad", "timeout", 2),
    ]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{tenant}"')
        conn.execute(f'CREATE TABLE "{tenant}".schema_version (version integer NOT NULL)')
        for version in (1, 2, 3):
            for statement in _MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement.replace("{s}", f'"{tenant}"'))
            conn.execute(f'INSERT INTO "{tenant}".schema_version VALUES ({version})')
        with conn.cursor() as cursor:
            cursor.executemany(f'INSERT INTO "{tenant}".points VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)', old)
            cursor.execute(f'INSERT INTO "{tenant}".points_minute VALUES (%s, %s, %s, 1, 1, 1.5, 1.5, 1.5)', old[0][:3])
    store = PostgresStore(pg_dsn, tenant)
    store.open()
    try:
        store_batches(store, rows("press-1", 3, [("temp", now + 1, 3.5)]))
    finally:
        store.close()
    assert sql(pg_dsn, f'SELECT max(version) FROM "{tenant}".schema_version') == [(SCHEMA_VERSION,)]
    assert sql(
        pg_dsn,
        f'SELECT gw, device, tag, ts, value, value_text, quality, error, seq FROM "{tenant}".points ORDER BY ts, tag',
    ) == [*sorted(old[:2], key=lambda r: r[2]), old[2], (GW, "press-1", "temp", now + 1, 3.5, None, "good", None, 3)]
    assert day_name(now - 3 * DAY_MS) in partitions(pg_dsn, tenant)  # the old day got its own partition
    assert sql(pg_dsn, f'SELECT count(*) FROM "{tenant}".samples_default') == [(0,)]
    assert sql(pg_dsn, f'SELECT count(*) FROM "{tenant}".points_minute') == [(2,)]


def test_retention_drops_old_day_partitions_while_ingest_goes_on(pg_dsn: str, tenant: str) -> None:
    now = int(time.time() * 1000)
    store = PostgresStore(pg_dsn, tenant)
    store.open()
    try:
        for seq, age in enumerate((40, 31, 30, 3, 0), start=1):  # days old
            store_batches(store, rows("press-1", seq, [("temp", now - age * DAY_MS, float(age))]))
        store.maintain(now)  # the days of the last month get their partitions; the 40-day-old stays in the default
        before = partitions(pg_dsn, tenant)
        assert {day_name(now - age * DAY_MS) for age in (31, 30, 3, 0)} <= set(before)
        assert day_name(now - 40 * DAY_MS) not in before
        assert sql(pg_dsn, f'SELECT value FROM "{tenant}".samples_default') == [(40.0,)]

        # Ingest goes on in another process's connection while the retention runs.
        writer = PostgresStore(pg_dsn, tenant)
        writer.open()
        stop, stored, errors = threading.Event(), [0], []

        def ingest() -> None:
            seq = 1000
            try:
                while not stop.is_set():
                    seq += 1
                    store_batches(writer, rows("press-2", seq, [(f"t{i}", now + i, float(i)) for i in range(100)]))
                    stored[0] += 100
            except Exception as exc:  # reported by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=ingest)
        thread.start()
        try:
            time.sleep(0.3)
            dropped = store.expire(now - 30 * DAY_MS)
            created = store.maintain(now + 2 * DAY_MS)  # and the next days' partitions are attached meanwhile
            time.sleep(0.3)
        finally:
            stop.set()
            thread.join(30)
            writer.close()
        assert errors == []
        after = partitions(pg_dsn, tenant)
        assert created == [day_name(now + 3 * DAY_MS), day_name(now + 4 * DAY_MS)]
    finally:
        store.close()
    # Whole days wholly before the cut are gone from the catalog; the day of the cut and newer stay.
    gone = day_name(now - 31 * DAY_MS)
    assert dropped == len([p for p in before if p != "samples_default" and p < day_name(now - 30 * DAY_MS)])
    assert gone in before and gone not in after
    assert {day_name(now - 30 * DAY_MS), day_name(now - 3 * DAY_MS), day_name(now), "samples_default"} <= set(after)
    assert sql(pg_dsn, f'SELECT value FROM "{tenant}".points WHERE device = %s ORDER BY ts', ("press-1",)) == [
        (30.0,),
        (3.0,),
        (0.0,),
    ]
    assert stored[0] > 0
    assert sql(pg_dsn, f'SELECT count(*) FROM "{tenant}".points WHERE device = %s', ("press-2",)) == [(stored[0],)]


def test_old_readings_in_the_default_partition_are_deleted(pg_dsn: str, tenant: str) -> None:
    store = PostgresStore(pg_dsn, tenant)
    store.open()
    try:
        store_batches(store, rows("press-1", 1, [("temp", -5, 1.0), ("temp", 1000, 2.0)]))  # days with no partition
        assert sql(pg_dsn, f'SELECT count(*) FROM "{tenant}".samples_default') == [(2,)]
        store.expire(0)
        assert sql(pg_dsn, f'SELECT ts FROM "{tenant}".points') == [(1000,)]
    finally:
        store.close()


def test_a_series_named_in_a_rolled_back_transaction_is_not_remembered(pg_dsn: str, tenant: str) -> None:
    first, second = PostgresStore(pg_dsn, tenant), PostgresStore(pg_dsn, tenant)
    first.open()
    second.open()
    now = int(time.time() * 1000)
    try:
        with pytest.raises(RuntimeError), first.transaction() as tx:
            tx.insert_points(tx.claim_batches([rows("press-1", 1, [("temp", now, 1.0)])]))
            raise RuntimeError("the window fails after the series was named")
        store_batches(second, rows("press-1", 2, [("other", now, 2.0)]))
        store_batches(first, rows("press-1", 3, [("temp", now, 3.0)]))
    finally:
        first.close()
        second.close()
    assert sql(pg_dsn, f'SELECT tag, value FROM "{tenant}".points ORDER BY seq') == [("other", 2.0), ("temp", 3.0)]


def test_readings_scattered_over_years_of_past_days_do_not_make_a_partition_each(pg_dsn: str, tenant: str) -> None:
    """A gateway (a bad clock, or hostile) spreads one batch over 400 days of 2001-2002: the upkeep makes no
    400 partitions (each a table the planner and every lock of ``points`` must carry); the readings stay
    readable in the default partition, and a retention removes them there."""
    now = int(time.time() * 1000)
    store = PostgresStore(pg_dsn, tenant)
    store.open()
    try:
        first_day = 11_323  # 2001-01-01
        store_batches(store, rows("press-1", 1, [("temp", (first_day + d) * DAY_MS + 1, float(d)) for d in range(400)]))
        store.maintain(now)
        store.close()
        store.open()  # a bridge starting makes its partitions too
        made = [p for p in partitions(pg_dsn, tenant) if p != "samples_default"]
        assert len(made) <= 4 + 2, made  # yesterday to two days ahead, and nothing for 2001
        assert sql(pg_dsn, f'SELECT count(*) FROM "{tenant}".points') == [(400,)]
        store.expire(now - 30 * DAY_MS)
        assert sql(pg_dsn, f'SELECT count(*) FROM "{tenant}".points') == [(0,)]
    finally:
        store.close()


def test_readings_of_last_week_get_their_day_partitions(pg_dsn: str, tenant: str) -> None:
    """A gateway back after a week offline sends its buffer: those days get partitions (retention drops them whole)."""
    now = int(time.time() * 1000)
    store = PostgresStore(pg_dsn, tenant)
    store.open()
    try:
        store_batches(store, rows("press-1", 1, [("temp", now - d * DAY_MS, float(d)) for d in range(2, 8)]))
        created = store.maintain(now)
        assert sorted(created) == sorted(day_name(now - d * DAY_MS) for d in range(2, 8))
        assert sql(pg_dsn, f'SELECT count(*) FROM "{tenant}".samples_default') == [(0,)]
    finally:
        store.close()


def test_retention_removes_the_per_minute_sums_of_the_readings_it_removes(pg_dsn: str, tenant: str) -> None:
    """``points_minute`` holds one reading a minute whole (n = 1, total = the value): kept for ever, it would keep
    a tenant that sends a reading a minute past its plan's retention. Its minutes past the cut (behind, or ahead)
    go with the readings."""
    now = int(time.time() * 1000)
    store = PostgresStore(pg_dsn, tenant)
    store.open()
    try:
        old, ahead = now - 20 * DAY_MS, 4_102_444_800_000  # 2100
        store_batches(
            store,
            rows("press-1", 1, [("temp", old, 1.0), ("temp", old + 60_000, 2.0), ("temp", now, 3.0)]),
            rows("press-2", 2, [("temp", ahead, 4.0), ("rpm", now, 5.0)]),
        )
        assert sql(pg_dsn, f'SELECT count(*) FROM "{tenant}".points_minute') == [(5,)]
        store.expire(now - 7 * DAY_MS, now + 7 * DAY_MS)
    finally:
        store.close()
    assert sql(pg_dsn, f'SELECT device, tag, total FROM "{tenant}".points_minute ORDER BY device, tag') == [
        ("press-1", "temp", 3.0),
        ("press-2", "rpm", 5.0),
    ]


def test_a_tenant_named_after_a_schema_postgresql_owns_is_refused(pg_dsn: str) -> None:
    """A bridge config (or an older registry) naming a tenant ``public``: its tables would land among the
    database's own, and a move would fence and empty all of them. Refused in one line, nothing created."""
    catalog = "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s"
    before = sql(pg_dsn, catalog, ("public",))
    for name in ("public", "pg_catalog", "pg_toast", "information_schema"):
        store = PostgresStore(pg_dsn, name)
        with pytest.raises(StorageError, match=f"tenant {name}: .*PostgreSQL"):
            store.open()
    assert sql(pg_dsn, catalog, ("public",)) == before


def test_a_window_the_database_refuses_leaves_nothing_behind_and_the_next_one_stores(pg_dsn: str, tenant: str) -> None:
    """The ingest loop then stores the window message by message, the refused one as a dead letter."""
    now = int(time.time() * 1000)
    store = PostgresStore(pg_dsn, tenant)
    store.open()
    try:
        good, bad = rows("press-1", 1, [("temp", now, 1.0)]), rows("press-2", 2, [("label", now, "a\x00b")])
        with pytest.raises(DataRejected), store.transaction() as tx:
            tx.insert_points(tx.claim_batches([good, bad]))
        assert store_batches(store, good) == [good]  # its claim was rolled back with the window
    finally:
        store.close()
    assert sql(pg_dsn, f'SELECT device, tag, value FROM "{tenant}".points') == [("press-1", "temp", 1.0)]
    assert sql(pg_dsn, f'SELECT gw, seq FROM "{tenant}".batches') == [(GW, 1)]


def test_two_processes_naming_the_same_new_series_at_once_share_one_id(pg_dsn: str, tenant: str) -> None:
    now = int(time.time() * 1000)
    stores = [PostgresStore(pg_dsn, tenant) for _ in range(2)]
    for store in stores:
        store.open()
    start, errors = threading.Barrier(2), []

    def write(i: int) -> None:
        try:
            start.wait(10)
            for n in range(20):  # each window names the same 50 new series as the other process's
                tags = [(f"t{n}-{k}", now + i, float(i)) for k in range(50)]
                store_batches(stores[i], rows("press-1", 1000 * i + n, tags))
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for store in stores:
        store.close()
    assert errors == []
    assert sql(pg_dsn, f'SELECT count(*), count(DISTINCT (gw, device, tag)) FROM "{tenant}".series') == [(1000, 1000)]
    assert sql(pg_dsn, f'SELECT count(*) FROM "{tenant}".points') == [(2000,)]
    assert sql(pg_dsn, f'SELECT count(*) FROM "{tenant}".points GROUP BY tag ORDER BY 1 LIMIT 1') == [(2,)]
