"""The store-and-forward buffer on a real SQLite file, including kill -9 of its writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.buffer import Buffer, read_stats
from agent.report import ReportFilter, Rule
from drivers.config import Deadband
from drivers.points import Point, Quality


def points(device: str, n: int, start: int = 0) -> list[Point]:
    return [Point(device, f"t{i}", 1_732_280_000_000 + i, float(start + i)) for i in range(n)]


def test_batches_are_cut_by_points_and_bytes_and_payload_is_the_contract(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", gateway="gw-01", max_bytes=10**8) as buf:
        seqs, drops = buf.add("press-1", points("press-1", 1200), max_points=500, max_bytes=10**6)
        assert seqs == [1, 2, 3] and drops == []
        small, _ = buf.add("press-1", points("press-1", 100), max_points=500, max_bytes=1000)
        assert len(small) > 1
        first = json.loads(buf.batches_after(0, 1)[0].payload)
    assert first["v"] == 1 and first["gw"] == "gw-01" and first["dev"] == "press-1" and first["seq"] == 1
    assert len(first["points"]) == 500
    assert first["points"][0] == {"tag": "t0", "ts": 1_732_280_000_000, "v": 0.0, "q": "good"}


def test_bad_points_and_non_finite_numbers(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", gateway="gw-01", max_bytes=10**8) as buf:
        buf.add("d", [Point.bad("d", "a", "timeout", ts=5), Point("d", "b", 6, float("nan"))], max_points=10, max_bytes=10**6)
        doc = json.loads(buf.batches_after(0, 1)[0].payload)
    assert doc["points"] == [{"tag": "a", "ts": 5, "v": None, "q": "bad", "err": "timeout"},
                             {"tag": "b", "ts": 6, "v": None, "q": "bad", "err": "not a finite number (nan)"}]


def test_seq_keeps_increasing_across_restarts_and_acks(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, gateway="gw-01", max_bytes=10**8) as buf:
        seqs, _ = buf.add("d", points("d", 10), max_points=5, max_bytes=10**6)
        buf.ack(seqs)
        assert buf.depth == 0
    with Buffer(path, gateway="gw-01", max_bytes=10**8) as buf:
        again, _ = buf.add("d", points("d", 1), max_points=5, max_bytes=10**6)
    assert seqs == [1, 2] and again == [3]


def test_full_buffer_drops_oldest_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, gateway="gw-01", max_bytes=20_000) as buf:
        all_drops = []
        for round_ in range(20):
            _, drops = buf.add("d", points("d", 50, start=round_ * 50), max_points=50, max_bytes=10**6)
            all_drops += drops
        stats = buf.stats()
        remaining = [b.seq for b in buf.batches_after(0, 100)]
    assert all_drops and all(d.reason == "full" for d in all_drops)
    dropped = sum(d.points for d in all_drops)
    assert stats.dropped_points == dropped == 1000 - stats.points
    assert stats.bytes <= 20_000
    # The newest survive, in order, without gaps: only the oldest went.
    assert remaining == list(range(21 - len(remaining), 21))
    assert read_stats(path).dropped_points == dropped


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
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout is not None
    committed = 0
    deadline = time.monotonic() + 20
    while committed < 400 and time.monotonic() < deadline:
        committed = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    with Buffer(path, gateway="gw-01", max_bytes=10**9) as buf:
        seqs = [b.seq for b in buf.batches_after(0, 100_000)]
        assert seqs[: committed] == list(range(1, committed + 1))
        assert buf.next_seq == seqs[-1] + 1
        next_seqs, _ = buf.add("d", points("d", 1), max_points=10, max_bytes=10**6)
    assert next_seqs[0] > committed


def test_report_by_exception() -> None:
    f = ReportFilter({("d", "temp"): Rule(Deadband(0.5), 60_000), ("d", "pct"): Rule(Deadband(10, percent=True), None),
                      ("d", "raw"): Rule(None, None), ("d", "quiet"): Rule(None, 10_000)})

    def sel(tag: str, ts: int, value: object, quality: Quality = Quality.GOOD, err: str | None = None) -> bool:
        return bool(f.select([Point("d", tag, ts, value, quality, err)]))

    assert sel("temp", 0, 70.0)
    assert not sel("temp", 1000, 70.4)           # within the deadband
    assert sel("temp", 2000, 70.6)               # moved by more than 0.5 from the last reported 70.0
    assert not sel("temp", 3000, 70.9)
    assert sel("temp", 4000, None, Quality.BAD, "timeout")  # quality change: always
    assert not sel("temp", 5000, None, Quality.BAD, "timeout")
    assert sel("temp", 6000, 70.9)
    assert sel("temp", 66_000, 70.9)             # max_silence
    assert sel("pct", 0, 200.0) and not sel("pct", 1, 219.0) and sel("pct", 2, 221.0)
    assert sel("raw", 0, 1) and sel("raw", 1, 1)  # no deadband: every reading
    assert sel("quiet", 0, 1) and not sel("quiet", 1, 1) and sel("quiet", 2, 2) and sel("quiet", 10_002, 2)


def test_max_age_drops_points_older_than_the_limit(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", gateway="gw-01", max_bytes=10**8, max_age_s=0.2) as buf:
        old, _ = buf.add("d", points("d", 3), max_points=10, max_bytes=10**6)
        time.sleep(0.3)
        new, drops = buf.add("d", points("d", 2), max_points=10, max_bytes=10**6)
        remaining = [b.seq for b in buf.batches_after(0, 10)]
    assert [(d.reason, d.points, d.oldest_seq) for d in drops] == [("max_age", 3, old[0])]
    assert remaining == new


def test_acknowledged_batches_are_kept_for_the_replay_window(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", gateway="gw-01", max_bytes=10**8, replay_s=0.3) as buf:
        seqs, _ = buf.add("d", points("d", 10), max_points=5, max_bytes=10**6)
        buf.ack(seqs[:1])
        assert buf.depth == 1 and buf.stats().points == 5  # pending figures only
        assert [b.seq for b in buf.batches_after(0, 10)] == [2]
        assert [(b.seq, b.acked) for b in buf.batches_after(0, 10, replay=True)] == [(1, True), (2, False)]
        time.sleep(0.4)
        buf.ack(seqs[1:])  # acknowledging purges what left the window
        assert [(b.seq, b.acked) for b in buf.batches_after(0, 10, replay=True)] == [(2, True)]
    assert read_stats(tmp_path / "b.db").batches == 0


def test_a_full_buffer_forgets_acknowledged_batches_before_dropping_any(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", gateway="gw-01", max_bytes=8_000, replay_s=3600) as buf:
        seqs, _ = buf.add("d", points("d", 100), max_points=50, max_bytes=10**6)
        buf.ack(seqs)
        _, drops = buf.add("d", points("d", 100), max_points=50, max_bytes=10**6)
        assert drops == [] and buf.stats().dropped_points == 0
        assert [b.acked for b in buf.batches_after(0, 10, replay=True)] == [False, False]
