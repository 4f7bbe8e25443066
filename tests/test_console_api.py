"""The console's JSON API, as a browser's requests reach it: accounts, sessions, CSRF, tenant isolation, data.

Tenant stores are written with the bridge's own storage code; provisioning
actions run against a real provisioning data directory (``provisioning
tenant create``). Requests go through the whole ASGI app over a client that
keeps cookies as a browser does (HTTPS, so the Secure cookie is sent).
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from bridge.alerts.model import State
from bridge.storage.postgres import PostgresStore
from console.accounts import Accounts
from console.cli import main as console_main
from console.service import Console, Settings
from console.tenantdata import Series
from factory_edge import pki
from provisioning.cli import main as provisioning_main
from provisioning.service import Service
from tests.bridge_fixtures import pg_dsn, pg_schemas, unique_tenant
from tests.console_fixtures import FAST_HASHER, PASSWORD, FleetWriter, client, logged_in, make_console, now_ms

HOUR = 3600_000
__all__ = ["pg_dsn", "pg_schemas"]  # fixtures used here


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A provisioning data directory with tenants acme and globex (copied for each test that changes it)."""
    data = tmp_path_factory.mktemp("prov") / "data"
    for tenant, port in (("acme", "18991"), ("globex", "18992")):
        argv = ["tenant", "create", tenant, "--domain", "example.com", "--broker-port", port, "--data-dir", str(data)]
        assert provisioning_main(argv) == 0
    return data


@pytest.fixture
def fleet(tmp_path: Path, provisioned: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Console]:
    """Tenants acme and globex with data; provisioning for both; accounts of every role."""
    data = tmp_path / "prov"
    shutil.copytree(provisioned, data, symlinks=True)
    capsys.readouterr()
    console = make_console(tmp_path, ["acme", "globex"], provisioning=data)
    storage = tmp_path / "storage"
    t = now_ms()
    acme = FleetWriter(storage, "acme")
    acme.status("press-gw", "online", ts=t - 5000)
    acme.points("press-gw", "press-1", [("spindle_temp", t - 1000, 71.5), ("rpm", t - 1000, 1200)])
    acme.points("press-gw", "oven-2", [("zone1", t - 2000, None)], quality="bad", error="timeout after 1 s")
    acme.event("press-gw", "buffer_drop", '{"type":"buffer_drop","points":40,"batches":2,"reason":"full"}')
    acme.event("press-gw", "buffer_drop", '{"type":"buffer_drop","points":2,"batches":1,"reason":"full"}')
    acme.alert("press-gw", "press-1", "spindle-overtemp", State.FIRING, 91.0)
    acme.status("old-gw", "online", ts=t - 10 * HOUR, version="0.0.9")
    acme.status("old-gw", "offline", ts=t - 9 * HOUR, version="0.0.9")
    acme.close()
    globex = FleetWriter(storage, "globex")
    globex.status("globex-secret-gw", "online")
    globex.points("globex-secret-gw", "globex-furnace", [("globex_temp", t, 1.0)])
    globex.alert("globex-secret-gw", "globex-furnace", "globex-rule", State.FIRING, 2.0)
    globex.close()
    for name, role, tenant in (
        ("root", "operator", None),
        ("acme-admin", "tenant-admin", "acme"),
        ("acme-viewer", "viewer", "acme"),
        ("globex-admin", "tenant-admin", "globex"),
    ):
        console.accounts.create(name, role, PASSWORD, tenant=tenant)
    yield console
    console.close()


