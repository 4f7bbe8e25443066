"""Connection scale through the SNI proxy: many TLS gateways across tenants, each with a 1 msg/s heartbeat.

    python bench/bench_connections.py                     # short: 500 gateways, 10 s of heartbeats
    python bench/bench_connections.py --gateways 5000 --window 30    # the target

A real deployment made by ``provisioning`` itself on loopback: ``provisioning
init`` and ``tenant create`` for each tenant (CA, broker certificate,
Mosquitto config and ACL, the HAProxy config and SNI map), then one
Mosquitto per tenant and HAProxy started by this script on those rendered
files, stopped by PID at the end. Every gateway has its own EC P-256 key and
a client certificate from its tenant's CA (CN = gateway id, which the broker
makes its client id), issued here with the product's ``pki`` module.

The gateways are lean asyncio MQTT v5 clients (``leanmqtt.py``) in several
worker processes: TLS with SNI ``mqtt.<tenant>.test``, the broker verified,
CONNECT, then one QoS 1 data batch per second. One subscriber per tenant
(the tenant's ``bridge.main`` identity, directly on its broker) counts the
heartbeats delivered.

Heartbeats start once every gateway has connected (or failed), so the CPU
measured while connecting is the connections' own; until then each
gateway pings at half its keepalive.

Two runs, same clients, same brokers (restarted between runs so each starts
with a fresh heap):

- baseline: the gateways dial their tenant's Mosquitto directly;
- proxy: the gateways dial HAProxy, which routes each by SNI.

The proxy's limits stay as rendered (``provisioning init`` defaults): the
per-source limit is met by spreading the clients over several loopback
source addresses (127.1.0.x), as gateways behind many site addresses would be.
The file-descriptor limit of this process (and so of the brokers and proxy
it starts) is raised to its hard limit.

Printed for each run: connect rate, time to all connected, heartbeats
delivered/s against the number expected and the number sent, every
heartbeat sent against every one delivered (counted once the clients have
stopped and nothing more arrives), broker and proxy RSS (total and
per connection, each against its value before the gateways connected), CPU
of brokers, proxy and clients, and failures; then the proxy's cost against
the baseline; and how the proxy's log says the connections ended (HAProxy's
termination state: ``--`` normal, ``C``/``S`` closed by client/server,
``P`` refused by the proxy, ``c``/``s`` timeout; second letter, the phase:
``R`` waiting for the ClientHello, ``C`` connecting to the broker, ``D`` data).
``SD`` is the normal end of a gateway that sent DISCONNECT (the broker closes
first); one ``PR`` is this script's readiness probe of the proxy.
On a machine shared with other work the rates move with the load; memory
per connection moves much less.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import leanmqtt
from leanmqtt import GatewaySpec

from provisioning import pki
from provisioning.layout import DataDir
from provisioning.registry import Registry
from provisioning.tenants import Settings, load_ca
from tests.provisioning_fixtures import Deployment, RenderedHaproxy, RenderedMosquitto

DOMAIN = "test"
TARGET_GATEWAYS = 5_000
TARGET_TENANTS = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- process figures from /proc ----------------------------------------------


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (HAProxy's master and worker)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return out


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError):
            pass
    return total


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError):
            pass
    return total / CLK_TCK


def kernel_tcp_bytes() -> int:
    """Socket buffer memory of every TCP socket on the machine (``/proc/net/sockstat``, in pages)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            words = line.split()
            return int(words[words.index("mem") + 1]) * PAGE
    return 0


@dataclass
class Sample:
    at: float
    broker_rss: int
    proxy_rss: int
    broker_cpu: float
    proxy_cpu: float
    client_cpu: float
    delivered: int
    kernel_tcp: int = 0
    counters: list[int] = field(default_factory=list)


def proxy_endings(log: str) -> Counter[str]:
    """HAProxy ``option tcplog`` lines by termination state (the two characters before the connection counts)."""
    return Counter(m.group(1) for m in re.finditer(r" ([-A-Za-z]{2}) \d+/\d+/\d+/\d+/\d+ \d+/\d+", log))


# -- the deployment -----------------------------------------------------------


def tenant_names(n: int) -> list[str]:
    return [f"plant{i:02d}" for i in range(n)]


