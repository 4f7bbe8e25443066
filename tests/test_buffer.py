"""The store-and-forward buffer on a real SQLite file, including kill -9 of its writer."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from agent.buffer import Buffer
from agent.bufferread import BufferReader, read_stats
from agent.report import ReportFilter, Rule
from drivers.config import Deadband, ModbusTcpDevice
from drivers.points import Point, Quality
from factory_edge.mqtt import packet_size

MiB = 1024 * 1024


def points(device: str, n: int, start: int = 0) -> list[Point]:
    return [Point(device, f"t{i}", 1_732_280_000_000 + i, float(start + i)) for i in range(n)]


def pending(path: Path, after: int = 0) -> list[int]:
    reader = BufferReader(path)
    try:
        return [b.seq for b in reader.pending(after, 10**6)]
    finally:
        reader.close()


def test_batches_are_cut_by_points_and_bytes_and_payload_is_the_contract(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", gateway="gw-01", max_bytes=10**8) as buf:
        seqs, drops = buf.add("press-1", points("press-1", 1200), max_points=500, max_bytes=10**6)
        first = seqs[0]
        assert seqs == [first, first + 1, first + 2] and drops == []
        small, _ = buf.add("press-1", points("press-1", 100), max_points=500, max_bytes=1000)
        assert len(small) > 1
    doc = json.loads(BufferReader(tmp_path / "b.db").pending(0, 1)[0].payload)
    assert doc["v"] == 1 and doc["gw"] == "gw-01" and doc["dev"] == "press-1" and doc["seq"] == first
    assert len(doc["points"]) == 500
    assert doc["points"][0] == {"tag": "t0", "ts": 1_732_280_000_000, "v": 0.0, "q": "good"}


def test_bad_points_and_non_finite_numbers(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", gateway="gw-01", max_bytes=10**8) as buf:
        buf.add(
            "d",
            [Point.bad("d", "a", "timeout", ts=5), Point("d", "b", 6, float("nan"))],
            max_points=10,
            max_bytes=10**6,
        )
    doc = json.loads(BufferReader(tmp_path / "b.db").pending(0, 1)[0].payload)
    assert doc["points"] == [
        {"tag": "a", "ts": 5, "v": None, "q": "bad", "err": "timeout"},
        {"tag": "b", "ts": 6, "v": None, "q": "bad", "err": "not a finite number (nan)"},
    ]


def test_a_batch_too_large_for_the_broker_is_split_into_batches_that_fit_keeping_every_point(tmp_path: Path) -> None:
    """Buffered before the broker's limit was known: cut again under new seqs, in its place, every point kept
    (multi-byte text counted in bytes); a point too large on its own becomes a bad point saying why; a batch
    that cannot be made smaller is left to the caller; one the broker accepted is not cut."""
    big = Point("d", "recipe", 1_732_280_000_999, "R" * 3000)
    alone = Point("d", "note", 1_732_280_000_500, "N" * 1850)  # over max_bytes, but a batch of one fits
    wide = [Point("d", f"t{i}", 1_732_280_000_000 + i, "é" * 40) for i in range(100)]
    with Buffer(tmp_path / "b.db", gateway="gw-01", max_bytes=10**8) as buf:
        (seq,), _ = buf.add("d", [*wide[:50], alone, *wide[50:], big], max_points=500, max_bytes=10**6)
        (lone,), _ = buf.add("d", points("d", 1), max_points=500, max_bytes=10**6)
        (taken,), _ = buf.add("d", points("d", 100), max_points=500, max_bytes=10**6)
        buf.mark_accepted([taken], 1)
        with buf.transaction():
            new = buf.split(seq, max_points=500, max_bytes=1024, limit=2048)
            assert buf.split(lone, max_points=500, max_bytes=1024, limit=2048) is None
            assert buf.split(taken, max_points=500, max_bytes=1024, limit=2048) is None
        assert new is not None and len(new) > 1 and min(new) > taken
        assert buf.figures().pending_points == 102 + 1
    reader = BufferReader(tmp_path / "b.db")
    batches = {b.seq: b for b in reader.pending(0, 1000)}
    assert seq not in batches and lone in batches
    docs = [json.loads(batches[s].payload) for s in new]
    assert all(len(batches[s].payload) <= 1024 + 100 or len(json.loads(batches[s].payload)["points"]) == 1 for s in new)
    assert all(packet_size("gw/gw-01/data/d", batches[s].payload) <= 2048 for s in new)
    got = [p for d in docs for p in d["points"]]
    assert [p["tag"] for p in got] == [f"t{i}" for i in range(50)] + ["note"] + [f"t{i}" for i in range(50, 100)] + [
        "recipe"
    ]
    assert got[50]["v"] == "N" * 1850
    assert got[0] == {"tag": "t0", "ts": 1_732_280_000_000, "v": "é" * 40, "q": "good"}
    assert got[-1] == {
        "tag": "recipe",
        "ts": 1_732_280_000_999,
        "v": None,
        "q": "bad",
        "err": "reading of 3053 bytes does not fit the broker's max_packet_size of 2048 bytes",
    }
    assert [d["seq"] for d in docs] == new and all(d["gw"] == "gw-01" and d["dev"] == "d" for d in docs)


def test_seq_keeps_increasing_across_restarts_and_confirmations(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, gateway="gw-01", max_bytes=10**8) as buf:
        seqs, _ = buf.add("d", points("d", 10), max_points=5, max_bytes=10**6)
        buf.accept(seqs)
        assert buf.confirm_seqs(seqs).batches == 2
    with Buffer(path, gateway="gw-01", max_bytes=10**8) as buf:
        again, _ = buf.add("d", points("d", 1), max_points=5, max_bytes=10**6)
    assert seqs == [seqs[0], seqs[0] + 1] and again == [seqs[0] + 2]


def test_a_new_buffer_never_reuses_the_seqs_of_an_earlier_one(tmp_path: Path) -> None:
    """A replaced box, or a deleted buffer: the store already holds (gw, 1…N) of the old one."""
    with Buffer(tmp_path / "old.db", gateway="gw-01", max_bytes=10**8) as old:
        used, _ = old.add("d", points("d", 50), max_points=1, max_bytes=10**6)
    time.sleep(0.002)
    with Buffer(tmp_path / "new.db", gateway="gw-01", max_bytes=10**8) as new:
        fresh, _ = new.add("d", points("d", 1), max_points=1, max_bytes=10**6)
    assert fresh[0] > used[-1] and used[0] >= int(time.time() * 1000 - 60_000) * 1000


def test_an_accepted_batch_stays_until_the_storage_confirms_it(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, gateway="gw-01", max_bytes=10**8) as buf:
        seqs, _ = buf.add("d", points("d", 30), max_points=10, max_bytes=10**6)
        buf.accept(seqs, at_ms=1000)
        buf.accept(seqs[:1], at_ms=5000)  # sent again: the first acceptance stays, the latest moves
        stats = read_stats(path)
        assert stats is not None and (stats.batches, stats.unconfirmed, stats.unconfirmed_points) == (0, 3, 30)
        counts = buf.figures()
        assert (counts.pending_batches, counts.unconfirmed_batches, counts.unconfirmed_points) == (0, 3, 30)
        confirmed = buf.confirm_seqs([seqs[0], seqs[2]])
        assert (confirmed.batches, confirmed.points, confirmed.newest_first_ms) == (2, 20, 1000)
        assert buf.confirm_seqs([seqs[0], seqs[2]]).batches == 0  # a repeated confirmation changes nothing
        assert buf.figures().unconfirmed_batches == 1
    found = BufferReader(path).oldest_unconfirmed()
    assert found is not None and (found[0].seq, found[1]) == (seqs[1], 1000)


def test_full_buffer_drops_oldest_counts_them_and_keeps_the_files_within_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    limit = 1 * MiB
    with Buffer(path, gateway="gw-01", max_bytes=limit) as buf:
        all_drops = []
        for round_ in range(120):
            _, drops = buf.add("d", points("d", 200, start=round_ * 200), max_points=100, max_bytes=10**6)
            all_drops += drops
            on_disk = path.stat().st_size + Path(f"{path}-wal").stat().st_size
            assert on_disk <= limit, f"{on_disk} bytes on disk after round {round_}"
    stats = read_stats(path)
    assert stats is not None
    assert all_drops and all(d.reason == "full" for d in all_drops)
    dropped = sum(d.points for d in all_drops)
    assert stats.dropped_points == dropped == 120 * 200 - stats.points
    assert stats.drops == {"full": dropped}
    # The newest survive, in order, without gaps: only the oldest went.
    remaining = pending(path)
    assert remaining == list(range(remaining[-1] - len(remaining) + 1, remaining[-1] + 1))
    # Each drop is recorded as an event for gw/{gw}/events.
    events = [json.loads(p) for _, p in BufferReader(path).pending_events(1000)]
    assert sum(e["points"] for e in events if e["type"] == "buffer_drop") == dropped


def test_broker_mode_forgets_accepted_batches_before_dropping_any(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, gateway="gw-01", max_bytes=1 * MiB, confirm="broker") as buf:
        seqs, _ = buf.add("d", points("d", 3000), max_points=100, max_bytes=10**6)
        buf.accept(seqs)
        for round_ in range(60):
            _, drops = buf.add("d", points("d", 300, start=round_), max_points=100, max_bytes=10**6)
            assert drops == []
            stats = read_stats(path)
            assert stats is not None
            if stats.unconfirmed == 0:
                break
    assert stats is not None
    assert stats.unconfirmed == 0 and stats.dropped_points == 0 and stats.batches == 3 * (round_ + 1)


def test_storage_mode_releases_what_the_broker_holds_before_losing_any_reading(tmp_path: Path) -> None:
    """Full: batches the broker accepted go first (it still holds them: "released", not counted as lost),
    then the oldest never sent ("full": lost)."""
    path = tmp_path / "b.db"
    with Buffer(path, gateway="gw-01", max_bytes=1 * MiB) as buf:
        seqs, _ = buf.add("d", points("d", 3000), max_points=100, max_bytes=10**6)
        buf.accept(seqs)
        drops = []
        for round_ in range(60):
            drops += buf.add("d", points("d", 300, start=round_), max_points=100, max_bytes=10**6)[1]
    released = [d for d in drops if d.reason == "released"]
    full = [d for d in drops if d.reason == "full"]
    assert released and released[0].oldest_seq == seqs[0] and sum(d.batches for d in released) == len(seqs)
    assert full and all(d.accepted == 0 for d in full)
    stats = read_stats(path)
    assert stats is not None and stats.dropped_points == sum(d.points for d in full)  # released: not lost
    assert stats.drops["released"] == sum(d.points for d in released)


WRITER = """
import sys
from agent.buffer import Buffer
from drivers.points import Point
buf = Buffer(sys.argv[1], gateway="gw-01", max_bytes=10**9)
i = 0
while True:
    seqs, _ = buf.add("d", [Point("d", "t", i, float(i))] * 20, max_points=10, max_bytes=10**6)
    print(seqs[-1], flush=True)
    i += 1
