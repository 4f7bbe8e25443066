"""Per-minute rollups of a tenant's SQLite points, so a month-long trend reads 43,200 rows, not millions.

On disk, ``<state dir>/rollup/<tenant>.db`` (the console's own file; the
tenant's store is only ever attached read-only):

- ``minute(gw, device, tag, minute, n, total, lo, hi)``: count, sum, min
  and max of the numeric readings whose ``ts`` falls in that minute;
- ``progress(rowid, source)``: the last rowid folded in, and of which
  table: ``samples`` (the store's readings by series id, schema 2 on) or
  ``points`` (older stores). A store converted in place numbers its rows
  anew, so a rollup that followed the other table is built again.

The readings only grow (the bridge appends, never updates), and SQLite
hands out rowids in increasing order, so folding ``rowid > progress`` in
chunks keeps the rollup exact: each point is counted once, whenever it
arrives, even a late batch with old timestamps. A trend whose buckets are
at least two minutes wide, or longer than 8 hours, is read from here once the rollup has caught up;
shorter ranges, and any range while a first build is still running, read
the raw points (``TenantData.trend``). PostgreSQL stores aggregate the raw
points in the database itself (TimescaleDB's chunks prune by time).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from factory_edge.errors import StorageError

from .tenantdata import Series

MINUTE_MS = 60_000
CHUNK_ROWS = 500_000
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS minute (gw TEXT NOT NULL, device TEXT NOT NULL, tag TEXT NOT NULL, "
    "minute INTEGER NOT NULL, n INTEGER NOT NULL, total REAL NOT NULL, lo REAL NOT NULL, hi REAL NOT NULL, "
    "PRIMARY KEY (gw, device, tag, minute)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS progress (id INTEGER PRIMARY KEY CHECK (id = 1), rowid INTEGER NOT NULL, "
    "source TEXT NOT NULL DEFAULT 'points')",
)
# What to fold in, by the store's shape: its readings' table, and a select of (gw, device, tag, ts, value) by rowid.
_SOURCES = {
    "samples": (
        "SELECT s.gw, s.device, s.tag, p.ts / ?, count(*), sum(p.value), min(p.value), max(p.value) "
        "FROM src.samples p JOIN src.series s ON s.id = p.series "
        "WHERE p.rowid > ? AND p.rowid <= ? AND typeof(p.value) IN ('integer', 'real') "
        "GROUP BY s.gw, s.device, s.tag, p.ts / ?"
    ),
    "points": (
        "SELECT gw, device, tag, ts / ?, count(*), sum(value), min(value), max(value) "
        "FROM src.points WHERE rowid > ? AND rowid <= ? AND typeof(value) IN ('integer', 'real') "
        "GROUP BY gw, device, tag, ts / ?"
    ),
}


class Rollup:
    """The rollup of one tenant's ``points``; ``refresh`` folds in what is new, ``trend`` reads it."""

    def __init__(self, state_dir: str | Path, store_file: Path, tenant: str) -> None:
        self.store_file = store_file
        self.tenant = tenant
        directory = Path(state_dir) / "rollup"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / f"{tenant}.db"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        for statement in _SCHEMA:
            self._db.execute(statement)
        self._attached = False
        self.behind = True  # until a refresh found nothing left to fold in

    def close(self) -> None:
        self._db.close()

    def _attach(self) -> bool:
        if not self._attached:
            if not self.store_file.exists():
                return False
            self._db.execute("ATTACH DATABASE ? AS src", (f"file:{self.store_file}?mode=ro",))
            self._attached = True
        return True

    def done_rowid(self, source: str = "points") -> int:
        """The last rowid of ``source`` folded in (a rollup that followed another table starts again)."""
        row = self._db.execute("SELECT rowid, source FROM progress WHERE id = 1").fetchone()
        if row is None:
            return 0
        if row[1] != source:
            self._db.execute("DELETE FROM minute")
            self._db.execute("DELETE FROM progress")
            return 0
        return int(row[0])

    def _source(self) -> str:
        found = self._db.execute("SELECT 1 FROM src.sqlite_master WHERE type = 'table' AND name = 'samples'")
        return "samples" if found.fetchone() else "points"

    def refresh(self, max_rows: int = CHUNK_ROWS) -> int:
        """Fold in up to ``max_rows`` new points; how many were read. ``behind`` says whether more wait."""
        with self._lock:
            try:
                if not self._attach():
                    self.behind = False
                    return 0
                source = self._source()
                start = self.done_rowid(source)
                top = self._db.execute(f"SELECT max(rowid) FROM src.{source}").fetchone()[0] or 0
                end = min(top, start + max_rows)
                if end <= start:
                    self.behind = False
                    return 0
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute(
                        f"INSERT INTO minute {_SOURCES[source]} "
                        "ON CONFLICT (gw, device, tag, minute) DO UPDATE SET n = n + excluded.n, "
                        "total = total + excluded.total, lo = min(lo, excluded.lo), hi = max(hi, excluded.hi)",
                        (MINUTE_MS, start, end, MINUTE_MS),
                    )
                    self._db.execute("INSERT OR REPLACE INTO progress VALUES (1, ?, ?)", (end, source))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self.behind = end < top
                return end - start
            except sqlite3.Error as exc:
                raise StorageError(f"{self.path}: rollup of {self.store_file}: {exc}") from exc

    def catch_up(self) -> None:
        while self.refresh() and self.behind:
            pass

    def trend(self, series: Series, start_ms: int, end_ms: int, buckets: int) -> list[list[Any]]:
        """Like ``TenantData.trend``, from whole minutes: ``start`` is rounded down and ``end`` up to a minute."""
        first, last = start_ms // MINUTE_MS, -(-end_ms // MINUTE_MS)
        width = max(1, -(-(last - first) // buckets))  # in minutes
        with self._lock:
            rows = self._db.execute(
                "SELECT (minute - ?) / ?, min(lo), max(hi), sum(total) / sum(n), sum(n) FROM minute "
                "WHERE gw = ? AND device = ? AND tag = ? AND minute >= ? AND minute < ? GROUP BY 1 ORDER BY 1",
                (first, width, series.gw, series.device, series.tag, first, last),
            ).fetchall()
        return [[(first + int(b) * width) * MINUTE_MS, lo, hi, mean, n] for b, lo, hi, mean, n in rows]


__all__ = ["MINUTE_MS", "Rollup"]
