"""Rendered configs are tried by the real programs before they replace the running ones.

- HAProxy: ``haproxy -c -f <cfg>`` (its own configuration check).
- Mosquitto 2.0 has no configuration-test flag, so the broker is started
  for real on the candidate files, with only the listener moved to a free
  loopback port and persistence switched off, and stopped as soon as it
  says ``running`` (about a tenth of a second). What it loads is what the
  tenant's broker would load on SIGHUP or restart: TLS files, CRL, ACL,
  plugin and its configuration; a line it cannot parse makes it exit.

A program that is not installed cannot be tried; the check is then skipped
and says so (``Checked.skipped``): the brokers and the proxy run on this
host in every supported layout, so that only happens on a host that only
renders files.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from factory_edge.errors import ProvisioningError

CHECK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Checked:
    what: str
    skipped: str | None = None


def check_haproxy(cfg: Path) -> Checked:
    """``haproxy -c``; ProvisioningError with HAProxy's first alert when the file does not load."""
    binary = shutil.which("haproxy")
    if binary is None:
        return Checked("haproxy", skipped="haproxy is not installed here")
    try:
        result = subprocess.run(
            [binary, "-c", "-f", str(cfg)],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisioningError(f"cannot run haproxy -c on {cfg}: {exc}") from exc
    if result.returncode != 0:
        raise ProvisioningError(f"the rendered proxy config does not load (haproxy -c): {_first_problem(result)}")
    return Checked("haproxy")


def check_mosquitto(conf_text: str, *, dynsec_config: Path | None = None) -> Checked:
    """Start Mosquitto on ``conf_text`` (a rendered ``mosquitto.conf``) on a free port; refuse what it refuses."""
    binary = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
    if binary is None:
        return Checked("mosquitto", skipped="mosquitto is not installed here")
    with tempfile.TemporaryDirectory(prefix="fe-check-") as tmp:
        work = Path(tmp)
        text = _trial_conf(conf_text, work, dynsec_config)
        conf = work / "mosquitto.conf"
        conf.write_text(text)
        log = work / "mosquitto.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work
            )
        try:
            deadline = time.monotonic() + CHECK_TIMEOUT_S
            while proc.poll() is None and " running" not in log.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise ProvisioningError(
                        f"the rendered broker config was not loaded within {CHECK_TIMEOUT_S:g}s by a trial mosquitto"
                    )
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        output = log.read_text(errors="replace")
        if " running" not in output:
            problem = next((line.split(": ", 1)[-1] for line in output.splitlines() if "Error" in line), output.strip())
            raise ProvisioningError(f"the rendered broker config does not load (trial mosquitto): {problem}")
    return Checked("mosquitto")


def _trial_conf(conf_text: str, work: Path, dynsec_config: Path | None) -> str:
    """The same config on a free loopback port, without persistence, writing nothing outside ``work``."""
    port = _free_port()
    lines = []
    for line in conf_text.splitlines():
        key = line.split(" ", 1)[0]
        if key == "listener":
            line = f"listener {port} 127.0.0.1"
        elif key in (
            "persistence",
            "persistence_location",
            "persistence_file",
            "autosave_interval",
            "pid_file",
            "log_dest",
        ):
            continue
        elif key == "plugin_opt_config_file":
            source = dynsec_config or Path(line.split(" ", 1)[1])
            copy = work / "dynsec.json"  # the plugin may rewrite its file: never the real one
            if source.exists():
                shutil.copyfile(source, copy)
            line = f"plugin_opt_config_file {copy}"
        lines.append(line)
    lines += ["persistence false", "log_dest stderr"]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _first_problem(result: subprocess.CompletedProcess[str]) -> str:
    for line in (result.stdout + result.stderr).splitlines():
        if "ALERT" in line or "error" in line.lower():
            return re.sub(r"^\[\w+\]\s*\(\d+\)\s*:\s*", "", line).strip()
    output = (result.stdout + result.stderr).strip()
    return output.splitlines()[0] if output else f"exit code {result.returncode}"


__all__ = ["Checked", "check_haproxy", "check_mosquitto"]
