"""Issue 12's first hour, item by item: each with the input the issue names, run through the real commands.

Every mistake ends in one actionable line on stderr and a non-zero exit
code, never a traceback. Item 2 (installing) is ``test_wheel.py`` and
``test_package.py``; item 3 (two demos, one hosts block) is in
``test_demo.py``; the names in config paths are in ``test_cli.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import build_parser
from agent.status import text_lines
from drivers.simulate.machines import demo_machines
from drivers.simulate.modbus_server import ModbusSimulator
from factory_edge.errors import PublishError
from factory_edge.logs import KeyValueFormatter, fields
from factory_edge.mqtt import BrokerSettings, dial
from tests.helpers import ROOT, free_port
from tests.infra import TenantPki

MODBUS_DEVICE = """\
devices:
  - name: press-1
    protocol: modbus-tcp
    host: 127.0.0.1
    port: {port}
    unit: {unit}
    tags:
      - {{name: cycle_count, table: holding, address: {address}, type: uint32}}
"""


def agent(*argv: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single ``Error: …`` line a failed command printed (and nothing else on stderr)."""
    assert "Traceback" not in result.stderr and "CancelledError" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def plant(tmp_path: Path, mqtt: str, port: int = 5020) -> Path:
    path = tmp_path / "plant.yaml"
    path.write_text(
        f"gateway: gw-01\nstate_dir: {tmp_path / 'state'}\n{mqtt}" + MODBUS_DEVICE.format(port=port, unit=1, address=0)
    )
    return path


# -- 1. a wrong TLS file ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TenantPki:
    return TenantPki(tmp_path_factory.mktemp("pki"), "acme")


def _tls_cases(pki: TenantPki, tmp_path: Path) -> list[tuple[str, str]]:
    cert, key = pki.client("gw-01")
    (tmp_path / "readme.txt").write_text("not a certificate\n")
    url = "  url: mqtts://mqtt.acme.test:8883\n"
    return [
        (f"mqtt:\n{url}  ca_file: nope.pem\n", f"mqtt.ca_file: {tmp_path}/nope.pem: no such file"),
        (
            f"mqtt:\n{url}  ca_file: readme.txt\n",
            f"mqtt.ca_file: {tmp_path}/readme.txt: not a PEM certificate (expected -----BEGIN CERTIFICATE-----)",
        ),
        (
            f"mqtt:\n{url}  ca_file: {pki.ca_file}\n  cert_file: gw-01.pem\n  key_file: {key}\n",
            f"mqtt.cert_file: {tmp_path}/gw-01.pem: no such file",
        ),
        (
            f"mqtt:\n{url}  ca_file: {pki.ca_file}\n  cert_file: {cert}\n  key_file: gw-01.key\n",
            f"mqtt.key_file: {tmp_path}/gw-01.key: no such file",
        ),
        (
            f"mqtt:\n{url}  ca_file: {pki.ca_file}\n  cert_file: {cert}\n  key_file: {cert}\n",
            f"mqtt.key_file: {cert}: not a PEM private key (expected -----BEGIN PRIVATE KEY-----)",
        ),
        (
            f"mqtt:\n{url}  ca_file: {pki.ca_file}\n  cert_file: {cert}\n  key_file: {pki.broker_key_file}\n",
            f"mqtt.key_file: {pki.broker_key_file}: not the key of the certificate {cert}",
        ),
    ]


def test_wrong_tls_files_fail_check_config_and_run_in_one_line(tls_files: TenantPki, tmp_path: Path) -> None:
    for mqtt, problem in _tls_cases(tls_files, tmp_path):
        path = plant(tmp_path, mqtt)
        assert one_line(agent("check-config", path), 2) == f"Error: {path}: {problem}"
        # agent run used to log "agent started" and die with ~40 lines of CancelledError traceback.
        assert one_line(agent("run", "--config", path), 2) == f"Error: {path}: {problem}"