"""


def test_kill_9_loses_nothing_that_was_committed(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    committed, lines = 0, 0
    deadline = time.monotonic() + 20
    while lines < 200 and time.monotonic() < deadline:
        committed, lines = int(proc.stdout.readline()), lines + 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    seqs = pending(path)
    start = seqs[0]
    assert seqs[: committed - start + 1] == list(range(start, committed + 1))
    with Buffer(path, gateway="gw-01", max_bytes=10**9) as buf:
        assert buf.next_seq == seqs[-1] + 1
        next_seqs, _ = buf.add("d", points("d", 1), max_points=10, max_bytes=10**6)
    assert next_seqs[0] > committed


def test_a_buffer_from_the_previous_version_is_migrated_with_its_drop_count(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE batches (seq INTEGER PRIMARY KEY, device TEXT NOT NULL, points INTEGER NOT NULL,
                              created_ms INTEGER NOT NULL, payload BLOB NOT NULL, acked_ms INTEGER);
        CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, created_ms INTEGER NOT NULL, payload BLOB NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('next_seq', 8), ('dropped_points', 40), ('dropped_batches', 2);
        CREATE INDEX batches_acked ON batches (acked_ms) WHERE acked_ms IS NOT NULL;
        INSERT INTO batches VALUES (6, 'd', 1, 1, '{"seq":6}', 1234), (7, 'd', 1, 1, '{"seq":7}', NULL);
        PRAGMA user_version = 2;
    """)
    db.close()
    with Buffer(path, gateway="gw-01", max_bytes=10**8) as buf:
        assert buf.next_seq == 8
    stats = read_stats(path)
    assert stats is not None and stats.drops == {"full": 40} and (stats.batches, stats.unconfirmed) == (1, 1)
    assert BufferReader(path).newest_accepted_ms() == 1234


