"""The ``bridge`` command as an operator uses it: exit codes, one-line errors, docs that match the code."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
import yaml

from bridge.alerts.model import OutboxItem
from bridge.alerts.rules import WebhookConfig
from bridge.alerts.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookSender, verify
from bridge.cli import build_parser, main
from bridge.config import load_config
from factory_edge.tasks import cancel_and_wait
from tests.bridge_fixtures import WebhookServer
from tests.helpers import documented_models, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "bridge.md"
EXAMPLES = sorted((ROOT / "config").glob("bridge-*.yaml"))


def write(tmp_path: Path, doc: dict[str, Any] | str) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


TENANT = {"name": "acme", "url": "mqtts://mqtt.acme.example.com:8883", "ca_file": "ca.pem"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_the_example_configs_are_valid(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(example)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("OK: ")


def test_check_config_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        {
            "storage": {"path": "data"},
            "tenants": [{**TENANT, "shared_group": "bridge"}],
            "mappings": [{"topic": "plant/{line}/temp", "table": "temps", "fields": {"value": "$.v"}}],
            "alerts": {
                "rules": [{"name": "hot", "tag": "temp", "above": 85, "for": "30s"}, {"name": "silent", "stale": "1m"}]
            },
        },
    )
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"OK: 1 tenants, storage sqlite ({tmp_path}/data/<tenant>.db), 1 mappings, commit window 1000 messages, "
        "receive maximum 2000",
        "  acme  mqtts://mqtt.acme.example.com:8883  shared group bridge",
        "    subscribes $share/bridge/gw/+/data/+ $share/bridge/gw/+/status $share/bridge/gw/+/meta/+ "
        "$share/bridge/gw/+/events "
        "$share/bridge/spBv1.0/# spBv1.0/+/NBIRTH/+ spBv1.0/+/DBIRTH/+/+ $share/bridge/plant/+/temp",
        "    alert hot: */*/temp above 85 for 30s [warning]",
        "    alert silent: */*/* no data for 1m [warning]",
        "  mapping plant/{line}/temp -> table temps (line, value, ts, received_at)",
    ]
    assert load_config(path).tenants[0].ca_file == str(tmp_path / "ca.pem")  # relative to the config file


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        (
            {"tenants": [TENANT], "storage": {"backend": "postgres"}},
            "bridge.yaml: storage: dsn: required when backend is postgres (postgresql://user@host/db)",
        ),
        (
            {"tenants": [{**TENANT, "urll": "x"}]},
            "bridge.yaml: tenants[acme].urll: unknown key (check its spelling and indentation)",
        ),
        (
            {"tenants": [{**TENANT, "url": "http://x"}]},
            "bridge.yaml: tenants[acme].url: String should match pattern '^mqtts?://'",
        ),
        (
            {"tenants": [{**TENANT, "url": "mqtts://:8883"}]},
            "bridge.yaml: tenants[acme].url: expected mqtts://host:port",
        ),
        (
            {"tenants": [{**TENANT, "url": "mqtts://h:99999"}]},
            "bridge.yaml: tenants[acme].url: not a broker URL: Port out of range",
        ),
        ({"tenants": [TENANT, TENANT]}, "bridge.yaml: tenants: tenant 'acme' is listed twice"),
        (
            {"tenants": [TENANT], "ingest": {"max_messages": 0}},
            "bridge.yaml: ingest.max_messages: must be greater than or equal to 1",
        ),
        (
            {"tenants": [TENANT], "alerts": {"rules": [{"name": "hot", "tag": "t", "above": 1, "for": "soon"}]}},
            "bridge.yaml: alerts.rules[hot].for: expected a duration like 500ms, 1s or 5m, got 'soon'",
        ),
        ({}, "bridge.yaml: (top level): tenants: list at least one tenant broker"),
        ("tenants: [", "bridge.yaml: line 1 column 11: invalid YAML: expected the node content"),
    ],
)
def test_config_errors_are_one_line_naming_file_path_and_problem(
    doc: Any, error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, doc)
    assert main(["check-config", "bridge.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"Error: {error}"), err
    assert len(err.splitlines()) == 1


def test_run_reports_what_it_cannot_open_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, {"tenants": [TENANT], "storage": {"path": str(tmp_path / "data")}})
    assert main(["run", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"Error: tenants[acme].ca_file: {tmp_path}/ca.pem: no such file\n"
    (tmp_path / "ca.pem").write_text("not a certificate")
    assert main(["run", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"Error: tenants[acme].ca_file: {tmp_path}/ca.pem: not a PEM certificate "
        "(expected -----BEGIN CERTIFICATE-----)\n"
    )
    tenant = {k: v for k, v in TENANT.items() if k != "ca_file"}  # system CAs
    (tmp_path / "not-a-dir").write_text("")
    path = write(tmp_path, {"tenants": [tenant], "storage": {"path": str(tmp_path / "not-a-dir")}})
    assert main(["run", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"Error: tenant acme: {tmp_path}/not-a-dir: not a directory (storage.path)"]
    path = write(
        tmp_path,
        {"tenants": [tenant], "storage": {"backend": "postgres", "dsn": "postgresql://postgres:pw@127.0.0.1:1/test"}},
    )
    assert main(["run", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: tenant acme: postgresql://127.0.0.1:1/test: cannot connect: ")
    assert "pw" not in err and len(err.splitlines()) == 1


def test_tenants_from_reads_the_provisioning_services_tenant_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "provisioning"
    data.mkdir()
    path = write(
        tmp_path,
        {
            "tenants_from": "provisioning",
            "storage": {"path": "data"},
            "tenants": [{**TENANT, "name": "globex", "shared_group": "bridge"}],
        },
    )
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"Error: tenants_from: {data}/tenants.json: no such file (is {data} the "
        "provisioning data directory, with a tenant created?)\n"
    )
    entry = {
        "name": "acme",
        "url": "mqtts://mqtt.acme.example.com:18830",
        "connect_host": "127.0.0.1",
        "ca_file": f"{data}/tenants/acme/ca.pem",
        "cert_file": f"{data}/tenants/acme/bridge.pem",
        "key_file": f"{data}/tenants/acme/bridge.key",
    }
    (data / "tenants.json").write_text(json.dumps({"tenants": [entry, {**entry, "name": "globex"}]}))
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("OK: 2 tenants")
    assert "  globex  mqtts://mqtt.acme.example.com:8883  shared group bridge" in out  # listed in the config: wins
    assert "  acme  mqtts://mqtt.acme.example.com:18830 via 127.0.0.1" in out
    (data / "tenants.json").write_text(json.dumps({"tenants": [{**entry, "cert_file": None}]}))
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == f"Error: {data}/tenants.json: tenants[0]: cert_file and key_file go together\n"
    (data / "tenants.json").write_text(json.dumps({"tenants": [{**entry, "url": "mqtts://"}]}))
    assert main(["check-config", str(path)]) == 2
    assert (
        capsys.readouterr().err
        == f"Error: {data}/tenants.json: tenants[0].url: expected mqtts://host:port (got 'mqtts://')\n"
    )


def test_tenants_from_in_postgresql_join_the_shared_group_and_sqlite_ones_are_not_split_across_hosts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "provisioning"
    data.mkdir()
    entry = {"name": "acme", "url": "mqtts://mqtt.acme.example.com:18830", "connect_host": "127.0.0.1"}
    placed = {**entry, "name": "globex", "storage": {"backend": "postgres", "dsn": "postgresql://db2.example.com/edge"}}
    (data / "tenants.json").write_text(json.dumps({"tenants": [entry, placed]}))
    path = write(tmp_path, {"tenants_from": "provisioning", "storage": {"path": "data"}})
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "  acme  mqtts://mqtt.acme.example.com:18830 via 127.0.0.1" in out  # SQLite: this host's file alone
    assert "  globex  mqtts://mqtt.acme.example.com:18830 via 127.0.0.1  shared group bridge" in out
    assert "    storage postgresql://db2.example.com:5432/edge" in out  # where globex is placed
    # Asking for a group across hosts with SQLite would leave part of acme's data in each host's file: refused.
    path = write(tmp_path, {"tenants_from": "provisioning", "storage": {"path": "data"}, "shared_group": "fleet"})
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == (
        "Error: tenants_from: tenant acme: shared_group 'fleet' with sqlite storage would split the tenant's "
        "data between the files of the bridge hosts: store it in PostgreSQL (storage: backend postgres), "
        "or set shared_group: null\n"
    )
    path = write(tmp_path, {"tenants_from": "provisioning", "storage": {"path": "data"}, "shared_group": None})
    assert main(["check-config", str(path)]) == 0
    assert "shared group" not in capsys.readouterr().out


def test_query_without_data_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, {"tenants": [TENANT, {**TENANT, "name": "globex"}], "storage": {"path": "data"}})
    assert main(["query", "values", "--config", str(path), "--tenant", "acme"]) == 1
    assert capsys.readouterr().err == f"Error: tenant acme: no data yet ({tmp_path}/data/acme.db does not exist)\n"
    assert main(["query", "values", "--config", str(path)]) == 2
    assert capsys.readouterr().err == "Error: --tenant: choose one of acme, globex\n"
    assert main(["query", "values", "--config", str(path), "--tenant", "nope"]) == 2
    assert capsys.readouterr().err == "Error: no tenant named 'nope' (tenants: acme, globex)\n"


async def test_webhooks_retry_with_backoff_and_give_up_on_refusal() -> None:
    done: list[int] = []
    with WebhookServer(first=[500, 503]) as server:
        config = WebhookConfig(url=server.url, secret="k", max_backoff=0.1, max_attempts=5)
        async with httpx.AsyncClient() as client:
            sender = WebhookSender(tenant="acme", name="ops", config=config, client=client, on_done=done.append)
            task = asyncio.create_task(sender.run())
            sender.submit(OutboxItem(7, "ops", b'{"state":"firing"}', 0))
            await wait_for(lambda: done == [7], what="delivery after two failures")
            assert len(server.requests) == 3 and sender.delivered == 1
            headers, body = server.requests[-1]
            assert verify("k", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
            assert headers["X-Factory-Edge-Delivery"] == "7"
            server.status = 410
            sender.submit(OutboxItem(8, "ops", b"{}", 0))
            await wait_for(lambda: done == [7, 8], what="given up")
            assert len(server.requests) == 4 and sender.failed == 1  # a 4xx is not retried
            await cancel_and_wait(task)


# ---------------------------------------------------------------- docs match the code


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_bridge_command_has_help_and_a_docs_section() -> None:
    text = DOCS.read_text()
    for name, sub in subcommands(build_parser()).items():
        assert sub.description, f"bridge {name} has no --help description"
        assert f"\n## bridge {name}\n" in text, f"docs/bridge.md has no section for bridge {name}"
        for action in sub._actions:
            assert action.help, f"bridge {name}: option {action.dest} has no help text"


@pytest.mark.parametrize(
    ("models", "keys"),
    documented_models(DOCS),
    ids=lambda v: getattr(v[0], "__name__", "") if isinstance(v, list) else None,
)
def test_bridge_doc_and_config_models_agree(models: list[type[pydantic.BaseModel]], keys: set[str]) -> None:
    fields = set()
    for model in models:
        fields |= {f.alias or name for name, f in model.model_fields.items()}
    assert keys - fields == set(), f"documented but not in {models}: {keys - fields}"
    assert fields - keys == set(), f"in {models} but not documented: {fields - keys}"


def test_every_config_model_is_documented() -> None:
    documented = {m for models, _ in documented_models(DOCS) for m in models}
    from bridge import config, mapping
    from bridge.alerts import rules

    for model in (
        config.BridgeConfig,
        config.StorageConfig,
        config.TenantConfig,
        config.IngestConfig,
        config.AlertsConfig,
        rules.AlertRule,
        rules.WebhookConfig,
        mapping.MappingRule,
        mapping.FieldSpec,
    ):
        assert model in documented, f"{model.__name__} has no table in docs/bridge.md"