def test_a_failing_task_stops_the_agent_with_its_own_line(tmp_path: Path) -> None:
    """Any task of the agent that fails (here the metrics endpoint) ends it with its reason, not a CancelledError."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = plant(tmp_path, f"metrics_port: {port}\nmqtt:\n  url: mqtt://127.0.0.1:{free_port()}\n")
        result = agent("run", "--config", path, "--log-level", "error")
    assert one_line(result, 2).startswith(f"Error: metrics_port: cannot listen on 127.0.0.1:{port}: ")


# -- 4. option placement ---------------------------------------------------------------------------------


def test_global_options_after_the_command_and_check_config_takes_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(["run", "--config", "x.yaml", "--log-format", "json"])
    assert (args.config, args.log_format, args.log_level) == ("x.yaml", "json", None)
    args = build_parser().parse_args(["--log-level", "debug", "read", "--config", "x.yaml"])
    assert args.log_level == "debug"  # before the command, as before
    path = tmp_path / "plant.yaml"
    path.write_text(MODBUS_DEVICE.format(port=502, unit=1, address=0))
    argvs: list[list[str | Path]] = [
        ["check-config", path, "--log-format", "json"],
        ["check-config", "--config", path],
        ["check-config", "--log-level", "debug", "--config", path, path],
    ]
    for argv in argvs:
        result = agent(*argv)
        assert (result.returncode, result.stderr) == (0, ""), argv
        assert result.stdout.startswith("OK: gateway (from provisioning), 1 device, 1 tag, 1 request per poll cycle")
    assert (
        one_line(agent("check-config"), 2) == "Error: no config file given: agent check-config FILE (or --config FILE)"
    )


# -- 5. library noise ------------------------------------------------------------------------------------


def test_agent_read_against_a_wrong_port_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "plant.yaml"
    path.write_text(MODBUS_DEVICE.format(port=free_port(), unit=1, address=0))
    result = agent("read", "--config", path)
    assert one_line(result, 1) == "Error: 1 of 1 tags not good (first: press-1.cycle_count: connection refused)"
    assert result.stdout.splitlines()[1].split() == ["press-1", "cycle_count", "bad", "connection", "refused"]


def test_pymodbus_frame_dumps_stay_out_of_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    """pymodbus' "Cancel send, because not connected! >>>>> send: 0x0 0x1…" is debug detail, converted where we call it."""
    from pymodbus.logging import Log

    import drivers.modbus.driver  # noqa: F401 - installs the filter, as the agent does
    from factory_edge.logs import setup_logging

    try:
        setup_logging(level="error")
        Log.transport_dump(Log.SEND_DATA, b"\x00\x01\x00\x00\x00\x06\x01\x03\x00\x00\x00\x01", None)
        Log.error("Cancel send, because not connected!")
        assert capsys.readouterr().err == ""
        setup_logging(level="debug")
        Log.transport_dump(Log.SEND_DATA, b"\x00\x01", None)
        Log.error("Cancel send, because not connected!")
        err = capsys.readouterr().err
        assert 'level=debug logger=pymodbus.logging msg="Cancel send, because not connected!"' in err
        assert ">>>>>" not in err
    finally:
        logging.getLogger().handlers.clear()


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, out = free_port(), tmp_path / "simulate.log"
    with open(out, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "simulate", "--modbus-port", str(port), "--opcua-port", "0", "--quiet"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while "simulating" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def test_simulator_answers_an_unknown_unit_id_like_a_gateway(simulator: tuple[int, Path], tmp_path: Path) -> None:
    port, out = simulator
    path = tmp_path / "plant.yaml"
    path.write_text(MODBUS_DEVICE.format(port=port, unit=9, address=0))
    for _ in range(2):
        result = agent("read", "--config", path)
        assert one_line(result, 1) == (
            "Error: 1 of 1 tags not good (first: press-1.cycle_count: gateway target failed to respond)"
        )
    log = out.read_text()
    assert "Traceback" not in log and "KeyError" not in log, log
    warnings = [line for line in log.splitlines() if "level=warning" in line]
    assert warnings == [next(line for line in warnings)]  # once per unit id
    assert 'msg="no simulated machine with this unit id" unit=9 units="1, 2, 3"' in warnings[0]


# -- 6. mqtts:// against a plain listener ------------------------------------------------------------------


@pytest.fixture
def plain_broker(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    conf = tmp_path / "plain.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def test_mqtts_url_against_a_plain_listener_says_it_is_not_a_tls_port(
    plain_broker: int, tls_files: TenantPki
) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from factory_edge.mqtt import tls_context

    settings = BrokerSettings.from_url(
        f"mqtts://mqtt.acme.test:{plain_broker}", connect_host="127.0.0.1", ca_file=str(tls_files.ca_file)
    )
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="gw-01", protocol=paho.MQTTv5)
    context = tls_context(settings)
    client.tls_set_context(context)
    with pytest.raises(PublishError) as caught:
        await dial(client, settings, context, Properties(PacketTypes.CONNECT), timeout_s=5)
    assert str(caught.value) == (
        f"127.0.0.1:{plain_broker} is not a TLS port: it answered in plain MQTT; use the "
        "broker's TLS port (usually 8883), or an mqtt:// URL for a plain listener"
    )
    await asyncio.get_running_loop().run_in_executor(None, client.loop_stop)


