"""Agent end to end: machines → agent → SQLite buffer → TLS via HAProxy (SNI) → Mosquitto.

    python bench/bench_agent.py [--devices 5] [--tags 1000] [--poll 0.1] [--seconds 10] [--backlog 1000000]

One run measures, on loopback with real Mosquitto and HAProxy:

1. sustained end-to-end points/s: ``--devices`` simulated Modbus devices of
   ``--tags`` tags each, polled every ``--poll`` seconds by ``agent run``,
   counted as they arrive at a subscriber on the broker;
2. the raw baselines from the same run: paho QoS 1 publishes of the same
   batches through the same HAProxy and TLS (points/s), and SQLite inserts
   of the same batches with the agent's durability (points/s);
3. the drain of a ``--backlog``-point buffer while 1,000 live tags keep
   publishing;
4. the agent's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.buffer import Buffer
from agent.bufferread import BufferReader
from drivers.config import Table
from drivers.points import Point
from drivers.simulate.modbus_server import ModbusSimulator, RegisterModel
from factory_edge.mqtt import BrokerSettings, tls_context
from tests.agentproc import AgentProcess
from tests.helpers import free_port
from tests.infra import Haproxy, Mosquitto, TenantPki

GW = "gw-bench"
SEQ = re.compile(rb'"seq":(\d+)')


class Counter:
    """A subscriber counting data points (and remembering seqs) as they arrive."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.points = 0
        self.seqs: set[int] = set()
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-counter", protocol=paho.MQTTv5)
        self.client.tls_set_context(tls_context(settings))
        self.client.on_message = self._message
        self.client.on_connect = lambda c, *a: c.subscribe(f"gw/{GW}/data/#", qos=1)
        self.client.connect(settings.dial_host, settings.port)
        self.client.loop_start()

    def _message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        seq = int(SEQ.search(message.payload).group(1))  # type: ignore[union-attr]
        with self.lock:
            if seq not in self.seqs:
                self.seqs.add(seq)
                self.points += message.payload.count(b'"tag":')

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def sample_batches(tags: int, count: int) -> list[bytes]:
    with tempfile.TemporaryDirectory() as tmp, Buffer(Path(tmp) / "b.db", gateway=GW, max_bytes=10**10) as buf:
        for i in range(count):
            buf.add(
                "dev-0",
                [Point("dev-0", f"t{t}", 1_732_280_000_000 + i, t) for t in range(tags)],
                max_points=500,
                max_bytes=256 * 1024,
            )
        reader = BufferReader(buf.path)
        try:
            return [b.payload for b in reader.pending(0, 10**9)]
        finally:
            reader.close()


def raw_paho(settings: BrokerSettings, payloads: list[bytes], seconds: float, inflight: int) -> float:
    """QoS 1 publishes of ready-made batches through the same proxy and TLS: points/s."""
    done = threading.Semaphore(0)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=GW, protocol=paho.MQTTv5)
    client.tls_set_context(tls_context(settings))
    client.max_inflight_messages_set(inflight)
    client.on_publish = lambda *a: done.release()
    client.connect(settings.dial_host, settings.port)
    client.loop_start()
    points_per = [p.count(b'"tag":') for p in payloads]
    sent = acked_points = 0
    started = time.perf_counter()
    window = threading.Semaphore(inflight)
    client.on_publish = lambda *a: window.release()
    while time.perf_counter() - started < seconds:
        window.acquire()
        client.publish(f"gw/{GW}/data/dev-0", payloads[sent % len(payloads)], qos=1)
        acked_points += points_per[sent % len(payloads)]
        sent += 1
    for _ in range(inflight):
        window.acquire()
    elapsed = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    return acked_points / elapsed


def raw_sqlite(payloads: list[bytes], seconds: float, per_commit: int) -> float:
    """Inserts of the same batches, WAL + synchronous=FULL, ``per_commit`` batches a transaction: points/s."""
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "raw.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE b (seq INTEGER PRIMARY KEY, payload BLOB)")
        points_per = [p.count(b'"tag":') for p in payloads]
        seq = points = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            db.execute("BEGIN")
            for _ in range(per_commit):
                db.execute("INSERT INTO b VALUES (?, ?)", (seq, payloads[seq % len(payloads)]))
                points += points_per[seq % len(payloads)]
                seq += 1
            db.execute("COMMIT")
        elapsed = time.perf_counter() - started
        db.close()
    return points / elapsed


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def models(tags: int) -> RegisterModel:
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, range(tags))
    return model


def device(i: int, port: int, tags: int, poll: float) -> dict[str, Any]:
    return {
        "name": f"dev-{i}",
        "protocol": "modbus-tcp",
        "host": "127.0.0.1",
        "port": port,
        "unit": i + 1,
        "poll": f"{int(poll * 1000)}ms",
        "timeout": "2s",
        "tags": [{"name": f"t{t}", "address": t} for t in range(tags)],
    }


