"""Metering: ``usage_hourly`` written in the data's own transaction, ``bridge usage``, thresholds, the exporter.

A real Mosquitto and ``bridge run`` as a process, on SQLite and on the
PostgreSQL at ``FACTORY_EDGE_PG_DSN``: what a user reads back with
``bridge usage`` and from ``/metrics``.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge import metering
from bridge.cli import main
from bridge.config import validate_config
from bridge.messages import DataBatch
from bridge.storage import make_store
from bridge.usage import Exporter
from tests.bridge_fixtures import (
    BridgeProcess,
    Gateway,
    StoreView,
    backend,
    batch,
    pg_dsn,
    pg_schemas,
    tenant_entry,
    unique_tenant,
    wait_until,
    write_config,
)
from tests.helpers import ServiceProcess, free_port
from tests.infra import Mosquitto, TenantPki

__all__ = ["backend", "pg_dsn", "pg_schemas"]

pytestmark = pytest.mark.timeout(120)
HOUR = metering.HOUR_MS


@pytest.fixture
def tenant(backend: StoreView, request: pytest.FixtureRequest) -> str:
    name = unique_tenant("meter")
    if backend.backend == "postgres":
        request.getfixturevalue("pg_schemas").append(name)
    return name


def usage_json(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> Any:
    assert main(["usage", "--config", str(config), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_usage_is_counted_once_per_stored_batch_and_read_back(
    tmp_path: Path, backend: StoreView, tenant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = TenantPki(tmp_path / "pki", tenant)
    broker = Mosquitto(tmp_path / "broker", pki).start()
    config = write_config(
        tmp_path / "bridge.yaml",
        tenants=[tenant_entry(pki, broker)],
        storage=backend.storage,
        usage={"thresholds": [{"name": "tiny-db", "metric": "bytes_per_day", "above": "1KB", "calls_for": "x"}]},
    )
    payloads = {seq: batch("gw-01", "press", seq, 50) for seq in range(5)}
    other = batch("gw-02", "oven", 0, 7)
    started = int(time.time() * 1000)
    try:
        with BridgeProcess(config, instance="t0") as bridge:
            bridge.wait_connected()
            with Gateway(pki, broker, "gw-01") as gw1, Gateway(pki, broker, "gw-02") as gw2:
                for payload in payloads.values():
                    gw1.publish("gw/gw-01/data/press", payload)
                for seq in (1, 3):  # sent again (a gateway that lost the confirmation): stored and counted once
                    gw1.publish("gw/gw-01/data/press", payloads[seq])
                gw2.publish("gw/gw-02/data/oven", other)
            wait_until(lambda: backend.count(tenant, "batches") == 6, what="6 batches stored")
            time.sleep(0.5)  # the repeats' windows committed too
    finally:
        broker.stop()
    rows = usage_json(capsys, config, "--by", "hour")
    hours = {started // HOUR * HOUR, int(time.time() * 1000) // HOUR * HOUR}
    assert {r["hour"] for r in rows} <= hours
    by_gw: dict[str, list[int]] = {}
    for r in rows:
        assert r["tenant"] == tenant
        sums = by_gw.setdefault(r["gateway"], [0, 0, 0, 0])
        for i, key in enumerate(("points", "messages", "bytes", "delayed_points")):
            sums[i] += r[key]
    assert by_gw == {
        "gw-01": [250, 5, sum(len(p) for p in payloads.values()), 0],
        "gw-02": [7, 1, len(other), 0],
    }
    days = usage_json(capsys, config, "--gateway", "gw-02")
    assert [(d["gateway"], d["day"] % metering.DAY_MS, d["points"]) for d in days] == [("gw-02", 0, 7)]

    assert main(["usage", "--config", str(config), "--tenant", tenant]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["TENANT", "GATEWAY", "DAY", "POINTS", "MESSAGES", "BYTES", "DELAYED", "POINTS"]
    assert table[1].split()[1:] == [
        "gw-01",
        time.strftime("%Y-%m-%d", time.gmtime()),
        "250",
        "5",
        str(sum(len(p) for p in payloads.values())),
        "0",
    ]

    assert main(["usage", "--config", str(config), "--thresholds"]) == 0
    size = sum(len(p) for p in payloads.values()) + len(other)
    assert capsys.readouterr().out.strip() == (
        f"tenant {tenant}: {metering.size_text(size)}/day ({time.strftime('%Y-%m-%d', time.gmtime())}), above the "
        "tiny-db threshold (1 kB/day): calls for x"
    )

    loaded = validate_config(json.loads(json.dumps(_yaml(config))), str(config))
    exporter = Exporter(loaded, host="127.0.0.1", port=0).start()
    try:
        text = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics").text
    finally:
        exporter.close()
    assert f'factory_edge_usage_points_total{{tenant="{tenant}",gateway="gw-01"}} 250' in text.splitlines()
    assert f'factory_edge_usage_messages_total{{tenant="{tenant}",gateway="gw-02"}} 1' in text.splitlines()
    assert f'factory_edge_usage_threshold_exceeded{{tenant="{tenant}",rule="tiny-db"}} 1' in text.splitlines()
    assert "# TYPE factory_edge_usage_bytes_total counter" in text


def _yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


def test_usage_rolls_back_with_the_data(tmp_path: Path, backend: StoreView, tenant: str) -> None:
    """Counted in the data's transaction: a failed commit leaves neither data nor usage."""
    storage = validate_config({"storage": backend.storage, "tenants": [{"name": tenant, "url": "mqtt://x:1"}]})
    store = make_store(storage.storage, tenant)
    store.open()
    try:
        at = 1_700_000_000_000
        rows = [("gw", "d", "t", at, 1.0, "good", None, 1)]
        b = DataBatch("gw", "d", 1, rows, at, 99)
        with pytest.raises(RuntimeError), store.transaction() as tx:
            claimed = tx.claim_batches([b])
            tx.insert_points(claimed)
            tx.record_usage(metering.hourly(claimed))
            raise RuntimeError("the commit fails")
        assert store.usage() == []
        for _ in range(2):  # the redelivery after the failure, then a repeat
            with store.transaction() as tx:
                claimed = tx.claim_batches([b])
                tx.insert_points(claimed)
                tx.record_usage(metering.hourly(claimed, {"gw": 1} if claimed else None))
        assert store.usage() == [metering.Usage(at - at % HOUR, "gw", 1, 1, 99, 1)]
        assert store.usage(since_ms=at + HOUR) == []
        assert store.usage(gw="other") == []
    finally:
        store.close()


