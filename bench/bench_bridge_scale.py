"""Bridge throughput with 1, 2 and 4 instances sharing a tenant, next to the raw subscriber baseline.

    python bench/bench_bridge_scale.py [--points 200000] [--batch 500] [--instances 1,2,4] [--dsn postgresql://…]

One real tenant Mosquitto (TLS, client certificates) on loopback and the
PostgreSQL server of ``--dsn`` (``FACTORY_EDGE_PG_DSN``). For each count of
instances, that many ``bridge run`` processes (identities ``bridge.t0`` …)
join the shared group ``bridge`` and are stopped cleanly, so the broker
keeps their sessions; the batches are then queued, spread by the broker
over the sessions, and the processes started again. The time runs from the
first instance's connection to the last point committed (polled in the
database every 50 ms), so process start-up is not counted.

The baseline is measured in the same run with the same batches: the raw
paho subscriber that parses each payload with ``json.loads`` and stores
nothing, from ``bench/bench_bridge.py`` (its code, imported).

Every process (broker, bridges, PostgreSQL, this script) shares the
machine's cores: on the 2-core development machine, shared with other work,
more instances mostly show how the work is spread, not a speed-up; on a
machine with cores to spare each instance adds its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_bridge, a sibling script

import psycopg
import yaml
from bench_bridge import GW, Raw, batch, client, publish_all, settings
from psycopg import sql

from factory_edge import names
from tests.bridge_fixtures import PG_DSN, BridgeProcess
from tests.infra import Mosquitto, TenantPki


def write_config(root: Path, pki: TenantPki, broker: Mosquitto, dsn: str) -> Path:
    path = root / "bridge.yaml"
    config = {
        "storage": {"backend": "postgres", "dsn": dsn},
        "tenants": [
            {
                "name": pki.tenant,
                "url": f"mqtts://{pki.host}:{broker.port}",
                "connect_host": "127.0.0.1",
                "ca_file": str(pki.ca_file),
                "identities": pki.bridge_identities(),
                "shared_group": "bridge",
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def stored(dsn: str, tenant: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            row = conn.execute(
                sql.SQL("SELECT coalesce(sum(points), 0) FROM {}.batches").format(sql.Identifier(tenant))
            )
            return int(row.fetchone()[0])  # type: ignore[index]
        except psycopg.errors.UndefinedTable:
            return 0


def drop(dsn: str, tenant: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(tenant)))


def connected_at(bridge: BridgeProcess) -> float | None:
    return next((e["ts"] for e in bridge.logs() if e.get("msg") == "connected to tenant broker"), None)


def run_instances(
    root: Path, config: Path, count: int, messages: list[tuple[str, bytes]], pki: TenantPki, broker: Mosquitto, dsn: str
) -> tuple[float, list[dict[str, Any]]]:
    """Seconds for ``count`` instances to store every point, and each one's totals (``ingest stopped``)."""
    total = sum(len(json.loads(p)["points"]) for _, p in messages)
    bridges = [BridgeProcess(config, instance=f"t{i}", log=root / f"n{count}-t{i}.log") for i in range(count)]
    for bridge in bridges:  # the group's sessions exist at the broker before the batches are queued
        bridge.start()
    for bridge in bridges:
        bridge.wait_connected()
    for bridge in bridges:
        bridge.stop()
    pub = client(settings(pki, broker, GW), f"{GW}-pub", clean=True)
    publish_all(pub, messages)
    pub.disconnect()
    pub.loop_stop()
    for bridge in bridges:
        bridge.log_path.write_text("")  # only this run's lines below
        bridge.start()
    try:
        deadline = time.monotonic() + 600
        while stored(dsn, pki.tenant) < total:
            if time.monotonic() > deadline:
                raise SystemExit(f"{count} instances: not every point stored within 600 s")
            time.sleep(0.05)
        done = time.time()
    finally:
        for bridge in bridges:
            bridge.stop()
    starts = [t for t in (connected_at(b) for b in bridges) if t is not None]
    totals = [next((e for e in b.logs() if e.get("msg") == "ingest stopped"), {}) for b in bridges]
    return done - min(starts), totals


def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="fe-bench-scale-"))
    tenant = f"scale{os.getpid()}"
    pki = TenantPki(root / "pki", tenant)
    broker = Mosquitto(root / "broker", pki).start()
    try:
        with psycopg.connect(args.dsn, connect_timeout=3):
            pass
    except psycopg.Error as exc:
        broker.stop()
        raise SystemExit(f"PostgreSQL at {args.dsn} unreachable (--dsn): {str(exc).strip()}") from None
    batches = args.points // args.batch
    total = batches * args.batch
    messages = [
        (f"gw/{GW}/data/press-{s % 10}", batch(f"press-{s % 10}", s, args.batch)) for s in range(1, batches + 1)
    ]
    config = write_config(root, pki, broker, args.dsn)
    try:
        load = os.getloadavg()
        print(
            f"bridge scale-out: {total:,} points in {batches:,} batches of {args.batch}, queued at a TLS Mosquitto, "
            f"PostgreSQL {args.dsn.rsplit('@', 1)[-1]}, shared subscription $share/bridge "
            f"({os.cpu_count()} CPUs shared by broker, bridges and database; load average {load[0]:.2f})"
        )
        # The baseline, measured now: the raw subscriber with json.loads (bench/bench_bridge.py), alone.
        identity = names.bridge_identity("t3")
        parsing = Raw(settings(pki, broker, identity), f"{identity}-raw", parse=json.loads)
        parsing.create_session()
        pub = client(settings(pki, broker, GW), f"{GW}-pub", clean=True)
        publish_all(pub, messages)
        pub.disconnect()
        pub.loop_stop()
        seconds, _ = parsing.drain(batches)
        baseline = total / seconds
        gone = client(settings(pki, broker, identity), f"{identity}-raw", clean=True)  # end its session
        gone.disconnect()
        gone.loop_stop()
        print(f"  {'raw subscriber + json.loads (baseline)':<36} {baseline:>10,.0f} points/s")
        first = None
        for count in args.instances:
            drop(args.dsn, tenant)
            seconds, totals = run_instances(root, config, count, messages, pki, broker, args.dsn)
            rate = total / seconds
            first = first or rate
            shares = "/".join(f"{t.get('batches', 0)}" for t in totals)
            duplicates = sum(t.get("duplicates", 0) for t in totals)
            print(
                f"  {f'bridge x{count} -> PostgreSQL':<36} {rate:>10,.0f} points/s  {rate / baseline:.2f}x baseline, "
                f"{rate / first:.2f}x one instance; batches per instance {shares}, duplicates {duplicates}"
            )
        print(
            "figures from a shared, busy 2-core machine when run there: every process competes for the same "
            "two cores, so they show the work spread over the instances more than a speed-up"
        )
    finally:
        broker.stop()
        drop(args.dsn, tenant)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200_000, help="points per run (default 200,000)")
    parser.add_argument("--batch", type=int, default=500, help="points per batch (default 500)")
    parser.add_argument(
        "--instances",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 2, 4],
        help="instance counts to measure (default 1,2,4; at most 4)",
    )
    parser.add_argument("--dsn", default=os.environ.get("FACTORY_EDGE_PG_DSN", PG_DSN))
    main(parser.parse_args())
