"""A tenant's broker moved between two broker hosts, against the target: how long the tenant has no broker.

    sudo python bench/bench_broker_move.py [--backlog 20000] [--rounds 2]

Two broker hosts and a proxy, each a network namespace on this machine
(``tests/netns.py``), rendered and driven by provisioning. A persistent
session (the bridge's identity) subscribes and goes away while a gateway
queues ``--backlog`` QoS 1 messages (200 bytes) for it; then the tenant
moves from one host to the other and back (``--rounds`` moves), each move
timed by ``provisioning.moves`` (old broker stopped, persistence carried,
new broker answering, proxies switched). After the last move the session
must get every queued message.

Raw baselines from the same run: copying the same persistence file with
``shutil.copyfile``, and restarting the broker in place (SIGTERM, start,
answering) with the same file: a move costs about their sum.

Target: the proxies switched within 5 s of the old broker's stop with
20,000 queued messages.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from factory_edge.errors import ProvisioningError
from provisioning import brokers, moves
from provisioning.layout import DataDir
from provisioning.registry import Registry
from provisioning.tenants import admin_link, get_tenant
from tests import netns
from tests.hosts_fixtures import PROXY_PORT, BrokerHostRunner, MqttClient, gateway_identity, start_proxy
from tests.provisioning_fixtures import provisioning

TARGET_S = 5.0


def main() -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=20_000, help="QoS 1 messages queued for the absent session")
    parser.add_argument("--rounds", type=int, default=2, help="moves (b1 -> b2, back, …)")
    args = parser.parse_args()
    if (why := netns.available()) is not None:
        print(f"skipped: {why}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="fe-move-"))
    try:
        with netns.Network() as net:
            return run(net, work, args.backlog, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(net: netns.Network, work: Path, backlog: int, rounds: int) -> int:
    for host in ("b1", "b2", "p1"):
        net.add_host(host)
    data = work / "data"
    provisioning(data, "init", "--proxy-port", str(PROXY_PORT), "--proxy-connect", net.address("p1"))
    for host in ("b1", "b2"):
        provisioning(data, "host", "add", host, "--address", net.address(host))
    provisioning(data, "tenant", "create", "acme", "--domain", "test", "--host", "b1")
    runners = {h: BrokerHostRunner(net, h, data, work / "logs").start() for h in ("b1", "b2")}
    try:
        start_proxy(net, "p1", data, work / "logs", "-p1")
        files = DataDir(data).tenant("acme")

        def client(identity: str, **kwargs: object) -> MqttClient:
            cert_key = (
                (files.bridge_cert, files.bridge_key)
                if identity == "bridge"
                else gateway_identity(data, "acme", identity, work / "gw")
            )
            return MqttClient(
                tenant="acme",
                identity=identity,
                address=net.address("p1"),
                ca_file=files.ca_cert,
                cert_key=cert_key,
                **kwargs,  # type: ignore[arg-type]  # the optional keywords of MqttClient
            )

        reader = client("bridge", subscribe="gw/gw-01/data/#", session_expiry_s=3600).start()
        reader.stop()
        gateway = client("gw-01")
        gateway.client.max_inflight_messages_set(1000)
        gateway.start()
        started = time.monotonic()
        payload = b"x" * 200
        for i in range(backlog):
            gateway.publish("gw/gw-01/data/line", payload)
            while i % 1000 == 0 and gateway.unacked() > 20_000:  # paho holds at most 65,535 unacknowledged
                time.sleep(0.01)
        while gateway.unacked():
            time.sleep(0.05)
        print(f"{backlog} messages queued for the absent session in {time.monotonic() - started:.1f}s")
        gateway.stop()

        baseline_restart = restart_in_place(data, runners)
        host = "b1"
        figures = []
        for _ in range(rounds):
            host = "b2" if host == "b1" else "b1"
            result = moves.move_broker(DataDir(data), "acme", host, wait_s=60)
            figures.append(result)
        db = DataDir(data).tenant("acme", host).persistence / moves.PERSISTENCE_FILE
        copy_mb = db.stat().st_size / 1e6  # as carried by the last move
        copy_s = baseline_copy(db, work)

        reader = client("bridge", subscribe="gw/gw-01/data/#", session_expiry_s=3600).start()
        last, since = -1, time.monotonic()
        while len(reader.payloads()) < backlog and time.monotonic() - since < 15:  # until it stops coming
            if len(reader.payloads()) != last:
                last, since = len(reader.payloads()), time.monotonic()
            time.sleep(0.2)
        got = len(reader.payloads())
        reader.stop()
    finally:
        for runner in runners.values():
            runner.stop()

    print("move        carried MB  stopped  answered  switched   (s after the old broker's SIGTERM)")
    for result in figures:
        print(
            f"  {result.old_host} -> {result.new_host}  {(result.carried_bytes or 0) / 1e6:10.1f}  {result.stopped_s:7.2f}  "
            f"{result.answered_s:8.2f}  {result.switched_s:8.2f}"
        )
    print(f"baseline: copy of the file        {copy_s:.2f} s ({copy_mb:.1f} MB)")
    print(f"baseline: broker restart in place {baseline_restart:.2f} s (SIGTERM to answering)")
    worst = max(r.switched_s for r in figures)
    print(f"target: switched within {TARGET_S:g} s with {backlog} queued: {worst:.2f} s")
    print(f"backlog after the moves: {got} of {backlog} messages delivered to the returning session")
    print("(figures on a shared 2-core machine: noisy)")
    return 0 if got >= backlog else 1


def restart_in_place(data: Path, runners: dict[str, BrokerHostRunner]) -> float:
    """SIGTERM the broker where it is; its host's runner starts it again; until it answers."""
    with Registry(DataDir(data).registry) as registry:
        tenant = get_tenant(registry, "acme")
    runner = runners[tenant.broker_host]
    pid = runner.pid("acme")
    assert pid is not None
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    while runner.pid("acme") in (None, pid):
        time.sleep(0.01)
    link = admin_link(DataDir(data), tenant)
    while True:
        try:
            brokers.send_commands(link, [], timeout_s=2.0)
            return time.monotonic() - started
        except ProvisioningError:
            time.sleep(0.05)


def baseline_copy(db: Path, work: Path) -> float:
    started = time.monotonic()
    shutil.copyfile(db, work / "copy.db")
    return time.monotonic() - started


if __name__ == "__main__":
    sys.exit(main())
