"""The base wheel is a gateway's agent: Modbus, no web, database or OPC UA stack.

Builds the wheel from this checkout, installs it into an empty venv (pip
takes the dependencies from the package index) and uses the installed
commands there: ``agent simulate`` serves the Modbus machines and says the
oven needs ``[opcua]``, ``agent read`` reads them, an OPC UA device is one
line naming the extra, and the cloud commands say they need ``[cloud]``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port

CLOUD_AND_OPCUA = ("fastapi", "uvicorn", "psycopg", "sqlite_utils", "orjson", "aiomqtt", "asyncua")


def run(*argv: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd="/")


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty venv with only the base wheel (and what it depends on) installed."""
    where = tmp_path_factory.mktemp("wheel")
    built = run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", where / "dist", ROOT)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (where / "dist").glob("factory_edge-*.whl")
    venv = where / "venv"
    made = run(sys.executable, "-m", "venv", venv)
    assert made.returncode == 0, made.stderr
    installed = run(venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", wheel, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return venv


def test_base_wheel_has_no_cloud_or_opcua_stack(base_venv: Path) -> None:
    probe = (
        "import importlib.util as u, sys; "
        f"print(' '.join(m for m in {CLOUD_AND_OPCUA!r} if u.find_spec(m) is not None))"
    )
    found = run(base_venv / "bin" / "python", "-c", probe)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "", f"installed with the base wheel: {found.stdout.strip()}"


def test_every_agent_module_imports_without_extras(base_venv: Path) -> None:
    """What the agent imports, even in a command not run here, is in the base dependencies."""
    probe = """
import importlib, pkgutil, agent, drivers
skip = ("drivers.opcua", "drivers.simulate.opcua_server")
for package in (agent, drivers):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not info.name.startswith(skip):
            importlib.import_module(info.name)
"""
    result = run(base_venv / "bin" / "python", "-c", probe)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture
def simulator(base_venv: Path, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    out = tmp_path / "simulate.out"
    with open(out, "w") as sink:
        proc = subprocess.Popen(
            [base_venv / "bin" / "agent", "simulate", "--modbus-port", str(port), "--opcua-port", str(free_port())],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while "simulating" not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def test_agent_read_works_against_agent_simulate(base_venv: Path, simulator: tuple[int, Path], tmp_path: Path) -> None:
    port, out = simulator
    assert (
        "OPC UA: not simulated (oven-1 needs the [opcua] extra: pip install 'factory-edge[opcua]')" in out.read_text()
    )
    config = tmp_path / "plant.yaml"
    config.write_text(f"""\
gateway: gw-01
devices:
  - name: press-1
    protocol: modbus-tcp
    host: 127.0.0.1
    port: {port}
    unit: 2
    tags:
      - {{name: cycle_count, table: holding, address: 0, type: uint32}}
      - {{name: hydraulic_temp, table: input, address: 0, type: int16, scale: 0.1}}
""")
    result = run(base_venv / "bin" / "agent", "read", "--config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["DEVICE", "TAG", "VALUE", "UNIT", "QUALITY"]
    assert [line.split()[1] for line in lines[1:]] == ["cycle_count", "hydraulic_temp"]
    assert all(" good" in line for line in lines[1:]), result.stdout


def test_opcua_device_without_the_extra_is_one_line(base_venv: Path, tmp_path: Path) -> None:
    config = tmp_path / "plant.yaml"
    config.write_text("""\
gateway: gw-01
devices:
  - name: oven-2
    protocol: opcua
    endpoint: opc.tcp://127.0.0.1:4840
    tags:
      - {name: zone1_temp, node: "ns=2;s=Oven.Zone1.Temp"}
""")
    argvs: list[list[str | Path]] = [
        ["check-config", config],
        ["read", "--config", config],
        ["run", "--config", config],
    ]
    for argv in argvs:
        result = run(base_venv / "bin" / "agent", *argv)
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert result.stderr == (
            f"Error: {config}: devices[oven-2]: protocol opcua needs the [opcua] extra "
            "(asyncua not installed): pip install 'factory-edge[opcua]'\n"
        )


@pytest.mark.parametrize("command", ["bridge", "provisioning", "console"])
def test_cloud_commands_name_their_extra(base_venv: Path, command: str) -> None:
    result = run(base_venv / "bin" / command, "--help")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: the {command} command needs the [cloud] extra (fastapi, ")
    assert result.stderr.endswith(" not installed): pip install 'factory-edge[cloud]'\n")
    assert len(result.stderr.splitlines()) == 1


def test_one_version() -> None:
    """``agent --version`` and the packages' version are the same number (CONTRIBUTING.md, Release)."""
    import tomllib

    from factory_edge import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__