async def main(args: argparse.Namespace) -> None:
    # The simulator's pymodbus logs every refused send when an agent stops.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    pki = TenantPki(work / "pki", "acme")
    cert, key = pki.client(GW)
    results: dict[str, float] = {}
    try:
        with Mosquitto(work / "broker", pki) as broker, Haproxy(work / "proxy", [broker.route]) as proxy:
            agent_mqtt = {
                "url": f"mqtts://{pki.host}:{proxy.port}",
                "connect_host": "127.0.0.1",
                "ca_file": str(pki.ca_file),
                "cert_file": str(cert),
                "key_file": str(key),
            }
            via_proxy = BrokerSettings(
                host=pki.host,
                port=proxy.port,
                tls=True,
                connect_host="127.0.0.1",
                ca_file=str(pki.ca_file),
                cert_file=str(cert),
                key_file=str(key),
            )
            bridge_cert, bridge_key = pki.bridge
            direct = BrokerSettings(
                host=pki.host,
                port=broker.port,
                tls=True,
                connect_host="127.0.0.1",
                ca_file=str(pki.ca_file),
                cert_file=str(bridge_cert),
                key_file=str(bridge_key),
            )
            port = free_port()
            units = {i + 1: models(args.tags) for i in range(args.devices)}
            async with ModbusSimulator(units=units, port=port):
                # 1. sustained end to end
                print(
                    f"[1/4] end to end: {args.devices} devices x {args.tags} tags every {args.poll}s "
                    f"(offered {args.devices * args.tags / args.poll:,.0f} points/s) for {args.seconds}s",
                    flush=True,
                )
                counter = Counter(direct)
                config = {
                    "gateway": GW,
                    "mqtt": agent_mqtt,
                    "buffer": {"max_bytes": "1GiB"},
                    "devices": [device(i, port, args.tags, args.poll) for i in range(args.devices)],
                }
                agent = AgentProcess(work / "agent-live", config).start()
                await asyncio.sleep(3)  # connect, first polls
                start_points, started = counter.points, time.perf_counter()
                await asyncio.sleep(args.seconds)
                results["e2e"] = (counter.points - start_points) / (time.perf_counter() - started)
                status = agent.status()
                results["e2e_backlog"] = status.get("buffer", {}).get("points", 0)
                agent.stop()
                results["rss_live"] = float("nan")
                counter.stop()

                # 2. baselines
                print("[2/4] raw baselines: paho QoS 1 through HAProxy, SQLite inserts", flush=True)
                payloads = sample_batches(args.tags, 50)
                results["paho"] = raw_paho(via_proxy, payloads, min(args.seconds, 5), 20)
                per_commit = max(1, args.tags // 500)
                results["sqlite"] = raw_sqlite(payloads, min(args.seconds, 5), per_commit)

                # 3. backlog drain while 1,000 live tags publish
                print(f"[3/4] drain of a {args.backlog:,}-point backlog with 1,000 live tags", flush=True)
                drain_dir = work / "agent-drain"
                with Buffer(drain_dir / "state" / "buffer.db", gateway=GW, max_bytes=10**10) as buf:
                    batch = [Point("backlog", f"t{t}", 1_732_280_000_000, t) for t in range(500)]
                    backlog_first = buf.next_seq
                    for _ in range(args.backlog // 500):
                        buf.add("backlog", batch, max_points=500, max_bytes=256 * 1024)
                    backlog_last = buf.next_seq - 1
                counter = Counter(direct)
                config = {
                    "gateway": GW,
                    "mqtt": agent_mqtt,
                    "buffer": {"max_bytes": "1GiB"},
                    "devices": [device(0, port, 1000, 1.0)],
                }
                agent = AgentProcess(drain_dir, config)
                started = time.perf_counter()
                agent.start()
                while (
                    not all(s in counter.seqs for s in range(backlog_first, backlog_last + 1, 97))
                    or len([s for s in counter.seqs if s <= backlog_last]) < backlog_last - backlog_first + 1
                ):
                    await asyncio.sleep(0.05)
                    if time.perf_counter() - started > 300:
                        raise SystemExit("backlog did not drain within 300 s")
                drain_s = time.perf_counter() - started
                live = len([s for s in counter.seqs if s > backlog_last])
                results["drain"] = args.backlog / drain_s
                results["drain_live_batches"] = live
                assert agent.proc is not None
                results["rss"] = peak_rss_mb(agent.proc.pid)
                agent.stop()
                counter.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'measure':<52} {'points/s':>12}")
    print(f"{'agent end to end (machines -> broker, deduplicated)':<52} {results['e2e']:>12,.0f}")
    print(f"{'raw paho QoS 1 via HAProxy TLS (same batches)':<52} {results['paho']:>12,.0f}")
    print(f"{'raw SQLite inserts, WAL + fsync (same batches)':<52} {results['sqlite']:>12,.0f}")
    print(f"{'backlog drain (1,000 live tags publishing too)':<52} {results['drain']:>12,.0f}")
    print()
    print(f"agent / raw paho:   {results['e2e'] / results['paho']:.2f}")
    print(f"agent / raw SQLite: {results['e2e'] / results['sqlite']:.2f}")
    print(f"backlog left after the end-to-end run: {results['e2e_backlog']:,} points (0 = kept up)")
    print(f"live batches delivered during the drain: {results['drain_live_batches']}")
    print(f"agent peak RSS (drain run): {results['rss']:.0f} MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--tags", type=int, default=1000)
    parser.add_argument("--poll", type=float, default=0.1)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    asyncio.run(main(parser.parse_args()))
