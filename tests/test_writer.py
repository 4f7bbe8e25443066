"""The buffer's writer thread: polls never wait for the disk, a full queue or a full disk is counted, not fatal."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.buffer import Buffer, wal_limit
from agent.bufferread import BufferReader, read_stats
from agent.writer import BufferWriter, Commit
from drivers.points import Point

KiB, MiB = 1024, 1024 * 1024


def poll(i: int, tags: int = 100) -> list[Point]:
    return [Point("press-1", f"r{t}", 1_732_280_000_000 + i, i * 1000 + t) for t in range(tags)]


def writer_for(buffer: Buffer, **options: int) -> BufferWriter:
    settings = {"max_points": 500, "max_batch_bytes": 256 * KiB, "queue_points": 100_000, "min_free_bytes": 0}
    return BufferWriter(buffer, **{**settings, **options})  # type: ignore[arg-type]


def stored_values(path: Path) -> list[int]:
    reader = BufferReader(path)
    try:
        return [p["v"] for b in reader.pending(0, 10**6) for p in json.loads(b.payload)["points"]]
    finally:
        reader.close()


def events(path: Path) -> list[dict[str, object]]:
    reader = BufferReader(path)
    try:
        return [json.loads(p) for _, p in reader.pending_events(10_000)]
    finally:
        reader.close()


class Lock:
    """Another connection holding the database's write lock: to the writer, a disk that does not complete writes."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.db.execute("ROLLBACK")
        self.db.close()


