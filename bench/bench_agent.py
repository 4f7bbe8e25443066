"""Agent end to end: machines → agent → SQLite buffer → TLS via HAProxy (SNI) → Mosquitto, against the targets.

    python bench/bench_agent.py [--seconds 10] [--backlog 1000000] [--skip-rss | --rss-only] [--full-rss]

One run, on loopback with real Mosquitto and HAProxy, the simulated Modbus
devices in this process, ``agent run`` in its own and every batch counted
(deduplicated by seq) as it arrives at a subscriber on the broker:

1. one device, 1,000 contiguous registers polled every 10 ms
   (``max_concurrent_requests: 8``): polls/s delivered (target ≥ 95);
2. 10 devices × 1,000 registers every 100 ms: values/s delivered (target
   100,000, no poll skipped) and the agent's CPU per 1,000 values (target
   ≤ 5 ms);
3. the raw baselines from the same run: paho QoS 1 publishes of the same
   batches through the same HAProxy and TLS (points/s and this process's CPU
   per 1,000 points), and SQLite inserts of the same batches with the
   agent's durability;
4. the drain of a ``--backlog``-point buffer while 1,000 live tags keep
   publishing (target ≥ 500,000 values/s);
5. the agent's RSS after a steady run with Modbus only (target < 40 MB) and
   with a Modbus and an OPC UA device (target < 55 MB);
6. whether that memory stays flat: the Modbus-only agent's RSS, read every
   2 s, through a steady run, a broker outage (the readings go to the
   buffer) and the drain after it. By default 60 s + 30 s + 60 s;
   ``--full-rss`` runs the issue's 10 minutes and 5-minute outage (~20 min).

Latency (register change → broker) is ``bench_delivery.py``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import sqlite3
import subprocess
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
from drivers.simulate.opcua_server import OpcuaSimulator
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


def raw_paho(settings: BrokerSettings, payloads: list[bytes], seconds: float, inflight: int) -> tuple[float, float]:
    """QoS 1 publishes of ready-made batches through the same proxy and TLS: points/s, CPU ms per 1,000 points."""
    done = threading.Semaphore(0)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=GW, protocol=paho.MQTTv5)
    client.tls_set_context(tls_context(settings))
    client.max_inflight_messages_set(inflight)
    client.on_publish = lambda *a: done.release()
    client.connect(settings.dial_host, settings.port)
    client.loop_start()
    points_per = [p.count(b'"tag":') for p in payloads]
    sent = acked_points = 0
    started, cpu_started = time.perf_counter(), time.process_time()
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
    cpu = time.process_time() - cpu_started
    client.disconnect()
    client.loop_stop()
    return acked_points / elapsed, cpu / acked_points * 1e6


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


def rss_mb(pid: int, field: str = "VmHWM") -> float:
    """``VmHWM``: peak resident set; ``VmRSS``: now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def flatness(
    work: Path,
    config: dict[str, Any],
    broker: Mosquitto,
    counter: Counter,
    steady_s: float,
    outage_s: float,
    after_s: float,
) -> dict[str, Any]:
    """RSS every 2 s through ``steady_s`` of running, ``outage_s`` with the broker stopped, ``after_s`` after it."""
    before = counter.points
    agent = AgentProcess(work / "agent-flat", config).start()
    assert agent.proc is not None
    samples: dict[str, list[float]] = {"warm": [], "steady": [], "outage": [], "after": []}

    async def sample(phase: str, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(2)
            samples[phase].append(rss_mb(agent.proc.pid, "VmRSS"))  # type: ignore[union-attr]

    try:
        deadline = time.monotonic() + 120  # started (seconds on a busy machine), connected, first batches through
        while counter.points == before and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await sample("warm", 10)
        await sample("steady", steady_s)
        broker.stop()
        try:
            await sample("outage", outage_s)
            backlog = agent.status().get("buffer", {}).get("points", 0)
        finally:
            broker.start()
        await sample("after", after_s)
        after = agent.status().get("buffer", {}).get("points", 0)
        return {**samples, "backlog": backlog, "backlog_after": after, "peak": rss_mb(agent.proc.pid)}
    finally:
        agent.stop()


async def steady(work: Path, name: str, config: dict[str, Any], counter: Counter, seconds: float) -> dict[str, float]:
    """Run the agent, let it settle, then measure ``seconds``: values/s delivered, CPU, RSS."""
    agent = AgentProcess(work / name, config).start()
    assert agent.proc is not None
    try:
        # Started (the config check and the imports take seconds on a busy machine), connected, first polls.
        before, deadline = counter.points, time.monotonic() + 120
        while counter.points == before and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)
        start_points, started, cpu = counter.points, time.perf_counter(), cpu_s(agent.proc.pid)
        await asyncio.sleep(seconds)
        delivered = counter.points - start_points
        elapsed = time.perf_counter() - started
        used = cpu_s(agent.proc.pid) - cpu
        after = agent.status()
        return {
            "values_per_s": delivered / elapsed,
            "cpu_ms_per_1000": used / max(1, delivered) * 1e6,
            "backlog": after.get("buffer", {}).get("points", 0),
            "rss": rss_mb(agent.proc.pid, "VmRSS"),
            "rss_peak": rss_mb(agent.proc.pid),
        }
    finally:
        agent.stop()


