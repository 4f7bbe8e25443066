"""Bridge ingest into SQLite and PostgreSQL against raw subscribers, and alert latency.

    python bench/bench_bridge.py [--points 500000] [--batch 500] [--samples 200] [--dsn postgresql://…]

One real tenant Mosquitto (TLS, client certificates) on loopback. The same
batches are queued at the broker for persistent sessions that each drain
their queue alone, points/s from connecting to the last message handled:

- raw paho subscribers that store nothing: one only receives and
  acknowledges, one also parses each payload with ``json.loads`` (the
  parse-only baseline the targets are set against), one with orjson;
- the bridge into SQLite and into PostgreSQL, to the last row committed
  (the bridge runs in this process, the same code as ``bridge run``, so the
  end is seen without polling the database).

Next to each backend, the same run measures the store alone: the same
batches, already decoded, claimed and inserted through the store's own
transactions with no MQTT and no decoding. That is the ceiling the bridge
can approach on this machine.

Alert latency: a rule ``above`` with no ``for:``. Each sample publishes a
triggering reading (then a clearing one), and times from the publish to the
alert arriving at a subscriber. It runs idle and under a background stream
of data, against the broker as provisioning configures it (with
``set_tcp_nodelay true``: Mosquitto otherwise leaves Nagle's algorithm on,
which holds a small message back for up to the peer's delayed-ACK time,
~40 ms, on an otherwise quiet connection).

On a machine shared with other work the rates move with the load; the CPU
per 1,000 points of each subscriber, printed next to its rate, moves less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from psycopg import sql

from bridge.config import validate_config
from bridge.decode import decode_batch
from bridge.service import Bridge
from bridge.storage.base import Store
from bridge.storage.postgres import PostgresStore
from bridge.storage.sqlite import SqliteStore
from factory_edge import names
from factory_edge.mqtt import BrokerSettings, tls_context
from tests.infra import Mosquitto, TenantPki

GW = "gw-bench"


def settings(pki: TenantPki, broker: Mosquitto, name: str) -> BrokerSettings:
    """``name``'s certificate: the broker makes its CN the client id, so each subscriber needs its own."""
    cert, key = pki.paths(name) if name in pki.certs else pki.client(name)
    return BrokerSettings(
        host=pki.host,
        port=broker.port,
        tls=True,
        connect_host="127.0.0.1",
        ca_file=str(pki.ca_file),
        cert_file=str(cert),
        key_file=str(key),
    )


def client(s: BrokerSettings, client_id: str, *, clean: bool = False) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.tls_set_context(tls_context(s))
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 0 if clean else 3600
    properties.ReceiveMaximum = 2000
    c.connect(s.dial_host, s.port, keepalive=60, clean_start=clean, properties=properties)
    c.loop_start()
    if not connected.wait(10):
        raise SystemExit(f"cannot connect {client_id}")
    return c


def batch(device: str, seq: int, points: int, value: float = 1.0) -> bytes:
    ts = int(time.time() * 1000)
    return json.dumps(
        {
            "v": 1,
            "gw": GW,
            "dev": device,
            "seq": seq,
            "points": [{"tag": f"t{i % 50}", "ts": ts + i, "v": value + i, "q": "good"} for i in range(points)],
        },
        separators=(",", ":"),
    ).encode()


