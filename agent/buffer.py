"""Store-and-forward: every reading is on disk before it is published, and leaves only once it is safe.

One SQLite database (WAL) in the state directory::

    batches(seq PRIMARY KEY, device, points, created_ms, payload)   the data, as published
    accepted(seq PRIMARY KEY, at_ms, first_ms)                       the broker's PUBACKs: the latest, the first
    events(id PRIMARY KEY, created_ms, payload)                      gateway events awaiting publish
    meta(key PRIMARY KEY, value)                                     next_seq, drop totals
    drops(reason PRIMARY KEY, points, batches)                       drops by reason

``accepted`` is a table of its own so that marking a batch costs a small
row, not a rewrite of its payload. ``seq`` is assigned here, per gateway,
in the same transaction as the batches that use it, so it keeps increasing
across restarts and crashes; a new buffer starts its seqs at its creation
time in milliseconds × 1000, so a replaced box (or a deleted buffer) never
reuses a seq the tenant's store already holds for that gateway. A batch's
payload is final when buffered: a redelivery is byte-identical, and the
bridge stores each ``(gw, seq)`` once.

A batch's life: buffered → accepted by the broker → deleted when safe,
which depends on ``confirm``:

- ``storage``: the bridge's confirmation that the tenant's storage has
  committed it (``gw/{gw}/ack``). A broker acknowledges before it has
  saved and a crash loses what it held for an absent bridge, so a PUBACK
  proves little; ``delivery.py`` decides when an accepted batch is sent
  again (the first PUBACK's time orders them, the latest one times them).
- ``broker``: the PUBACK, for consumers other than the bridge; accepted
  batches are kept a little while and replayed after a reconnect.

Bounds: ``max_bytes`` bounds the files on disk (pages in use plus the WAL,
capped by ``journal_size_limit``). When a write would pass it, batches the
broker already accepted go first, oldest first (counted as ``released``:
the broker still holds them, they are no longer kept to be sent again),
then the oldest others (``full``: lost). ``max_age`` drops what waited too
long. Every drop is counted by reason and recorded as a ``buffer_drop``
event.

One thread writes (``writer.py``); readers open their own connection
(``bufferread.py``), which WAL lets run beside the writer. The writer keeps
the backlog's figures in memory, so status reads cost no scan.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from drivers.points import Point, now_ms
from factory_edge.acks import Range
from factory_edge.errors import BufferError

from .pointjson import Body, bodies, rebatch

Confirm = Literal["storage", "broker"]
SCHEMA_VERSION = 4
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
    3: """
        CREATE TABLE accepted (seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL);
        CREATE INDEX accepted_at ON accepted (at_ms);
        INSERT INTO accepted SELECT seq, acked_ms FROM batches WHERE acked_ms IS NOT NULL;
        DROP INDEX IF EXISTS batches_acked;
        ALTER TABLE batches DROP COLUMN acked_ms;
        CREATE TRIGGER batches_gone AFTER DELETE ON batches BEGIN
            DELETE FROM accepted WHERE seq = old.seq;
        END;
        CREATE TABLE drops (reason TEXT PRIMARY KEY, points INTEGER NOT NULL, batches INTEGER NOT NULL);
        INSERT INTO drops SELECT 'full', m1.value, m2.value FROM meta m1, meta m2
            WHERE m1.key = 'dropped_points' AND m2.key = 'dropped_batches' AND m1.value > 0;
    """,
    4: """
        ALTER TABLE accepted ADD COLUMN first_ms INTEGER;
        UPDATE accepted SET first_ms = at_ms;
        CREATE INDEX accepted_first ON accepted (first_ms);
        CREATE INDEX batches_created ON batches (created_ms);
    """,
}
SOURCE = "batches LEFT JOIN accepted USING (seq)"  # at_ms, first_ms: NULL until the broker accepts the batch
PENDING = "at_ms IS NULL"
ACCEPTED = "at_ms IS NOT NULL"
NOT_LOST = frozenset({"released"})  # drops that are not readings lost: left out of the dropped totals
MAX_EVENTS = 10_000
MIN_MAX_BYTES = 1024 * 1024
ROW_OVERHEAD = 48  # bytes a batch row costs beyond its payload (key, columns, b-tree cell)
DROP_TO = 0.9  # a full buffer drops down to this share of its budget, so it does not drop on every poll
SEQ_FLOOR_MS = 1_767_225_600_000  # 2026-01-01: a clock behind this (no RTC yet) still starts seqs high


def wal_limit(max_bytes: int) -> int:
    """The WAL's share of ``max_bytes``: an eighth, between 128 KiB and 1 MiB.

    Small on purpose: the WAL only shrinks at a checkpoint, and a WAL that
    outgrows the free space leaves no room even to delete confirmed batches.
    """
    return max(128 * 1024, min(1024 * 1024, max_bytes // 8))


def first_seq(clock_ms: int) -> int:
    """Where a new buffer's seqs start: above any seq an earlier buffer of the same gateway can have used."""
    return max(clock_ms, SEQ_FLOOR_MS) * 1000


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    device: str
    points: int
    payload: bytes
    accepted_ms: int | None = None  # when the broker last acknowledged it (None: never)