def models(tags: int) -> RegisterModel:
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, range(tags))
    return model


async def serve(port: int, units: int, registers: int) -> None:
    """Child process: ``units`` simulated devices on one port, until the benchmark closes stdin."""
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # sends to agents that are gone
    async with ModbusSimulator(units={i + 1: models(registers) for i in range(units)}, port=port):
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


class Machines:
    """The simulated devices in a process of their own, so that serving them does not slow the counting."""

    def __init__(self, units: int, registers: int) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.port), str(units), str(registers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)


def device(i: int, port: int, tags: int, poll: float, concurrent: int = 8) -> dict[str, Any]:
    return {
        "name": f"dev-{i}",
        "protocol": "modbus-tcp",
        "host": "127.0.0.1",
        "port": port,
        "unit": i + 1,
        "poll": f"{int(poll * 1000)}ms",
        "timeout": "2s",
        "max_concurrent_requests": concurrent,
        "tags": [{"name": f"t{t}", "address": t} for t in range(tags)],
    }


def line(label: str, figure: str, target: str, verdict: bool | None, note: str = "") -> None:
    mark = "" if verdict is None else ("  ok" if verdict else "  BELOW TARGET")
    print(f"  {label:<58} {figure:>16}   target {target:<14}{mark}{('  ' + note) if note else ''}")


