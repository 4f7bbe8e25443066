"""Reading the buffer beside its writer: what to publish, and the figures ``agent status`` shows.

Every query the publisher runs on the event loop walks an index (``seq``,
``accepted.first_ms``, ``accepted.at_ms``) and stops at its limit, so a
buffer of hundreds of thousands of batches costs no more than a small one.
``read_stats`` (``agent status`` of a stopped agent) is the one full scan.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory_edge.errors import BufferError

from .buffer import ACCEPTED, NOT_LOST, PENDING, SOURCE, Batch, Counts, _size, open_db


@dataclass(frozen=True, slots=True)
class BufferStats:
    batches: int  # not yet accepted by the broker
    points: int
    bytes: int  # payload bytes of those
    oldest_ms: int | None
    unconfirmed: int  # accepted, waiting for the storage's confirmation (or, in broker mode, kept for replay)
    unconfirmed_points: int
    oldest_unconfirmed_ms: int | None
    next_seq: int
    dropped_points: int  # readings lost (not counting batches released to the broker's keeping)
    dropped_batches: int
    drops: dict[str, int]  # points dropped, by reason
    events: int
    disk_bytes: int  # database pages in use + WAL

    @property
    def backlog(self) -> int:
        return self.batches + self.unconfirmed


class BufferReader:
    """A read connection of its own: one owner (thread) at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = open_db(self.path, write=False)
        except sqlite3.DatabaseError as exc:
            raise BufferError(f"{self.path}: cannot open the buffer: {exc}") from exc

    def pending(self, after: int, limit: int, *, below: int | None = None) -> list[Batch]:
        """Batches never accepted by the broker, ``seq`` in (after, below), in order."""
        where, args = f"seq > ? AND {PENDING}", [after]
        if below is not None:
            where += " AND seq < ?"
            args.append(below)
        return self._batches(where, args, limit)

    def resend(self, after: int, limit: int, *, first_before: int, sent_before: int) -> list[Batch]:
        """Accepted batches due to be sent again: first accepted before ``first_before`` and last sent before
        ``sent_before`` (``delivery.py``), in seq order."""
        return self._batches(
            "seq > ? AND seq IN (SELECT seq FROM accepted WHERE first_ms < ? AND at_ms < ?)",
            [after, first_before, sent_before],
            limit,
        )

    def replay(self, after: int, limit: int, *, accepted_from: int) -> list[Batch]:
        """Broker mode: accepted batches the broker may have lost in a crash (accepted from this time on)."""
        return self._batches(
            "seq > ? AND seq IN (SELECT seq FROM accepted WHERE at_ms >= ?)", [after, accepted_from], limit
        )

    def oldest_unconfirmed(self) -> tuple[Batch, int] | None:
        """The batch the broker accepted first among those unconfirmed, and when it first did."""
        row = self._db.execute("SELECT seq, first_ms FROM accepted ORDER BY first_ms, seq LIMIT 1").fetchone()
        if row is None:
            return None
        found = self._batches("seq = ?", [row[0]], 1)
        return (found[0], row[1]) if found else None

    def newest_accepted_ms(self) -> int | None:
        newest: int | None = self._db.execute("SELECT max(at_ms) FROM accepted").fetchone()[0]
        return newest

    def _batches(self, where: str, args: Sequence[Any], limit: int) -> list[Batch]:
        rows = self._db.execute(
            f"SELECT seq, device, points, payload, at_ms FROM {SOURCE} WHERE {where} ORDER BY seq LIMIT ?",
            (*args, limit),
        )
        return [Batch(*row) for row in rows]

    def pending_events(self, limit: int) -> list[tuple[int, bytes]]:
        return list(self._db.execute("SELECT id, payload FROM events ORDER BY id LIMIT ?", (limit,)))

    def has_pending(self) -> bool:
        return self._db.execute(f"SELECT 1 FROM {SOURCE} WHERE {PENDING} LIMIT 1").fetchone() is not None

    def ages(self) -> tuple[int | None, int | None]:
        """When the oldest pending and the oldest unconfirmed batch were buffered (epoch ms)."""
        row = self._db.execute(f"SELECT created_ms FROM {SOURCE} WHERE {PENDING} ORDER BY seq LIMIT 1").fetchone()
        first = self._db.execute(
            "SELECT created_ms FROM batches WHERE seq = (SELECT min(seq) FROM accepted)"
        ).fetchone()
        return (row[0] if row else None, first[0] if first else None)

    def stats(
        self,
        counts: Counts | None = None,
        next_seq: int | None = None,
        *,
        ages: tuple[int | None, int | None] | None = None,
    ) -> BufferStats:
        """The figures; with the writer's ``counts`` no batch is counted, with ``ages`` (oldest pending, oldest
        unconfirmed) none is looked for (those can walk many accepted batches)."""
        return _stats(self._db, self.path, counts, next_seq, ages)

    def close(self) -> None:
        self._db.close()