def test_polls_never_wait_for_a_stalled_disk_and_everything_is_written_in_order_after(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    commits: list[Commit] = []
    with Buffer(path, gateway="gw-01", max_bytes=64 * MiB) as buffer:
        writer = writer_for(buffer)
        writer.on_commit = commits.append
        lock = Lock(path)
        for i in range(50):
            writer.submit("press-1", poll(i))  # returns at once: the thread waits for the disk, not the poll
        assert stored_values(path) == []
        lock.release()
        assert writer.flush(10)
        writer.close()
    assert stored_values(path) == [i * 1000 + t for i in range(50) for t in range(100)]
    seqs = sorted(seq for c in commits for seq in c.seqs)
    assert seqs == list(range(seqs[0], seqs[0] + 50))


def test_a_full_queue_drops_the_oldest_unwritten_readings_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, gateway="gw-01", max_bytes=64 * MiB) as buffer:
        writer = writer_for(buffer, queue_points=1000)
        lock = Lock(path)
        writer.submit("press-1", poll(0))
        deadline = time.monotonic() + 5
        while not writer._busy and time.monotonic() < deadline:  # the thread is now stuck writing poll 0
            time.sleep(0.01)
        for i in range(1, 30):
            writer.submit("press-1", poll(i))
        assert writer.figures()["dropped"] == {"queue_full": 1900}
        lock.release()
        writer.flush(10)
        writer.close()
    # Poll 0 was being written and waited; of those queued behind it, the newest ten were kept within
    # queue_points and the nineteen before them were dropped, counted and reported.
    assert stored_values(path) == [i * 1000 + t for i in (0, *range(20, 30)) for t in range(100)]
    stats = read_stats(path)
    assert stats is not None and stats.drops == {"queue_full": 1900}
    drop_events = [e for e in events(path) if e["type"] == "buffer_drop"]
    assert [(e["reason"], e["points"], e["batches"]) for e in drop_events] == [("queue_full", 1900, 19)]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs mounted for the test (root only), unmounted in teardown."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_a_state_dropped_readings_are_counted_and_writing_resumes_when_there_is_room(
    small_disk: Path,
) -> None:
    path = small_disk / "buffer.db"
    with Buffer(path, gateway="gw-01", max_bytes=256 * MiB) as buffer:  # the filesystem, not max_bytes, is the limit
        writer = writer_for(buffer, min_free_bytes=256 * KiB)
        submitted = 0
        while not writer.figures()["disk_full"] and submitted < 2000:
            writer.submit("press-1", poll(submitted))
            submitted += 1
            writer.flush(10)
        assert writer.figures()["disk_full"], "the disk never filled"
        for i in range(submitted, submitted + 20):  # still accepted, dropped and counted
            writer.submit("press-1", poll(i))
        submitted += 20
        writer.flush(10)
        dropped = writer.figures()["dropped"]["disk_full"]
        assert dropped >= 20 * 100
        st = os.statvfs(small_disk)
        assert st.f_bavail * st.f_frsize > 0  # the writer stopped short of the very last byte
        # The storage confirms the oldest half: their pages are reused, writing resumes.
        reader = BufferReader(path)
        seqs = [b.seq for b in reader.pending(0, 10**6)]
        writer.accepted(seqs, 1)
        writer.confirmed([(seqs[0], seqs[len(seqs) // 2])])
        writer.submit("press-1", poll(submitted))
        submitted += 1
        writer.flush(10)
        assert not writer.figures()["disk_full"]
        writer.close()
        stats = reader.stats()
        reader.close()
    written = stats.points + stats.unconfirmed_points + (len(seqs) // 2 + 1) * 100
    assert written + dropped == submitted * 100  # every reading is either written or counted
    assert stats.drops == {"disk_full": dropped}
    drop_events = [e for e in events(path) if e["type"] == "buffer_drop"]
    assert [(e["reason"], e["points"]) for e in drop_events] == [("disk_full", dropped)]


def test_deliveries_are_recorded_even_while_readings_cannot_be(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, gateway="gw-01", max_bytes=64 * MiB) as buffer:
        writer = writer_for(buffer)
        for i in range(4):
            writer.submit("press-1", poll(i))
        writer.flush(10)
        done = threading.Event()
        confirmed: list[int] = []

        def on_commit(commit: Commit) -> None:
            if commit.confirmed:
                confirmed.append(commit.confirmed.batches)
                done.set()

        writer.on_commit = on_commit
        writer.min_free_bytes = 1 << 62  # no filesystem has this much: readings cannot be written
        writer.submit("press-1", poll(99))
        writer.flush(10)
        assert writer.figures()["disk_full"] and writer.figures()["dropped"] == {"disk_full": 100}
        first = BufferReader(path).pending(0, 1)[0].seq
        writer.confirmed([(first, first + 1)])
        assert done.wait(10) and confirmed == [2]
        writer.close()
    assert stored_values(path) == [i * 1000 + t for i in (2, 3) for t in range(100)]


def test_a_backlog_cut_for_a_small_broker_is_cut_in_transactions_the_wal_holds(tmp_path: Path) -> None:
    """Ten minutes of a 300-register machine buffered in an outage (about 12 KB a poll), then a broker that
    takes 4 KiB: the publisher asks for every batch to be cut at once. The writer cuts them in transactions
    its WAL's share holds (a full disk must still be able to record deletions), and keeps every reading."""
    polls = 600
    with Buffer(tmp_path / "b.db", gateway="gw-01", max_bytes=64 * MiB) as buffer:
        seqs = [s for i in range(polls) for s in buffer.add("press-1", poll(i, 300), max_points=500, max_bytes=MiB)[0]]
        buffer._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        sizes = {b.seq: len(b.payload) for b in BufferReader(buffer.path).pending(0, 10**6)}
        writer = writer_for(buffer)
        try:
            with writer._cond:  # asked for in one pass of the publisher, while the writer waits
                for seq in seqs:
                    writer.split(seq, 4096, sizes[seq])
            deadline = time.monotonic() + 60
            while (writer._busy or writer._ops.splits) and time.monotonic() < deadline:
                time.sleep(0.05)
            wal = os.stat(f"{buffer.path}-wal").st_size
            assert not writer._ops.splits and writer.stats.commits > 10
            assert wal <= 2 * wal_limit(buffer.max_bytes), f"WAL {wal} bytes, its share {wal_limit(buffer.max_bytes)}"
        finally:
            writer.close(5)
    values = stored_values(tmp_path / "b.db")
    assert sorted(values) == sorted(i * 1000 + t for i in range(polls) for t in range(300))


def test_a_cut_the_database_refuses_is_tried_again_without_spinning(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", gateway="gw-01", max_bytes=10 * MiB) as buffer:
        (seq,), _ = buffer.add("press-1", poll(0), max_points=500, max_bytes=MiB)
        tries = 0
        real = buffer.split

        def refused(*args: object, **kwargs: object) -> None:  # as SQLite says when the disk is full
            nonlocal tries
            tries += 1
            raise sqlite3.OperationalError("database or disk is full")

        buffer.split = refused  # type: ignore[method-assign]
        writer = writer_for(buffer)
        try:
            writer.split(seq, 1024, 5000)
            time.sleep(1.2)
            assert 1 <= tries <= 4, f"{tries} tries in 1.2 s"
            buffer.split = real  # type: ignore[method-assign]
            deadline = time.monotonic() + 5
            while seq in {b.seq for b in BufferReader(buffer.path).pending(0, 100)} and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            writer.close(5)
    assert sorted(stored_values(tmp_path / "b.db")) == list(range(100))
