"""The buffer's one writer: a thread, so that polling never waits for the disk.

::

    poll[press-1] ──submit──▶ queue (bounded, in points) ──▶ thread buffer-writer ──▶ one transaction ──▶ fsync
    publisher ──accepted / confirmed / published events──▶ same queue             └─▶ on_commit → publisher wakes

Whatever arrives while a transaction commits goes into the next one, so a
slow disk (a worn SD card's 500 ms fsync) makes fewer, larger commits,
never a late poll. If the queue passes ``queue_points``, the oldest
readings not yet written are dropped and counted (``queue_full``): the
poll schedule is never what gives.

**A full disk is a state, not a crash.** Before writing readings the
writer checks the filesystem's free space: below ``min_free`` (and with no
free pages inside the database to reuse) it stops writing readings, counts
every one it cannot store (``disk_full``), keeps confirming and deleting
what the storage has (which makes room), and writes again as soon as the
space is back, recording one ``buffer_drop`` event for the whole episode.
SQLite's own "database or disk is full" is handled the same way. Gateway
events wait in memory meanwhile (bounded).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from drivers.points import Point, now_ms
from factory_edge.acks import Range
from factory_edge.logs import fields
from factory_edge.mqtt import PACKET_HEADROOM

from .buffer import Buffer, Confirmed, Drop, needed_bytes, wal_limit

log = logging.getLogger(__name__)

MAX_HELD_EVENTS = 1000  # events kept in memory while the disk is full
MIN_BATCH_BYTES = 256  # of points in a batch, however small the broker's packets (its limit is 1 KiB at least)
DROP_MESSAGES = {
    "full": "buffer full: dropped oldest points",
    "released": "buffer full: released batches the broker holds (no longer kept to be sent again)",
    "max_age": "dropped points older than max_age",
    "too_large": "dropped a batch larger than the broker accepts",
}

# One submit, encoded: (points, batch bodies, bytes on disk).
Encoded = tuple[int, list[tuple[str, int, str]], int]


@dataclass
class WriterStats:
    """Figures for ``agent status`` (written by the thread, read by the event loop: plain values)."""

    queued_points: int = 0
    written_points: int = 0
    commits: int = 0
    disk_full: bool = False  # readings cannot be written now
    dropped: dict[str, int] = field(default_factory=dict)  # points dropped before reaching the disk, by reason
    unsaved: dict[str, int] = field(default_factory=dict)  # of those, not yet counted in the database (no room)
    last_error: str | None = None


@dataclass
class Commit:
    """What one transaction did, handed to ``on_commit`` (on the writer thread)."""

    seqs: list[int] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    confirmed: Confirmed | None = None
    accepted: list[int] = field(default_factory=list)
    events_done: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs or self.drops or self.confirmed or self.accepted or self.events_done)


@dataclass
class _Ops:
    adds: deque[tuple[str, list[Point], int]] = field(default_factory=deque)  # device, points, count
    events: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[tuple[int, int]] = field(default_factory=list)  # seq, at_ms
    confirmed: list[Range] = field(default_factory=list)
    events_done: list[int] = field(default_factory=list)
    forget_before: int | None = None
    discards: list[tuple[int, str]] = field(default_factory=list)  # seq, reason
    splits: list[tuple[int, int, int]] = field(default_factory=list)  # seq, the broker's max_packet_size, bytes
    queue_drops: list[int] = field(default_factory=lambda: [0, 0])  # points, submits

    def deletions(self) -> bool:
        return bool(self.confirmed or self.events_done or self.forget_before is not None or self.discards)

    def bookkeeping(self) -> bool:
        return bool(self.accepted or self.splits) or self.deletions()

    def empty(self) -> bool:
        return not (self.adds or self.events or self.bookkeeping() or self.queue_drops[0])


class BufferWriter:
    """Thread ``buffer-writer``: the only writer of the buffer. Every method is safe to call from any thread."""

    def __init__(
        self,
        buffer: Buffer,
        *,
        max_points: int,
        max_batch_bytes: int,
        queue_points: int,
        min_free_bytes: int,
        on_commit: Callable[[Commit], None] | None = None,
    ) -> None:
        self.buffer = buffer
        self.max_points = max_points
        self.max_batch_bytes = max_batch_bytes
        self.packet_limit: int | None = None  # the broker's Maximum Packet Size, from the latest CONNACK
        self.queue_points = queue_points
        # Never less than the WAL's share: it must be able to grow to record deletions on a full disk.
        self.min_free_bytes = max(min_free_bytes, wal_limit(buffer.max_bytes))
        self.on_commit = on_commit
        self.stats = WriterStats()
        self._ops = _Ops()
        self._cond = threading.Condition()
        self._busy = False
        self._closing = False
        # Owned by the thread: what waits for room on the disk.
        self._held_events: list[dict[str, Any]] = []
        self._unsaved: dict[str, list[int]] = {}  # reason -> [points, submits] not yet counted on disk
        self._retry: list[Encoded] = []  # readings whose write found the database locked by another process
        self._busy_error = False
        self._logged_errors: dict[str, float] = {}
        self._full_since: float | None = None
        # A few blocks set aside: when another program fills the disk to the last byte, giving them back is
        # what lets SQLite record the confirmations that make room.
        self.reserve = buffer.path.with_name(buffer.path.name + ".reserve")
        self.reserve_bytes = 2 * wal_limit(buffer.max_bytes)
        self._make_reserve()
        self._thread = threading.Thread(target=self._run, name="buffer-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ producers

    def submit(self, device: str, points: list[Point]) -> None:
        """Queue one poll's reported points; never blocks. Over ``queue_points``, the oldest queued go."""
        if not points:
            return
        with self._cond:
            ops = self._ops
            ops.adds.append((device, points, len(points)))
            self.stats.queued_points += len(points)
            while self.stats.queued_points > self.queue_points and len(ops.adds) > 1:
                _, _, n = ops.adds.popleft()
                self.stats.queued_points -= n
                ops.queue_drops[0] += n
                ops.queue_drops[1] += 1
                self._count("queue_full", n)
            self._cond.notify()

    def event(self, doc: dict[str, Any]) -> None:
        self._put(lambda ops: ops.events.append(doc))

    def accepted(self, seqs: Sequence[int], at_ms: int) -> None:
        self._put(lambda ops: ops.accepted.extend((s, at_ms) for s in seqs))

    def confirmed(self, ranges: Sequence[Range]) -> None:
        self._put(lambda ops: ops.confirmed.extend(ranges))

    def events_published(self, ids: Sequence[int]) -> None:
        self._put(lambda ops: ops.events_done.extend(ids))

    def discard(self, seq: int, reason: str) -> None:
        """A batch that can never be delivered: dropped, counted under ``reason``."""
        self._put(lambda ops: ops.discards.append((seq, reason)))

    def fit_packets(self, max_packet_size: int | None) -> None:
        """The broker's Maximum Packet Size (None: none said): batches written from now on fit in it."""
        self.packet_limit = max_packet_size

    def split(self, seq: int, max_packet_size: int, size: int) -> None:
        """A batch buffered before the broker's limit was known, too large for it: cut into batches that fit."""
        self._put(lambda ops: ops.splits.append((seq, max_packet_size, size)))

    def batch_bytes(self, limit: int | None) -> int:
        """Bytes of points a batch may hold: ``publish.max_bytes``, less if the broker takes less."""
        if limit is None:
            return self.max_batch_bytes
        return min(self.max_batch_bytes, max(MIN_BATCH_BYTES, limit - PACKET_HEADROOM))

    def forget_accepted(self, before_ms: int) -> None:
        def put(ops: _Ops) -> None:
            ops.forget_before = max(before_ms, ops.forget_before or 0)

        self._put(put)

    def _put(self, change: Callable[[_Ops], None]) -> None:
        with self._cond:
            change(self._ops)
            self._cond.notify()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Block until every reading and event queued so far is written (or counted as dropped); False on
        timeout. Deliveries waiting for room on a full disk are not waited for: they are redone after a restart."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while (self._ops.adds or self._ops.events or self._busy) and self._thread.is_alive():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, save the drop counters (even below ``min_free``: a few bytes), stop the thread.
        The buffer stays open: its owner closes it."""
        self.flush(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._save_counters()

    def figures(self) -> dict[str, Any]:
        """The writer's figures for ``agent status`` (a consistent copy)."""
        with self._cond:
            st = self.stats
            return {
                "disk_full": st.disk_full,
                "queued_points": st.queued_points,
                "written_points": st.written_points,
                "dropped": dict(st.dropped),
                "dropped_unsaved": {k: v for k, v in st.unsaved.items() if v},
                "last_error": st.last_error,
            }

    def _count(self, reason: str, points: int) -> None:
        """Under the lock: points dropped before reaching the disk."""
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + points
        self.stats.unsaved[reason] = self.stats.unsaved.get(reason, 0) + points

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._ops.empty() and not self._closing:
                    if self._retry:
                        break
                    waiting = bool(self._held_events or self._unsaved)
                    self._cond.wait(1.0 if waiting else None)
                    if waiting:
                        break  # try the disk again, even with nothing new to write
                if self._closing and not (self._ops.adds or self._ops.events) and not self._retry:
                    self._cond.notify_all()
                    return
                ops, self._ops = self._ops, _Ops()
                self.stats.queued_points = 0
                self._busy = True
            try:
                self._write(ops)
            except Exception:  # a bug here must not stop the buffer for good
                log.exception("buffer writer failed; the readings of this write are lost")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write(self, ops: _Ops) -> None:
        commit = Commit()
        if ops.queue_drops[0]:
            self._hold("queue_full", *ops.queue_drops)
            log.warning(
                "readings dropped before reaching the disk: the write queue was full",
                extra=fields(points=ops.queue_drops[0], queue_points=self.queue_points),
            )
        # Deletions first, on their own: they free space and must not wait for anything that cannot be written.
        if ops.deletions():
            if self._transaction(lambda: self._deletions(ops, commit), "cannot record confirmations") is None:
                self._requeue_deletions(ops)
        if (
            ops.accepted
            and self._transaction(lambda: self._acceptances(ops, commit), "cannot record acceptances") is None
        ):
            # Only a saving lost: those batches count as never sent, and are sent once more.
            log.debug("acceptances not recorded", extra=fields(batches=len(ops.accepted)))
        if ops.splits:
            self._split_some(ops, commit)
        buffer = self.buffer
        encoded, self._retry = self._retry, []
        max_bytes = self.batch_bytes(self.packet_limit)
        for device, points, n in ops.adds:
            bodies = buffer.encode(device, points, max_points=self.max_points, max_bytes=max_bytes)
            encoded.append((n, bodies, needed_bytes(bodies)))
        events = self._held_events + ops.events
        self._held_events = []
        while True:
            # A stalled queue is written in several transactions, each small enough for the WAL's share.
            chunk: list[Encoded] = []
            size = 0
            while encoded and (not chunk or size + encoded[0][2] <= buffer.max_transaction_bytes):
                chunk.append(encoded.pop(0))
                size += chunk[-1][2]
            self._write_readings(chunk, events, commit)
            events = []
            if not encoded:
                break
        if self.on_commit is not None and commit:
            self.on_commit(commit)

    def _deletions(self, ops: _Ops, commit: Commit) -> None:
        buffer = self.buffer
        if ops.confirmed:
            commit.confirmed = buffer.confirm_ranges(ops.confirmed)
        if ops.forget_before is not None:
            buffer.forget_accepted(ops.forget_before)
        for seq, reason in ops.discards:
            drop = buffer.discard(seq, reason)
            if drop:
                commit.drops.append(drop)
        buffer.delete_events(ops.events_done)
        commit.events_done = list(ops.events_done)
        commit.accepted += [seq for seq, _ in ops.discards]  # no longer anyone's to record

    def _split_some(self, ops: _Ops, commit: Commit) -> None:
        """As many of the splits asked for as one transaction's share of the WAL holds; the rest come next."""
        now: list[tuple[int, int, int]] = []
        later: list[tuple[int, int, int]] = []
        size = 0
        for item in ops.splits:
            # In the WAL: the parts (a little larger than the batch was) and the pages the deletion frees.
            if now and size + 3 * item[2] > self.buffer.max_transaction_bytes:
                later.append(item)
            else:
                now.append(item)
                size += 3 * item[2]
        done = self._transaction(lambda: self._splits(now, commit), "cannot split batches")
        with self._cond:
            self._ops.splits[:0] = later if done is not None else now + later
        if done is None:
            time.sleep(0.5)  # the database refuses even this: do not spin
            return
        self._log_splits(done)

    def _splits(
        self, items: list[tuple[int, int, int]], commit: Commit
    ) -> list[tuple[int, int, list[int] | Drop | None]]:
        done: list[tuple[int, int, list[int] | Drop | None]] = []
        for seq, limit, _ in items:
            seqs = self.buffer.split(seq, max_points=self.max_points, max_bytes=self.batch_bytes(limit), limit=limit)
            if seqs is None:  # as small as it gets (or gone): it can never be delivered
                drop = self.buffer.discard(seq, "too_large")
                done.append((seq, limit, drop))
                if drop:
                    commit.drops.append(drop)
            else:
                done.append((seq, limit, seqs))
                commit.seqs += seqs
        commit.drops += self.buffer.check_bounds()  # the parts take a little more room than the batch did
        commit.accepted += [seq for seq, _, _ in items]  # no longer anyone's to send
        return done

    @staticmethod
    def _log_splits(done: list[tuple[int, int, list[int] | Drop | None]]) -> None:
        for seq, limit, outcome in done:
            if isinstance(outcome, list):
                log.warning(
                    "batch larger than the broker accepts: split",
                    extra=fields(seq=seq, max_packet_size=limit, batches=len(outcome), seq_from=outcome[0]),
                )
            elif outcome is not None:
                log.error(
                    "batch larger than the broker accepts: dropped",
                    extra=fields(seq=seq, max_packet_size=limit, points=outcome.points),
                )

    def _acceptances(self, ops: _Ops, commit: Commit) -> None:
        by_time: dict[int, list[int]] = {}
        for seq, at in ops.accepted:
            by_time.setdefault(at, []).append(seq)
        for at, seqs in by_time.items():
            self.buffer.mark_accepted(seqs, at)
        commit.accepted += [seq for seq, _ in ops.accepted]

    def _requeue_deletions(self, ops: _Ops) -> None:
        """Deletions that could not be recorded are tried again with the next write."""
        with self._cond:
            self._ops.confirmed[:0] = ops.confirmed
            self._ops.events_done[:0] = ops.events_done
            self._ops.discards[:0] = ops.discards
            if ops.forget_before is not None:
                self._ops.forget_before = max(ops.forget_before, self._ops.forget_before or 0)
        time.sleep(0.5)  # the disk has no room even for this: do not spin

    def _write_readings(self, chunk: list[Encoded], events: list[dict[str, Any]], commit: Commit) -> None:
        buffer = self.buffer
        bodies = [body for _, encoded, _ in chunk for body in encoded]
        npoints = sum(n for n, _, _ in chunk)
        needed = sum(size for _, _, size in chunk)
        if chunk and not self._room_for(needed):
            self._cannot_write(chunk, "disk_full", "free space below buffer.min_free")
            chunk, bodies, npoints = [], [], 0
        if not (bodies or events or (self._unsaved and self._room_for(0))):
            self._held_events = events[-MAX_HELD_EVENTS:]
            return
        unsaved = [Drop(submits, points, None, None, reason) for reason, (points, submits) in self._unsaved.items()]
        created = now_ms()

        def write() -> tuple[list[int], list[Drop]]:
            drops = buffer.make_room(needed, created) if bodies else []
            seqs = buffer.insert(bodies, created) if bodies else []
            if bodies:
                drops += buffer.check_bounds()
            for drop in unsaved:
                buffer.count_drop(drop)
            buffer.insert_events([*events, *(d.event() for d in unsaved)])
            return seqs, drops

        result = self._transaction(write, "cannot store points")
        if result is None and self._busy_error and chunk:
            # Another process holds the database (a copy, a backup): the readings wait, within queue_points.
            self._requeue(chunk, events)
            return
        if result is None:
            full = "full" in (self.stats.last_error or "")
            if chunk:
                self._cannot_write(chunk, "disk_full" if full else "write_error", self.stats.last_error or "")
            self._held_events = events[-MAX_HELD_EVENTS:]
            return
        seqs, drops = result
        commit.seqs += seqs
        commit.drops += drops
        self.stats.written_points += npoints
        with self._cond:
            for drop in unsaved:
                self.stats.unsaved[drop.reason] -= drop.points
        self._unsaved.clear()
        for drop in drops:
            log.warning(
                DROP_MESSAGES.get(drop.reason, f"dropped points ({drop.reason})"),
                extra=fields(
                    points=drop.points,
                    batches=drop.batches,
                    seq_from=drop.oldest_seq,
                    seq_to=drop.newest_seq,
                    accepted=drop.accepted,
                ),
            )
        if bodies:
            self._make_reserve()  # room again: set the reserve aside again
        if self.stats.disk_full and bodies:
            self.stats.disk_full = False
            log.warning(
                "buffer writable again",
                extra=fields(
                    path=str(buffer.path),
                    dropped_points=sum(d.points for d in unsaved if d.reason != "queue_full"),
                    after_s=round(time.monotonic() - (self._full_since or time.monotonic()), 1),
                ),
            )
            self._full_since = None

    def _requeue(self, chunk: list[Encoded], events: list[dict[str, Any]]) -> None:
        self._held_events = events[-MAX_HELD_EVENTS:]
        self._retry.extend(chunk)
        waiting = sum(n for n, _, _ in self._retry)
        while waiting > self.queue_points and len(self._retry) > 1:
            n, _, _ = self._retry.pop(0)
            waiting -= n
            self._hold("queue_full", n, 1)
            with self._cond:
                self._count("queue_full", n)
        time.sleep(0.1)

    def _save_counters(self) -> None:
        """At stop: drops not yet counted on disk are counted now, whatever the free space (a few bytes)."""
        if not self._unsaved:
            return
        unsaved = [Drop(submits, points, None, None, reason) for reason, (points, submits) in self._unsaved.items()]

        def write() -> None:
            for drop in unsaved:
                self.buffer.count_drop(drop)
            self.buffer.insert_events([d.event() for d in unsaved])

        if self._transaction(write, "cannot save the drop counters") is not None:
            with self._cond:
                for drop in unsaved:
                    self.stats.unsaved[drop.reason] -= drop.points
            self._unsaved.clear()

    def _hold(self, reason: str, points: int, submits: int) -> None:
        held = self._unsaved.setdefault(reason, [0, 0])
        held[0] += points
        held[1] += submits

    def _room_for(self, needed: int) -> bool:
        """Free space for ``needed`` more bytes, keeping ``min_free`` (free pages inside the file count)."""
        try:
            st = os.statvfs(self.buffer.path.parent)
        except OSError:
            return True
        free = st.f_bavail * st.f_frsize
        if free >= self.min_free_bytes + needed:
            return True
        try:
            return needed > 0 and self.buffer.free_pages_bytes() >= needed * 2
        except sqlite3.DatabaseError:
            return False

    def _cannot_write(self, chunk: list[Encoded], reason: str, why: str) -> None:
        points = sum(n for n, _, _ in chunk)
        self._hold(reason, points, len(chunk))
        with self._cond:
            self._count(reason, points)
        if not self.stats.disk_full:
            self.stats.disk_full = True
            self._full_since = time.monotonic()
            log.error(
                "buffer cannot write: readings are dropped and counted until there is room",
                extra=fields(path=str(self.buffer.path), reason=why, min_free=self.min_free_bytes),
            )

    def _make_reserve(self) -> None:
        if self.reserve.exists():
            return
        try:
            st = os.statvfs(self.reserve.parent)
            if st.f_bavail * st.f_frsize < self.min_free_bytes + self.reserve_bytes:
                return  # not now: there is no room to spare
            with open(self.reserve, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, self.reserve_bytes)
        except OSError:
            self.reserve.unlink(missing_ok=True)

    def _release_reserve(self) -> bool:
        try:
            self.reserve.unlink()
        except FileNotFoundError:
            return False
        except OSError:
            return False
        log.warning(
            "disk full: released the buffer's reserve so that stored batches can be deleted",
            extra=fields(path=str(self.reserve), bytes=self.reserve_bytes),
        )
        return True

    def _transaction(self, work: Callable[[], Any], what: str) -> Any:
        """Run ``work`` in one transaction; None (the reason in ``stats.last_error``) if SQLite refuses."""
        try:
            try:
                with self.buffer.transaction():
                    result = work()
            except sqlite3.DatabaseError as exc:
                if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL or not self._release_reserve():
                    raise
                with self.buffer.transaction():  # once more, with the reserve's room
                    result = work()
        except sqlite3.DatabaseError as exc:
            self._busy_error = getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            text = f"{what}: {exc}"
            now = time.monotonic()
            if self._logged_errors.get(text, 0.0) <= now:  # each distinct failure at most once a minute
                self._logged_errors[text] = now + 60.0
                log.error("buffer write failed", extra=fields(path=str(self.buffer.path), err=text))
            self.stats.last_error = text
            return None
        self.stats.commits += 1
        self.stats.last_error = None
        self._busy_error = False
        return result if result is not None else True
