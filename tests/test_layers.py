"""The packages depend on each other one way only: what ships to a gateway never pulls in the cloud.

    factory_edge   the foundation: imports none of the others
    drivers        factory_edge
    agent          factory_edge, drivers            (never provisioning, bridge)
    provisioning   factory_edge                     (never agent, drivers, bridge)
    bridge         factory_edge                     (never agent, drivers, provisioning)
    console        factory_edge, provisioning, bridge   (the cloud side's web page; never agent, drivers)

Read from the source with ``ast``: every ``import`` and ``from … import``,
at the top of a module or inside a function (a lazy import is still a
dependency of the installed package). ``factory_edge.demo`` runs the whole
story with every command, but only as child processes, so it imports none.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("factory_edge", "drivers", "agent", "provisioning", "bridge", "console")
ALLOWED = {
    "factory_edge": set(),
    "drivers": {"factory_edge"},
    "agent": {"factory_edge", "drivers"},
    "provisioning": {"factory_edge"},
    "bridge": {"factory_edge"},
    "console": {"factory_edge", "provisioning", "bridge"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import of one of ours in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in PACKAGES]
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_layers(package: str) -> None:
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, imported in imported_packages(path):
            if imported != package and imported not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package]) or 'nothing of ours'}:\n" + "\n".join(wrong)


def test_the_rule_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import os\nfrom agent.mqtt import Link\n\ndef f():\n    import bridge.cli\n    from . import x\n"
    )
    assert imported_packages(source) == [(2, "agent"), (5, "bridge")]


def test_a_modbus_only_agent_loads_no_opcua_sparkplug_http_or_cryptography_stack(tmp_path: Path) -> None:
    """Memory on a gateway: asyncua, protobuf, httpx and cryptography load only when a device, Sparkplug,
    a TLS file check (``check-config``), provisioning or a renewal needs them."""
    import subprocess
    import sys

    from tests.infra import TenantPki

    cert, key = TenantPki(tmp_path, "acme").client("gw-1")
    probe = (
        "import sys; from agent import cli, runtime; from agent.config import AgentConfig; "
        "from drivers.base import open_driver; from factory_edge.mqtt import check_client_certificate; "
        "from agent.identity import broker_from_config; "
        "c = AgentConfig.model_validate({'gateway': 'gw-1', 'mqtt': {'url': 'mqtts://mqtt.example:8883', "
        f"'cert_file': {str(cert)!r}, 'key_file': {str(key)!r}}}, "
        "'devices': [{'name': 'press-1', 'protocol': 'modbus-tcp', 'host': '127.0.0.1', "
        "'tags': [{'name': 't', 'address': 0}]}]}); "
        "open_driver(c.devices[0]); check_client_certificate(broker_from_config(c)); "
        "print(sorted(m for m in ('asyncua', 'google.protobuf', 'httpx', 'cryptography') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_running_modbus_only_agent_maps_no_pydantic_asyncua_or_cryptography(tmp_path: Path) -> None:
    """``agent run`` checks its config in a child process (agent/configproc.py), then runs without the config
    models: pydantic's compiled core is not in its memory map, nor cryptography's (which asyncua would bring)."""
    import time

    from tests.agentproc import AgentProcess
    from tests.helpers import free_port

    config = {
        "gateway": "gw-1",
        "mqtt": {"url": f"mqtt://127.0.0.1:{free_port()}"},  # nobody listens: the agent keeps retrying
        "devices": [
            {"name": "press-1", "protocol": "modbus-tcp", "host": "127.0.0.1", "port": free_port(),
             "tags": [{"name": "t", "address": 0}]}
        ],
    }  # fmt: skip
    with AgentProcess(tmp_path, config).start() as agent:
        assert agent.proc is not None
        deadline = time.monotonic() + 30
        while not any(entry.get("msg") == "agent started" for entry in agent.logs()):
            assert agent.alive and time.monotonic() < deadline, agent.log_path.read_text()
            time.sleep(0.1)
        mapped = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    assert "pydantic_core" not in mapped
    assert "cryptography" not in mapped