def test_report_by_exception() -> None:
    f = ReportFilter(
        {
            ("d", "temp"): Rule(Deadband(0.5), 60_000),
            ("d", "pct"): Rule(Deadband(10, percent=True), None),
            ("d", "raw"): Rule(None, None),
            ("d", "quiet"): Rule(None, 10_000),
        }
    )

    def sel(
        tag: str,
        ts: int,
        value: bool | int | float | str | None,
        quality: Quality = Quality.GOOD,
        err: str | None = None,
    ) -> bool:
        return bool(f.select([Point("d", tag, ts, value, quality, err)]))

    assert sel("temp", 0, 70.0)
    assert not sel("temp", 1000, 70.4)  # within the deadband
    assert sel("temp", 2000, 70.6)  # moved by more than 0.5 from the last reported 70.0
    assert not sel("temp", 3000, 70.9)
    assert sel("temp", 4000, None, Quality.BAD, "timeout")  # quality change: always
    assert not sel("temp", 5000, None, Quality.BAD, "timeout")
    assert sel("temp", 6000, 70.9)
    assert sel("temp", 66_000, 70.9)  # max_silence
    assert sel("pct", 0, 200.0) and not sel("pct", 1, 219.0) and sel("pct", 2, 221.0)
    assert sel("raw", 0, 1) and sel("raw", 1, 1)  # no deadband: every reading
    assert sel("quiet", 0, 1) and not sel("quiet", 1, 1) and sel("quiet", 2, 2) and sel("quiet", 10_002, 2)