# -- 7. the small ones -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "gateway: gw-01\n", "devices: []\n"])
def test_a_config_without_devices_is_not_ok(tmp_path: Path, text: str) -> None:
    path = tmp_path / "plant.yaml"
    path.write_text(text)
    assert one_line(agent("check-config", path), 2) == (
        f"Error: {path}: devices: none configured, so the agent would poll nothing; "
        "list the machines under devices: (docs/config.md)"
    )


def test_modicon_address_is_named_at_check_config_and_at_read(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "plant.yaml"
    path.write_text(MODBUS_DEVICE.format(port=port, unit=2, address=40001))
    hint = (
        "address 40001 looks like 1-based Modicon notation (holding register 40001); "
        "this field takes the 0-based protocol address: table: holding, address: 0 "
        "(or give the device addressing: modicon)"
    )
    result = agent("check-config", path)
    assert result.returncode == 0
    assert result.stderr == f"Warning: {path}: devices[press-1].tags[cycle_count].address: {hint}\n"

    async def read() -> subprocess.CompletedProcess[str]:
        async with ModbusSimulator(machines=demo_machines(), port=port):
            return await asyncio.to_thread(agent, "read", "--config", path)

    result = asyncio.run(read())
    assert (
        one_line(result, 1) == f"Error: 1 of 1 tags not good (first: press-1.cycle_count: illegal data address; {hint})"
    )


def test_ca_file_with_a_plain_url_is_an_error(tmp_path: Path) -> None:
    path = plant(tmp_path, "mqtt:\n  url: mqtt://broker.local:1883\n  ca_file: ca.pem\n")
    assert one_line(agent("check-config", path), 2) == (
        f"Error: {path}: mqtt: ca_file: given with an mqtt:// url, which is plain TCP without TLS: "
        "use mqtts:// (TLS), or remove it"
    )


def test_text_log_lines_carry_the_time_zone_and_no_none_fields() -> None:
    record = logging.LogRecord("agent", logging.WARNING, __file__, 1, "device down", None, None)
    record.__dict__.update(fields(device="press-1", err=None))
    line = KeyValueFormatter(with_time=True).format(record)
    stamp = line.split()[0].removeprefix("ts=")
    assert stamp[-6] in "+-" and stamp[-3] == ":", line  # 2026-12-03T11:26:55.747+01:00
    assert line.endswith('level=warning logger=agent msg="device down" device=press-1'), line


def test_status_of_a_stopped_agent_shows_no_rate() -> None:
    doc: dict[str, Any] = {
        "gw": "gw-01",
        "running": False,
        "connection": {"broker": "mqtts://b:8883", "state": "stopped", "reconnects": 1},
        "publish": {"points_per_s": 0.0, "acked_points": 1200, "confirmed_points": 1100},
        "buffer": {},
    }
    lines = text_lines(doc)
    assert lines[4] == "publishing   stopped; last run: 1200 accepted by the broker, 1100 confirmed stored, 1 reconnect"
    doc["running"] = True
    doc["publish"]["points_per_s"] = 712.4
    assert text_lines(doc)[4].startswith("publishing   712.4 points/s, 1200 accepted")


def test_demo_help_sets_nothing_up(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no venv on the PATH: --help needs none
    started = time.monotonic()
    result = subprocess.run(
        [str(ROOT / "scripts" / "demo"), "--help"], capture_output=True, text=True, env=env, timeout=30, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: scripts/demo [-h]") and "setup:" not in result.stderr
    assert time.monotonic() - started < 5


def test_json_logs_leave_out_absent_fields() -> None:
    from factory_edge.logs import JsonFormatter

    record = logging.LogRecord("agent", logging.INFO, __file__, 1, "connected", None, None)
    record.__dict__.update(fields(broker="b", error=None))
    assert "error" not in json.loads(JsonFormatter().format(record))
