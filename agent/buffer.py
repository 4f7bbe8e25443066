"""Store-and-forward: every batch is on disk before it is published, and leaves only when acknowledged.

One SQLite database (WAL) in the state directory::

    batches(seq PRIMARY KEY, device, points, created_ms, payload)   the data, as published
    events(id PRIMARY KEY, created_ms, payload)                     gateway events awaiting publish
    meta(key PRIMARY KEY, value)                                    next_seq, drop counters

``seq`` is assigned here, per gateway, when points are buffered; it is
stored in the same transaction as the batches that use it, so it keeps
increasing across restarts and crashes. A batch's payload is final when
buffered: a redelivery after a crash is byte-identical, and the bridge
stores each ``(gw, seq)`` once.

The buffer is bounded by ``max_bytes`` (and optionally ``max_age``): when
full, the oldest batches go first, and the drop is counted and returned to
the caller to log and publish as an event.

Acknowledged batches are kept for ``replay_s`` more seconds and sent again
on the next connection. A broker acknowledges a message before it has
written it to disk (Mosquitto's ``autosave_interval``), so a broker that
crashes can lose what it acknowledged last; the replay covers that window,
and the bridge stores each ``(gw, seq)`` once.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.points import Point, now_ms
from factory_edge.errors import BufferError

SCHEMA_VERSION = 2
_MIGRATIONS = {
    1: """
        CREATE TABLE batches (
            seq INTEGER PRIMARY KEY,
            device TEXT NOT NULL,
            points INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            payload BLOB NOT NULL
        );
        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            created_ms INTEGER NOT NULL,
            payload BLOB NOT NULL
        );
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('next_seq', 1), ('dropped_points', 0), ('dropped_batches', 0);
    """,
    2: """
        ALTER TABLE batches ADD COLUMN acked_ms INTEGER;
        CREATE INDEX batches_acked ON batches (acked_ms) WHERE acked_ms IS NOT NULL;
    """,
}
PENDING = "acked_ms IS NULL"
MAX_EVENTS = 10_000


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    device: str
    points: int
    payload: bytes
    acked: bool = False  # already acknowledged once: sent again only to cover a broker crash


@dataclass(frozen=True, slots=True)
class Drop:
    """Batches removed to keep the buffer within its bounds."""

    batches: int
    points: int
    oldest_seq: int
    newest_seq: int
    reason: str  # "full" or "max_age"


@dataclass(frozen=True, slots=True)
class BufferStats:
    batches: int
    points: int
    bytes: int
    oldest_ms: int | None
    next_seq: int
    dropped_points: int
    dropped_batches: int
    events: int


_TAG_JSON: dict[str, str] = {}


def _point_json(point: Point) -> str:
    """One point as compact JSON, by hand: this runs for every point buffered."""
    value = point.value
    quality = point.quality.value
    error = point.error
    kind = type(value)
    if value is None:
        text = "null"
    elif kind is bool:
        text = "true" if value else "false"
    elif kind is int:
        text = str(value)
    elif kind is float:
        if math.isfinite(value):  # type: ignore[arg-type]
            text = repr(value)
        else:
            # JSON has no NaN or Infinity: the reading is bad, and says why.
            text, quality, error = "null", "bad", f"not a finite number ({value})"
    else:
        text = json.dumps(value if kind is str else str(value), ensure_ascii=False)
    tag = _TAG_JSON.get(point.tag)
    if tag is None:
        tag = _TAG_JSON[point.tag] = json.dumps(point.tag, ensure_ascii=False)
    if error is None:
        return f'{{"tag":{tag},"ts":{point.ts},"v":{text},"q":"{quality}"}}'
    return f'{{"tag":{tag},"ts":{point.ts},"v":{text},"q":"{quality}","err":{json.dumps(error, ensure_ascii=False)}}}'


class Buffer:
    """The agent's on-disk queue of batches. Not thread-safe: one owner (the agent's event loop)."""

    def __init__(self, path: str | Path, *, gateway: str, max_bytes: int, max_age_s: float | None = None,
                 fsync: bool = True, replay_s: float = 0.0) -> None:
        self.path = Path(path)
        self.gateway = gateway
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.replay_ms = int(replay_s * 1000)
        self._head = json.dumps(gateway)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed batch survives power loss too, not only kill -9.
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._migrate()
            self._reload_counters()
            self._next_seq = self._meta("next_seq")
        except sqlite3.DatabaseError as exc:
            raise BufferError(f"{self.path}: cannot open the buffer: {exc}") from exc

    # ------------------------------------------------------------ schema

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise BufferError(f"{self.path}: buffer schema {version} is newer than this agent ({SCHEMA_VERSION})")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction():
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={target}")

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    # ------------------------------------------------------------ writing

    def add(self, device: str, points: Sequence[Point], *, max_points: int, max_bytes: int) -> tuple[list[int], list[Drop]]:
        """Buffer one device's points as batches; returns their seqs and any drops it caused.

        One transaction: either every batch and the new ``next_seq`` are on
        disk when this returns, or nothing is.
        """
        if not points:
            return [], []
        created = now_ms()
        rows: list[tuple[int, str, int, int, bytes]] = []
        seq = self._next_seq
        head = f'{{"v":1,"gw":{self._head},"dev":{json.dumps(device)},"seq":'
        parts: list[str] = []
        size = 0
        for point in points:
            part = _point_json(point)
            if parts and (len(parts) >= max_points or size + len(part) + 1 > max_bytes):
                rows.append(self._row(seq, device, head, parts, created))
                seq += 1
                parts, size = [], 0
            parts.append(part)
            size += len(part) + 1
        rows.append(self._row(seq, device, head, parts, created))
        added_bytes = sum(len(r[4]) for r in rows)
        try:
            with self._transaction():
                self._db.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?, NULL)", rows)
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
                self._bytes += added_bytes
                self._points += len(points)
                self._batches += len(rows)
                drops = self._enforce_bounds(created)
        except sqlite3.DatabaseError as exc:
            self._reload_counters()
            raise BufferError(f"{self.path}: cannot store points: {exc}") from exc
        self._next_seq = seq + 1
        return [r[0] for r in rows], drops

    def _row(self, seq: int, device: str, head: str, parts: list[str], created: int) -> tuple[int, str, int, int, bytes]:
        payload = f'{head}{seq},"points":[{",".join(parts)}]}}'.encode()
        return (seq, device, len(parts), created, payload)

    def _enforce_bounds(self, now: int) -> list[Drop]:
        drops = []
        if self.max_age_s is not None:
            cutoff = now - int(self.max_age_s * 1000)
            drop = self._drop_where(f"{PENDING} AND created_ms < ?", (cutoff,), "max_age")
            if drop:
                drops.append(drop)
        if self._bytes + self._kept_bytes > self.max_bytes and self._kept_bytes:
            self._forget_acked(None)  # delivered already: the first to go
        if self._bytes > self.max_bytes:
            # Oldest first, until a tenth below the bound, so a full buffer
            # does not drop on every single poll.
            target = int(self.max_bytes * 0.9)
            cut = self._db.execute(
                f"SELECT seq FROM (SELECT seq, sum(length(payload)) OVER (ORDER BY seq DESC) AS kept "
                f"FROM batches WHERE {PENDING}) WHERE kept > ? ORDER BY seq DESC LIMIT 1", (target,)).fetchone()
            if cut:
                drop = self._drop_where(f"{PENDING} AND seq <= ?", (cut[0],), "full")
                if drop:
                    drops.append(drop)
        return drops

    def _forget_acked(self, before_ms: int | None) -> None:
        """Delete acknowledged batches (all, or those acknowledged before ``before_ms``)."""
        if before_ms is None:
            self._db.execute("DELETE FROM batches WHERE acked_ms IS NOT NULL")
            self._kept_bytes = 0
            return
        (size,) = self._db.execute("SELECT coalesce(sum(length(payload)), 0) FROM batches "
                                   "WHERE acked_ms IS NOT NULL AND acked_ms < ?", (before_ms,)).fetchone()
        if size:
            self._db.execute("DELETE FROM batches WHERE acked_ms IS NOT NULL AND acked_ms < ?", (before_ms,))
            self._kept_bytes -= size

    def _drop_where(self, condition: str, args: tuple[Any, ...], reason: str) -> Drop | None:
        row = self._db.execute(
            f"SELECT count(*), coalesce(sum(points), 0), coalesce(sum(length(payload)), 0), min(seq), max(seq) "
            f"FROM batches WHERE {condition}", args).fetchone()
        batches, points, size, oldest, newest = row
        if not batches:
            return None
        self._db.execute(f"DELETE FROM batches WHERE {condition}", args)
        self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped_points'", (points,))
        self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped_batches'", (batches,))
        self._bytes -= size
        self._points -= points
        self._batches -= batches
        return Drop(batches, points, oldest, newest, reason)

    def add_event(self, doc: dict[str, Any]) -> None:
        """Keep a gateway event until it is published (the newest MAX_EVENTS at most)."""
        payload = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            with self._transaction():
                self._db.execute("INSERT INTO events (created_ms, payload) VALUES (?, ?)", (now_ms(), payload))
                self._db.execute("DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - ?", (MAX_EVENTS,))
        except sqlite3.DatabaseError as exc:
            raise BufferError(f"{self.path}: cannot store event: {exc}") from exc

    # ------------------------------------------------------------ reading and acknowledging

    def batches_after(self, seq: int, limit: int, *, below: int | None = None, replay: bool = False) -> list[Batch]:
        """Up to ``limit`` unacknowledged batches with ``seq`` greater than ``seq`` (and less than ``below``),
        in order; with ``replay``, also those acknowledged within the replay window."""
        where = "seq > ?"
        args: list[Any] = [seq]
        if below is not None:
            where += " AND seq < ?"
            args.append(below)
        if replay and self.replay_ms:
            where += " AND (acked_ms IS NULL OR acked_ms >= ?)"
            args.append(now_ms() - self.replay_ms)
        else:
            where += f" AND {PENDING}"
        rows = self._db.execute(f"SELECT seq, device, points, payload, acked_ms IS NOT NULL FROM batches "
                                f"WHERE {where} ORDER BY seq LIMIT ?", (*args, limit))
        return [Batch(seq_, device, points, payload, bool(acked)) for seq_, device, points, payload, acked in rows]

    def ack(self, seqs: Iterable[int]) -> None:
        """The broker has these batches (one transaction): forget them, or keep them for the replay window."""
        seqs = list(seqs)
        if not seqs:
            return
        marks = ",".join("?" * len(seqs))
        now = now_ms()
        try:
            with self._transaction():
                size, points, count = self._db.execute(
                    f"SELECT coalesce(sum(length(payload)), 0), coalesce(sum(points), 0), count(*) "
                    f"FROM batches WHERE {PENDING} AND seq IN ({marks})", seqs).fetchone()
                if self.replay_ms:
                    self._db.execute(f"UPDATE batches SET acked_ms = ? WHERE {PENDING} AND seq IN ({marks})",
                                     (now, *seqs))
                    self._kept_bytes += size
                    self._forget_acked(now - self.replay_ms)
                else:
                    self._db.execute(f"DELETE FROM batches WHERE seq IN ({marks})", seqs)
        except sqlite3.DatabaseError as exc:
            self._reload_counters()
            raise BufferError(f"{self.path}: cannot acknowledge batches: {exc}") from exc
        self._bytes -= size
        self._points -= points
        self._batches -= count

    def pending_events(self, limit: int) -> list[tuple[int, bytes]]:
        return list(self._db.execute("SELECT id, payload FROM events ORDER BY id LIMIT ?", (limit,)))

    def ack_events(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        if ids:
            with self._transaction():
                self._db.execute(f"DELETE FROM events WHERE id IN ({','.join('?' * len(ids))})", ids)

    # ------------------------------------------------------------ state

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def depth(self) -> int:
        """Batches waiting for an acknowledgement."""
        return self._batches

    def stats(self) -> BufferStats:
        oldest = self._db.execute(f"SELECT min(created_ms) FROM batches WHERE {PENDING}").fetchone()[0]
        events = self._db.execute("SELECT count(*) FROM events").fetchone()[0]
        return BufferStats(self._batches, self._points, self._bytes, oldest, self._next_seq,
                           self._meta("dropped_points"), self._meta("dropped_batches"), events)

    def _reload_counters(self) -> None:
        """Pending figures and the bytes of acknowledged batches kept for replay, from the database."""
        self._bytes, self._points, self._batches = self._db.execute(
            f"SELECT coalesce(sum(length(payload)), 0), coalesce(sum(points), 0), count(*) FROM batches "
            f"WHERE {PENDING}").fetchone()
        (self._kept_bytes,) = self._db.execute(
            "SELECT coalesce(sum(length(payload)), 0) FROM batches WHERE acked_ms IS NOT NULL").fetchone()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on any error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def read_stats(path: str | Path) -> BufferStats | None:
    """Buffer figures for ``agent status``, read-only, while the agent runs (WAL allows it)."""
    path = Path(path)
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        size, points, batches, oldest = db.execute(
            "SELECT coalesce(sum(length(payload)), 0), coalesce(sum(points), 0), count(*), min(created_ms) FROM batches "
            + ("WHERE acked_ms IS NULL" if "acked_ms" in {c[1] for c in db.execute("PRAGMA table_info(batches)")} else "")
        ).fetchone()
        events = db.execute("SELECT count(*) FROM events").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise BufferError(f"{path}: cannot read the buffer: {exc}") from exc
    finally:
        db.close()
    return BufferStats(batches, points, size, oldest, meta.get("next_seq", 1), meta.get("dropped_points", 0),
                       meta.get("dropped_batches", 0), events)


def age_seconds(oldest_ms: int | None) -> float | None:
    return None if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000)