def test_report_by_exception_from_the_config_keeps_every_reading_of_tags_without_a_rule() -> None:
    def press(name: str, *tags: dict[str, object]) -> ModbusTcpDevice:
        return ModbusTcpDevice.model_validate(
            {"name": name, "protocol": "modbus-tcp", "host": "127.0.0.1", "tags": list(tags)}
        )

    plain = ReportFilter.for_devices([press("p1", {"name": "a", "address": 0}, {"name": "b", "address": 1})])
    readings = [Point("p1", "a", 0, 1), Point("p1", "b", 0, 2), Point("p1", "a", 1, 1), Point("p1", "b", 1, 2)]
    assert plain.select(readings) == readings and plain.select(readings) == readings

    mixed = ReportFilter.for_devices(
        [
            press("p1", {"name": "a", "address": 0, "deadband": 5}, {"name": "b", "address": 1}),
            press("p2", {"name": "a", "address": 0}),
        ]
    )
    selected = mixed.select([*readings, Point("p2", "a", 0, 1), Point("p2", "a", 1, 1)])
    assert [(p.device, p.tag, p.ts) for p in selected] == [
        ("p1", "a", 0),
        ("p1", "b", 0),
        ("p1", "b", 1),
        ("p2", "a", 0),
        ("p2", "a", 1),
    ]


def test_max_age_drops_points_older_than_the_limit(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", gateway="gw-01", max_bytes=10**8, max_age_s=0.2) as buf:
        old, _ = buf.add("d", points("d", 3), max_points=10, max_bytes=10**6)
        time.sleep(0.3)
        new, drops = buf.add("d", points("d", 2), max_points=10, max_bytes=10**6)
    assert [(d.reason, d.points, d.oldest_seq) for d in drops] == [("max_age", 3, old[0])]
    assert pending(tmp_path / "b.db") == new


def test_acceptance_times_in_the_future_are_brought_back_to_the_present(tmp_path: Path) -> None:
    """A gateway that restarts with its clock set back must not hold accepted batches back until the clock
    catches up: the delivery timeouts would never expire."""
    path = tmp_path / "b.db"
    with Buffer(path, gateway="gw-01", max_bytes=10**8) as buf:
        seqs, _ = buf.add("d", points("d", 20), max_points=10, max_bytes=10**6)
        buf.accept(seqs[:1], at_ms=5_000)
        buf.accept(seqs[1:], at_ms=9_000_000_000_000)  # year 2255
        assert buf.clamp_accepted(6_000) == 1
    reader = BufferReader(path)
    assert reader.newest_accepted_ms() == 6_000
    assert [b.accepted_ms for b in reader.resend(0, 10, first_before=10_000, sent_before=10_000)] == [5_000, 6_000]