def publish_all(pub: paho.Client, messages: list[tuple[str, bytes]]) -> None:
    infos = [pub.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(60)


class Raw:
    """A persistent-session paho subscriber that counts messages (paho acknowledges them)."""

    def __init__(self, s: BrokerSettings, client_id: str, *, parse: Any = None) -> None:
        self.s = s
        self.client_id = client_id
        self.parse = parse
        self.count = 0
        self.done = threading.Event()
        self.expected = 0

    def create_session(self) -> None:
        c = client(self.s, self.client_id)
        c.subscribe("gw/+/data/+", qos=1)
        time.sleep(0.3)
        c.disconnect()
        c.loop_stop()

    def drain(self, expected: int) -> tuple[float, float]:
        """Seconds to receive ``expected`` messages, and the CPU seconds this process spent on it."""
        self.expected = expected

        def on_message(c: Any, u: Any, message: paho.MQTTMessage) -> None:
            if self.parse is not None:
                self.parse(message.payload)
            self.count += 1
            if self.count == self.expected:
                self.done.set()

        started, cpu = time.perf_counter(), time.process_time()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        c.tls_set_context(tls_context(self.s))
        c.on_message = on_message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        properties.ReceiveMaximum = 2000
        c.connect(self.s.dial_host, self.s.port, keepalive=60, clean_start=False, properties=properties)
        c.loop_start()
        if not self.done.wait(300):
            raise SystemExit(f"raw subscriber got {self.count} of {expected}")
        elapsed, used = time.perf_counter() - started, time.process_time() - cpu
        c.disconnect()
        c.loop_stop()
        return elapsed, used


def bridge_config(
    pki: TenantPki,
    broker: Mosquitto,
    storage: dict[str, Any],
    rules: list[dict[str, Any]] | None = None,
    instance: str = "test",
) -> Any:
    cert, key = pki.bridge
    return validate_config(
        {
            "instance": instance,  # identity bridge.<instance>, one of the TenantPki's
            "storage": storage,
            "tenants": [
                {
                    "name": pki.tenant,
                    "url": f"mqtts://{pki.host}:{broker.port}",
                    "connect_host": "127.0.0.1",
                    "ca_file": str(pki.ca_file),
                    "cert_file": str(cert),
                    "key_file": str(key),
                    "identities": pki.bridge_identities(),
                }
            ],
            "alerts": {"rules": rules or []},
        }
    )


async def wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def create_session(config: Any) -> None:
    async with Bridge(config) as bridge:
        consumer = bridge.tenants[0].consumers
        await wait(lambda: consumer and consumer[0].connected.is_set(), 20, "bridge connection")
        await asyncio.sleep(0.3)


class ServerCpu:
    """CPU seconds of the PostgreSQL backends serving one tenant's bridge connections, when the server runs on
    this host (read from /proc); None otherwise. The server's share of the work is not in the bridge's own CPU."""

    def __init__(self, dsn: str | None, tenant: str) -> None:
        self.dsn = dsn
        self.tenant = tenant
        self.start: dict[int, float] = {}

    def _sample(self) -> dict[int, float]:
        if self.dsn is None:
            return {}
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            pids = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                (f"factory-edge bridge {self.tenant}"[:63],),
            ).fetchall()
        out = {}
        for (pid,) in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # another host's server, or gone
            out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return out

    def begin(self) -> None:
        self.start = self._sample()

    def seconds(self) -> float | None:
        end = self._sample()
        if not end:
            return None
        return sum(v - self.start.get(pid, 0.0) for pid, v in end.items())


async def drain(config: Any, points: int, server: ServerCpu) -> tuple[float, float, float | None]:
    """Seconds to store every point, the CPU seconds this process (the bridge) spent on it, and the database
    server's (PostgreSQL on this host)."""
    async with Bridge(config) as bridge:
        tenant = bridge.tenants[0]
        server.begin()
        started, cpu = time.perf_counter(), time.process_time()
        await wait(lambda: tenant.ingests and tenant.ingests[0].stats.points >= points, 600, "every point stored")
        elapsed, used = time.perf_counter() - started, time.process_time() - cpu
        return elapsed, used, server.seconds()


async def alert_latency(config: Any, pki: TenantPki, broker: Mosquitto, samples: int, load_pps: int) -> list[float]:
    """Seconds from publishing a triggering (or clearing) reading to its alert arriving at a subscriber."""
    arrived: dict[str, float] = {}
    got = threading.Event()
    watcher = client(settings(pki, broker, "bridge"), "alert-watcher", clean=True)

    def on_message(c: Any, u: Any, message: paho.MQTTMessage) -> None:
        if message.retain:
            return  # an earlier run's alert, retained
        doc = json.loads(message.payload)
        arrived[f"{doc['device']}:{doc['state']}"] = time.perf_counter()
        got.set()

    watcher.on_message = on_message
    watcher.subscribe("alerts/#", qos=1)
    pub = client(settings(pki, broker, GW), f"{GW}-alerts", clean=True)
    stop = threading.Event()
    background = threading.Thread(target=stream, args=(pki, broker, load_pps, stop), daemon=True) if load_pps else None
    latencies: list[float] = []
    async with Bridge(config) as bridge:
        consumers = bridge.tenants[0].consumers
        await wait(lambda: consumers and consumers[0].connected.is_set(), 20, "bridge connection")
        if background:
            background.start()
            await asyncio.sleep(1.0)
        seq = 10_000_000 + 1_000_000 * bool(load_pps)  # the idle and loaded runs share a store: seqs of their own
        for i in range(samples):
            device = f"cnc-{load_pps}-{i}"
            for value, state in ((100.0, "firing"), (0.0, "resolved")):
                seq += 1
                payload = batch(device, seq, 1, value)
                key = f"{device}:{state}"
                sent = time.perf_counter()
                pub.publish(f"gw/{GW}/data/{device}", payload, qos=1)
                await wait(lambda key=key: key in arrived, 10, f"alert {key}")
                latencies.append(arrived[key] - sent)
        stop.set()
    if background:
        background.join(10)
    for c in (watcher, pub):
        c.disconnect()
        c.loop_stop()
    return latencies


