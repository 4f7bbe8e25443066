"""The console in a real browser (Debian's headless chromium): what an operator and a tenant's staff do.

Marked ``browser`` (deselected by default; ``./scripts/test -m browser``, run by
.ci/run). The console runs as ``console serve`` over HTTPS; the tenant's
store is written meanwhile with the bridge's own storage code, so every
change on screen arrives through the live stream, never by reloading.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.alerts.model import State
from provisioning.cli import main as provisioning_main
from tests.browser_fixtures import ConsoleServer, chromium, log_in, script_errors, wait_for
from tests.console_fixtures import PASSWORD, FleetWriter, bridge_config, now_ms

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


@pytest.fixture
def served(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[ConsoleServer, FleetWriter]]:
    data = tmp_path / "prov"
    for tenant, port in (("acme", "18993"), ("globex", "18994")):
        argv = ["tenant", "create", tenant, "--domain", "example.com", "--broker-port", port, "--data-dir", str(data)]
        assert provisioning_main(argv) == 0
    capsys.readouterr()
    storage = tmp_path / "storage"
    writer = FleetWriter(storage, "acme")
    t = now_ms()
    writer.status("press-gw", "online")
    writer.points("press-gw", "cnc-1", [("spindle_temp", t - 60_000 + i * 1000, 60.0 + i % 7) for i in range(60)])
    writer.status("spare-gw", "offline", ts=t - 3600_000)
    other = FleetWriter(storage, "globex")
    other.status("globex-only-gw", "online")
    other.close()
    server = ConsoleServer(
        tmp_path / "console",
        bridge_config(tmp_path / "bridge.yaml", storage, ["acme", "globex"]),
        provisioning_dir=data,
    )
    server.account("root", "operator", PASSWORD)
    server.account("acme-admin", "tenant-admin", PASSWORD, tenant="acme")
    server.account("acme-viewer", "viewer", PASSWORD, tenant="acme")
    server.start()
    try:
        server.wait_ready()
        yield server, writer
    finally:
        server.stop()
        writer.close()


def cell(driver, key: str, column: str) -> str:
    return driver.find_element("css selector", f'tr[data-key="{key}"] td[data-col="{column}"]').text


def test_fleet_gateway_trend_alerts_and_keys_live_in_the_browser(served: tuple[ConsoleServer, FleetWriter]) -> None:
    server, writer = served
    with chromium() as driver:
        log_in(driver, server.url, "acme-admin", PASSWORD)
        assert driver.current_url == f"{server.url}/tenants/acme"
        wait_for(driver, lambda d: cell(d, "press-gw", "state") == "online", 20, "press-gw online")
        assert cell(driver, "spare-gw", "state") == "offline"
        assert "globex" not in driver.page_source
        # Live: the gateway drops off and comes back without a reload.
        driver.execute_script("document.body.dataset.marker = 'same page'")
        writer.status("press-gw", "offline")
        wait_for(driver, lambda d: cell(d, "press-gw", "state") == "offline", 20, "press-gw offline, live")
        writer.status("press-gw", "online")
        wait_for(driver, lambda d: cell(d, "press-gw", "state") == "online", 20, "press-gw online again, live")
        # Filter and sort, by keyboard.
        driver.find_element("id", "filter").send_keys("spare")
        wait_for(
            driver, lambda d: len(d.find_elements("css selector", "tbody tr[data-key]")) == 1, 5, "filtered to one row"
        )
        driver.find_element("id", "filter").clear()
        driver.find_element("id", "filter").send_keys(" ")
        assert driver.execute_script("return document.body.dataset.marker") == "same page"

        # The gateway page: live value, trend drawn from the store, CSV link for the shown range.
        driver.get(f"{server.url}/tenants/acme/gateways/press-gw")
        value = 'tr[data-tag="cnc-1/spindle_temp"] td.value'
        wait_for(driver, lambda d: d.find_element("css selector", value).text == "63", 20, "newest spindle_temp")
        writer.points("press-gw", "cnc-1", [("spindle_temp", now_ms(), 77.25)])
        wait_for(driver, lambda d: d.find_element("css selector", value).text == "77.25", 20, "new value, live")
        driver.find_element("css selector", 'tr[data-tag="cnc-1/spindle_temp"] input[type=checkbox]').click()
        drawn = wait_for(
            driver, lambda d: int(d.find_element("id", "trend").get_attribute("data-points") or 0), 20, "trend drawn"
        )
        assert drawn >= 20  # 61 readings over a minute, in buckets of ~3 s (an hour over the canvas width)
        assert "/trend.csv?series=press-gw%2Fcnc-1%2Fspindle_temp" in driver.find_element("id", "csv").get_attribute(
            "href"
        )

        # Alerts appear and resolve without a reload; acknowledged with a comment.
        driver.get(f"{server.url}/tenants/acme/alerts")
        wait_for(driver, lambda d: d.find_elements("id", "no-active"), 20, "no active alerts yet")
        since = now_ms()
        writer.alert("press-gw", "cnc-1", "spindle-overtemp", State.FIRING, 91.5, since=since)
        row = '#active tr[data-alert="press-gw/cnc-1/spindle-overtemp"]'
        wait_for(driver, lambda d: d.find_elements("css selector", row), 20, "the firing alert, live")
        driver.find_element("css selector", f"{row} input").send_keys("coolant pump restarted")
        driver.find_element("css selector", f"{row} button").click()
        wait_for(
            driver,
            lambda d: "acme-admin: coolant pump restarted" in d.find_element("css selector", row).text,
            20,
            "ack shown",
        )
        writer.alert("press-gw", "cnc-1", "spindle-overtemp", State.RESOLVED, 70.0, since=now_ms())
        wait_for(driver, lambda d: d.find_elements("id", "no-active"), 20, "alert resolved, live")
        assert "resolved" in driver.find_element("id", "history").text

        # A provisioning key: the secret shown once, then listed without it, then revoked.
        driver.get(f"{server.url}/tenants/acme/provisioning")
        wait_for(driver, lambda d: d.find_elements("id", "uses"), 20, "provisioning page")
        driver.find_element("css selector", "#uses").clear()
        driver.find_element("css selector", "#uses").send_keys("1")
        driver.find_element("xpath", "//button[text()='Create key']").click()
        key = wait_for(driver, lambda d: d.find_element("id", "new-key").text, 20, "the new key")
        assert key.startswith("fek_")
        key_id = key.split("_")[1]
        wait_for(driver, lambda d: d.find_elements("css selector", f'tr[data-key="{key_id}"]'), 20, "key listed")
        driver.get(f"{server.url}/tenants/acme/provisioning")
        wait_for(
            driver, lambda d: d.find_elements("css selector", f'tr[data-key="{key_id}"] button'), 20, "key listed again"
        )
        assert key not in driver.page_source  # shown once only
        driver.find_element("css selector", f'tr[data-key="{key_id}"] button').click()
        wait_for(
            driver,
            lambda d: "revoked" in d.find_element("css selector", f'tr[data-key="{key_id}"]').text,
            20,
            "key revoked",
        )
        # A technician certificate with the mosquitto_sub line to copy.
        driver.find_element("id", "tech-name").send_keys("alice")
        driver.find_element("xpath", "//button[text()='Issue certificate']").click()
        line = wait_for(driver, lambda d: d.find_element("id", "mosquitto-sub").text, 30, "the mosquitto_sub line")
        assert line.startswith("mosquitto_sub -h mqtt.acme.example.com") and "--cert tech-alice.pem" in line
        assert script_errors(driver) == []


def test_a_viewer_sees_but_cannot_change_and_another_tenant_is_not_there(
    served: tuple[ConsoleServer, FleetWriter],
) -> None:
    server, _ = served
    with chromium(width=800, height=1100) as driver:  # a tablet in portrait
        log_in(driver, server.url, "acme-viewer", PASSWORD)
        driver.get(f"{server.url}/tenants/acme/provisioning")
        wait_for(driver, lambda d: d.find_elements("css selector", "#keys table"), 20, "keys table")
        assert not driver.find_elements("id", "uses") and not driver.find_elements("xpath", "//button[text()='Revoke']")
        driver.get(f"{server.url}/tenants/globex")
        assert (
            "No such page." in driver.find_element("id", "message").text and "globex-only-gw" not in driver.page_source
        )
        assert [e.split(" - ")[1] for e in script_errors(driver)] == [
            "Failed to load resource: the server responded with a status of 404 (Not Found)"
        ]
        # The page fits the width: no horizontal scrolling of the page itself.
        driver.get(f"{server.url}/tenants/acme")
        wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready"), 20, "fleet page")
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        assert script_errors(driver) == []