@dataclass(frozen=True, slots=True)
class Drop:
    """Batches (or readings never buffered) given up, and why."""

    batches: int
    points: int
    oldest_seq: int | None
    newest_seq: int | None
    reason: str  # "full", "released", "max_age", "disk_full", "queue_full", "too_large"
    accepted: int = 0  # of the batches, those the broker had accepted

    def event(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": "buffer_drop",
            "ts": now_ms(),
            "reason": self.reason,
            "points": self.points,
            "batches": self.batches,
        }
        if self.oldest_seq is not None:
            doc.update(seq_from=self.oldest_seq, seq_to=self.newest_seq)
        if self.accepted:
            doc["accepted"] = self.accepted
        return doc


@dataclass(frozen=True, slots=True)
class Confirmed:
    batches: int
    points: int
    newest_first_ms: int | None  # the latest first acceptance among them (the order the broker had them in)


@dataclass(slots=True)
class Counts:
    """The backlog's figures, kept by the writer as it writes."""

    pending_batches: int = 0
    pending_points: int = 0
    pending_bytes: int = 0
    unconfirmed_batches: int = 0
    unconfirmed_points: int = 0


class Buffer:
    """The agent's on-disk queue of batches, written by one thread."""

    def __init__(
        self,
        path: str | Path,
        *,
        gateway: str,
        max_bytes: int,
        max_age_s: float | None = None,
        fsync: bool = True,
        confirm: Confirm = "storage",
    ) -> None:
        self.path = Path(path)
        self.gateway = gateway
        self.max_bytes = max(max_bytes, MIN_MAX_BYTES)
        self.max_age_s = max_age_s
        self.confirm = confirm
        self._head = json.dumps(gateway)
        self._gateway = gateway
        self._tags: dict[str, str] = {}
        self._next_seq = 1
        self.committed_next_seq = 1  # what readers can see: batches below it are on disk
        self.counts = Counts()
        # Whoever writes holds this: closing the connection under a running statement would crash the process.
        self.lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = open_db(self.path, fsync=fsync)
            self.page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
            wal = wal_limit(self.max_bytes)
            # The WAL is reset after each checkpoint and truncated to this size.
            self._db.execute(f"PRAGMA journal_size_limit={wal}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={max(8, wal // self.page_size // 2)}")
            self.db_budget = self.max_bytes - wal - 8 * self.page_size
            self.max_transaction_bytes = wal // 4  # keeps one transaction's WAL frames within the WAL's share
            self._migrate()
            self._next_seq = self.committed_next_seq = self._meta("next_seq")
            self.counts = self._count_all()
        except sqlite3.DatabaseError as exc:
            raise BufferError(f"{self.path}: cannot open the buffer: {exc}") from exc

    # ------------------------------------------------------------ schema

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise BufferError(f"{self.path}: buffer schema {version} is newer than this agent ({SCHEMA_VERSION})")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.transaction():
                for statement in _statements(_MIGRATIONS[target]):
                    self._db.execute(statement)
                if version == 0 and target == SCHEMA_VERSION:  # a new buffer: seqs no earlier one has used
                    self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (first_seq(now_ms()),))
                self._db.execute(f"PRAGMA user_version={target}")

    def transaction(self) -> _Transaction:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on any error); the methods below run inside one."""
        return _Transaction(self)

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def _count_all(self) -> Counts:
        row = self._db.execute(
            f"SELECT count(*) - count(at_ms), coalesce(sum(CASE WHEN {PENDING} THEN points END), 0), "
            f"coalesce(sum(CASE WHEN {PENDING} THEN length(payload) END), 0), count(at_ms), "
            f"coalesce(sum(CASE WHEN {ACCEPTED} THEN points END), 0) FROM {SOURCE}"
        ).fetchone()
        return Counts(*row)

    def figures(self) -> Counts:
        """A consistent copy of the backlog's figures (any thread)."""
        with self.lock:
            return replace(self.counts)

    # ------------------------------------------------------------ size

    def used_bytes(self) -> int:
        """Database pages in use (the freelist is reused before the file grows)."""
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages - free) * self.page_size

    def free_pages_bytes(self) -> int:
        with self.lock:
            return int(self._db.execute("PRAGMA freelist_count").fetchone()[0]) * self.page_size

    def disk_bytes(self) -> int:
        """What the buffer occupies on disk now: database and WAL files."""
        return sum(_size(self.path.with_name(self.path.name + suffix)) for suffix in ("", "-wal"))

    # ------------------------------------------------------------ writing (inside a transaction)

    def encode(self, device: str, points: Sequence[Point], *, max_points: int, max_bytes: int) -> list[Body]:
        """Points as batch bodies ``(device, points, body)``, cut by ``max_points`` and ``max_bytes``."""
        return bodies(device, points, self._tags, max_points=max_points, max_bytes=max_bytes)

    def insert(self, encoded: Sequence[Body], created_ms: int) -> list[int]:
        """Store encoded batches with the next seqs; returns them."""
        seq = self._next_seq
        rows = []
        for device, count, body in encoded:
            payload = self._payload(device, seq, body)
            rows.append((seq, device, count, created_ms, payload.encode()))
            seq += 1
        self._db.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?)", rows)
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq,))
        self._next_seq = seq
        c = self.counts
        c.pending_batches += len(rows)
        c.pending_points += sum(r[2] for r in rows)
        c.pending_bytes += sum(len(r[4]) for r in rows)
        return [r[0] for r in rows]

    def _payload(self, device: str, seq: int, body: str) -> str:
        """A batch as published: the envelope around its points (``body``, the array without brackets)."""
        return f'{{"v":1,"gw":{self._head},"dev":{json.dumps(device)},"seq":{seq},"points":[{body}]}}'

    def make_room(self, needed: int, now: int) -> list[Drop]:
        """Before writing about ``needed`` bytes: drop what ``max_age`` and ``max_bytes`` require."""
        drops = []
        if self.max_age_s is not None:
            cutoff = now - int(self.max_age_s * 1000)
            drop = self._drop_where(f"{PENDING} AND created_ms < ?", (cutoff,), "max_age")
            if drop:
                drops.append(drop)
        if self.used_bytes() + needed > self.db_budget:
            goal = int(self.db_budget * DROP_TO) - needed
            # The broker holds what it accepted: those go first (in broker mode, already delivered).
            drops += self._free(ACCEPTED, goal, None if self.confirm == "broker" else "released")
            if self.used_bytes() + needed > self.db_budget:
                drops += self._free("1", goal, "full")
        return drops

    def check_bounds(self) -> list[Drop]:
        """After a write: if the estimate fell short, drop more (rare)."""
        if self.used_bytes() <= self.db_budget:
            return []
        return self._free("1", int(self.db_budget * DROP_TO), "full")

    def _free(self, condition: str, goal_used: int, reason: str | None) -> list[Drop]:
        """Delete the oldest batches matching ``condition`` until the pages in use are down to ``goal_used``;
        with a ``reason``, as counted drops."""
        drops = []
        for _ in range(16):  # estimates converge in one or two rounds
            excess = self.used_bytes() - goal_used
            if excess <= 0:
                break
            cut = self._db.execute(
                f"SELECT seq FROM (SELECT seq, sum(length(payload) + {ROW_OVERHEAD}) OVER (ORDER BY seq) AS total "
                f"FROM {SOURCE} WHERE {condition}) WHERE total >= ? ORDER BY seq LIMIT 1",
                (excess,),
            ).fetchone()
            if cut is None:
                cut = self._db.execute(f"SELECT max(seq) FROM {SOURCE} WHERE {condition}").fetchone()
            if cut is None or cut[0] is None:
                break
            if reason is None:
                self._delete(f"{condition} AND seq <= ?", (cut[0],))
            else:
                drop = self._drop_where(f"{condition} AND seq <= ?", (cut[0],), reason)
                if drop:
                    drops.append(drop)
        return drops

    def _delete(
        self, condition: str, args: tuple[Any, ...]
    ) -> tuple[int, int, int | None, int | None, int, int | None]:
        """Delete batches; ``(batches, points, oldest seq, newest seq, accepted ones, newest first acceptance)``."""
        row = self._db.execute(
            f"SELECT count(*), coalesce(sum(points), 0), min(seq), max(seq), count(at_ms), max(first_ms), "
            f"coalesce(sum(CASE WHEN {PENDING} THEN length(payload) END), 0), "
            f"coalesce(sum(CASE WHEN {PENDING} THEN points END), 0) FROM {SOURCE} WHERE {condition}",
            args,
        ).fetchone()
        batches, points, oldest, newest, accepted, newest_first, pending_bytes, pending_points = row
        if batches:
            self._db.execute(f"DELETE FROM batches WHERE seq IN (SELECT seq FROM {SOURCE} WHERE {condition})", args)
            c = self.counts
            c.pending_batches -= batches - accepted
            c.pending_points -= pending_points
            c.pending_bytes -= pending_bytes
            c.unconfirmed_batches -= accepted
            c.unconfirmed_points -= points - pending_points
        return batches, points, oldest, newest, accepted, newest_first

    def _drop_where(self, condition: str, args: tuple[Any, ...], reason: str) -> Drop | None:
        batches, points, oldest, newest, accepted, _ = self._delete(condition, args)
        if not batches:
            return None
        drop = Drop(batches, points, oldest, newest, reason, accepted)
        self.count_drop(drop)
        self.insert_events([drop.event()])
        return drop

    def count_drop(self, drop: Drop) -> None:
        if drop.reason not in NOT_LOST:
            self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped_points'", (drop.points,))
            self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped_batches'", (drop.batches,))
        self._db.execute(
            "INSERT INTO drops VALUES (?, ?, ?) ON CONFLICT (reason) DO UPDATE SET "
            "points = points + excluded.points, batches = batches + excluded.batches",
            (drop.reason, drop.points, drop.batches),
        )

    def insert_events(self, docs: Iterable[dict[str, Any]]) -> None:
        """Keep gateway events until published (the newest MAX_EVENTS at most)."""
        created = now_ms()
        rows = [(created, json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()) for doc in docs]
        if rows:
            self._db.executemany("INSERT INTO events (created_ms, payload) VALUES (?, ?)", rows)
            self._db.execute("DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - ?", (MAX_EVENTS,))

    def mark_accepted(self, seqs: Sequence[int], at_ms: int) -> None:
        """The broker has these batches (its PUBACK): the first time is kept, the latest moves forward."""
        if not seqs:
            return
        marks = ",".join("?" * len(seqs))
        count, points, size = self._db.execute(
            f"SELECT count(*), coalesce(sum(points), 0), coalesce(sum(length(payload)), 0) FROM {SOURCE} "
            f"WHERE seq IN ({marks}) AND {PENDING}",
            list(seqs),
        ).fetchone()
        # Only batches still buffered (a confirmation may have come first).
        self._db.executemany(
            "INSERT INTO accepted (seq, at_ms, first_ms) SELECT seq, ?, ? FROM batches WHERE seq = ? "
            "ON CONFLICT (seq) DO UPDATE SET at_ms = excluded.at_ms",
            [(at_ms, at_ms, s) for s in seqs],
        )
        c = self.counts
        c.pending_batches -= count
        c.pending_points -= points
        c.pending_bytes -= size
        c.unconfirmed_batches += count
        c.unconfirmed_points += points

    def confirm_ranges(self, ranges: Sequence[Range]) -> Confirmed:
        """The tenant's storage has these seqs: delete them."""
        batches = points = 0
        newest: int | None = None
        for first, last in ranges:
            count, pts, _, _, _, newest_first = self._delete("seq BETWEEN ? AND ?", (first, last))
            batches += count
            points += pts
            if newest_first is not None and (newest is None or newest_first > newest):
                newest = newest_first
        return Confirmed(batches, points, newest)

    def split(self, seq: int, *, max_points: int, max_bytes: int, limit: int) -> list[int] | None:
        """A batch the broker never accepted, too large for its ``limit``: its points again as batches of at
        most ``max_bytes`` (``pointjson.rebatch``), with new seqs, in its place and with its creation time.

        Returns the new seqs; None if the batch is gone or cannot be made smaller (the caller discards it).
        """
        row = self._db.execute(
            f"SELECT device, created_ms, payload FROM {SOURCE} WHERE seq = ? AND {PENDING}", (seq,)
        ).fetchone()
        if row is None:
            return None
        device, created_ms, payload = row
        # A reading that fits alone, in a batch of its own, stays a reading: the envelope, the topic and the
        # packet's header are what a batch of one adds to it (its seq taken at 20 digits).
        envelope = len(self._payload(device, 10**19, "").encode())
        topic = len(f"gw/{self._gateway}/data/{device}".encode())
        cut, smaller = rebatch(
            device,
            json.loads(payload)["points"],
            max_points=max_points,
            max_bytes=max_bytes,
            alone=limit - envelope - topic - 16,
            limit=limit,
        )
        if not smaller:
            return None
        self._delete("seq = ?", (seq,))
        return self.insert(cut, created_ms)

    def discard(self, seq: int, reason: str) -> Drop | None:
        """A batch that can never be delivered (e.g. larger than the broker accepts): dropped and counted."""
        return self._drop_where("seq = ?", (seq,), reason)

    def clamp_accepted(self, now: int) -> int:
        """Acceptance times in the future (the clock was set back since) become the present; returns how many."""
        with self.transaction():
            return int(
                self._db.execute(
                    "UPDATE accepted SET at_ms = min(at_ms, ?), first_ms = min(first_ms, ?) "
                    "WHERE at_ms > ? OR first_ms > ?",
                    (now, now, now, now),
                ).rowcount
            )

    def forget_accepted(self, before_ms: int) -> int:
        """Broker mode: delete accepted batches older than the replay window; returns how many."""
        return self._delete("seq IN (SELECT seq FROM accepted WHERE at_ms < ?)", (before_ms,))[0]

    def delete_events(self, ids: Sequence[int]) -> None:
        if ids:
            self._db.execute(f"DELETE FROM events WHERE id IN ({','.join('?' * len(ids))})", list(ids))

    # ------------------------------------------------------------ convenience (own transaction)

    def add(
        self, device: str, points: Sequence[Point], *, max_points: int, max_bytes: int
    ) -> tuple[list[int], list[Drop]]:
        """Buffer one device's points in one transaction: their seqs, and any drops it caused."""
        if not points:
            return [], []
        encoded = self.encode(device, points, max_points=max_points, max_bytes=max_bytes)
        created = now_ms()
        try:
            with self.transaction():
                drops = self.make_room(needed_bytes(encoded), created)
                seqs = self.insert(encoded, created)
                drops += self.check_bounds()
        except sqlite3.DatabaseError as exc:
            raise BufferError(f"{self.path}: cannot store points: {exc}") from exc
        return seqs, drops

    def accept(self, seqs: Sequence[int], at_ms: int | None = None) -> None:
        with self.transaction():
            self.mark_accepted(seqs, now_ms() if at_ms is None else at_ms)

    def confirm_seqs(self, seqs: Iterable[int]) -> Confirmed:
        from factory_edge.acks import ranges

        with self.transaction():
            return self.confirm_ranges(ranges(seqs))

    def add_event(self, doc: dict[str, Any]) -> None:
        with self.transaction():
            self.insert_events([doc])

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def close(self) -> None:
        with self.lock:
            self._db.close()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WRITER_CACHE_KIB = 512