def issue_gateways(
    data: DataDir, tenants: list[str], gateways: int, out: Path
) -> dict[str, list[tuple[str, Path, Path]]]:
    """One key and certificate per gateway, from its tenant's CA, round-robin over the tenants."""
    issued: dict[str, list[tuple[str, Path, Path]]] = {t: [] for t in tenants}
    cas = {t: load_ca(data.tenant(t)) for t in tenants}
    for i in range(gateways):
        tenant = tenants[i % len(tenants)]
        gw = f"gw-{i:05d}"
        key, cert = pki.issue_client_cert(*cas[tenant], gw, days=1)
        folder = out / tenant
        folder.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = folder / f"{gw}.pem", folder / f"{gw}.key"
        pki.write_private_key(key_file, key)
        pki.write_pem(cert_file, cert)
        issued[tenant].append((gw, cert_file, key_file))
    return issued


@dataclass
class Site:
    deployment: Deployment
    data: DataDir
    tenants: list[str]
    broker_ports: dict[str, int]
    per_source: int
    per_tenant: int
    maxconn: int

    @property
    def brokers(self) -> dict[str, RenderedMosquitto]:
        return self.deployment.brokers

    @property
    def proxy(self) -> RenderedHaproxy:
        return self.deployment.proxy

    def broker_pids(self) -> list[int]:
        return [b.pid for b in self.brokers.values() if b.pid]

    def proxy_pids(self) -> list[int]:
        return family(self.proxy.pid) if self.proxy.pid else []

    def restart_brokers(self) -> None:
        for broker in self.brokers.values():
            broker.stop()
        for broker in self.brokers.values():
            broker.start()


def make_site(root: Path, tenants: list[str]) -> Site:
    deployment = Deployment(root, tenants=tenants, domain=DOMAIN)
    data = DataDir(deployment.data)
    with Registry(data.registry) as registry:
        ports = {t: registry.tenant(t).broker_port for t in tenants}  # type: ignore[union-attr]
        limits = Settings.load(registry).limits
    return Site(deployment, data, tenants, ports, limits.per_source, limits.per_tenant, limits.maxconn)


# -- one run ------------------------------------------------------------------


@dataclass
class Run:
    label: str
    gateways: int
    connected: int = 0
    failed: int = 0
    closed: int = 0
    connect_s: float = 0.0
    handshake_ms: float = 0.0
    delivered_per_s: float = 0.0
    acked_per_s: float = 0.0
    sent_per_s: float = 0.0
    sent_total: int = 0
    delivered_total: int = 0
    expected_per_s: float = 0.0
    broker_rss: tuple[int, int] = (0, 0)  # before, with every gateway connected
    proxy_rss: tuple[int, int] = (0, 0)
    kernel_tcp: tuple[int, int] = (0, 0)
    connect_cpu: dict[str, float] = field(default_factory=dict)
    steady_cpu: dict[str, float] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)


def specs_for(
    site: Site, issued: dict[str, list[tuple[str, Path, Path]]], *, via_proxy: bool, sources: list[str]
) -> list[GatewaySpec]:
    specs = []
    i = 0
    for tenant, gws in issued.items():
        ca = str(site.data.tenant(tenant).ca_cert)
        for gw, cert, key in gws:
            port = site.deployment.proxy_port if via_proxy else site.broker_ports[tenant]
            specs.append(
                GatewaySpec(
                    gateway=gw,
                    sni=f"mqtt.{tenant}.{DOMAIN}",
                    ca_file=ca,
                    cert_file=str(cert),
                    key_file=str(key),
                    host="127.0.0.1",
                    port=port,
                    source=sources[i % len(sources)],
                )
            )
            i += 1
    return specs


