"""Storage per point in each tenant store (SQLite and PostgreSQL), against the bytes of a plain row.

    python bench/bench_storage.py [--gateways 1000] [--tags 10] [--seconds 30] [--per-commit 1000] [--dsn …]

Fills each store through its own transactions (``claim_batches`` and
``insert_points``, as the bridge does) with the readings of ``--gateways``
gateways, each publishing one batch of ``--tags`` readings per second for
``--seconds`` seconds (1 s polls, float values in a random walk, quality
good), decoded from the same JSON batches the agent sends, ``--per-commit``
batches per transaction (the bridge's window, ``ingest.max_messages``: with
a fleet this large each window holds one reading of each series, the
costly case for the per-minute aggregates). Then it prints
the bytes on disk per point, and what that means per day for every 1,000
points/s a tenant sends: the figure a capacity plan needs.

Measured in the same run, for comparison:

- the JSON batch on the wire, per point;
- a plain PostgreSQL table with the same columns, no index, filled by COPY:
  the floor of PostgreSQL's row format (about 24 bytes of row header, plus
  the values).

TimescaleDB compression, where installed, shrinks old chunks many times
over; this measures the stores as they are without it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg import sql

from bridge.decode import decode_batch
from bridge.messages import DataBatch
from bridge.storage.base import Store
from bridge.storage.postgres import PostgresStore
from bridge.storage.sqlite import SqliteStore

PER_DAY = 86_400


def batches(gateways: int, tags: int, seconds: int) -> tuple[list[DataBatch], int]:
    """The decoded batches, and the JSON bytes they were on the wire."""
    rng = random.Random(17)
    values = [[rng.uniform(0, 100) for _ in range(tags)] for _ in range(gateways)]
    start_ms = int(time.time() * 1000) - seconds * 1000
    out, wire = [], 0
    for second in range(seconds):
        for g in range(gateways):
            ts = start_ms + second * 1000 + g
            points = []
            for t in range(tags):
                values[g][t] += rng.gauss(0, 0.5)
                points.append({"tag": f"tag_{t:03d}", "ts": ts, "v": round(values[g][t], 3), "q": "good"})
            payload = json.dumps(
                {"v": 1, "gw": f"gw-{g:04d}", "dev": "press-1", "seq": second + 1, "points": points},
                separators=(",", ":"),
            ).encode()
            wire += len(payload)
            out.append(decode_batch(f"gw-{g:04d}", "press-1", payload, ts))
    return out, wire


def fill(store: Store, data: list[DataBatch], per_commit: int) -> float:
    """Points/s of the store's own transactions (what the bridge's storage step does)."""
    store.open()
    try:
        started = time.perf_counter()
        for i in range(0, len(data), per_commit):
            with store.transaction() as tx:
                tx.insert_points(tx.claim_batches(data[i : i + per_commit]))
        return sum(len(b.rows) for b in data) / (time.perf_counter() - started)
    finally:
        store.close()


def sqlite_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def pg_bytes(conn: psycopg.Connection[Any], schema: str, tables: list[str]) -> dict[str, int]:
    """Each table with its indexes and TOAST (the WAL is not counted: it is recycled)."""
    sizes = {}
    for table in tables:
        row = conn.execute("SELECT pg_total_relation_size(%s::regclass)", (f'"{schema}".{table}',)).fetchone()
        sizes[table] = int(row[0]) if row else 0
    return sizes


def per_day(bytes_per_point: float) -> str:
    """GB per day for every 1,000 points/s."""
    return f"{bytes_per_point * 1000 * PER_DAY / 1e9:6.1f} GB/day per 1,000 points/s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=1000, help="gateways, one batch per second each (1000)")
    parser.add_argument("--tags", type=int, default=10, help="readings per batch (10)")
    parser.add_argument("--seconds", type=int, default=30, help="seconds of readings (30)")
    parser.add_argument(
        "--per-commit", type=int, default=1000, help="batches per transaction (1000, the bridge's max_messages)"
    )
    parser.add_argument(
        "--dsn", default=os.environ.get("FACTORY_EDGE_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    )
    args = parser.parse_args()
    data, wire = batches(args.gateways, args.tags, args.seconds)
    points = sum(len(b.rows) for b in data)
    print(
        f"storage per point: {points:,} readings = {args.gateways} gateways x {args.tags} tags x "
        f"{args.seconds} s, one batch per gateway per second"
    )
    print(f"  JSON batches on the wire                 {wire / points:7.1f} bytes/point   {per_day(wire / points)}")
    with tempfile.TemporaryDirectory(prefix="fe-bench-storage-") as tmp:
        root = Path(tmp)
        rate = fill(SqliteStore(root, "storage"), data, args.per_commit)
        size = sqlite_bytes(root)
        print(
            f"  SQLite store (file, WAL included)        {size / points:7.1f} bytes/point   {per_day(size / points)}"
            f"   ({rate:,.0f} points/s stored)"
        )
    schema = f"fe_bench_storage_{os.getpid()}"
    try:
        conn = psycopg.connect(args.dsn, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        print(f"PostgreSQL at {args.dsn} unreachable, skipped: {str(exc).strip()}")
        return 0
    with conn:
        timescale = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
        try:
            rate = fill(PostgresStore(args.dsn, schema), data, args.per_commit)
            # The per-minute rows are updated in place by every window (a dead row version each time, reused
            # once autovacuum has passed): compacted here to their live size, as in a store that has run a while.
            for table in ("points", "batches", "points_minute"):
                conn.execute(sql.SQL("VACUUM FULL ANALYZE {}").format(sql.Identifier(schema, table)))
            sizes = pg_bytes(conn, schema, ["points", "batches", "points_minute"])
            minute_rows = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, "points_minute"))
            ).fetchone()
            per_row = sizes["points_minute"] / max(1, minute_rows[0] if minute_rows else 1)
            per_point = {
                "points": sizes["points"] / points,
                "batches": sizes["batches"] / points,
                "points_minute": per_row / 60,  # one row per series and minute: 60 readings at 1 s polls
            }
            total = sum(per_point.values())
            print(
                f"  PostgreSQL store                         {total:7.1f} bytes/point   {per_day(total)}"
                f"   ({rate:,.0f} points/s stored{', TimescaleDB' if timescale else ', no TimescaleDB'})"
            )
            print(
                f"    points (table and its (gw, device, tag, ts) index) {per_point['points']:.1f}, "
                f"batches {per_point['batches']:.1f} ({args.tags} points per batch), "
                f"points_minute {per_row:.0f} bytes per series-minute = {per_point['points_minute']:.1f} "
                "bytes/point at 1 s polls"
            )
            plain = sql.Identifier(schema, "plain")
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (gw text, device text, tag text, ts bigint, value double precision, "
                    "value_text text, quality text, error text, seq bigint)"
                ).format(plain)
            )
            with conn.cursor() as cursor, cursor.copy(sql.SQL("COPY {} FROM STDIN").format(plain)) as copy:
                for b in data:
                    for gw, device, tag, ts, value, quality, error, seq in b.rows:
                        copy.write_row((gw, device, tag, ts, value, None, quality, error, seq))
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(plain))
            plain_size = pg_bytes(conn, schema, ["plain"])["plain"]
            print(
                f"  plain PostgreSQL rows, no index (floor)  {plain_size / points:7.1f} bytes/point   "
                f"{per_day(plain_size / points)}"
            )
        finally:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    print(
        "per day: bytes/point x 86,400 s x points/s; a tenant crossing 100 GB/day "
        "is the threshold for a dedicated database (docs/scaling.md)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