def test_login_sets_a_secure_httponly_samesite_cookie_and_passwords_are_stored_hashed(fleet: Console) -> None:
    fleet.accounts.hasher = Accounts(fleet.settings.state_dir / "default").hasher  # argon2-cffi's own parameters
    fleet.accounts.set_password("acme-admin", PASSWORD)
    c = client(fleet)
    assert c.get("/api/session").status_code == 401
    wrong = c.post("/api/login", json={"name": "acme-admin", "password": "not the password"})
    assert wrong.status_code == 401 and wrong.json() == {"detail": "wrong name or password"}
    answer = c.post("/api/login", json={"name": "acme-admin", "password": PASSWORD})
    assert answer.status_code == 200
    cookie = answer.headers["set-cookie"]
    assert re.match(r"fe_session=[A-Za-z0-9_-]{40,};", cookie)
    for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute in cookie
    me = c.get("/api/session").json()
    assert me["account"] == {"name": "acme-admin", "role": "tenant-admin", "tenant": "acme", "disabled": False}
    assert me["tenants"] == ["acme"]
    # Only an Argon2id hash and the session token's SHA-256 are on disk.
    raw = (fleet.settings.state_dir / "console.db").read_bytes()
    assert PASSWORD.encode() not in raw
    assert cookie.split(";")[0].split("=", 1)[1].encode() not in raw
    with sqlite3.connect(fleet.settings.state_dir / "console.db") as db:
        stored = db.execute("SELECT password_hash FROM accounts WHERE name = 'acme-admin'").fetchone()[0]
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    actions = [e["action"] for e in fleet.accounts.audit_log("acme")]
    assert actions[:3] == ["login", "login.failed", "account.password"]
    assert (fleet.settings.state_dir / "console.db").stat().st_mode & 0o777 == 0o600
    assert c.post("/api/logout", headers={"X-CSRF-Token": me["csrf"]}).status_code == 200
    assert c.get("/api/session").status_code == 401


def test_logins_are_rate_limited_per_account(fleet: Console) -> None:
    c = client(fleet)
    for _ in range(fleet.settings.login_max_failures):
        assert c.post("/api/login", json={"name": "acme-viewer", "password": "guess guess guess"}).status_code == 401
    refused = c.post("/api/login", json={"name": "acme-viewer", "password": PASSWORD})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert c.post("/api/login", json={"name": "acme-admin", "password": PASSWORD}).status_code == 200


def test_changes_without_the_csrf_token_are_refused(fleet: Console) -> None:
    c, token = logged_in(fleet, "acme-admin")
    # A cross-site HTML form: form-encoded, no token; the browser sends the (SameSite) cookie in the worst case.
    form = c.post("/api/tenants/acme/keys", data={"uses": "1"})
    assert form.status_code == 403 and "CSRF" in form.json()["detail"]
    assert c.post("/api/tenants/acme/keys", json={"uses": 1}, headers={"X-CSRF-Token": "wrong"}).status_code == 403
    assert (
        c.post(
            "/api/tenants/acme/keys",
            json={"uses": 1},
            headers={"X-CSRF-Token": token, "Origin": "https://evil.example"},
        ).status_code
        == 403
    )
    assert c.post("/api/login", data={"name": "acme-admin", "password": PASSWORD}).status_code == 415
    assert fleet.keys("acme") == []
    made = c.post("/api/tenants/acme/keys", json={"uses": 1}, headers={"X-CSRF-Token": token})
    assert made.status_code == 201


def _routes(console: Console) -> list[tuple[str, str]]:
    spec = client(console).get("/openapi.json").json()
    return [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]


def _fill(path: str, tenant: str) -> str:
    return (
        path.replace("{tenant}", tenant)
        .replace("{gw}", "press-gw")
        .replace("{key_id}", "0123456789")
        .replace("{name}", "alice")
    )


def test_a_viewer_gets_403_on_every_write_route_of_the_openapi_spec(fleet: Console) -> None:
    writes = [(m, p) for m, p in _routes(fleet) if m not in ("GET", "HEAD") and "{tenant}" in p]
    assert len(writes) >= 6  # ack, key create/revoke, gateway revoke, technician issue/revoke
    c, token = logged_in(fleet, "acme-viewer")
    for method, path in writes:
        answer = c.request(method, _fill(path, "acme"), json={}, headers={"X-CSRF-Token": token})
        assert answer.status_code == 403, (method, path, answer.text)
    assert fleet.keys("acme") == [] and fleet.technicians("acme") == []
    assert "refused" in [e["action"] for e in fleet.accounts.audit_log("acme")]


