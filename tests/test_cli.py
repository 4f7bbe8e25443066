"""The ``agent`` command as a technician uses it: exit codes and exact output."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import load_config
from drivers.simulate.machines import demo_machines
from drivers.simulate.modbus_server import ModbusSimulator
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "config" / "agent-demo.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plant.yaml"
    path.write_text(text)
    return path


def test_check_config_summarises_the_demo_plant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(DEMO)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "OK: gateway gw-demo, 4 devices, 31 tags, 14 requests per poll cycle"
    assert "  cnc-1  modbus-tcp 127.0.0.1:5020 unit 1  poll 1s  9 tags  5 requests per poll" in out
    assert "    holding 0..3 (4 registers, 4 tags)" in out


def test_check_config_names_file_path_and_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        """\
devices:
  - name: press-1
    protocol: modbus-tcp
    host: 10.0.0.5
    tags:
      - {name: ok, address: 1}
      - {name: far, address: 70000}
      - {name: word, address: 40.10, type: int16}
      - {name: recipe, address: 5, type: string}
      - {name: typo, address: 5, tpye: int16}
  - name: oven
    protocol: opcua
    endpoint: opc.tcp://10.0.0.6:4840
    poll: 5 parsecs
    tags: [{name: t, node: "ns=2;s=X"}]
  - name: x
    protocol: profibus
""",
    )
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"Error: {path}: devices[press-1].tags[far].address: must be between 0 and 65535 (0-based protocol address) (got 70000)",
        f"Error: {path}: devices[press-1].tags[word]: a register bit (bit: 10) is read as bool, not int16",
        f"Error: {path}: devices[press-1].tags[recipe]: a string tag needs length: (number of registers, 2 characters each)",
        f"Error: {path}: devices[press-1].tags[typo].tpye: unknown key (check its spelling and indentation)",
        f"Error: {path}: devices[oven].poll: expected a duration like 500ms, 1s or 5m, got '5 parsecs'",
        f"Error: {path}: devices[x].protocol: must be one of 'modbus-tcp', 'modbus-rtu', 'opcua' (got 'profibus')",
    ]


BAD_CONFIGS = [
    ("devices: [\n", "line 2 column 1: invalid YAML: expected the node content, but found '<stream end>'"),
    ("- just\n- a list\n", "the top level must be a mapping of keys, got list"),
    (
        "devices:\n  - {name: a, protocol: modbus-tcp, host: h, tags: [{name: t, address: 1}, {name: t, address: 2}]}\n",
        "devices[a].tags: tag name 't' is used twice",
    ),
    (
        "devices:\n  - {name: a/b, protocol: opcua, endpoint: 'opc.tcp://h', tags: [{name: t, node: 'i=1'}]}\n",
        "devices[0].name: must start with a letter or digit and hold only letters, digits, '_', '.' and '-' "
        "(it becomes an MQTT topic level) (got 'a/b')",
    ),
    (
        "devices:\n  - {name: a, protocol: modbus-tcp, host: h, max_registers_per_read: 2, "
        "tags: [{name: t, address: 1, type: float64}]}\n",
        "devices: device 'a': tag 't' needs 4 registers but max_registers_per_read is 2",
    ),
    (
        "devices:\n  - {name: a, protocol: modbus-rtu, serial: /dev/ttyUSB0, max_concurrent_requests: 4, "
        "tags: [{name: t, address: 1}]}\n",
        "devices[a].max_concurrent_requests: a serial line carries one request at a time: "
        "only 1 is possible for modbus-rtu (got 4)",
    ),
    (
        "devices:\n  - {name: a, protocol: modbus-tcp, host: h, max_concurrent_requests: 64, tags: [{name: t, address: 1}]}\n",
        "devices[a].max_concurrent_requests: must be less than or equal to 32 (got 64)",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_config_errors_are_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = write(tmp_path, text)
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == f"Error: {path}: {message}\n"


def test_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "/nonexistent/plant.yaml"]) == 2
    assert capsys.readouterr().err == "Error: /nonexistent/plant.yaml: no such file\n"


def test_agent_run_refuses_a_bad_config_with_check_configs_lines(tmp_path: Path) -> None:
    """``agent run`` checks its file in a short-lived process (agent/configproc.py): same lines, exit code 2."""
    import subprocess

    cases = [*BAD_CONFIGS[:3], BAD_CONFIGS[4], (None, "no such file")]  # YAML, top level, models
    for i, (text, message) in enumerate(cases):
        path = tmp_path / f"plant-{i}.yaml"
        if text is not None:
            path.write_text(text)
        out = subprocess.run(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (out.returncode, out.stderr) == (2, f"Error: {path}: {message}\n"), text


@pytest.mark.parametrize("group", [False, True], ids=["agent", "agent-and-its-child"])
def test_a_stop_while_the_config_is_checked_ends_the_agent_cleanly(tmp_path: Path, group: bool) -> None:
    """SIGTERM while ``agent run`` waits for its config check (a child process): exit 0, no traceback.

    systemd stops the whole cgroup (the child too); a plain ``kill`` reaches the agent alone.
    """
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(DEMO), "--state-dir", str(tmp_path / "state")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        deadline = time.monotonic() + 30
        while not children.read_text().split():  # the config check has started
            assert proc.poll() is None and time.monotonic() < deadline, "no config check seen"
            time.sleep(0.01)
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopped while starting" in err


def test_demo_config_matches_the_simulated_register_map() -> None:
    config = load_config(DEMO)
    for machine in demo_machines():
        device = config.device(machine.name)
        assert device.unit == machine.unit
        ignore = {"deadband", "max_silence", "description"}
        assert {t.name: t.model_dump(exclude=ignore) for t in device.tags} == {
            f.name: f.tag().model_dump(exclude=ignore) for f in machine.fields
        }


async def run_agent(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_agent_read_prints_a_table_and_json(tmp_path: Path) -> None:
    port = free_port()
    config = write(tmp_path, DEMO.read_text().replace("port: 5020", f"port: {port}").split("  - name: oven-1")[0])
    async with ModbusSimulator(machines=demo_machines(), port=port):
        code, out, err = await run_agent("read", "--config", str(config), "--device", "compressor-1")
        assert (code, err) == (0, "")
        lines = out.splitlines()
        assert lines[0].split() == ["DEVICE", "TAG", "VALUE", "UNIT", "QUALITY", "ERROR"]
        name, tag, value, quality = lines[1].split()
        assert (name, tag, quality) == ("compressor-1", "loaded", "good") and value in ("true", "false")
        assert lines[3].split() == ["compressor-1", "serial_number", "SC7-0042", "good"]
        assert lines[5].split()[3:] == ["l/min", "good"]
        code, out, err = await run_agent("read", "--config", str(config), "--json")
        assert code == 0
        doc = json.loads(out)
        assert [d["dev"] for d in doc] == ["cnc-1", "press-1", "compressor-1"]
        program = next(p for p in doc[0]["points"] if p["tag"] == "program")
        assert program["v"] == "O1234-BRACKET" and program["q"] == "good" and program["ts"] > 1.7e12
        code, out, err = await run_agent("read", "--config", str(config), "--device", "nope")
        assert code == 2
        assert err == f"Error: {config}: no device named 'nope' (devices: cnc-1, press-1, compressor-1)\n"


async def test_agent_read_reports_an_unreachable_device(tmp_path: Path) -> None:
    port = free_port()
    config = write(
        tmp_path,
        f"devices:\n  - {{name: gone, protocol: modbus-tcp, host: 127.0.0.1, port: {port}, "
        f"tags: [{{name: a, address: 0}}, {{name: b, address: 1}}]}}\n",
    )
    code, out, err = await run_agent("read", "--config", str(config), "--json")
    assert code == 1
    assert err == "Error: 2 of 2 tags not good (first: gone.a: connection refused)\n"
    assert [(p["tag"], p["q"], p["err"]) for p in json.loads(out)[0]["points"]] == [
        ("a", "bad", "connection refused"),
        ("b", "bad", "connection refused"),
    ]


def test_agent_run_holds_the_values_check_config_reads(tmp_path: Path) -> None:
    """Every section, as ``agent run`` gets it from its child process: equal values, no model left in it."""
    from agent import config as models
    from agent import configproc

    path = write(
        tmp_path,
        """\