def _stats(
    db: sqlite3.Connection,
    path: Path,
    counts: Counts | None = None,
    next_seq: int | None = None,
    ages: tuple[int | None, int | None] | None = None,
) -> BufferStats:
    meta = dict(db.execute("SELECT key, value FROM meta"))
    version = db.execute("PRAGMA user_version").fetchone()[0]
    source, accepted = (
        (SOURCE, ACCEPTED) if version >= 3 else ("batches", "acked_ms IS NOT NULL" if version == 2 else "0")
    )
    if counts is None:
        pending, points, size, unconfirmed, unconfirmed_points = db.execute(
            f"SELECT count(*) - count(CASE WHEN {accepted} THEN 1 END), "
            f"coalesce(sum(CASE WHEN {accepted} THEN 0 ELSE points END), 0), "
            f"coalesce(sum(CASE WHEN {accepted} THEN 0 ELSE length(payload) END), 0), "
            f"count(CASE WHEN {accepted} THEN 1 END), "
            f"coalesce(sum(CASE WHEN {accepted} THEN points ELSE 0 END), 0) FROM {source}"
        ).fetchone()
    else:
        pending, points, size = counts.pending_batches, counts.pending_points, counts.pending_bytes
        unconfirmed, unconfirmed_points = counts.unconfirmed_batches, counts.unconfirmed_points
    if ages is None:
        # The oldest of each: the first by seq (seqs follow creation).
        row = db.execute(f"SELECT created_ms FROM {source} WHERE NOT ({accepted}) ORDER BY seq LIMIT 1").fetchone()
        first = (
            db.execute("SELECT created_ms FROM batches WHERE seq = (SELECT min(seq) FROM accepted)").fetchone()
            if version >= 3
            else None
        )
        ages = (row[0] if row else None, first[0] if first else None)
    has_drops = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'drops'").fetchone()
    drops = dict(db.execute("SELECT reason, points FROM drops")) if has_drops else {}
    events = db.execute("SELECT count(*) FROM events").fetchone()[0]
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    used = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
    disk = used * page_size + _size(path.with_name(path.name + "-wal"))
    lost = {reason: n for reason, n in drops.items() if reason not in NOT_LOST}
    return BufferStats(
        pending,
        points,
        size,
        ages[0],
        unconfirmed,
        unconfirmed_points,
        ages[1],
        next_seq if next_seq is not None else meta.get("next_seq", 1),
        sum(lost.values()),
        meta.get("dropped_batches", 0),
        drops,
        events,
        disk,
    )


def read_stats(path: str | Path) -> BufferStats | None:
    """Buffer figures for ``agent status``, read-only, while the agent runs (WAL allows it)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.DatabaseError as exc:
        raise BufferError(f"{path}: cannot read the buffer: {exc}") from exc
    try:
        return _stats(db, path)
    except sqlite3.DatabaseError as exc:
        raise BufferError(f"{path}: cannot read the buffer: {exc}") from exc
    finally:
        db.close()