def test_another_tenants_routes_are_404_and_nothing_of_it_leaks(fleet: Console) -> None:
    c, token = logged_in(fleet, "acme-admin")
    seen: list[str] = []
    for method, path in _routes(fleet):
        if "{tenant}" not in path:
            continue
        url = _fill(path, "globex")
        params = {"series": "globex-secret-gw/globex-furnace/globex_temp"}
        answer = c.request(method, url, params=params, json={}, headers={"X-CSRF-Token": token})
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json() == {"detail": "no such tenant"}  # the same as a tenant that does not exist
        seen.append(answer.text)
        endless = path.endswith("/stream")  # the live stream: its events are the fleet and alerts read here too
        own = (
            c.request("GET", _fill(path, "acme"), params={"series": "press-gw/press-1/rpm"})
            if method == "GET" and not endless
            else None
        )
        if own is not None and own.headers.get("content-type", "").startswith(("application/json", "text/csv")):
            seen.append(own.text)
    assert c.get("/api/tenants/nosuch/fleet").json() == {"detail": "no such tenant"}
    assert c.get("/api/audit").status_code == 404
    seen += [c.get("/api/tenants").text, c.get("/api/session").text, c.get("/tenants/acme").text]
    for page in ("/tenants/globex", "/tenants/globex/gateways/globex-secret-gw", "/tenants/globex/alerts", "/audit"):
        answer = c.get(page)
        assert answer.status_code == 404
        seen.append(answer.text)
    text = "\n".join(seen)
    for secret in ("globex", "globex-secret-gw", "globex-furnace", "globex-rule"):
        assert secret not in text
    # The operator sees both.
    op, _ = logged_in(fleet, "root")
    assert op.get("/api/tenants").json() == ["acme", "globex"]
    assert [g["gateway"] for g in op.get("/api/tenants/globex/fleet").json()] == ["globex-secret-gw"]


def test_fleet_overview_shows_state_version_drops_errors_alerts_and_certificates(fleet: Console) -> None:
    c, _ = logged_in(fleet, "acme-viewer")
    rows = {r["gateway"]: r for r in c.get("/api/tenants/acme/fleet").json()}
    assert set(rows) == {"press-gw", "old-gw"}
    press, old = rows["press-gw"], rows["old-gw"]
    assert press["state"] == "online" and old["state"] == "offline"
    assert old["version"] == "0.0.9" and press["version"] == "0.1.0" and press["config_hash"] == "c0ffee"
    assert press["dropped_points"] == 42 and old["dropped_points"] == 0
    assert press["devices_with_errors"] == ["oven-2"] and press["devices"] == 2 and press["bad_tags"] == 1
    assert press["active_alerts"] == 1
    assert 0 <= press["lag_ms"] < 60_000
    assert press["last_seen"] >= press["since"]
    assert "cert_not_after" not in press  # never provisioned through this provisioning service


def test_certificates_expiring_within_30_days_are_flagged(fleet: Console) -> None:
    assert fleet.provisioning is not None
    for gw, days in (("press-gw", 12), ("fresh-gw", 365)):
        key = fleet.create_key("acme", uses=1, expires_s=3600)["key"]
        csr = pki.make_csr(pki.new_key(), gw).public_bytes(serialization.Encoding.PEM).decode()
        Service(fleet.provisioning, cert_lifetime_s=days * 86400).provision(key, csr, gw)
    c, _ = logged_in(fleet, "acme-viewer")
    rows = {r["gateway"]: r for r in c.get("/api/tenants/acme/fleet").json()}
    assert rows["press-gw"]["cert_warning"] is True and 11 < rows["press-gw"]["cert_days_left"] <= 12
    assert rows["fresh-gw"]["cert_warning"] is False and rows["fresh-gw"]["state"] == "never seen"
    assert rows["old-gw"].get("cert_not_after") is None  # not provisioned here: nothing to warn about


