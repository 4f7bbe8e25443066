"""The console as a real process over HTTPS, and Debian's headless chromium driven through its chromium-driver.

Nothing is downloaded: selenium is given ``/usr/bin/chromium`` and
``/usr/bin/chromedriver`` (``scripts/setup`` installs both from Debian)
and ``SE_OFFLINE`` keeps its driver manager off the network. The console
makes its own CA; the browser is told to accept that certificate
(``acceptInsecureCerts``), the only thing a test browser does differently.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, ServiceProcess, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def require_chromium() -> None:
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(binary):
            pytest.fail(f"{binary} missing: run ./scripts/setup (it installs Debian's chromium and chromium-driver)")


class ConsoleServer(ServiceProcess):
    """``console serve`` on a free port, its own TLS, JSON logs."""

    def __init__(self, root: Path, bridge_config: Path, *, provisioning_dir: Path | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root / "console.log")
        self.state = root / "state"
        self.bridge_config = bridge_config
        self.provisioning_dir = provisioning_dir
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        argv = [
            "console.cli",
            "serve",
            "--bridge-config",
            str(self.bridge_config),
            "--state-dir",
            str(self.state),
            "--port",
            str(self.port),
            "--log-format",
            "json",
        ]
        if self.provisioning_dir is not None:
            argv += ["--provisioning-dir", str(self.provisioning_dir)]
        return argv

    def account(self, name: str, role: str, password: str, tenant: str | None = None) -> None:
        argv = [str(ROOT / ".venv" / "bin" / "python"), "-m", "console.cli", "account", "create", name, "--role", role]
        argv += ["--tenant", tenant] if tenant else []
        argv += ["--password-stdin", "--state-dir", str(self.state)]
        subprocess.run(argv, input=password + "\n", text=True, check=True, capture_output=True, cwd=ROOT, timeout=60)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.alive, self.log_path.read_text()
            ca = self.state / "tls" / "ca.pem"
            if ca.exists():
                context = ssl.create_default_context(cafile=str(ca))
                try:
                    with urllib.request.urlopen(f"{self.url}/login", context=context, timeout=2) as answer:
                        if answer.status == 200:
                            return
                except OSError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"console did not answer within {timeout_s} s:\n{self.log_path.read_text()}")


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    require_chromium()
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    options.set_capability("acceptInsecureCerts", True)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, predicate: Callable[[Any], Any], timeout_s: float, what: str) -> Any:
    """The first truthy value of ``predicate(driver)`` within the time; else fail naming ``what`` and the page."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate(driver)
            if value:
                return value
        except (StaleElementReferenceException, WebDriverException):
            pass
        if time.monotonic() > deadline:
            text = driver.find_element("tag name", "body").text
            raise AssertionError(f"{what}: not within {timeout_s} s; the page shows:\n{text[:3000]}")
        time.sleep(0.1)


def type_into(driver: Any, css: str, text: str) -> None:
    """Click the field and type as a person does, to whatever holds the focus: a live redraw between finding
    the field and typing replaces the element, and the page must carry the focus and the text over."""
    from selenium.webdriver.common.action_chains import ActionChains

    wait_for(driver, lambda d: d.find_element("css selector", css).click() or True, 10, f"the field {css}")
    ActionChains(driver).send_keys(text).perform()


def log_in(driver: Any, url: str, name: str, password: str) -> None:
    driver.get(f"{url}/login")
    driver.find_element("id", "name").send_keys(name)
    driver.find_element("id", "password").send_keys(password)
    driver.find_element("css selector", "button[type=submit]").click()
    wait_for(driver, lambda d: d.find_elements("id", "logout"), 20, f"logged in as {name}")


def script_errors(driver: Any) -> list[str]:
    """The browser console's errors (a Content-Security-Policy violation is one)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