READER_CACHE_KIB = 256


def open_db(path: Path, *, fsync: bool = True, write: bool = True) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # Page caches smaller than SQLite's 2 MiB default, each connection its own (the agent has three): the
    # writer appends at one end and deletes at the other, a reader reads each batch once. Measured: the same
    # CPU to write and to drain 1,000,000 points, and up to 3.5 MB less resident over an outage
    # (docs/performance.md).
    db.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB if write else READER_CACHE_KIB}")
    if not write:
        return db  # WAL is a property of the file, set by the writer
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed batch survives power loss too, not only kill -9.
    db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
    db.execute("PRAGMA busy_timeout=5000")
    # Debian builds SQLite with secure_delete on: every freed page is zeroed, i.e. written again.
    # FAST zeroes only within pages written anyway: deleting a confirmed batch costs no extra I/O.
    db.execute("PRAGMA secure_delete=FAST")
    return db


def _statements(script: str) -> list[str]:
    """An SQL script's statements (a trigger's body holds semicolons of its own)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return [st for st in statements if st]


def needed_bytes(encoded: Sequence[Body]) -> int:
    """Bytes a write of these batch bodies takes on disk, estimated (the header adds ~60 bytes a batch)."""
    return sum(len(body) + len(device) + 60 + ROW_OVERHEAD for device, _, body in encoded)


class _Transaction:
    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer

    def __enter__(self) -> None:
        self.buffer.lock.acquire()
        try:
            self.next_seq = self.buffer._next_seq
            self.counts = replace(self.buffer.counts)
            self.buffer._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.buffer.lock.release()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        db = self.buffer._db
        try:
            if exc_type is None:
                try:
                    db.execute("COMMIT")
                    self.buffer.committed_next_seq = self.buffer._next_seq
                    return
                except sqlite3.DatabaseError:
                    self._rollback()
                    raise
            self._rollback()
        finally:
            self.buffer.lock.release()

    def _rollback(self) -> None:
        self.buffer._next_seq = self.next_seq  # seqs of a rolled-back insert were never used
        self.buffer.counts = self.counts
        try:
            self.buffer._db.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass  # SQLite already rolled back (e.g. after SQLITE_FULL)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def age_seconds(oldest_ms: int | None) -> float | None:
    return None if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000)