def test_usage_before_any_data_and_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(
        tmp_path / "bridge.yaml",
        tenants=[{"name": "empty", "url": "mqtts://mqtt.empty.test:8883"}],
        storage={"backend": "sqlite", "path": str(tmp_path / "none")},
    )
    assert main(["usage", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("(no usage recorded since ")
    assert main(["usage", "--config", str(config), "--thresholds"]) == 0
    assert capsys.readouterr().out.startswith("no tenant above a threshold rule since ")
    assert main(["usage", "--config", str(config), "--since", "soon"]) == 2
    assert capsys.readouterr().err.strip() == "Error: --since: expected a duration like 500ms, 1s or 5m, got 'soon'"
    assert main(["usage"]) == 2
    assert "--config: required" in capsys.readouterr().err
    assert main(["usage", "--config", str(config), "--since", "99999999d"]) == 2  # was a traceback
    assert capsys.readouterr().err.strip() == "Error: --since: 99999999d is more than 36500d"
    with pytest.raises(SystemExit) as stopped:  # argparse: a one-line usage error, exit 2 (was an OverflowError)
        main(["usage", "serve", "--config", str(config), "--port", "99999"])
    assert stopped.value.code == 2
    assert "argument --port: 99999 is not a port (0-65535)" in capsys.readouterr().err


def test_thresholds_are_pure_sums_of_hours() -> None:
    day = 1_700_006_400_000 - 1_700_006_400_000 % metering.DAY_MS
    hours = [metering.Usage(day + h * HOUR, f"gw-{h % 3}", 1000, 200_000, 6_000_000_000) for h in range(24)]
    from bridge.config import DEFAULT_THRESHOLDS

    found = {c.rule: c.message() for c in metering.crossings("acme", hours, DEFAULT_THRESHOLDS)}
    assert found == {
        "shared-database": "tenant acme: 144 GB/day (2023-11-15), above the shared-database threshold (100 GB/day): "
        "calls for a dedicated database server",
        "shared-database-writes": "tenant acme: 55.6 messages/s (busiest hour 2023-11-15 00:00 UTC), above the "
        "shared-database-writes threshold (50 messages/s): calls for a dedicated database server (each message "
        "is a write)",
    }
    assert metering.by_day(hours)[0] == metering.Usage(day, "gw-0", 8000, 1_600_000, 48_000_000_000)


class UsageExporter(ServiceProcess):
    """``bridge usage serve`` in a subprocess."""

    def __init__(self, config: Path, port: int) -> None:
        super().__init__(config.with_name("exporter.log"))
        self.config, self.port = config, port
        self.extra: list[str] = []

    def command(self) -> list[str]:
        serve = ["usage", "serve", "--config", str(self.config), "--port", str(self.port), *self.extra]
        return ["bridge.cli", "--log-format", "json", *serve]

    def metrics(self) -> list[str]:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text.splitlines()


def test_the_exporter_follows_tenants_json_like_the_bridge(tmp_path: Path) -> None:
    """A tenant provisioned (or moved to other storage) after the exporter started is scraped from where it is
    now; a half-written tenants.json leaves the last good list in use."""
    storage = {"backend": "sqlite", "path": str(tmp_path / "store")}
    first, second = unique_tenant("exp"), unique_tenant("exp")
    at = int(time.time() * 1000)
    for name, points in ((first, 3), (second, 5)):
        store = make_store(
            validate_config({"storage": storage, "tenants": [{"name": name, "url": "mqtt://x:1"}]}).storage, name
        )
        store.open()
        try:
            with store.transaction() as tx:
                b = DataBatch("gw-01", "press", 1, [("gw-01", "press", "t", at, 1.0, "good", None, 1)] * points, at, 10)
                tx.insert_points(tx.claim_batches([b]))
                tx.record_usage(metering.hourly([b]))
        finally:
            store.close()
    data = tmp_path / "provisioning"
    data.mkdir()

    def provision(names: list[str], text: str | None = None) -> None:
        staging = data / ".tenants.json.tmp"
        staging.write_text(text or json.dumps({"tenants": [{"name": n, "url": "mqtts://x.test:8883"} for n in names]}))
        staging.replace(data / "tenants.json")

    provision([first])
    config = write_config(tmp_path / "bridge.yaml", tenants=[], storage=storage, tenants_from=str(data))
    exporter = UsageExporter(config, free_port()).start()
    try:
        wait_until(lambda: _scrape(exporter), what="the exporter answering")
        line = 'factory_edge_usage_points_total{{tenant="{}",gateway="gw-01"}} {}'
        assert line.format(first, 3) in exporter.metrics()
        provision([first, second])
        assert line.format(second, 5) in exporter.metrics()
        provision([], text='{"tenants": [{"name": ')  # caught half-written
        assert {line.format(first, 3), line.format(second, 5)} <= set(exporter.metrics())
        assert exporter.alive
    finally:
        exporter.stop()


def _scrape(exporter: UsageExporter) -> bool:
    try:
        exporter.metrics()
    except httpx.HTTPError:
        return False
    return True


def test_scrapes_at_once_read_the_stores_one_at_a_time(tmp_path: Path, pg_dsn: str, pg_schemas: list[str]) -> None:
    """Scrapes piling up (a slow store, a short Prometheus timeout, anyone on the port) must not open a
    connection per tenant per request to the shared PostgreSQL server the bridges need: they take turns."""
    names = [unique_tenant("pile") for _ in range(4)]
    pg_schemas.extend(names)
    storage = {"backend": "postgres", "dsn": pg_dsn}
    at = int(time.time() * 1000)
    for name in names:
        store = make_store(
            validate_config({"storage": storage, "tenants": [{"name": name, "url": "mqtt://x:1"}]}).storage, name
        )
        store.open()
        try:
            with store.transaction() as tx:
                b = DataBatch("gw-01", "press", 1, [("gw-01", "press", "t", at, 1.0, "good", None, 1)], at, 10)
                tx.insert_points(tx.claim_batches([b]))
                tx.record_usage(metering.hourly([b]))
        finally:
            store.close()
    config = write_config(
        tmp_path / "bridge.yaml", tenants=[{"name": n, "url": "mqtt://x:1"} for n in names], storage=storage
    )
    exporter = UsageExporter(config, free_port()).start()
    peak, stop = [0], threading.Event()

    def watch() -> None:
        import psycopg

        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'factory-edge bridge pile-%%'"
                ).fetchone()
                peak[0] = max(peak[0], int(row[0]) if row else 0)

    try:
        wait_until(lambda: _scrape(exporter), what="the exporter answering")
        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(40) as pool:
            texts = list(pool.map(lambda _: exporter.metrics(), range(120)))
        stop.set()
        watcher.join(10)
    finally:
        stop.set()
        exporter.stop()
    assert all(f'factory_edge_usage_points_total{{tenant="{names[0]}",gateway="gw-01"}} 1' in t for t in texts)
    assert peak[0] <= len(names), f"{peak[0]} connections at once for {len(names)} tenants"


def test_the_exporter_answers_only_with_its_bearer_token_when_given_one(tmp_path: Path) -> None:
    """``--token-file``: Prometheus' ``authorization`` (bearer) is required, so whoever reaches the port does not
    read every tenant's name and usage; a token file others can read, or an empty one, is refused at start."""
    config = write_config(
        tmp_path / "bridge.yaml",
        tenants=[{"name": "acme", "url": "mqtts://x.test:8883"}],
        storage={"backend": "sqlite", "path": str(tmp_path / "store")},
    )
    token = tmp_path / "exporter.token"
    token.write_text("s3cret-scrape-token\n")
    token.chmod(0o644)
    assert main(["usage", "serve", "--config", str(config), "--token-file", str(token), "--port", "0"]) == 2
    token.chmod(0o600)
    exporter = UsageExporter(config, free_port())
    exporter.extra = ["--token-file", str(token)]
    exporter.start()
    try:
        url = f"http://127.0.0.1:{exporter.port}/metrics"

        def up() -> bool:
            try:
                httpx.get(url, timeout=5)
            except httpx.HTTPError:
                return False
            return True

        wait_until(up, what="the exporter answering")
        refused = httpx.get(url, timeout=10)
        assert refused.status_code == 401 and "acme" not in refused.text
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        ok = httpx.get(url, headers={"Authorization": "Bearer s3cret-scrape-token"}, timeout=10)
        assert ok.status_code == 200 and "# TYPE factory_edge_usage_points_total counter" in ok.text
    finally:
        exporter.stop()


def test_usage_serve_answers_metrics_and_says_why_it_cannot_listen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "bridge.yaml",
        tenants=[{"name": "quiet", "url": "mqtts://mqtt.quiet.test:8883", "limits": {"points_per_s": 300}}],
        storage={"backend": "sqlite", "path": str(tmp_path / "none")},
    )
    exporter = UsageExporter(config, free_port()).start()
    try:
        url = f"http://127.0.0.1:{exporter.port}"
        text = wait_until(lambda: _get(f"{url}/metrics"), what="the exporter")
        assert 'factory_edge_tenant_points_per_s_limit{tenant="quiet"} 300' in text.splitlines()
        assert 'factory_edge_usage_threshold_exceeded{tenant="quiet",rule="shared-database"} 0' in text.splitlines()
        assert httpx.get(f"{url}/other").status_code == 404
        assert main(["usage", "serve", "--config", str(config), "--port", str(exporter.port)]) == 2
        assert capsys.readouterr().err.startswith(f"Error: --port {exporter.port}: cannot listen on 127.0.0.1: ")
    finally:
        assert exporter.stop() == 0  # SIGTERM: a clean stop


def _get(url: str) -> str | None:
    try:
        return httpx.get(url).text
    except httpx.TransportError:
        return None
