"""The cloud side of fleet configuration: ``provisioning config`` against a tenant broker it rendered, a real agent.

Versions stored in the registry, pushed as the operators' identity through
the rendered ACL, and compared with the retained status each agent keeps:
in sync, drift after a rollback, drift after a local edit on the gateway.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from drivers.config import Table
from drivers.simulate.modbus_server import ModbusSimulator, RegisterModel
from provisioning import pki as pkilib
from tests.agentproc import AgentProcess
from tests.helpers import free_port
from tests.provisioning_fixtures import ApiServer, RenderedMosquitto, eventually, provisioning

pytestmark = pytest.mark.timeout(120)

GW = "gw-01"


def status_rows(data: Path) -> tuple[int, list[dict[str, Any]]]:
    result = provisioning(data, "config", "status", "acme", "--json", check=False)
    assert result.returncode in (0, 3), result.stderr
    return result.returncode, json.loads(result.stdout)


def gateway_config(tenant_dir: Path, broker_port: int, modbus_port: int, tags: int) -> dict[str, Any]:
    return {
        "gateway": GW,
        "mqtt": {
            "url": f"mqtts://mqtt.acme.test:{broker_port}",
            "connect_host": "127.0.0.1",
            "ca_file": str(tenant_dir / "ca.pem"),
            "cert_file": str(tenant_dir / f"{GW}.pem"),
            "key_file": str(tenant_dir / f"{GW}.key"),
        },
        "buffer": {"confirm": "broker"},
        "remote_config": {"deadline": "3s"},
        "devices": [
            {
                "name": "line-1",
                "protocol": "modbus-tcp",
                "host": "127.0.0.1",
                "port": modbus_port,
                "poll": "200ms",
                "tags": [{"name": "r{address}", "addresses": f"0-{tags - 1}"}],
            }
        ],
    }


@pytest.mark.fault
async def test_store_push_and_drift_through_the_rendered_broker(tmp_path: Path) -> None:
    data = tmp_path / "data"
    broker_port, modbus_port = free_port(), free_port()
    provisioning(data, "init", "--proxy-bind", "127.0.0.1", "--proxy-port", str(free_port()))
    provisioning(data, "tenant", "create", "acme", "--domain", "test", "--broker-port", str(broker_port))
    files = data / "tenants" / "acme"
    # The gateway's certificate from the tenant's CA (what agent provision would get).
    ca_key, ca_cert = pkilib.load_private_key(files / "ca.key"), pkilib.load_cert(files / "ca.pem")
    key, cert = pkilib.issue_client_cert(ca_key, ca_cert, GW)
    site = tmp_path / "site"
    site.mkdir()
    pkilib.write_private_key(site / f"{GW}.key", key)
    pkilib.write_pem(site / f"{GW}.pem", cert)
    (site / "ca.pem").write_bytes((files / "ca.pem").read_bytes())
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, range(10))
    broker = RenderedMosquitto(data, "acme")
    async with ModbusSimulator(units={1: model}, port=modbus_port):
        with broker, AgentProcess(tmp_path / "agent", gateway_config(site, broker_port, modbus_port, 2)) as agent:
            agent.start()
            await asyncio.to_thread(
                eventually, lambda: status_rows(data)[1] and status_rows(data)[1][0]["online"], 20, "the agent's status"
            )
            code, rows = await asyncio.to_thread(status_rows, data)
            assert code == 0 and rows[0]["state"] == "not pushed" and rows[0]["source"] == "local"

            wanted = tmp_path / "v1.yaml"
            wanted.write_text(yaml.safe_dump(gateway_config(site, broker_port, modbus_port, 4), sort_keys=False))
            result = await asyncio.to_thread(
                provisioning, data, "config", "set", "acme", GW, str(wanted), "--note", "4 registers", "--push"
            )
            assert result.stdout.splitlines()[0].startswith(f"{GW}: version 1, hash ")
            assert result.stdout.splitlines()[1].startswith(f"{GW}: version 1 applying, hash ")
            await asyncio.to_thread(eventually, lambda: status_rows(data)[1][0]["state"] == "in sync", 15, "in sync")
            code, rows = await asyncio.to_thread(status_rows, data)
            assert code == 0 and rows[0]["running_version"] == 1 and rows[0]["source"] == "pushed"
            assert rows[0]["last"]["state"] == "applied"
            assert (
                await asyncio.to_thread(provisioning, data, "config", "show", "acme", GW)
            ).stdout == wanted.read_text()

            # The same text again stores nothing new; pushed again, the gateway says it runs it already.
            again = await asyncio.to_thread(provisioning, data, "config", "set", "acme", GW, str(wanted))
            assert again.stdout.startswith(f"{GW}: version 1, hash ")
            same = await asyncio.to_thread(provisioning, data, "config", "push", "acme", GW, "--wait", "10s")
            assert same.stdout.startswith(f"{GW}: version 1 applied (already running), hash ")

            # Version 2 reads a dead port: the gateway rolls back, the cloud sees drift and why.
            dead = gateway_config(site, broker_port, free_port(), 4)
            wanted.write_text(yaml.safe_dump(dead, sort_keys=False))
            waited = await asyncio.to_thread(
                provisioning, data, "config", "set", "acme", GW, str(wanted), "--push", "--wait", "20s", check=False
            )
            assert waited.returncode == 1, waited.stderr
            assert waited.stderr.splitlines()[0] == f"{GW}: version 2 rolled back"
            assert waited.stderr.splitlines()[1].startswith(
                "  1 of 1 devices that read fine before fail after 3s (more than remote_config.max_failed_share 0.5): "
                "line-1: "
            )
            code, rows = await asyncio.to_thread(status_rows, data)
            assert code == 3 and rows[0]["state"] == "drift" and rows[0]["running_version"] == 1
            line = (await asyncio.to_thread(provisioning, data, "config", "status", "acme", check=False)).stdout.strip()
            assert line.startswith(f"{GW}  drift  desired v2 {rows[0]['desired_hash']}  running v1 ")
            assert "last push v2 rolled back: 1 of 1 devices that read fine before fail after 3s" in line

            # A rejected push: exit code 1, the reasons on stderr, nothing changes.
            wanted.write_text(wanted.read_text().replace("0-3", "65530-65540"))
            rejected = await asyncio.to_thread(
                provisioning, data, "config", "set", "acme", GW, str(wanted), "--push", check=False
            )
            assert rejected.returncode == 1
            assert rejected.stderr.splitlines() == [
                f"{GW}: version 3 rejected",
                "  config version 3: devices[line-1].tags[0].addresses: the range runs to address 65540, past the "
                "last one, 65535 (0-based protocol address)",
            ]

            # Through the API, as the console would: store version 4 and push it, waiting for the outcome.
            token = (await asyncio.to_thread(provisioning, data, "operator-token", "create", "console")).stdout.strip()
            api = ApiServer(data, "--max-failures", "1000")
            await asyncio.to_thread(api.start)  # in a thread: the simulator shares this loop
            try:
                v4 = yaml.safe_dump(gateway_config(site, broker_port, modbus_port, 5), sort_keys=False)
                response = await asyncio.to_thread(
                    httpx.put,
                    f"{api.url}/v1/tenants/acme/gateways/{GW}/config",
                    json={"yaml": v4, "push": True, "wait": 15},
                    headers={"Authorization": f"Bearer {token}"},
                    verify=api.context(),
                    timeout=30,
                )
            finally:
                await asyncio.to_thread(api.stop)
            assert response.status_code == 200, response.text
            assert response.json()["version"] == 4
            assert response.json()["answer"] == {"ok": True, "state": "applied", "version": 4, "hash": fleet_hash(v4)}
            await asyncio.to_thread(eventually, lambda: status_rows(data)[1][0]["state"] == "in sync", 15, "in sync")

            # A local edit on the gateway wins over the pushed configuration, and shows as drift.
            assert await asyncio.to_thread(agent.stop) == 0
            agent.write_config(gateway_config(site, broker_port, modbus_port, 3))
            agent.start()
            await asyncio.to_thread(
                eventually, lambda: status_rows(data)[1][0]["source"] == "local", 20, "the local override"
            )
            code, rows = await asyncio.to_thread(status_rows, data)
            assert code == 3 and rows[0]["state"] == "drift" and rows[0]["running_version"] is None
            assert rows[0]["running_hash"] == pkilib_hash(agent.config_path)


def pkilib_hash(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@pytest.mark.fault
def test_config_set_refuses_what_is_not_an_agent_config(tmp_path: Path) -> None:
    data = tmp_path / "data"
    provisioning(data, "init", "--proxy-bind", "127.0.0.1", "--proxy-port", str(free_port()))
    provisioning(data, "tenant", "create", "acme", "--domain", "test", "--broker-port", str(free_port()))
    bad = tmp_path / "bad.yaml"
    for text, error in [
        ("devices: [oops", f"{bad}: line 1 column 15: invalid YAML: expected ',' or ']', but got '<stream end>'"),
        ("- just a list\n", f"{bad}: an agent config is a mapping of keys (docs/config.md)"),
        ("gateway: gw-01\n", f"{bad}: devices: none configured, so the agent would poll nothing"),
    ]:
        bad.write_text(text)
        result: subprocess.CompletedProcess[str] = provisioning(
            data, "config", "set", "acme", GW, str(bad), check=False
        )
        assert result.returncode != 0 and result.stderr == f"Error: {error}\n"
    bad.write_text("devices: [{name: x}]\n")
    result = provisioning(data, "config", "set", "acme", "gw/01", str(bad), check=False)
    assert result.returncode != 0 and "gateway name" in result.stderr and "Traceback" not in result.stderr
    assert provisioning(data, "config", "show", "acme", GW, check=False).stderr == (
        f"Error: no configuration stored for gateway '{GW}' of tenant 'acme'\n"
    )


def test_the_api_stores_shows_and_compares_configurations_for_operators_only(tmp_path: Path) -> None:
    import httpx

    from tests.provisioning_fixtures import ApiServer

    data = tmp_path / "data"
    broker_port = free_port()
    provisioning(data, "init", "--proxy-bind", "127.0.0.1", "--proxy-port", str(free_port()))
    provisioning(data, "tenant", "create", "acme", "--domain", "test", "--broker-port", str(broker_port))
    everyone = provisioning(data, "operator-token", "create", "console").stdout.strip()
    other = provisioning(data, "operator-token", "create", "globex-ci", "--tenant", "acme").stdout.strip()
    with ApiServer(data, "--max-failures", "1000") as api, RenderedMosquitto(data, "acme"):

        def call(method: str, path: str, token: str | None = everyone, **kwargs: Any) -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return httpx.request(
                method, f"{api.url}{path}", headers=headers, verify=api.context(), timeout=15.0, **kwargs
            )

        path = f"/v1/tenants/acme/gateways/{GW}/config"
        text = "devices:\n  - {name: d, protocol: modbus-tcp, host: 10.0.0.5, tags: [{name: r, address: 0}]}\n"
        assert call("PUT", path, None, json={"yaml": text}).json() == {
            "detail": "an operator token is required: Authorization: Bearer feo_…"
        }
        assert call("PUT", path, None, json={"yaml": text}).status_code == 401
        assert call("GET", "/v1/tenants/acme/configs", "feo_0123456789_" + "a" * 43).status_code == 401
        stored = call("PUT", path, json={"yaml": text, "note": "first"})
        assert stored.status_code == 200, stored.text
        assert stored.json()["version"] == 1 and stored.json()["hash"] == fleet_hash(text)
        assert call("GET", path, other).json()["yaml"] == text  # a token for this tenant
        assert call("GET", path + "?version=2").status_code == 404
        bad = call("PUT", path, json={"yaml": "devices: [oops"})
        assert bad.status_code == 422
        assert (
            bad.json()["detail"] == "yaml: line 1 column 15: invalid YAML: expected ',' or ']', but got '<stream end>'"
        )
        rows = call("GET", "/v1/tenants/acme/configs")
        assert rows.status_code == 200, rows.text
        assert [(r["gateway"], r["state"], r["desired_version"]) for r in rows.json()] == [(GW, "no status", 1)]
        assert call("GET", "/v1/tenants/nope/configs").status_code == 404
        token_id = other.split("_")[1]
        provisioning(data, "operator-token", "revoke", token_id)
        refused = call("GET", path, other)
        assert refused.status_code == 403 and refused.json()["detail"].startswith(
            f"operator token {token_id} was revoked"
        )


def fleet_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]