def test_gateway_page_data_lists_devices_tags_values_and_errors(fleet: Console) -> None:
    c, _ = logged_in(fleet, "acme-viewer")
    doc = c.get("/api/tenants/acme/gateways/press-gw").json()
    devices = {d["device"]: {t["tag"]: t for t in d["tags"]} for d in doc["devices"]}
    assert devices["press-1"]["spindle_temp"]["value"] == 71.5
    assert devices["oven-2"]["zone1"]["quality"] == "bad"
    assert devices["oven-2"]["zone1"]["error"] == "timeout after 1 s"
    assert [e["type"] for e in doc["events"]] == ["buffer_drop", "buffer_drop"]
    assert c.get("/api/tenants/acme/gateways/globex-secret-gw").status_code == 404


def test_trend_is_downsampled_on_the_server_and_csv_has_every_point(tmp_path: Path) -> None:
    console = make_console(tmp_path, ["acme"])
    console.accounts.create("v", "viewer", PASSWORD, tenant="acme")
    writer = FleetWriter(tmp_path / "storage", "acme")
    start = 1_700_000_000_000
    values = [((i * 37) % 101) - 50.0 for i in range(20_000)]
    for chunk in range(0, 20_000, 5000):
        writer.points("gw", "cnc", [("temp", start + i * 100, values[i]) for i in range(chunk, chunk + 5000)])
    writer.points("gw", "cnc", [("label", start, "text is not drawn")])
    writer.close()
    c, _ = logged_in(console, "v")
    end = start + 20_000 * 100
    doc = c.get(
        "/api/tenants/acme/trend", params={"series": "gw/cnc/temp", "start": start, "end": end, "buckets": 100}
    ).json()
    assert doc["source"] == "points"
    points = doc["series"][0]["points"]
    assert len(points) == 100
    assert sum(p[4] for p in points) == 20_000
    assert min(p[1] for p in points) == min(values) and max(p[2] for p in points) == max(values)
    first = values[:200]
    assert points[0][:5] == [start, min(first), max(first), pytest.approx(sum(first) / 200), 200]
    text = c.get(
        "/api/tenants/acme/trend.csv", params={"series": "gw/cnc/temp", "start": start, "end": start + 1000}
    ).text
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["series", "ts", "time", "value", "quality", "error"]
    assert [float(r[3]) for r in rows[1:]] == values[:10]
    assert rows[1][2] == "2023-11-14T22:13:20.000Z"
    bad = c.get("/api/tenants/acme/trend", params={"series": "gw/cnc", "start": start, "end": end})
    assert bad.status_code == 422 and bad.json() == {"detail": "series 'gw/cnc': expected GATEWAY/DEVICE/TAG"}
    console.close()


