"""The SQLite store's readings: series ids behind the ``points`` view, the migration from the first schema."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bridge.messages import DataBatch
from bridge.storage.base import SeriesIds
from bridge.storage.sqlite import _MIGRATIONS, SCHEMA_VERSION, SqliteStore

GW = "gw-01"


def rows(device: str, seq: int, readings: list[tuple[str, int, Any]]) -> DataBatch:
    return DataBatch(GW, device, seq, [(GW, device, tag, ts, v, "good", None, seq) for tag, ts, v in readings], 0)


def store_batches(store: SqliteStore, *batches: DataBatch) -> None:
    with store.transaction() as tx:
        tx.insert_points(tx.claim_batches(batches))


def points(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT gw, device, tag, ts, value, quality, error, seq FROM points ORDER BY seq, ts"
        ).fetchall()


def test_readings_read_back_through_points_with_every_column(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, "acme")
    store.open()
    try:
        store_batches(store, rows("press-1", 1, [("temp", 10, 71.5), ("recipe", 10, "PN-7"), ("count", 11, 2**60)]))
        store_batches(store, rows("press-2", 2, [("temp", 12, None)]), rows("press-1", 3, [("temp", 13, True)]))
        table = store.query("points", device="press-1", tag="temp")
    finally:
        store.close()
    assert points(store.path) == [
        (GW, "press-1", "temp", 10, 71.5, "good", None, 1),
        (GW, "press-1", "recipe", 10, "PN-7", "good", None, 1),
        (GW, "press-1", "count", 11, 2**60, "good", None, 1),
        (GW, "press-2", "temp", 12, None, "good", None, 2),
        (GW, "press-1", "temp", 13, 1, "good", None, 3),
    ]
    assert table.columns == ("gw", "device", "tag", "ts", "value", "quality", "error")
    assert table.rows == [(GW, "press-1", "temp", 13, 1, "good", None), (GW, "press-1", "temp", 10, 71.5, "good", None)]


def test_a_series_named_in_a_rolled_back_transaction_is_not_remembered(tmp_path: Path) -> None:
    """Two processes share the file: an id the first one saw in a transaction that failed may go to another series."""
    first, second = SqliteStore(tmp_path, "acme"), SqliteStore(tmp_path, "acme")
    first.open()
    second.open()
    try:
        with pytest.raises(RuntimeError):
            with first.transaction() as tx:
                tx.insert_points(tx.claim_batches([rows("press-1", 1, [("temp", 10, 1.0)])]))
                raise RuntimeError("the commit window failed")
        store_batches(second, rows("press-9", 2, [("speed", 20, 2.0)]))  # takes the id the failed one had
        store_batches(first, rows("press-1", 1, [("temp", 10, 1.0)]))
        store_batches(second, rows("press-1", 3, [("temp", 30, 3.0)]))
        store_batches(first, rows("press-9", 4, [("speed", 40, 4.0)]))
    finally:
        first.close()
        second.close()
    assert [(p[1], p[2], p[3]) for p in points(first.path)] == [
        ("press-1", "temp", 10),
        ("press-9", "speed", 20),
        ("press-1", "temp", 30),
        ("press-9", "speed", 40),
    ]


def test_more_series_than_the_id_cache_holds_are_still_stored_under_their_own_names(tmp_path: Path) -> None:
    """The ids in memory are forgotten all at once past the limit and asked for again, never mixed up."""
    store = SqliteStore(tmp_path, "acme")
    store.open()
    store._series = SeriesIds(limit=3)
    try:
        for seq in range(1, 31):  # each of the 15 series comes back after the cache was cleared
            device = f"press-{seq % 5}"
            store_batches(store, rows(device, seq, [(f"t{seq % 3}", seq * 10, float(seq))]))
            assert sum(len(tags) for tags in store._series.known.values()) <= 3 + 1
    finally:
        store.close()
    assert [(p[1], p[2], p[3], p[4]) for p in points(store.path)] == [
        (f"press-{seq % 5}", f"t{seq % 3}", seq * 10, float(seq)) for seq in range(1, 31)
    ]


def test_a_first_schema_database_migrates_with_its_readings_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "acme.db"
    with sqlite3.connect(path, isolation_level=None) as db:
        for statement in _MIGRATIONS[1].split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("PRAGMA user_version=1")
        old = [
            (GW, "press-1", "temp", 5, 70.0, "good", None, 1),
            (GW, "press-2", "temp", 5, "hot", "uncertain", None, 1),
            (GW, "press-1", "temp", 5, 71.0, "bad", "timeout", 2),  # same time again: both kept
            ("gw-02", "press-1", "temp", 6, 2**62, "good", None, 1),
        ]
        db.executemany("INSERT INTO points VALUES (?, ?, ?, ?, ?, ?, ?, ?)", old)
    store = SqliteStore(tmp_path, "acme")
    with caplog.at_level(logging.INFO, logger="bridge.storage.sqlite"):
        store.open()
    assert [r.getMessage() for r in caplog.records] == [
        "converting stored readings to series ids (once)",
        "stored readings converted",
    ]
    try:
        store_batches(store, rows("press-1", 3, [("temp", 7, 72.0)]))
        newest = store.query("points", gw=GW, limit=2).rows
        counts = dict(store.query("counts").rows)
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT * FROM points").fetchall() == [
            *old,
            (GW, "press-1", "temp", 7, 72.0, "good", None, 3),
        ]
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert newest == [
        (GW, "press-1", "temp", 7, 72.0, "good", None),
        (GW, "press-1", "temp", 5, 71.0, "bad", "timeout"),
    ]
    assert counts["points"] == 5 and counts["series"] == 3
