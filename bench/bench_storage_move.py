"""How long a tenant's ingest pauses while its storage moves to another PostgreSQL server.

    python bench/bench_storage_move.py [--points 500000] [--dsn postgresql://…]

The tenant is filled on the server of ``--dsn`` (``FACTORY_EDGE_PG_DSN``)
through the bridge's own store (batches of 500 points, binary COPY), then
moved with ``bridge.storage.move.move_tenant`` to a second server this
script starts (``tests/pgserver.py``, same machine). Printed: the copy's
rows/s and seconds, next to the raw baseline measured in the same run, a
``COPY (SELECT …) TO STDOUT`` of the same ``points`` table read and
discarded (the read side alone, the copy's upper bound); and the pause
that rate gives per million stored points.

Both servers and this script share the machine's cores; on the 2-core
development machine, shared with other work, the figures are noisy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg import sql

from bridge.config import StorageConfig
from bridge.messages import DataBatch
from bridge.storage.move import move_tenant
from bridge.storage.postgres import PostgresStore
from tests.bridge_fixtures import PG_DSN
from tests.pgserver import PgServer, pg_bin


def fill(dsn: str, tenant: str, points: int, per_batch: int = 500) -> float:
    """Store ``points`` readings as the bridge does; returns the seconds it took."""
    store = PostgresStore(dsn, tenant)
    store.open()
    started = time.perf_counter()
    ts0 = 1_700_000_000_000
    seq = 0
    try:
        while seq * per_batch < points:
            window = []
            for _ in range(20):  # a commit window of 20 batches
                seq += 1
                rows = [
                    ("gw-bench", "press-1", f"t{i % 50}", ts0 + seq * per_batch + i, float(i), "good", None, seq)
                    for i in range(per_batch)
                ]
                window.append(DataBatch("gw-bench", "press-1", seq, rows, ts0))
            with store.transaction() as tx:
                tx.insert_points(tx.claim_batches(window))
    finally:
        store.close()
    return time.perf_counter() - started


def read_alone(dsn: str, tenant: str) -> tuple[int, float]:
    """Bytes and seconds to read the tenant's points out with binary COPY, discarding them."""
    started = time.perf_counter()
    size = 0
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        query = sql.SQL("COPY (SELECT * FROM {}) TO STDOUT (FORMAT BINARY)").format(sql.Identifier(tenant, "points"))
        with cur.copy(query) as copy:
            for block in copy:
                size += len(block)
    return size, time.perf_counter() - started


def main(args: argparse.Namespace) -> None:
    if pg_bin() is None:
        raise SystemExit("PostgreSQL server binaries not installed (apt-get install postgresql)")
    tenant = f"move{os.getpid()}"
    try:
        with psycopg.connect(args.dsn, connect_timeout=3):
            pass
    except psycopg.Error as exc:
        raise SystemExit(f"PostgreSQL at {args.dsn} unreachable (--dsn): {str(exc).strip()}") from None
    try:
        with PgServer() as second:
            filled = fill(args.dsn, tenant, args.points)
            size, read_s = read_alone(args.dsn, tenant)
            load = os.getloadavg()
            print(
                f"storage move: a tenant of {args.points:,} points ({size / 2**20:.0f} MiB as binary COPY), "
                f"{args.dsn.rsplit('@', 1)[-1]} -> a second PostgreSQL 127.0.0.1:{second.port} on this machine "
                f"({os.cpu_count()} CPUs, load average {load[0]:.2f}); filled through the store in {filled:.1f} s"
            )
            report = move_tenant(
                tenant,
                StorageConfig(backend="postgres", dsn=args.dsn),
                StorageConfig(backend="postgres", dsn=second.dsn),
            )
            rows = report.total_rows
            rate = rows / report.copy_s
            print(f"  {'raw COPY out of points, discarded (baseline)':<46} {args.points / read_s:>12,.0f} rows/s")
            print(
                f"  {'move_tenant: every table, one transaction':<46} {rate:>12,.0f} rows/s  "
                f"({rows:,} rows in {report.copy_s:.1f} s, {rate / (args.points / read_s):.2f}x the baseline)"
            )
            print(
                f"  ingest pause per million stored rows at that rate: {1e6 / rate:.1f} s "
                f"(100 million: {1e8 / rate / 60:.0f} min); plus up to 2 s for each instance to see the move"
            )
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(tenant)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=500_000, help="points in the tenant (default 500,000)")
    parser.add_argument("--dsn", default=os.environ.get("FACTORY_EDGE_PG_DSN", PG_DSN))
    main(parser.parse_args())
