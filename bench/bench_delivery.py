"""Delivery: latency over TLS with the durable buffer, reconnect after an outage, polls beside a busy disk.

    python bench/bench_delivery.py [--seconds 20] [--outage 30] [--fsync-load-s 20]

On loopback with real Mosquitto and HAProxy, ``agent run`` reading the
ground-truth machine (``tests/groundtruth.py``, which writes down when it
served each reading), one run measures:

1. end-to-end latency, reading served by the machine → batch at a
   subscriber on the broker, at 100 ms polls over TLS through HAProxy, with
   the buffer's fsync on (targets p50 ≤ 20 ms, p99 ≤ 60 ms); baseline: raw paho QoS 1
   publishes of the same size over the same path, timed the same way;
2. reconnect: the broker stopped for ``--outage`` seconds, then the time
   from its return to the agent's first batch at the subscriber (target
   ≤ 2 s); baseline: how soon a fresh raw TLS connection succeeds;
3. poll periods (from the timestamps the agent gave its readings) at
   100 ms, quiet and while another process writes and fsyncs on the same
   disk (target: no poll skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import itertools

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from factory_edge.mqtt import BrokerSettings, tls_context
from tests.agentproc import AgentProcess
from tests.faults import GW, Plant, agent_config
from tests.infra import Haproxy, Mosquitto, TenantPki

FSYNC_WRITER = """
import os, sys, time
path, until = sys.argv[1], time.time() + float(sys.argv[2])
block = os.urandom(256 * 1024)
with open(path, "wb") as f:
    while time.time() < until:
        f.write(block)
        f.flush()
        os.fsync(f.fileno())
        if f.tell() > 64 * 1024 * 1024:
            f.seek(0)
"""


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


class Arrivals:
    """A subscriber (direct to the broker, bridge identity) noting when each batch arrives."""

    def __init__(self, settings: BrokerSettings, topic: str) -> None:
        self.times: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}", protocol=paho.MQTTv5)
        self.client.tls_set_context(tls_context(settings))
        self.client.reconnect_delay_set(0.05, 0.1)  # type: ignore[arg-type]  # paho types whole seconds; it takes floats
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_message = self._message
        self.client.connect(settings.dial_host, settings.port, keepalive=5)
        self.client.loop_start()

    def _message(self, client: Any, userdata: Any, message: Any) -> None:
        at = time.time()
        with self.lock:
            self.times.append((at, json.loads(message.payload)))

    def since(self, t: float) -> list[tuple[float, dict[str, Any]]]:
        with self.lock:
            return [(at, doc) for at, doc in self.times if at >= t]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def agent_latencies(plant: Plant, arrivals: Arrivals, since: float) -> list[float]:
    """ms from the machine serving a reading to its batch at the subscriber."""
    served = {s.value: s.at_ms for s in plant.served() if s.value is not None}
    out = []
    for at, doc in arrivals.since(since):
        for point in doc.get("points", []):
            if point["tag"] == "served" and point["v"] in served:
                out.append(at * 1000 - served[point["v"]])
    return out


def raw_latencies(settings: BrokerSettings, arrivals: Arrivals, payload_size: int, seconds: float) -> list[float]:
    """Raw paho QoS 1 publishes of a batch-sized payload over the same path, each stamped when sent."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=paho.MQTTv5)
    client.tls_set_context(tls_context(settings))
    client.connect(settings.dial_host, settings.port)
    client.loop_start()
    start = time.time()
    pad = "x" * max(0, payload_size - 60)
    while time.time() - start < seconds:
        client.publish("gw/bench-raw/data/raw", json.dumps({"sent": time.time(), "pad": pad}), qos=1)
        time.sleep(0.1)
    time.sleep(0.5)
    client.disconnect()
    client.loop_stop()
    return [(at - doc["sent"]) * 1000 for at, doc in arrivals.since(start) if "sent" in doc]


def poll_periods(arrivals: Arrivals, start_ms: int, end_ms: int) -> list[float]:
    """Periods between the agent's reads, from the timestamps it gave the readings (the agent's own schedule)."""
    times = sorted(
        p["ts"]
        for _, doc in arrivals.since(start_ms / 1000 - 5)
        for p in doc.get("points", [])
        if p["tag"] == "served" and start_ms <= p["ts"] <= end_ms
    )
    return [b - a for a, b in itertools.pairwise(times)]


def raw_connect_ready(settings: BrokerSettings, since: float) -> float:
    """Seconds after ``since`` until a fresh raw TLS MQTT connection succeeds."""
    while True:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-probe", protocol=paho.MQTTv5)
        client.tls_set_context(tls_context(settings))
        try:
            client.connect(settings.dial_host, settings.port, keepalive=5)
            client.disconnect()
            return time.monotonic() - since
        except OSError:
            time.sleep(0.02)