async def main(args: argparse.Namespace) -> None:
    logging.getLogger("asyncio").setLevel(logging.ERROR)  # sends to agents that are gone, counted by asyncio
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    pki = TenantPki(work / "pki", "acme")
    cert, key = pki.client(GW)
    results: dict[str, Any] = {}
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
            machines = Machines(10, 1000)
            port = machines.port
            try:
                counter = Counter(direct)
                base = {"gateway": GW, "mqtt": agent_mqtt, "buffer": {"max_bytes": "1GiB"}}

                if not args.rss_only:
                    # 1. one device at 10 ms
                    print("[1/6] one device, 1,000 registers every 10 ms, max_concurrent_requests 8", flush=True)
                    results["fast"] = await steady(
                        work, "agent-fast", {**base, "devices": [device(0, port, 1000, 0.01)]}, counter, args.seconds
                    )
                    # 2. ten devices at 100 ms
                    print("[2/6] 10 devices x 1,000 registers every 100 ms", flush=True)
                    results["ten"] = await steady(
                        work,
                        "agent-ten",
                        {**base, "devices": [device(i, port, 1000, 0.1) for i in range(10)]},
                        counter,
                        args.seconds,
                    )
                    counter.stop()

                    # 3. baselines
                    print("[3/6] raw baselines: paho QoS 1 through HAProxy, SQLite inserts", flush=True)
                    payloads = sample_batches(1000, 50)
                    results["paho"], results["paho_cpu"] = raw_paho(via_proxy, payloads, min(args.seconds, 5), 20)
                    results["sqlite"] = raw_sqlite(payloads, min(args.seconds, 5), 2)

                    # 4. backlog drain while 1,000 live tags publish
                    print(f"[4/6] drain of a {args.backlog:,}-point backlog with 1,000 live tags", flush=True)
                    drain_dir = work / "agent-drain"
                    with Buffer(drain_dir / "state" / "buffer.db", gateway=GW, max_bytes=10**10) as buf:
                        batch = [Point("backlog", f"t{t}", 1_732_280_000_000, t) for t in range(500)]
                        backlog_first = buf.next_seq
                        for _ in range(args.backlog // 500):
                            buf.add("backlog", batch, max_points=500, max_bytes=256 * 1024)
                        backlog_last = buf.next_seq - 1
                    counter = Counter(direct)
                    agent = AgentProcess(drain_dir, {**base, "devices": [device(0, port, 1000, 1.0)]})
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
                    results["drain"] = args.backlog / drain_s
                    results["drain_live_batches"] = len([s for s in counter.seqs if s > backlog_last])
                    assert agent.proc is not None
                    results["drain_rss"] = rss_mb(agent.proc.pid)
                    agent.stop()

                # 5. memory: Modbus only, then Modbus and OPC UA
                if not args.skip_rss:
                    print("[5/6] RSS: Modbus only, then Modbus and OPC UA", flush=True)
                    modbus_only = {**base, "devices": [device(0, port, 1000, 0.1)]}
                    results["rss_modbus"] = await steady(work, "agent-rss-modbus", modbus_only, counter, args.seconds)
                    async with OpcuaSimulator(port=free_port(), extra_nodes=100, update_interval_s=0.1) as sim:
                        opcua = {
                            "name": "oven",
                            "protocol": "opcua",
                            "endpoint": sim.endpoint,
                            "poll": "100ms",
                            "tags": [{"name": f"v{i}", "node": f"ns=2;s=Bench.Value{i}"} for i in range(100)],
                        }
                        both = {**base, "devices": [device(0, port, 1000, 0.1), opcua]}
                        results["rss_both"] = await steady(work, "agent-rss-both", both, counter, args.seconds)
                counter.stop()

                # 6. memory over time, across an outage
                if not args.skip_rss:
                    steady_s, outage_s, after_s = (600, 300, 300) if args.full_rss else (60, 30, 60)
                    print(
                        f"[6/6] RSS flatness, Modbus only: {steady_s:.0f} s steady, {outage_s:.0f} s broker outage, "
                        f"{after_s:.0f} s after",
                        flush=True,
                    )
                    modbus_only = {**base, "devices": [device(0, port, 1000, 0.1)]}
                    counter = Counter(direct)
                    try:
                        results["flat"] = await flatness(
                            work, modbus_only, broker, counter, steady_s, outage_s, after_s
                        )
                    finally:
                        counter.stop()
            finally:
                machines.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()[0]
    print()
    print(
        f"agent targets ({os.cpu_count()} CPUs, load average {load:.2f} at the end; ratios against this run's raw paho)"
    )
    if not args.rss_only:
        fast, ten, paho_cpu = results["fast"], results["ten"], results["paho_cpu"]
        line(
            "1 device x 1,000 registers at 10 ms: polls/s delivered",
            f"{fast['values_per_s'] / 1000:,.1f}",
            ">= 95",
            fast["values_per_s"] / 1000 >= 95,
            f"({fast['values_per_s']:,.0f} values/s = {fast['values_per_s'] / results['paho']:.3f}x raw paho; "
            f"CPU {fast['cpu_ms_per_1000']:.1f} ms per 1,000 values)",
        )
        line(
            "10 devices x 1,000 registers at 100 ms: values/s delivered",
            f"{ten['values_per_s']:,.0f}",
            ">= 100,000",
            ten["values_per_s"] >= 99_000,
            f"({ten['values_per_s'] / results['paho']:.3f}x raw paho; backlog at the end {ten['backlog']:,} points)",
        )
        line(
            "   agent CPU per 1,000 values",
            f"{ten['cpu_ms_per_1000']:.2f} ms",
            "<= 5 ms",
            ten["cpu_ms_per_1000"] <= 5,
            f"({ten['cpu_ms_per_1000'] / paho_cpu:.1f}x raw paho's {paho_cpu:.2f} ms publishing ready-made batches)",
        )
        line(
            "backlog drain, 1,000 live tags publishing too: values/s",
            f"{results['drain']:,.0f}",
            ">= 500,000",
            results["drain"] >= 500_000,
            f"({results['drain'] / results['paho']:.2f}x raw paho; {results['drain_live_batches']} live batches "
            f"delivered meanwhile; peak RSS {results['drain_rss']:.0f} MB)",
        )
    if not args.skip_rss:
        for rss_key, label, limit in (("rss_modbus", "Modbus only", 40), ("rss_both", "Modbus and OPC UA", 55)):
            r = results[rss_key]
            line(
                f"agent RSS, {label}, after {args.seconds:.0f} s",
                f"{r['rss']:.1f} MB",
                f"< {limit} MB",
                r["rss"] < limit,
                f"(peak {r['rss_peak']:.1f} MB)",
            )
    if not args.skip_rss:
        flat = results["flat"]
        # RSS moves by a few hundred KiB from one reading to the next: compare the highest reading anywhere with
        # the highest of the steady phase's first quarter. Flat: less than 2 MB above it.
        start = max(flat["steady"][: max(1, len(flat["steady"]) // 4)])
        highest = max(flat["steady"] + flat["outage"] + flat["after"])
        line(
            "agent RSS flat: steady, outage, after (start -> highest)",
            f"{start:.1f} -> {highest:.1f} MB",
            "< 40 MB, flat",
            highest < 40 and highest - start < 2,
            "(highest in each phase {} MB; backlog {:,} points at the outage's end, {:,} at the end)".format(
                " / ".join(f"{max(flat[k]):.1f}" for k in ("steady", "outage", "after")),
                flat["backlog"],
                flat["backlog_after"],
            ),
        )
        window = max(1, round(30 * (len(flat["steady"]) / 300)) or 1)  # ~30 readings shown over a full run
        series = " | ".join(
            f"{phase} " + " ".join(f"{max(r[i : i + window]):.1f}" for i in range(0, len(r), window))
            for phase, r in ((k, flat[k]) for k in ("steady", "outage", "after"))
        )
        print(f"    RSS in MB, highest of each {2 * window} s: {series}")
    if not args.rss_only:
        print(
            f"raw baselines: paho QoS 1 via HAProxy TLS {results['paho']:,.0f} points/s at {paho_cpu:.2f} ms CPU per "
            f"1,000; SQLite inserts, WAL + fsync {results['sqlite']:,.0f} points/s"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        asyncio.run(serve(*(int(a) for a in sys.argv[2:5])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="measuring time of each steady run")
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--skip-rss", action="store_true", help="leave out the memory runs")
    parser.add_argument("--rss-only", action="store_true", help="only the memory runs (5 and 6)")
    parser.add_argument(
        "--full-rss", action="store_true", help="flatness over 10 minutes and a 5-minute outage (default 60 s + 30 s)"
    )
    asyncio.run(main(parser.parse_args()))
