"""The console's first render: the fleet page with 1,000 gateways, a trend over 30 days of 1-second data.

    python bench/bench_console.py [--gateways 1000] [--days 30] [--period-ms 1000] [--runs 5] [--postgres DSN]

Writes one tenant's SQLite store with the bridge's own storage code
(``SqliteStore`` transactions, as ingest commits them), starts ``console
serve`` over HTTPS and Debian's headless chromium, and times, in the same run:

- fleet page: navigation start to the table drawn with every gateway (in
  the browser), and the ``/api/tenants/…/fleet`` answer alone; baseline:
  reading the ``status`` and ``latest`` rows themselves in SQLite;
- trend: clicking a tag on the gateway page with the range "last 30 days"
  to the chart drawn (in the browser), and the ``/trend`` answer alone;
  baseline: the same downsampling run over the raw points in SQLite
  (what a trend costs without the per-minute rollup);
- the rollup's first build (once per store; afterwards it folds in only
  what is new).

``--period-ms 100`` times a month of 100 ms data (26 million points: the
store alone takes minutes to write).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.messages import DataBatch
from bridge.storage import Store
from bridge.storage.postgres import PostgresStore
from bridge.storage.sqlite import SqliteStore
from console.rollup import Rollup
from console.tenantdata import PostgresData, Series, SqliteData, TenantData
from tests.browser_fixtures import ConsoleServer, chromium, log_in, wait_for
from tests.console_fixtures import PASSWORD, FleetWriter, bridge_config

TENANT = "bench"


def make_store(directory: Path, dsn: str | None) -> Store:
    return PostgresStore(dsn, TENANT) if dsn else SqliteStore(directory, TENANT, fsync=False)


def fill_fleet(directory: Path, gateways: int, dsn: str | None) -> None:
    writer = FleetWriter(directory, TENANT, store=make_store(directory, dsn))
    now = int(time.time() * 1000)
    for i in range(gateways):
        gw = f"gw-{i:04d}"
        writer.status(gw, "online" if i % 10 else "offline", ts=now - i * 1000)
        writer.buffer(gw, now - i * 1000, pending=i % 7, unconfirmed=i % 3, dropped=i, oldest=now - 60_000)
        writer.points(gw, "press-1", [(f"tag{t}", now - 500, float(t)) for t in range(10)])
        writer.points(
            gw,
            "oven-1",
            [(f"zone{t}", now - 500, 20.0 + t) for t in range(10)],
            quality="bad" if i % 50 == 0 else "good",
        )
        if i % 25 == 0:
            writer.event(
                gw, "buffer_drop", json.dumps({"type": "buffer_drop", "points": 10 + i, "batches": 1, "reason": "full"})
            )
    writer.close()


def fill_series(directory: Path, days: int, period_ms: int, dsn: str | None) -> tuple[int, int, int]:
    """One tag, ``days`` of readings every ``period_ms``: ``(start, end, points)``."""
    store = make_store(directory, dsn)
    store.open()
    total = days * 86_400_000 // period_ms
    end = int(time.time() * 1000) // 1000 * 1000
    start = end - days * 86_400_000
    chunk = 500_000
    started = time.monotonic()
    for first in range(0, total, chunk):
        rows = [
            (
                "gw-0000",
                "cnc-1",
                "spindle_temp",
                start + i * period_ms,
                60.0 + (i % 3600) / 100.0,
                "good",
                None,
                i // 500,
            )
            for i in range(first, min(total, first + chunk))
        ]
        with store.transaction() as tx:  # the bridge's own insert (executemany in SQLite, COPY in PostgreSQL)
            tx.insert_points([DataBatch("gw-0000", "cnc-1", first, rows, end)])
        print(
            f"  writing the series: {min(total, first + chunk):,} of {total:,} points ({time.monotonic() - started:.0f} s)",
            flush=True,
        )
    with store.transaction() as tx:  # the gateway page lists the tag from its newest value
        last = start + (total - 1) * period_ms
        tx.upsert_latest([("gw-0000", "cnc-1", "spindle_temp", last, 60.0, "good", None, last, last)])
    store.close()
    return start, end, total


def drop_schema(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{TENANT}" CASCADE')


def timed(call: object, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        began = time.perf_counter()
        call()  # type: ignore[operator]
        out.append(time.perf_counter() - began)
    return out


def line(label: str, values: list[float], base: float | None = None) -> str:
    median = statistics.median(values)
    ratio = f"   {median / base:6.2f}x baseline" if base else ""
    return f"{label:<58} median {median * 1000:8.1f} ms   max {max(values) * 1000:8.1f} ms{ratio}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument(
        "--period-ms", type=int, default=1000, help="series sample period (default 1000; 100 = a month of 100 ms data)"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--postgres",
        metavar="DSN",
        help="store in PostgreSQL (a schema named bench, dropped first and after) instead of SQLite",
    )
    args, _ = parser.parse_known_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="fe-bench-console-") as tmp:
        root = Path(tmp)
        storage = root / "storage"
        dsn = args.postgres
        if dsn:
            drop_schema(dsn)
        fill_fleet(storage, args.gateways, dsn)
        start, end, total = fill_series(storage, args.days, args.period_ms, dsn)

        def data() -> TenantData:
            return PostgresData(dsn, TENANT) if dsn else SqliteData(storage, TENANT)

        series = Series("gw-0000", "cnc-1", "spindle_temp")

        # Baselines, read straight from the store.
        def raw_fleet() -> None:
            with data() as reader:
                reader.rows("SELECT * FROM {s}status")
                reader.rows("SELECT * FROM {s}latest")
                reader.rows("SELECT * FROM {s}gateway_buffer")

        def raw_trend() -> None:
            with data() as reader:
                reader.trend(series, start, end, 1200)

        fleet_base = timed(raw_fleet, args.runs)
        trend_base = timed(raw_trend, max(1, min(args.runs, 3)))

        server = ConsoleServer(root / "console", bridge_config(root / "bridge.yaml", storage, [TENANT], dsn=dsn))
        server.account("bench", "operator", PASSWORD)
        build = 0.0
        if not dsn:  # a PostgreSQL store keeps points_minute itself (the bridge, in the commit of the points)
            rollup = Rollup(server.state, storage / f"{TENANT}.db", TENANT)
            began = time.perf_counter()
            rollup.catch_up()
            build = time.perf_counter() - began
            rollup.close()
        server.start()
        try:
            server.wait_ready()
            context = ssl.create_default_context(cafile=str(server.state / "tls" / "ca.pem"))
            with chromium() as driver:
                log_in(driver, server.url, "bench", PASSWORD)
                cookie = driver.get_cookie("fe_session")["value"]

                def api(path: str) -> bytes:
                    request = urllib.request.Request(server.url + path, headers={"Cookie": f"fe_session={cookie}"})
                    with urllib.request.urlopen(request, context=context, timeout=60) as answer:
                        return bytes(answer.read())

                fleet_api = timed(lambda: api(f"/api/tenants/{TENANT}/fleet"), args.runs)
                assert len(json.loads(api(f"/api/tenants/{TENANT}/fleet"))) == args.gateways
                query = f"/api/tenants/{TENANT}/trend?series=gw-0000/cnc-1/spindle_temp&start={start}&end={end}&buckets=1200"
                doc = json.loads(api(query))
                assert doc["source"] == "rollup", doc["source"]
                assert sum(p[4] for p in doc["series"][0]["points"]) == total
                trend_api = timed(lambda: api(query), args.runs)

                fleet_page = []
                for _ in range(args.runs):
                    driver.get(f"{server.url}/tenants/{TENANT}")
                    wait_for(
                        driver, lambda d: d.execute_script("return document.body.dataset.ready"), 60, "fleet drawn"
                    )
                    rows = driver.execute_script("return document.querySelectorAll('tbody tr[data-key]').length")
                    assert rows == args.gateways, rows
                    fleet_page.append(float(driver.execute_script("return document.body.dataset.renderedMs")) / 1000)
                trend_page = []
                for _ in range(args.runs):
                    driver.get(f"{server.url}/tenants/{TENANT}/gateways/gw-0000")
                    wait_for(
                        driver,
                        lambda d: d.find_elements("css selector", 'tr[data-tag="cnc-1/spindle_temp"] input'),
                        60,
                        "gateway page",
                    )
                    driver.execute_script("document.getElementById('range').value = '2592000000'")
                    took = driver.execute_async_script(
                        """
                        const done = arguments[arguments.length - 1], canvas = document.getElementById('trend');
                        canvas.removeAttribute('data-points');
                        const t0 = performance.now();
                        document.querySelector('tr[data-tag="cnc-1/spindle_temp"] input').click();
                        (function poll() {
                          if (canvas.dataset.points && canvas.dataset.points !== '0') done((performance.now() - t0) / 1000);
                          else setTimeout(poll, 5);
                        })();
                        """
                    )
                    trend_page.append(float(took))
        finally:
            server.stop()
        print(
            f"store: {'PostgreSQL' if dsn else 'SQLite'}, {args.gateways:,} gateways x 20 tags; one series of {total:,} points ({args.days} days every {args.period_ms} ms)"
        )
        print(line("fleet baseline: status + latest + gateway_buffer rows read from the store", fleet_base))
        print(line(f"fleet API: /fleet with {args.gateways:,} gateways", fleet_api, statistics.median(fleet_base)))
        print(line("fleet page: navigation to table drawn (chromium)", fleet_page, statistics.median(fleet_base)))
        print(line(f"trend baseline: raw points downsampled in the store ({total:,})", trend_base))
        print(
            line(
                f"trend API: {args.days} days, 1200 buckets, from {'points_minute' if dsn else 'the rollup'}",
                trend_api,
                statistics.median(trend_base),
            )
        )
        print(
            line(
                f"trend page: click to chart drawn, {args.days} days (chromium)",
                trend_page,
                statistics.median(trend_base),
            )
        )
        if build:
            print(f"{'rollup first build (once per store)':<58} {build:8.1f} s  ({total / build:,.0f} points/s)")
        if dsn:
            drop_schema(dsn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
