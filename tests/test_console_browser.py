"""The console in a real browser (Debian's headless chromium): what an operator and a tenant's staff do.

Marked ``browser`` (deselected by default; ``./scripts/test -m browser``, run by
.ci/run). The console runs as ``console serve`` over HTTPS; the tenant's
store is written meanwhile with the bridge's own storage code, so every
change on screen arrives through the live stream, never by reloading.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bridge.alerts.model import State
from factory_edge.demo.stack import GATEWAY, Ports
from provisioning.cli import main as provisioning_main
from tests.browser_fixtures import ConsoleServer, chromium, log_in, script_errors, type_into, wait_for
from tests.console_fixtures import PASSWORD, FleetWriter, bridge_config, now_ms
from tests.helpers import ROOT
from tests.infra import resolve_in_namespace, run_in_namespace
from tests.test_demo import HOSTS, Demo, _free_offset

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


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
    """A fleet cell's text; the live page re-renders a row on each update, so a cell found may go stale."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        try:
            return driver.find_element("css selector", f'tr[data-key="{key}"] td[data-col="{column}"]').text
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"the {column} cell of {key} kept being re-rendered")


def test_fleet_gateway_trend_alerts_and_keys_live_in_the_browser(served: tuple[ConsoleServer, FleetWriter]) -> None:
    server, writer = served
    with chromium() as driver:
        log_in(driver, server.url, "acme-admin", PASSWORD)
        assert driver.current_url == f"{server.url}/tenants/acme"
        wait_for(driver, lambda d: cell(d, "press-gw", "state") == "online", 30, "press-gw online")
        assert cell(driver, "spare-gw", "state") == "offline"
        assert "globex" not in driver.page_source
        # Live: the gateway drops off and comes back without a reload.
        driver.execute_script("document.body.dataset.marker = 'same page'")
        writer.status("press-gw", "offline")
        wait_for(driver, lambda d: cell(d, "press-gw", "state") == "offline", 30, "press-gw offline, live")
        writer.status("press-gw", "online")
        wait_for(driver, lambda d: cell(d, "press-gw", "state") == "online", 30, "press-gw online again, live")
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
        wait_for(driver, lambda d: d.find_element("css selector", value).text == "63", 30, "newest spindle_temp")
        writer.points("press-gw", "cnc-1", [("spindle_temp", now_ms(), 77.25)])
        wait_for(driver, lambda d: d.find_element("css selector", value).text == "77.25", 30, "new value, live")
        driver.find_element("css selector", 'tr[data-tag="cnc-1/spindle_temp"] input[type=checkbox]').click()
        drawn = wait_for(
            driver, lambda d: int(d.find_element("id", "trend").get_attribute("data-points") or 0), 30, "trend drawn"
        )
        assert drawn >= 20  # 61 readings over a minute, in buckets of ~3 s (an hour over the canvas width)
        assert "/trend.csv?series=press-gw%2Fcnc-1%2Fspindle_temp" in driver.find_element("id", "csv").get_attribute(
            "href"
        )

        # Alerts appear and resolve without a reload; acknowledged with a comment.
        driver.get(f"{server.url}/tenants/acme/alerts")
        wait_for(driver, lambda d: d.find_elements("id", "no-active"), 30, "no active alerts yet")
        since = now_ms()
        writer.alert("press-gw", "cnc-1", "spindle-overtemp", State.FIRING, 91.5, since=since)
        row = '#active tr[data-alert="press-gw/cnc-1/spindle-overtemp"]'
        wait_for(driver, lambda d: d.find_elements("css selector", row), 30, "the firing alert, live")
        driver.find_element("css selector", f"{row} input").send_keys("coolant pump restarted")
        driver.find_element("css selector", f"{row} button").click()
        wait_for(
            driver,
            lambda d: "acme-admin: coolant pump restarted" in d.find_element("css selector", row).text,
            20,
            "ack shown",
        )
        writer.alert("press-gw", "cnc-1", "spindle-overtemp", State.RESOLVED, 70.0, since=now_ms())
        wait_for(driver, lambda d: d.find_elements("id", "no-active"), 30, "alert resolved, live")
        assert "resolved" in driver.find_element("id", "history").text

        # A provisioning key: the secret shown once, then listed without it, then revoked.
        driver.get(f"{server.url}/tenants/acme/provisioning")
        wait_for(driver, lambda d: d.find_elements("id", "uses"), 30, "provisioning page")
        driver.find_element("css selector", "#uses").clear()
        driver.find_element("css selector", "#uses").send_keys("1")
        driver.find_element("xpath", "//button[text()='Create key']").click()
        key = wait_for(driver, lambda d: d.find_element("id", "new-key").text, 30, "the new key")
        assert key.startswith("fek_")
        key_id = key.split("_")[1]
        wait_for(driver, lambda d: d.find_elements("css selector", f'tr[data-key="{key_id}"]'), 30, "key listed")
        driver.get(f"{server.url}/tenants/acme/provisioning")
        wait_for(
            driver, lambda d: d.find_elements("css selector", f'tr[data-key="{key_id}"] button'), 30, "key listed again"
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
        wait_for(driver, lambda d: d.find_elements("css selector", "#keys table"), 30, "keys table")
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
        wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready"), 30, "fleet page")
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        # By keyboard: the first Tab reaches the skip link; Enter on a column header sorts by it, and the
        # focus stays on that header through the live redraws.
        from selenium.webdriver.common.keys import Keys

        driver.find_element("tag name", "body").send_keys(Keys.TAB)
        assert driver.switch_to.active_element.text == "Skip to content"
        header = driver.find_element("css selector", 'button[data-sort="gateway"]')
        header.send_keys(Keys.ENTER)
        sorted_th = 'th[aria-sort="descending"] button[data-sort="gateway"]'
        wait_for(driver, lambda d: d.find_elements("css selector", sorted_th), 10, "sorted by gateway, descending")
        assert [r.get_attribute("data-key") for r in driver.find_elements("css selector", "tbody tr")] == [
            "spare-gw",
            "press-gw",
        ]
        time.sleep(2.5)  # live updates arrive meanwhile
        assert driver.switch_to.active_element.get_attribute("data-sort") == "gateway"
        assert script_errors(driver) == []


def test_a_comment_being_typed_survives_the_live_updates_of_the_alerts_page(
    served: tuple[ConsoleServer, FleetWriter],
) -> None:
    # The alerts table is redrawn whenever an alert changes (a new value, another alert firing); someone
    # typing an acknowledgement's comment meanwhile kept neither the text nor the focus.
    server, writer = served
    writer.alert("press-gw", "cnc-1", "overheat", State.FIRING, 91.0)
    field = '#active tr[data-alert="press-gw/cnc-1/overheat"] input'
    with chromium() as driver:
        log_in(driver, server.url, "acme-admin", PASSWORD)
        driver.get(f"{server.url}/tenants/acme/alerts")
        wait_for(driver, lambda d: d.find_elements("css selector", field), 30, "the overheat alert")
        type_into(driver, field, "coolant pump")
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        writer.alert("press-gw", "cnc-1", "overheat", State.FIRING, 97.5)  # redrawn between two keystrokes
        writer.alert("press-gw", "cnc-1", "vibration", State.FIRING, 12.0)
        wait_for(driver, lambda d: "97.5" in d.find_element("id", "active").text, 20, "the new value drawn")
        wait_for(driver, lambda d: "vibration" in d.find_element("id", "active").text, 20, "the new alert drawn")
        ActionChains(driver).send_keys(Keys.END, " restarted").perform()  # typing on, without clicking again
        focused = "return document.activeElement.closest('tr') && document.activeElement.closest('tr').dataset.alert"
        assert driver.execute_script(focused) == "press-gw/cnc-1/overheat"
        assert driver.find_element("css selector", field).get_attribute("value") == "coolant pump restarted"
        ActionChains(driver).send_keys(Keys.LEFT * 14).perform()  # the caret before "pump"
        writer.alert("press-gw", "cnc-1", "overheat", State.FIRING, 98.125)
        wait_for(
            driver,
            lambda d: "98.125" in d.find_element("css selector", '#active tr[data-alert$="overheat"]').text,
            20,
            "the value after that drawn",
        )
        ActionChains(driver).send_keys("water ").perform()  # lands where the caret was, not at the end
        assert driver.find_element("css selector", field).get_attribute("value") == "coolant water pump restarted"
        ActionChains(driver).send_keys(Keys.END).perform()
        # By keyboard on to the button: it keeps the focus through the next redraw, and Enter acknowledges.
        ActionChains(driver).send_keys(Keys.TAB).perform()
        writer.alert("press-gw", "cnc-1", "overheat", State.FIRING, 99.25)
        wait_for(driver, lambda d: "99.25" in d.find_element("id", "active").text, 20, "the next value drawn")
        assert driver.execute_script(focused) == "press-gw/cnc-1/overheat"
        assert driver.switch_to.active_element.tag_name == "button"
        ActionChains(driver).send_keys(Keys.ENTER).perform()
        shown = "acme-admin: coolant water pump restarted"
        wait_for(driver, lambda d: shown in d.find_element("id", "active").text, 20, "the acknowledgement")
        assert script_errors(driver) == []


# ---------------------------------------------------------------- the whole deployment: ./scripts/demo


def _demo_gateway_config(workdir: Path, modbus_port: int) -> Path:
    """An agent config for a second gateway reading the demo's simulated press."""
    doc = {
        "state_dir": str(workdir / "state"),
        "devices": [
            {
                "name": "press-1",
                "protocol": "modbus-tcp",
                "host": "127.0.0.1",
                "port": modbus_port,
                "unit": 2,
                "poll": "1s",
                "timeout": "1s",
                "tags": [{"name": "cycle_count", "table": "holding", "address": 0, "type": "uint32"}],
            }
        ],
    }
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def short_root() -> Iterator[Path]:
    # HAProxy's admin socket lives below the demo directory: keep the path short (108 bytes at most).
    root = Path(tempfile.mkdtemp(prefix="fe-demo-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_the_demo_deployment_in_the_browser(short_root: Path) -> None:
    """Against ``./scripts/demo`` (simulated machines, provisioning, brokers, proxy, agent, bridge, console):
    log in with the printed account; the demo gateway online with live values and a trend; the simulated
    CNC's overtemperature alert appearing and resolving live; a key made here provisions a gateway, which
    comes online, and revoking it takes it offline."""
    offset = _free_offset()
    ports = Ports.with_offset(offset)
    demo = Demo(short_root, offset)
    agent = None
    try:
        line = demo.wait_line("  console       https://127.0.0.1:", 240)
        match = re.search(r"(https://127\.0\.0\.1:\d+)/  log in as (\S+), password (\S+)", line)
        assert match, line
        url, account, password = match.groups()
        assert url == f"https://127.0.0.1:{ports.console}"
        demo.wait_line("Running until Ctrl-C", 240)  # the demo's own overheat story is done
        files = demo.dir / "provisioning" / "tenants" / "acme"
        bridge_conn = ["-h", "mqtt.acme.demo.localhost", "-p", str(ports.proxy), "--cafile", str(files / "ca.pem")]
        bridge_conn += ["--cert", str(files / "bridge.pem"), "--key", str(files / "bridge.key"), "-V", "mqttv5"]

        def coolant(on: bool) -> None:
            payload = json.dumps({"device": "cnc-1", "tag": "coolant", "value": on})
            argv = ["mosquitto_pub", *bridge_conn, "-q", "1", "-t", f"gw/{GATEWAY}/cmd/write", "-m", payload]
            result = run_in_namespace(HOSTS, argv, timeout=20)
            assert result.returncode == 0, result.stderr

        with chromium() as driver:
            log_in(driver, url, account, password)
            driver.get(f"{url}/tenants/acme")
            wait_for(driver, lambda d: cell(d, GATEWAY, "state") == "online", 30, "the demo gateway online")
            # The agent's own buffer figures, from its retained status.
            wait_for(driver, lambda d: cell(d, GATEWAY, "backlog_batches").endswith("batches"), 30, "its backlog")

            driver.get(f"{url}/tenants/acme/gateways/{GATEWAY}")
            speed = 'tr[data-tag="cnc-1/spindle_temp"] td.value'
            first = wait_for(
                driver,
                lambda d: (
                    d.find_element("css selector", speed).text.endswith(" degC")
                    and d.find_element("css selector", speed).text
                ),
                30,
                "spindle_temp shown with its unit",
            )
            wait_for(
                driver, lambda d: d.find_element("css selector", speed).text != first, 60, "spindle_temp changing live"
            )
            driver.find_element("css selector", 'tr[data-tag="cnc-1/spindle_temp"] input[type=checkbox]').click()
            wait_for(
                driver,
                lambda d: int(d.find_element("id", "trend").get_attribute("data-points") or 0) > 5,
                30,
                "trend drawn",
            )
            assert driver.find_element("id", "trend").get_attribute("data-unit") == "degC"  # the value axis

            driver.get(f"{url}/tenants/acme/alerts")
            wait_for(
                driver, lambda d: "resolved" in d.find_element("id", "history").text, 30, "the demo's alert history"
            )
            wait_for(driver, lambda d: d.find_elements("id", "no-active"), 60, "no active alert")
            coolant(False)  # the spindle heats up: the bridge's rule fires above 80 degC
            row = f'#active tr[data-alert="{GATEWAY}/cnc-1/spindle-overtemp"]'
            wait_for(
                driver,
                lambda d: "firing" in d.find_element("css selector", row).text,
                180,
                "overtemperature firing, live",
            )
            coolant(True)
            wait_for(driver, lambda d: d.find_elements("id", "no-active"), 180, "overtemperature resolved, live")

            # A key made in the console provisions a new gateway; revoking it takes it offline.
            driver.get(f"{url}/tenants/acme/provisioning")
            wait_for(driver, lambda d: d.find_elements("id", "uses"), 30, "provisioning page")
            driver.find_element("xpath", "//button[text()='Create key']").click()
            key = wait_for(driver, lambda d: d.find_element("id", "new-key").text, 30, "the new key")
            workdir = short_root / "gw2"
            workdir.mkdir()
            argv = [sys.executable, "-m", "agent.cli", "provision", "--url", f"https://127.0.0.1:{ports.api}"]
            argv += ["--key", key, "--name", "gw-console", "--state-dir", str(workdir / "state")]
            argv += ["--ca-file", str(demo.dir / "provisioning" / "api" / "ca.pem")]
            provisioned = run_in_namespace(HOSTS, argv, timeout=60, cwd=ROOT)
            assert provisioned.returncode == 0, provisioned.stderr
            config = _demo_gateway_config(workdir, ports.modbus)
            agent = resolve_in_namespace(
                HOSTS,
                [
                    sys.executable,
                    "-m",
                    "agent.cli",
                    "run",
                    "--config",
                    str(config),
                    "--state-dir",
                    str(workdir / "state"),
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            driver.get(f"{url}/tenants/acme")
            wait_for(driver, lambda d: cell(d, "gw-console", "state") == "online", 60, "gw-console online")
            driver.get(f"{url}/tenants/acme/provisioning")
            revoke = 'tr[data-gateway="gw-console"] button'
            wait_for(driver, lambda d: d.find_elements("css selector", revoke), 30, "gw-console listed")
            driver.find_element("css selector", revoke).click()
            driver.switch_to.alert.accept()
            wait_for(driver, lambda d: "gw-console revoked" in d.find_element("id", "message").text, 60, "revoked")
            driver.get(f"{url}/tenants/acme")
            wait_for(
                driver, lambda d: cell(d, "gw-console", "state") in ("offline", "revoked"), 60, "gw-console offline"
            )
            assert cell(driver, GATEWAY, "state") == "online"
            assert script_errors(driver) == []
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()
            agent.wait(20)
        if demo.proc.poll() is None:
            demo.proc.send_signal(signal.SIGINT)
            try:
                demo.wait(120)
            except subprocess.TimeoutExpired:
                pass
        demo.kill()