def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-delivery-"))
    results: dict[str, Any] = {}
    pki = TenantPki(work / "pki", "acme")
    try:
        with (
            Mosquitto(work / "broker", pki) as broker,
            Haproxy(work / "proxy", [broker.route]) as proxy,
            Plant(work / "plant", units=(1,), bulk=args.tags) as plant,
        ):
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
            gw_cert, gw_key = pki.client("bench-raw")
            via_proxy = BrokerSettings(
                host=pki.host,
                port=proxy.port,
                tls=True,
                connect_host="127.0.0.1",
                ca_file=str(pki.ca_file),
                cert_file=str(gw_cert),
                key_file=str(gw_key),
            )
            arrivals = Arrivals(direct, "gw/#")
            config = agent_config(pki, proxy.port, plant, buffer={"confirm": "broker"})
            config["devices"] = plant.devices(poll="100ms")
            agent = AgentProcess(work / "agent", config).start()
            try:
                # 1. latency
                print(
                    f"[1/3] latency: 100 ms polls, {args.tags + 1} tags, TLS via HAProxy, fsync on, {args.seconds:g} s",
                    flush=True,
                )
                time.sleep(3)
                t0 = time.time()
                time.sleep(args.seconds)
                results["agent_lat"] = agent_latencies(plant, arrivals, t0)
                size = len(json.dumps(arrivals.since(t0)[-1][1])) if arrivals.since(t0) else 1000
                results["raw_lat"] = raw_latencies(via_proxy, arrivals, size, min(args.seconds, 10))

                # 3a. poll periods, quiet
                print(
                    f"[2/3] poll periods at 100 ms: quiet, then beside an fsync-heavy writer ({args.fsync_load_s:g} s)",
                    flush=True,
                )
                quiet_from = int(time.time() * 1000)
                time.sleep(args.fsync_load_s)
                results["quiet"] = poll_periods(arrivals, quiet_from, int(time.time() * 1000))
                loaded_from = int(time.time() * 1000)
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        FSYNC_WRITER,
                        str(work / "agent" / "fsync-load.bin"),
                        str(args.fsync_load_s),
                    ],
                    check=True,
                )
                time.sleep(1)  # the last batches arrive
                results["loaded"] = poll_periods(arrivals, loaded_from, int(time.time() * 1000) - 1000)

                # 2. reconnect
                print(f"[3/3] reconnect after a {args.outage:g} s broker outage", flush=True)
                broker.stop()
                time.sleep(args.outage)
                before = max((doc.get("seq", 0) for _, doc in arrivals.since(0)), default=0)
                broker.start()
                back, back_wall = time.monotonic(), time.time()
                results["raw_ready"] = raw_connect_ready(via_proxy, back)
                results["reconnect"] = float("nan")
                while time.monotonic() - back < 60:
                    new = [
                        at
                        for at, doc in arrivals.since(back_wall)
                        if doc.get("gw") == GW and doc.get("seq", 0) > before
                    ]
                    if new:
                        results["reconnect"] = min(new) - back_wall
                        break
                    time.sleep(0.01)
            finally:
                agent.stop()
                arrivals.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    a, r = results["agent_lat"], results["raw_lat"]
    print()
    print(f"{'measure':<58} {'p50':>8} {'p99':>8} {'target':>10}")
    met = pct(a, 50) <= 20 and pct(a, 99) <= 60
    print(
        f"{'latency, machine -> broker, agent (durable buffer), ms':<58} {pct(a, 50):>8.1f} {pct(a, 99):>8.1f} "
        f"{'p50 <= 20, p99 <= 60':>10}  {'ok' if met else 'MISSED'}"
    )
    print(f"{'latency, raw paho QoS 1 via the same HAProxy TLS, ms':<58} {pct(r, 50):>8.1f} {pct(r, 99):>8.1f}")
    for name, periods in (("quiet", results["quiet"]), ("fsync load", results["loaded"])):
        skipped = sum(1 for p in periods if p > 150)
        print(
            f"{f'poll period at 100 ms, {name}, ms':<58} {pct(periods, 50):>8.1f} {pct(periods, 99):>8.1f} "
            f"{'no skips':>10}   max {max(periods, default=float('nan')):.0f}, skipped {skipped} of {len(periods)}"
        )
    print()
    print(f"agent latency / raw:  p50 {pct(a, 50) / pct(r, 50):.2f}, p99 {pct(a, 99) / pct(r, 99):.2f}")
    print(
        f"reconnect after a {args.outage:g} s outage: first batch at the broker {results['reconnect']:.2f} s after its "
        f"return (target <= 2 s); a fresh raw TLS connection succeeded after {results['raw_ready']:.2f} s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--tags", type=int, default=99, help="bulk tags besides the counter (batch size)")
    parser.add_argument("--outage", type=float, default=30)
    parser.add_argument("--fsync-load-s", type=float, default=20)
    main(parser.parse_args())