gateway: gw-1
mqtt: {url: "mqtts://mqtt.example:8883", keepalive: 10s}
buffer: {max_bytes: 64MiB, max_age: 2h, confirm: broker}
publish: {max_points: 200}
sparkplug: {group_id: plant-a, primary_host: scada}
remote_config: {deadline: 1m}
metrics_port: 9100
profiles:
  press: {protocol: modbus-tcp, tags: [{name: temp, address: 40.3}]}
devices:
  - {name: press-1, profile: press, host: 10.0.0.5, poll: 250ms}
  - name: oven
    protocol: opcua
    endpoint: opc.tcp://10.0.0.6:4840
    security: {policy: Basic256Sha256, mode: Sign}
    tags: [{name: zone1, node: "ns=2;s=Oven.Zone1", deadband: 2%}]
""",
    )
    model, plain = models.load_config(path), configproc.load_config(path)
    assert plain == model and model == plain

    def no_model(value: object, where: str) -> None:
        assert not hasattr(value, "model_dump"), where
        for key, item in vars(value).items() if hasattr(value, "__dict__") else []:
            for i, child in enumerate(item if isinstance(item, list) else [item]):
                if hasattr(child, "__dict__") and not isinstance(child, type):
                    no_model(child, f"{where}.{key}[{i}]")

    no_model(plain, "config")
    assert plain.device("press-1").tags[0].bit == 3 and plain.device("press-1").address == "10.0.0.5:502"
    assert plain.device("oven").tags[0].deadband == model.device("oven").tags[0].deadband
    assert plain.replace(gateway="gw-2").gateway == "gw-2" and plain.gateway == "gw-1"