def stream(pki: TenantPki, broker: Mosquitto, points_per_s: int, stop: threading.Event) -> None:
    """Background data: 100-point batches at ``points_per_s`` from another gateway."""
    pub = client(settings(pki, broker, "gw-load"), "gw-load", clean=True)
    seq, per_batch = 0, 100
    interval = per_batch / points_per_s
    next_at = time.perf_counter()
    while not stop.is_set():
        seq += 1
        ts = int(time.time() * 1000)
        doc = {
            "v": 1,
            "gw": "gw-load",
            "dev": "line-1",
            "seq": seq,
            "points": [{"tag": f"t{i}", "ts": ts, "v": float(i), "q": "good"} for i in range(per_batch)],
        }
        pub.publish("gw/gw-load/data/line-1", json.dumps(doc, separators=(",", ":")), qos=1)
        next_at += interval
        time.sleep(max(0.0, next_at - time.perf_counter()))
    pub.disconnect()
    pub.loop_stop()


def store_alone(
    store: Store, messages: list[tuple[str, bytes]], per_commit: int, server: ServerCpu
) -> tuple[float, float, float | None]:
    """Points/s of the store with no MQTT and no decoding (pre-decoded batches, claimed and inserted), this
    process's CPU ms per 1,000, and the database server's (PostgreSQL on this host)."""
    batches = [decode_batch(GW, topic.rsplit("/", 1)[1], payload, 0) for topic, payload in messages]
    store.open()
    try:
        server.begin()
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(batches), per_commit):
            with store.transaction() as tx:
                tx.insert_points(tx.claim_batches(batches[i : i + per_commit]))
        rows = sum(len(b.rows) for b in batches)
        elapsed, used = time.perf_counter() - started, time.process_time() - cpu
        server_s = server.seconds()
        return rows / elapsed, used / rows * 1e6, None if server_s is None else server_s / rows * 1e6
    finally:
        store.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="fe-bench-bridge-"))
    tenant = f"bench{os.getpid()}"
    pki = TenantPki(root / "pki", tenant)
    broker = Mosquitto(root / "broker", pki).start()
    pg_ok = True
    try:
        with psycopg.connect(args.dsn, connect_timeout=3):
            pass
    except psycopg.Error as exc:
        pg_ok = False
        print(f"PostgreSQL at {args.dsn} unreachable, skipped: {str(exc).strip()}")
    batches = args.points // args.batch
    total = batches * args.batch
    sqlite_config = bridge_config(pki, broker, {"backend": "sqlite", "path": str(root / "data")}, instance="one")
    pg_config = bridge_config(pki, broker, {"backend": "postgres", "dsn": args.dsn}, instance="two")
    try:
        raw = Raw(settings(pki, broker, names.bridge_identity("t0")), names.bridge_identity("t0"))
        raw.create_session()
        parsing = Raw(settings(pki, broker, names.bridge_identity("t1")), names.bridge_identity("t1"), parse=json.loads)
        parsing.create_session()
        fast_parsing = Raw(
            settings(pki, broker, names.bridge_identity("t2")), names.bridge_identity("t2"), parse=orjson.loads
        )
        fast_parsing.create_session()
        await create_session(sqlite_config)
        if pg_ok:
            await create_session(pg_config)
        pub = client(settings(pki, broker, GW), f"{GW}-pub", clean=True)
        messages = [
            (f"gw/{GW}/data/press-{s % 10}", batch(f"press-{s % 10}", s, args.batch)) for s in range(1, batches + 1)
        ]
        publish_all(pub, messages)
        pub.disconnect()
        pub.loop_stop()
        size = sum(len(p) for _, p in messages) / len(messages)
        load = os.getloadavg()
        print(
            f"bridge ingest: {total:,} points in {batches:,} batches of {args.batch} (~{size / 1024:.0f} KiB), "
            f"queued at a TLS Mosquitto, drained by each subscriber alone (loopback, {os.cpu_count()} CPUs, "
            f"load average {load[0]:.2f})"
        )

        def ms(cpu: float) -> str:
            return f"CPU {cpu / total * 1e6:.2f} ms per 1,000 points"

        seconds, cpu = raw.drain(batches)
        raw_pps = total / seconds
        print(f"  {'raw paho subscriber (no parsing)':<38} {raw_pps:>10,.0f} points/s  {ms(cpu)}")
        seconds, parse_cpu = parsing.drain(batches)
        parse_pps = total / seconds
        print(f"  {'raw subscriber + json.loads (baseline)':<38} {parse_pps:>10,.0f} points/s  {ms(parse_cpu)}")
        seconds, cpu = fast_parsing.drain(batches)
        fast_pps = total / seconds
        print(
            f"  {'raw subscriber + orjson.loads':<38} {fast_pps:>10,.0f} points/s  {fast_pps / parse_pps:.2f}x baseline, "
            f"{ms(cpu)}"
        )
        per_commit = max(1, 100_000 // args.batch)
        results: list[tuple[str, Any, float, Callable[[], Store], ServerCpu, ServerCpu]] = [
            (
                "SQLite (WAL, fsync on)",
                sqlite_config,
                0.3,
                lambda: SqliteStore(root / "alone", "alone"),
                ServerCpu(None, tenant),
                ServerCpu(None, "alone"),
            )
        ]
        if pg_ok:
            results.append(
                (
                    "PostgreSQL (binary COPY)",
                    pg_config,
                    0.2,
                    lambda: PostgresStore(args.dsn, f"{tenant}_alone"),
                    ServerCpu(args.dsn, tenant),
                    ServerCpu(args.dsn, f"{tenant}_alone"),
                )
            )

        def server_ms(seconds: float | None) -> str:
            return "" if seconds is None else f", server CPU {seconds / total * 1e6:.2f} ms per 1,000 points"

        results = [r for r in results if r[0].split()[0].lower() in args.backends.split(",")]
        for label, config, target, make_store, server, alone_server in results:
            seconds, cpu, server_s = await drain(config, total, server)
            bridge_pps = total / seconds
            alone_pps, alone_cpu, alone_server_ms = store_alone(make_store(), messages, per_commit, alone_server)
            ratio = bridge_pps / parse_pps
            print(
                f"  {'bridge -> ' + label:<38} {bridge_pps:>10,.0f} points/s  {ratio:.2f}x baseline "
                f"(target {target:.1f}x, {target * parse_pps:,.0f} in this run: "
                f"{'ok' if ratio >= target else 'BELOW TARGET'}); bridge {ms(cpu)}, "
                f"{parse_cpu / cpu:.2f}x the baseline's per point{server_ms(server_s)}"
            )
            print(
                f"  {'   the store alone, decoded rows':<38} {alone_pps:>10,.0f} points/s  "
                f"(the bridge reaches {bridge_pps / alone_pps:.2f} of it); CPU {alone_cpu:.2f} ms per 1,000 points"
                + ("" if alone_server_ms is None else f", server CPU {alone_server_ms:.2f} ms per 1,000 points")
            )
        rules = [{"name": "hot", "device": "cnc-*", "tag": "t0", "above": 50.0}]
        print(
            f"alert latency (publish -> alert received by a subscriber), {args.samples} firing + "
            f"{args.samples} resolved samples, SQLite:"
        )
        alert_config = bridge_config(
            pki, broker, {"backend": "sqlite", "path": str(root / "alerts")}, rules, instance="test"
        )
        for load_label, rate in (("idle", 0), (f"{args.load:,} points/s of other data", args.load))[
            : 2 if args.samples else 0
        ]:
            latencies = await alert_latency(alert_config, pki, broker, args.samples, rate)
            verdict = ""
            if rate:
                verdict = "  (target p99 < 20 ms: " + ("ok)" if pct(latencies, 0.99) < 0.020 else "MISSED)")
            print(
                f"  {'broker as provisioned (set_tcp_nodelay true), ' + load_label:<64} "
                f"p50 {pct(latencies, 0.5) * 1000:5.1f} ms   p99 {pct(latencies, 0.99) * 1000:5.1f} ms   "
                f"max {max(latencies) * 1000:5.1f} ms{verdict}"
            )
        print(
            "targets: SQLite >= 0.3x and PostgreSQL >= 0.2x the json.loads baseline (300,000 and 200,000 points/s "
            "on a quiet 2-core machine); alert p99 < 20 ms under 10,000 points/s of other data"
        )
    finally:
        broker.stop()
        if pg_ok:
            with psycopg.connect(args.dsn, autocommit=True) as conn:
                for schema in (tenant, f"{tenant}_alone"):
                    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=500_000, help="points queued per subscriber")
    parser.add_argument("--batch", type=int, default=500, help="points per batch message")
    parser.add_argument("--samples", type=int, default=200, help="alert latency samples per run (0: none)")
    parser.add_argument(
        "--backends", default="sqlite,postgresql", help="the stores to measure: sqlite, postgresql or both"
    )
    parser.add_argument("--load", type=int, default=10_000, help="background points/s in the loaded latency run")
    parser.add_argument(
        "--dsn", default=os.environ.get("FACTORY_EDGE_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    )
    asyncio.run(main(parser.parse_args()))