class Subscribers:
    """One counting subscriber per tenant, on its own event loop in a thread of this process."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="subscribers", daemon=True)
        self.subs: list[leanmqtt.Subscriber] = []

    def __enter__(self) -> Subscribers:
        self.thread.start()
        for tenant in self.site.tenants:
            files = self.site.data.tenant(tenant)
            cert, key = files.identity("bridge.main")
            spec = GatewaySpec(
                gateway="bridge.main",
                sni=f"mqtt.{tenant}.{DOMAIN}",
                ca_file=str(files.ca_cert),
                cert_file=str(cert),
                key_file=str(key),
                host="127.0.0.1",
                port=self.site.broker_ports[tenant],
                source="127.0.0.1",
            )
            future = asyncio.run_coroutine_threadsafe(leanmqtt.open_subscriber(spec, "gw/+/data/+"), self.loop)
            self.subs.append(future.result(15))
        return self

    def received(self) -> int:
        return sum(s.received for s in self.subs)

    def __exit__(self, *exc: object) -> None:
        for sub in self.subs:
            self.loop.call_soon_threadsafe(sub.close)
        time.sleep(0.2)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def run(site: Site, specs: list[GatewaySpec], args: argparse.Namespace, label: str, via_proxy: bool) -> Run:
    ctx = mp.get_context("spawn")
    workers = max(1, min(args.workers, len(specs)))
    rows = [ctx.RawArray("q", leanmqtt.SLOTS) for _ in range(workers)]
    ready = [ctx.Event() for _ in range(workers)]
    go, beat, stop = ctx.Event(), ctx.Event(), ctx.Event()
    errors_q: Any = ctx.Queue()
    procs = [
        ctx.Process(
            target=leanmqtt.run_worker,
            args=(specs[w::workers], rows[w], ready[w], go, beat, stop, errors_q, args.period, args.parallel),
            name=f"gateways-{w}",
        )
        for w in range(workers)
    ]
    result = Run(label, len(specs), expected_per_s=len(specs) / args.period)
    with Subscribers(site) as subs:
        for p in procs:
            p.start()
        try:
            for r in ready:
                if not r.wait(300):
                    raise RuntimeError("a gateway worker did not load its TLS contexts within 300 s")
            client_pids = [p.pid for p in procs if p.pid]

            def sample() -> Sample:
                return Sample(
                    at=time.monotonic(),
                    broker_rss=rss_bytes(site.broker_pids()),
                    proxy_rss=rss_bytes(site.proxy_pids()) if via_proxy else 0,
                    broker_cpu=cpu_s(site.broker_pids()),
                    proxy_cpu=cpu_s(site.proxy_pids()) if via_proxy else 0.0,
                    client_cpu=cpu_s(client_pids),
                    delivered=subs.received(),
                    kernel_tcp=kernel_tcp_bytes(),
                    counters=[sum(row[i] for row in rows) for i in range(leanmqtt.SLOTS)],
                )

            before = sample()
            started_ns = time.monotonic_ns()
            go.set()
            last_progress = time.monotonic()
            while True:
                now = sample()
                settled = now.counters[leanmqtt.CONNECTED] + now.counters[leanmqtt.FAILED]
                if settled >= len(specs) or time.monotonic() - before.at > args.connect_timeout:
                    break
                if time.monotonic() - last_progress > 5:
                    print(f"  {label}: {settled:,}/{len(specs):,} connected or failed", flush=True)
                    last_progress = time.monotonic()
                time.sleep(0.05)
            connected = now
            c = connected.counters
            result.connected, result.failed = c[leanmqtt.CONNECTED], c[leanmqtt.FAILED]
            last_ok = max((row[leanmqtt.LAST_OK_NS] for row in rows), default=0)
            result.connect_s = (last_ok - started_ns) / 1e9 if result.connected else float("nan")
            result.handshake_ms = c[leanmqtt.HANDSHAKE_NS] / max(1, result.connected) / 1e6
            result.connect_cpu = cpu_delta(before, connected)
            beat.set()
            time.sleep(args.settle)
            start = sample()
            time.sleep(args.window)
            end = sample()
            span = end.at - start.at
            result.delivered_per_s = (end.delivered - start.delivered) / span
            result.acked_per_s = (end.counters[leanmqtt.ACKED] - start.counters[leanmqtt.ACKED]) / span
            result.sent_per_s = (end.counters[leanmqtt.SENT] - start.counters[leanmqtt.SENT]) / span
            result.expected_per_s = result.connected / args.period
            result.closed = end.counters[leanmqtt.CLOSED]
            result.steady_cpu = {k: v / span for k, v in cpu_delta(start, end).items()}
            result.broker_rss = (before.broker_rss, end.broker_rss)
            result.proxy_rss = (before.proxy_rss, end.proxy_rss)
            result.kernel_tcp = (before.kernel_tcp, end.kernel_tcp)
        finally:
            go.set()
            stop.set()
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.terminate()
                    p.join(5)
            while not errors_q.empty():
                result.errors.update(errors_q.get())
        # Every heartbeat sent (the workers have exited: their counters are final) against every one the
        # subscribers got, once nothing more arrives: loss, apart from what was still on its way in the window.
        result.sent_total = sum(row[leanmqtt.SENT] for row in rows)
        seen = -1
        deadline = time.monotonic() + 30
        while subs.received() != seen and time.monotonic() < deadline:
            seen = subs.received()
            time.sleep(1.0)
        result.delivered_total = subs.received()
    return result


def cpu_delta(a: Sample, b: Sample) -> dict[str, float]:
    return {
        "brokers": b.broker_cpu - a.broker_cpu,
        "proxy": b.proxy_cpu - a.proxy_cpu,
        "clients": b.client_cpu - a.client_cpu,
    }


# -- report -------------------------------------------------------------------


def report(r: Run, *, via_proxy: bool, brokers: int) -> None:
    n = max(1, r.connected)
    rate = r.connected / r.connect_s if r.connect_s and r.connect_s == r.connect_s else 0.0
    print(f"{r.label}:")
    print(
        f"  connected            {r.connected:>8,} of {r.gateways:,}   failed {r.failed:,}   dropped later {r.closed:,}"
    )
    print(
        f"  connect              {r.connect_s:8.1f} s to all connected   {rate:8.0f} connections/s   "
        f"TLS+CONNECT {r.handshake_ms:.0f} ms mean each"
    )
    print(
        f"  CPU while connecting brokers {r.connect_cpu['brokers']:.1f} s   "
        + (f"proxy {r.connect_cpu['proxy']:.2f} s   " if via_proxy else "")
        + f"clients {r.connect_cpu['clients']:.1f} s   "
        f"(brokers {r.connect_cpu['brokers'] / n * 1000:.2f} ms per connection)"
    )
    ratio = r.delivered_per_s / r.expected_per_s if r.expected_per_s else 0.0
    print(
        f"  heartbeats           {r.delivered_per_s:8,.0f} delivered/s of {r.expected_per_s:,.0f} expected "
        f"({ratio:.3f})   clients sent {r.sent_per_s:,.0f}/s (delivered/sent "
        f"{r.delivered_per_s / max(1.0, r.sent_per_s):.3f})   acknowledged {r.acked_per_s:,.0f}/s"
    )
    print(
        f"  all heartbeats       {r.delivered_total:8,} delivered of {r.sent_total:,} sent, "
        f"{r.sent_total - r.delivered_total:,} lost (counted once the clients had stopped and all had arrived)"
    )
    broker_delta = r.broker_rss[1] - r.broker_rss[0]
    print(
        f"  broker RSS           {r.broker_rss[1] / 2**20:8.1f} MiB total ({brokers} brokers)   "
        f"+{broker_delta / 2**20:.1f} MiB for the gateways = {broker_delta / n / 1024:.1f} KiB per connection"
    )
    if via_proxy:
        proxy_delta = r.proxy_rss[1] - r.proxy_rss[0]
        print(
            f"  proxy RSS            {r.proxy_rss[1] / 2**20:8.1f} MiB total   "
            f"+{proxy_delta / 2**20:.1f} MiB for the gateways = {proxy_delta / n / 1024:.1f} KiB per connection"
        )
    kernel_delta = r.kernel_tcp[1] - r.kernel_tcp[0]
    sockets = 4 if via_proxy else 2
    print(
        f"  kernel TCP buffers   {kernel_delta / 2**20:+8.1f} MiB on the whole machine = {kernel_delta / n / 1024:.1f} KiB "
        f"per gateway ({sockets} loopback sockets each; other work on the machine counts too)"
    )
    cpu = r.steady_cpu
    print(
        f"  CPU at steady state  brokers {cpu['brokers'] * 100:.1f}%"
        + (f"   proxy {cpu['proxy'] * 100:.1f}%" if via_proxy else "")
        + f"   clients {cpu['clients'] * 100:.1f}% of one core"
        + (f"   (brokers {cpu['brokers'] / max(1.0, r.delivered_per_s) * 1e6:.0f} µs per heartbeat)")
    )
    for reason, count in r.errors.most_common(5):
        print(f"  failure x{count}: {reason}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=500, help=f"concurrent gateways (target {TARGET_GATEWAYS:,})")
    parser.add_argument("--tenants", type=int, default=TARGET_TENANTS, help="tenants, one Mosquitto each (10)")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of heartbeats measured (10)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the last connection (2)")
    parser.add_argument("--period", type=float, default=1.0, help="heartbeat period of each gateway in s (1)")
    parser.add_argument("--workers", type=int, default=2, help="client processes (2)")
    parser.add_argument("--parallel", type=int, default=50, help="connection attempts in flight per worker (50)")
    parser.add_argument("--connect-timeout", type=float, default=300.0, help="give up connecting after (300 s)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the direct-to-broker run")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tenants = tenant_names(args.tenants)
    with tempfile.TemporaryDirectory(prefix="fe-bench-conn-") as tmp:
        started = time.monotonic()
        site = make_site(Path(tmp), tenants)
        made = time.monotonic() - started
        started = time.monotonic()
        issued = issue_gateways(site.data, tenants, args.gateways, Path(tmp) / "gateways")
        issue_s = time.monotonic() - started
        per_source = max(1, site.per_source * 9 // 10)
        n_sources = -(-args.gateways // per_source)
        sources = [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(n_sources)]
        print(
            f"connection scale: {args.gateways:,} TLS gateways over {args.tenants} tenants "
            f"({args.gateways // args.tenants:,} each), heartbeat QoS 1 every {args.period:g} s; "
            f"loopback, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
        )
        print(
            f"  provisioning made {args.tenants} tenants (CA, broker, proxy config) in {made:.1f} s; "
            f"{args.gateways:,} gateway certificates, one EC P-256 key each, issued in {issue_s:.1f} s"
        )
        print(
            f"  proxy limits as rendered: per source {site.per_source}, per tenant {site.per_tenant}, "
            f"maxconn {site.maxconn or 'from the descriptor limit'}; clients spread over {n_sources} "
            f"loopback source addresses ({sources[0]}..{sources[-1]}, at most {per_source} each)"
        )
        print(f"  file descriptors: raised from {soft:,} to {hard:,} (brokers and proxy inherit it)")
        print(f"  {args.workers} client processes, {args.parallel} connection attempts in flight each")
        if args.gateways // args.tenants > site.per_tenant:
            print(f"  note: {args.gateways // args.tenants:,} gateways per tenant exceed the per-tenant limit")
        results = []
        try:
            for broker in site.brokers.values():
                broker.start()
            if not args.no_baseline:
                base = run(site, specs_for(site, issued, via_proxy=False, sources=sources), args, "baseline", False)
                results.append((base, False))
                site.restart_brokers()
            site.proxy.start()
            proxied = run(site, specs_for(site, issued, via_proxy=True, sources=sources), args, "proxy", True)
            results.append((proxied, True))
        finally:
            site.proxy.stop()
            for broker in site.brokers.values():
                broker.stop()
        endings = proxy_endings(site.proxy.log())
    print()
    for r, via_proxy in results:
        r.label = (
            "baseline: gateways dial their tenant's Mosquitto directly"
            if not via_proxy
            else "through the proxy: gateways dial HAProxy, routed by SNI to their tenant's Mosquitto"
        )
        report(r, via_proxy=via_proxy, brokers=args.tenants)
        print()
    print(
        "proxy log, how connections ended: "
        + (", ".join(f"{state} {count:,}" for state, count in endings.most_common()) or "no lines")
    )
    proxied = results[-1][0]
    ok = proxied.connected >= TARGET_GATEWAYS and proxied.failed == 0 and proxied.closed == 0
    ok_beats = proxied.sent_total > 0 and proxied.delivered_total == proxied.sent_total
    verdict = "met" if ok and ok_beats else "NOT MET"
    if args.gateways < TARGET_GATEWAYS:
        verdict = f"not measured by this short run (--gateways {TARGET_GATEWAYS} measures it)"
    print(
        f"target: {TARGET_GATEWAYS:,} concurrent TLS gateways over {TARGET_TENANTS} tenants through the proxy, "
        f"every heartbeat delivered: {verdict} ({proxied.connected:,} connected, "
        f"{proxied.delivered_total:,} of {proxied.sent_total:,} heartbeats delivered; the clients kept "
        f"{proxied.sent_per_s / max(1.0, proxied.expected_per_s):.3f} of the 1 msg/s rate)"
    )
    if len(results) == 2:
        base = results[0][0]
        rate_b = base.connected / base.connect_s if base.connect_s else 0.0
        rate_p = proxied.connected / proxied.connect_s if proxied.connect_s else 0.0
        print(
            f"proxy cost: connect rate {rate_p:,.0f}/s vs {rate_b:,.0f}/s direct "
            f"({rate_p / rate_b if rate_b else 0:.2f}x); "
            f"broker RSS per connection {kib_per(proxied.broker_rss, proxied)} vs {kib_per(base.broker_rss, base)} KiB; "
            f"proxy adds {kib_per(proxied.proxy_rss, proxied)} KiB and "
            f"{proxied.steady_cpu['proxy'] * 100:.1f}% of a core at {proxied.delivered_per_s:,.0f} heartbeats/s"
        )
    return 0 if proxied.failed == 0 else 1


def kib_per(rss: tuple[int, int], r: Run) -> str:
    return f"{(rss[1] - rss[0]) / max(1, r.connected) / 1024:.1f}"


if __name__ == "__main__":
    sys.exit(main())