def test_long_trends_read_the_minute_rollup_and_agree_with_the_raw_points(tmp_path: Path) -> None:
    console = make_console(tmp_path, ["acme"])
    writer = FleetWriter(tmp_path / "storage", "acme")
    start = 1_700_000_000_000 - 1_700_000_000_000 % 60_000
    rows = [("temp", start + i * 10_000, float(i % 97)) for i in range(3 * 8640)]  # three days, every 10 s
    writer.points("gw", "cnc", rows[: len(rows) // 2])
    rollup = console.rollup("acme")
    assert rollup is not None
    rollup.catch_up()
    writer.points("gw", "cnc", rows[len(rows) // 2 :])  # arrives after the first pass: folded in on the next
    writer.close()
    end = start + 3 * 86400_000
    fast = console.trend("acme", [Series("gw", "cnc", "temp")], start, end, 72)
    assert fast["source"] == "rollup"
    with console.data("acme") as data:
        raw = data.trend(Series("gw", "cnc", "temp"), start, end, 72)
    assert [[*p[:3], p[4]] for p in fast["series"][0]["points"]] == [[*p[:3], p[4]] for p in raw]
    assert [p[3] for p in fast["series"][0]["points"]] == pytest.approx([p[3] for p in raw])
    console.close()


def test_the_console_reads_a_postgresql_store_like_a_sqlite_one(
    tmp_path: Path, pg_dsn: str, pg_schemas: list[str]
) -> None:
    tenant = unique_tenant("console")
    pg_schemas.append(tenant)
    writer = FleetWriter(tmp_path, tenant, store=PostgresStore(pg_dsn, tenant))
    start = 1_700_000_000_000
    writer.status("gw", "online", ts=now_ms() - 1000)
    writer.points("gw", "cnc", [("temp", start + i * 1000, float(i % 10)) for i in range(600)])
    writer.points("gw", "cnc", [("program", now_ms(), "O1234")])
    writer.points("gw", "oven", [("zone", now_ms(), None)], quality="bad", error="timeout")
    writer.event("gw", "buffer_drop", '{"type":"buffer_drop","points":7,"batches":1,"reason":"full"}')
    writer.alert("gw", "cnc", "overtemp", State.FIRING, 88.5)
    writer.close()
    console = make_console(tmp_path, [tenant], dsn=pg_dsn)
    try:
        [row] = console.fleet(tenant)
        assert (row["gateway"], row["state"], row["dropped_points"], row["devices_with_errors"]) == (
            "gw",
            "online",
            7,
            ["oven"],
        )
        assert row["active_alerts"] == 1
        doc = console.gateway(tenant, "gw")
        assert doc is not None
        tags = {t["tag"]: t for d in doc["devices"] for t in d["tags"]}
        assert (
            tags["program"]["value"] == "O1234" and tags["temp"]["value"] == 9.0 and tags["zone"]["error"] == "timeout"
        )
        trend = console.trend(tenant, [Series("gw", "cnc", "temp")], start, start + 600_000, 10)
        assert trend["source"] == "points"
        assert [p[1:] for p in trend["series"][0]["points"]] == [[0.0, 9.0, 4.5, 60]] * 10
        assert [p[0] for p in console.points(tenant, Series("gw", "cnc", "temp"), start, start + 3000)] == [
            start,
            start + 1000,
            start + 2000,
        ]
        alerts = console.alerts(tenant)
        assert alerts["active"][0]["value"] == 88.5 and alerts["history"][0]["state"] == "firing"
    finally:
        console.close()


def test_long_postgresql_trends_read_the_minute_table_the_bridge_keeps(
    tmp_path: Path, pg_dsn: str, pg_schemas: list[str]
) -> None:
    tenant = unique_tenant("console")
    pg_schemas.append(tenant)
    store = PostgresStore(pg_dsn, tenant)
    writer = FleetWriter(tmp_path, tenant, store=store)
    start = 1_700_000_000_000 - 1_700_000_000_000 % 60_000
    rows = [("temp", start + i * 10_000, float(i % 97)) for i in range(3 * 8640)]  # three days, every 10 s
    for first in range(0, len(rows), 5000):  # batches straddle minutes: the same minute is upserted twice
        writer.points("gw", "cnc", rows[first : first + 5000])
    writer.points("gw", "cnc", [("temp", start + 5, 1000.0), ("label", start, "text")])  # a late reading
    writer.close()
    console = make_console(tmp_path, [tenant], dsn=pg_dsn)
    try:
        series = Series("gw", "cnc", "temp")
        fast = console.trend(tenant, [series], start, start + 3 * 86400_000, 72)
        assert fast["source"] == "rollup"
        with console.data(tenant) as data:
            raw = data.trend(series, start, start + 3 * 86400_000, 72)
        assert [[*p[:3], p[4]] for p in fast["series"][0]["points"]] == [[*p[:3], p[4]] for p in raw]
        assert [p[3] for p in fast["series"][0]["points"]] == pytest.approx([p[3] for p in raw])
        assert fast["series"][0]["points"][0][2] == 1000.0 and sum(p[4] for p in raw) == len(rows) + 1
    finally:
        console.close()
    # A store made before the minute table existed gets it, filled from its points, when the bridge opens it.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for table in ("points_minute", "gateway_buffer", "device_meta", "usage_hourly"):  # those of versions 2 to 5
            conn.execute(f'DROP TABLE "{tenant}".{table}')
        # Version 1's points: a table keyed by names (version 4 made it a view of series and samples).
        conn.execute(f'CREATE TABLE "{tenant}".points_v1 AS SELECT * FROM "{tenant}".points')
        conn.execute(f'DROP VIEW "{tenant}".points')
        conn.execute(f'DROP TABLE "{tenant}".samples, "{tenant}".series')
        conn.execute(f'ALTER TABLE "{tenant}".points_v1 RENAME TO points')
        conn.execute(f'DELETE FROM "{tenant}".schema_version WHERE version >= 2')
    store = PostgresStore(pg_dsn, tenant)
    store.open()
    store.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        found = conn.execute(f'SELECT sum(n), max(hi) FROM "{tenant}".points_minute').fetchone()
    assert found == (len(rows) + 1, 1000.0)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_backlog_and_units_come_from_the_agents_own_status_and_meta(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    tenant, dsn = unique_tenant("console"), None
    if backend == "postgres":
        dsn = request.getfixturevalue("pg_dsn")
        request.getfixturevalue("pg_schemas").append(tenant)
    store = PostgresStore(dsn, tenant) if dsn else None
    writer = FleetWriter(tmp_path / "storage", tenant, store=store)
    t = now_ms()
    writer.status("old-agent", "online", ts=t - 1000)  # reports no buffer: its figures are unknown, not zero
    writer.event("old-agent", "buffer_drop", '{"type":"buffer_drop","points":5,"batches":1,"reason":"full"}')
    writer.event("gw", "buffer_drop", '{"type":"buffer_drop","points":5,"batches":1,"reason":"full"}')
    writer.buffer("gw", t - 20_000, pending=40, unconfirmed=3, dropped=120, oldest=t - 60_000)
    writer.buffer("gw", t - 10_000, pending=0, unconfirmed=2, dropped=120, oldest=None)
    writer.buffer("gw", t - 30_000, pending=99, unconfirmed=99, dropped=99, oldest=t - 90_000)  # late: older
    writer.points("gw", "press", [("oil_temp", t, 61.5), ("strokes", t, 7)])
    oil = {"name": "oil_temp", "type": "float32", "unit": "degC", "description": "tank", "writable": False}
    writer.meta("gw", "press", [oil, {"name": "strokes", "type": "uint16", "unit": None, "writable": False}])
    writer.meta("gw", "gone", [{"name": "x", "unit": "bar"}])
    writer.meta("gw", "gone", None)
    writer.close()
    console = make_console(tmp_path, [tenant], dsn=dsn)
    console.accounts.create("v", "viewer", PASSWORD, tenant=tenant)
    try:
        c, _ = logged_in(console, "v")
        rows = {r["gateway"]: r for r in c.get(f"/api/tenants/{tenant}/fleet").json()}
        gw, old = rows["gw"], rows["old-agent"]
        assert (gw["backlog_batches"], gw["backlog_points"], gw["unconfirmed_batches"]) == (0, 0, 2)
        assert (gw["buffer_ts"], gw["oldest_backlog_ts"]) == (t - 10_000, None)
        assert gw["dropped_points"] == 120  # the agent's own count, not the events the store happens to hold
        assert old["backlog_batches"] is None and old["unconfirmed_batches"] is None and old["dropped_points"] == 5
        doc = c.get(f"/api/tenants/{tenant}/gateways/gw").json()
        tags = {t["tag"]: t for d in doc["devices"] for t in d["tags"]}
        assert (tags["oil_temp"]["value"], tags["oil_temp"]["unit"], tags["oil_temp"]["description"]) == (
            61.5,
            "degC",
            "tank",
        )
        assert tags["strokes"]["unit"] is None
        assert doc["status"]["backlog_batches"] == 0
        trend = c.get(f"/api/tenants/{tenant}/trend?series=gw/press/oil_temp&series=gw/gone/x").json()
        assert [s["unit"] for s in trend["series"]] == ["degC", None]  # a cleared meta leaves no unit behind
    finally:
        console.close()


def test_alerts_are_acknowledged_with_a_comment_by_admins_only(fleet: Console) -> None:
    viewer, vtoken = logged_in(fleet, "acme-viewer")
    body = {"gw": "press-gw", "device": "press-1", "rule": "spindle-overtemp", "comment": "coolant valve checked"}
    assert viewer.post("/api/tenants/acme/alerts/ack", json=body, headers={"X-CSRF-Token": vtoken}).status_code == 403
    admin, token = logged_in(fleet, "acme-admin")
    done = admin.post("/api/tenants/acme/alerts/ack", json=body, headers={"X-CSRF-Token": token})
    assert done.status_code == 200 and done.json()["by"] == "acme-admin"
    doc = viewer.get("/api/tenants/acme/alerts").json()
    assert doc["active"][0]["ack"]["comment"] == "coolant valve checked"
    assert doc["history"][0]["state"] == "firing" and doc["history"][0]["value"] == 91.0
    entry = fleet.accounts.audit_log("acme")[0]
    assert (entry["actor"], entry["action"], entry["target"], entry["detail"]) == (
        "acme-admin",
        "alert.ack",
        "press-gw/press-1/spindle-overtemp",
        {"comment": "coolant valve checked"},
    )
    missing = admin.post(
        "/api/tenants/acme/alerts/ack", json={**body, "rule": "nosuch"}, headers={"X-CSRF-Token": token}
    )
    assert missing.status_code == 404


def test_provisioning_keys_and_technicians_through_the_console_use_the_cli_checks(fleet: Console) -> None:
    admin, token = logged_in(fleet, "acme-admin")
    h = {"X-CSRF-Token": token}
    made = admin.post("/api/tenants/acme/keys", json={"uses": 2, "expires": "1d"}, headers=h)
    assert made.status_code == 201
    key = made.json()
    assert re.fullmatch(r"fek_[0-9a-f]{10}_[A-Za-z0-9_-]{43}", key["key"]) and key["max_uses"] == 2
    listed = admin.get("/api/tenants/acme/keys").json()
    assert [k["id"] for k in listed] == [key["id"]] and key["key"] not in admin.get("/api/tenants/acme/keys").text
    bad = admin.post("/api/tenants/acme/keys", json={"expires": "soon"}, headers=h)
    assert bad.status_code == 422 and bad.json()["detail"].startswith("expires: ")
    # A globex admin cannot revoke acme's key by its id.
    other, otoken = logged_in(fleet, "globex-admin")
    assert (
        other.post(f"/api/tenants/globex/keys/{key['id']}/revoke", headers={"X-CSRF-Token": otoken}).status_code == 404
    )
    assert admin.post(f"/api/tenants/acme/keys/{key['id']}/revoke", headers=h).status_code == 200
    assert admin.get("/api/tenants/acme/keys").json()[0]["state"] == "revoked"
    tech = admin.post("/api/tenants/acme/technicians", json={"name": "alice", "hours": 2}, headers=h)
    assert tech.status_code == 201, tech.text
    doc = tech.json()
    assert set(doc["files"]) == {"tech-alice.pem", "tech-alice.key", "acme-ca.pem"}
    assert "PRIVATE KEY" in doc["files"]["tech-alice.key"]
    assert (
        doc["command"].startswith("mosquitto_sub -h mqtt.acme.example.com") and "--key tech-alice.key" in doc["command"]
    )
    assert [t["state"] for t in admin.get("/api/tenants/acme/technicians").json()] == ["active"]
    too_long = admin.post("/api/tenants/acme/technicians", json={"name": "bob", "hours": 500}, headers=h)
    assert too_long.status_code == 422
    revoked = admin.post("/api/tenants/acme/technicians/alice/revoke", headers=h)
    assert revoked.status_code == 200 and revoked.json()["technician"] == "tech-alice"
    nosuch = admin.post("/api/tenants/acme/gateways/nosuch-gw/revoke", headers=h)
    assert nosuch.status_code == 404 and "no gateway 'nosuch-gw' in tenant acme" in nosuch.json()["detail"]
    actions = [e["action"] for e in fleet.accounts.audit_log("acme")]
    for action in ("key.create", "key.revoke", "technician.issue", "technician.revoke", "gateway.revoke.failed"):
        assert action in actions


def test_cli_creates_the_first_operator_and_manages_accounts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = str(tmp_path / "state")

    def run(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = console_main([*args, "--state-dir", state])
        out = capsys.readouterr()
        return code, out.out, out.err

    assert run("account", "create", "root", "--role", "operator", "--password-stdin", stdin=PASSWORD + "\n") == (
        0,
        "account root created: operator\n",
        "",
    )
    assert run("account", "create", "v", "--role", "viewer", "--password-stdin", stdin=PASSWORD + "\n")[2] == (
        "Error: --tenant: a viewer belongs to one tenant; name it\n"
    )
    assert run("account", "create", "v", "--role", "viewer", "--tenant", "acme", "--password-stdin", stdin="short\n")[
        2
    ] == ("Error: password: at least 10 characters (got 5)\n")
    assert run("account", "create", "root", "--role", "operator", "--password-stdin", stdin=PASSWORD + "\n")[2] == (
        "Error: account 'root' exists already\n"
    )
    assert (
        run(
            "account", "create", "v", "--role", "viewer", "--tenant", "acme", "--password-stdin", stdin=PASSWORD + "\n"
        )[0]
        == 0
    )
    _, out, _ = run("account", "list")
    assert out.splitlines() == [
        "NAME  ROLE      TENANT  STATE",
        "root  operator  (all)   active",
        "v     viewer    acme    active",
    ]
    assert run("account", "disable", "v") == (0, "account v: disabled\n", "")
    assert Accounts(state).login("v", PASSWORD, client="test") is None
    assert run("account", "remove", "nosuch")[2] == "Error: no account 'nosuch' (see console account list)\n"
    _, out, _ = run("audit", "--tenant", "acme")
    assert [line.split("  ")[2:4] for line in out.splitlines()] == [
        ["acme", "login.failed"],
        ["acme", "account.disable"],
        ["acme", "account.create"],
    ]


def test_a_will_published_after_the_birth_shows_the_gateway_offline(tmp_path: Path) -> None:
    """The agent makes its will before it connects, so the broker's will (offline) carries an older ts than the
    birth it follows. What was received last is the gateway's state."""
    console = make_console(tmp_path, ["acme"])
    writer = FleetWriter(tmp_path / "storage", "acme")
    t = now_ms()
    writer.status("gw", "online", ts=t - 1000, received=t - 900)
    writer.status("gw", "offline", ts=t - 1010, received=t - 100)  # the will, made before the connection
    writer.close()
    (row,) = console.fleet("acme")
    assert row["state"] == "offline"
    console.close()


def test_a_tenant_placed_on_another_storage_server_is_read_there(
    tmp_path: Path, pg_dsn: str, pg_schemas: list[str]
) -> None:
    """``tenants.json`` places the tenant on PostgreSQL while the bridge's own storage is SQLite."""
    tenant = unique_tenant("placed")
    pg_schemas.append(tenant)
    writer = FleetWriter(tmp_path, tenant, store=PostgresStore(pg_dsn, tenant))
    writer.status("gw", "online", ts=now_ms() - 1000)
    writer.points("gw", "cnc", [("temp", now_ms(), 71.5)])
    writer.close()
    data = tmp_path / "provisioning"
    data.mkdir()
    entry = {
        "name": tenant,
        "url": "mqtts://mqtt.placed.example.com:8883",
        "storage": {"backend": "postgres", "dsn": pg_dsn},
    }
    (data / "tenants.json").write_text(json.dumps({"tenants": [entry]}))
    config = tmp_path / "bridge.yaml"
    config.write_text(yaml.safe_dump({"storage": {"path": str(tmp_path / "sqlite")}, "tenants_from": str(data)}))
    console = Console(Settings(state_dir=tmp_path / "console", bridge_config=config, hasher=FAST_HASHER))
    try:
        [row] = console.fleet(tenant)
        assert (row["gateway"], row["state"]) == ("gw", "online")
        doc = console.gateway(tenant, "gw")
        assert doc is not None and doc["devices"][0]["tags"][0]["value"] == 71.5
        assert not (tmp_path / "sqlite" / f"{tenant}.db").exists()
    finally:
        console.close()
