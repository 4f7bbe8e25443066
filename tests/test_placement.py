"""Placement on one machine: hosts and storage servers, least-load choice, rendered files, refused moves.

Real moves across hosts (network namespaces, running brokers and proxies)
are in test_placement_hosts.py.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from provisioning import registry as registry_module
from provisioning.cli import main
from provisioning.layout import DataDir
from provisioning.registry import Registry
from tests.bridge_fixtures import pg_dsn, pg_schemas, unique_tenant
from tests.provisioning_fixtures import registry_dump

__all__ = ["pg_dsn", "pg_schemas"]  # fixtures used here

DSN = "postgresql://bridge@db1.example.com:5432/factory"


def run(capsys: pytest.CaptureFixture[str], data: Path, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--data-dir", str(data)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    root = tmp_path / "data"
    assert run(capsys, root, "init")[0] == 0
    return root


def index(data: Path) -> dict[str, dict[str, object]]:
    doc = json.loads((data / "tenants.json").read_text())
    return {entry["name"]: entry for entry in doc["tenants"]}


def test_a_new_deployment_has_the_local_host_and_no_storage_server(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, data, "host", "list")
    assert code == 0
    assert out.splitlines() == [
        "HOST   ADDRESS    TENANTS  CAPACITY  CONFIGS",
        f"local  127.0.0.1  0        100       {data}/tenants",
    ]
    assert run(capsys, data, "storage", "list") == (
        0,
        "no storage servers: every tenant uses the bridge's own storage (add one: provisioning storage add)\n",
        "",
    )


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["host", "add", "B1", "--address", "10.0.0.1"], "host name 'B1' is not a DNS label"),
        (["host", "add", "b1", "--address", "0.0.0.0"], "--address 0.0.0.0: brokers need the host's own address"),
        (["host", "add", "b1", "--address", "fd00::1"], "--address fd00::1: give an IPv6 host by its DNS name"),
        (["host", "add", "b1", "--address", "a b"], "--address 'a b' is not an IPv4 address or a lowercase DNS name"),
        (["host", "add", "b1", "--address", "10.0.0.1", "--capacity", "-1"], "--capacity -1 is not in 0..1000000"),
        (["host", "add", "local", "--address", "10.0.0.1"], "host local already exists (address 127.0.0.1)"),
        (["host", "add", "b1", "--address", "127.0.0.1"], "address 127.0.0.1 is already host local's"),
        (["host", "set", "b9", "--capacity", "1"], "no broker host 'b9' (hosts: local; add one with"),
        (["storage", "add", "pg1", "--dsn", "postgresql://u:secret@db/x"], "--dsn carries a password"),
        (["storage", "add", "pg1", "--dsn", "postgresql://u@db"], "--dsn 'postgresql://u@db' names no database"),
        (["storage", "add", "pg1", "--dsn", "host=db dbname"], "--dsn 'host=db dbname' is not a PostgreSQL connection"),
        (["storage", "add", "pg_1", "--dsn", DSN], "storage name 'pg_1' is not a DNS label"),
        (["tenant", "create", "acme", "--domain", "test", "--host", "b9"], "no broker host 'b9'"),
        (["tenant", "create", "acme", "--domain", "test", "--storage", "pg9"], "no storage server 'pg9'"),
    ],
)
def test_bad_places_are_refused_in_one_line_and_change_nothing(
    data: Path, capsys: pytest.CaptureFixture[str], args: list[str], error: str
) -> None:
    before = registry_dump(data)
    code, out, err = run(capsys, data, *args)
    assert (code, out) == (1, "")
    assert err.startswith(f"Error: {error}") and err.count("\n") == 1, err
    assert registry_dump(data) == before
    assert not (data / "tenants" / "acme").exists()


def test_least_load_weighs_tenants_by_capacity_and_says_why(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, data, "host", "add", "b1", "--address", "10.0.0.11", "--capacity", "1")[0] == 0
    assert run(capsys, data, "host", "add", "b2", "--address", "10.0.0.12", "--capacity", "3")[0] == 0
    assert run(capsys, data, "host", "set", "local", "--capacity", "0")[0] == 0
    assert run(capsys, data, "storage", "add", "pg1", "--dsn", DSN, "--no-check")[0] == 0
    placed = []
    for i in range(4):
        code, out, err = run(capsys, data, "tenant", "create", f"t{i}", "--domain", "test")
        assert code == 0, err
        placed.append([line for line in out.splitlines() if line.startswith(("  host", "  storage"))])
    assert placed[0] == [
        "  host         b1: least loaded host (tenants/capacity: b1 0/1, b2 0/3)",
        "  storage      pg1: least loaded storage server (tenants/capacity: pg1 0/100)",
    ]
    assert placed[1][0] == "  host         b2: least loaded host (tenants/capacity: b2 0/3, b1 1/1)"
    assert placed[2][0] == "  host         b2: least loaded host (tenants/capacity: b2 1/3, b1 1/1)"
    assert placed[3][0] == "  host         b2: least loaded host (tenants/capacity: b2 2/3, b1 1/1)"
    # Named: on a host with capacity 0 too.
    code, out, _ = run(capsys, data, "tenant", "create", "own", "--domain", "test", "--host", "local")
    assert "  host         local: host local as requested (127.0.0.1)" in out.splitlines()
    code, out, _ = run(capsys, data, "host", "list")
    assert out.splitlines()[1:] == [
        f"b1     10.0.0.11  1        1         {data}/hosts/b1",
        f"b2     10.0.0.12  3        3         {data}/hosts/b2",
        f"local  127.0.0.1  1        0         {data}/tenants",
    ]
    listed = json.loads(run(capsys, data, "storage", "list", "--json")[1])
    assert listed == [{"name": "pg1", "dsn": DSN, "capacity": 100, "tenants": 5}]


def test_a_tenant_on_a_host_is_rendered_there_and_dialled_through_the_proxy(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, data, "host", "add", "b1", "--address", "10.0.0.11")[0] == 0
    assert run(capsys, data, "storage", "add", "pg1", "--dsn", DSN, "--no-check")[0] == 0
    assert run(capsys, data, "tenant", "create", "acme", "--domain", "test", "--host", "b1")[0] == 0
    code, _, err = run(capsys, data, "tenant", "create", "old", "--domain", "test", "--host", "local")
    assert code == 0, err

    files = DataDir(data).tenant("acme", "b1")
    assert files.conf == data / "hosts" / "b1" / "acme" / "mosquitto.conf"
    conf = files.conf.read_text()
    assert "listener 18831 10.0.0.11\n" in conf
    assert f"persistence_location {data}/hosts/b1/acme/data\n" in conf
    assert f"cafile {data}/tenants/acme/ca.pem\n" in conf
    assert not (data / "tenants" / "acme" / "mosquitto.conf").exists()
    assert (data / "hosts" / "b1" / "acme" / "data").is_dir()
    cfg = (data / "haproxy" / "haproxy.cfg").read_text()
    assert "    server acme 10.0.0.11:18831\n" in cfg
    assert "    server old 127.0.0.1:18832\n" in cfg
    assert f'stats socket "{data}/haproxy/admin${{FE_PROXY_NAME-}}.sock"' in cfg

    entries = index(data)
    assert {k: entries["acme"][k] for k in ("url", "connect_host", "storage")} == {
        "url": "mqtts://mqtt.acme.test:8883",
        "connect_host": "127.0.0.1",
        "storage": {"backend": "postgres", "dsn": DSN},
    }
    # A tenant on host local is dialled straight, as before placement existed.
    assert (entries["old"]["url"], entries["old"]["connect_host"]) == ("mqtts://mqtt.old.test:18832", "127.0.0.1")
    # With --proxy-connect, every tenant goes through the proxy.
    assert run(capsys, data, "init", "--proxy-connect", "10.0.0.5")[0] == 0
    entries = index(data)
    assert [(e["url"], e["connect_host"]) for e in entries.values()] == [
        ("mqtts://mqtt.acme.test:8883", "10.0.0.5"),
        ("mqtts://mqtt.old.test:8883", "10.0.0.5"),
    ]
    listed = json.loads(run(capsys, data, "tenant", "list", "--json")[1])
    assert [(t["name"], t["host"], t["broker_address"], t["storage"]) for t in listed] == [
        ("acme", "b1", "10.0.0.11", "pg1"),
        ("old", "local", "127.0.0.1", "pg1"),
    ]


def test_a_storage_move_writes_the_new_and_the_previous_server(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, data, "storage", "add", "pg1", "--dsn", DSN, "--no-check")[0] == 0
    assert (
        run(capsys, data, "storage", "add", "pg2", "--dsn", "postgresql://bridge@db2:5432/factory", "--no-check")[0]
        == 0
    )
    assert run(capsys, data, "tenant", "create", "acme", "--domain", "test", "--storage", "pg1")[0] == 0
    assert "storage_previous" not in index(data)["acme"]
    code, out, err = run(capsys, data, "tenant", "move", "acme", "--storage", "pg2")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "tenant acme: storage pg1 -> pg2"
    entry = index(data)["acme"]
    assert entry["storage"] == {"backend": "postgres", "dsn": "postgresql://bridge@db2:5432/factory"}
    assert entry["storage_previous"] == {"backend": "postgres", "dsn": DSN}
    assert run(capsys, data, "tenant", "move", "acme", "--storage", "pg2") == (
        1,
        "",
        "Error: tenant acme is already on storage server pg2\n",
    )


def test_a_tenant_on_the_bridges_own_storage_is_not_moved_by_placement(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, data, "tenant", "create", "acme", "--domain", "test")[0] == 0
    assert run(capsys, data, "storage", "add", "pg1", "--dsn", DSN, "--no-check")[0] == 0
    code, out, err = run(capsys, data, "tenant", "move", "acme", "--storage", "pg1")
    assert (code, out) == (1, "")
    assert err.startswith("Error: tenant acme is on the bridge's own storage")


def test_a_broker_move_refuses_when_the_old_broker_is_not_visible_and_changes_nothing(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, data, "host", "add", "b1", "--address", "127.0.0.2")[0] == 0
    assert run(capsys, data, "tenant", "create", "acme", "--domain", "test", "--host", "local")[0] == 0
    before = registry_dump(data)
    cfg = (data / "haproxy" / "haproxy.cfg").read_text()
    code, out, err = run(capsys, data, "tenant", "move", "acme", "--host", "b1")
    assert (code, out) == (
        1,
        "1/5 rendered " + f"{data}/hosts/b1/acme/mosquitto.conf (listener 127.0.0.2:18831), loads\n",
    )
    assert err.startswith("Error: the broker of tenant acme on host local is not running where provisioning can see")
    assert "--broker-stopped" in err
    assert registry_dump(data) == before
    assert (data / "haproxy" / "haproxy.cfg").read_text() == cfg
    assert (data / "tenants" / "acme" / "mosquitto.conf").exists()
    assert run(capsys, data, "tenant", "move", "acme", "--host", "local")[2] == (
        "Error: tenant acme is already on host local (127.0.0.1)\n"
    )


def test_a_broker_move_whose_new_broker_never_answers_is_undone(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, data, "host", "add", "b1", "--address", "127.0.0.2")[0] == 0
    assert run(capsys, data, "tenant", "create", "acme", "--domain", "test", "--host", "local")[0] == 0
    persisted = data / "tenants" / "acme" / "data" / "mosquitto.db"
    persisted.write_bytes(b"sessions")  # as a stopped broker leaves it
    before = registry_dump(data)
    code, out, err = run(capsys, data, "tenant", "move", "acme", "--host", "b1", "--broker-stopped", "--wait", "0.5")
    assert code == 1
    assert "3/5 carried 8 bytes of sessions and queued messages" in out
    assert err.startswith("Error: the new broker did not answer at 127.0.0.2:18831 within 0.5s")
    assert err.rstrip().endswith("the move was undone: start the old broker again")
    assert registry_dump(data) == before
    assert (data / "tenants" / "acme" / "mosquitto.conf").exists()
    assert not (data / "tenants" / "acme" / "mosquitto.conf.moved").exists()
    assert (data / "hosts" / "b1" / "acme" / "mosquitto.conf.failed").exists()
    assert persisted.read_bytes() == b"sessions"
    assert index(data)["acme"]["connect_host"] == "127.0.0.1"


def test_a_registry_from_before_placement_keeps_its_tenants_on_the_local_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "registry.db"
    monkeypatch.setattr(registry_module, "MIGRATIONS", registry_module.MIGRATIONS[:4])
    with Registry(path) as old:
        old.db.execute(
            "INSERT INTO tenants (name, domain, broker_port, public_port, created_at) "
            "VALUES ('acme', 'test', 18831, 8883, '2026-01-01T00:00:00Z')"
        )
    monkeypatch.undo()
    with Registry(path) as registry:
        tenant = registry.tenant("acme")
        assert tenant is not None
        assert (tenant.broker_host, tenant.broker_address, tenant.storage) == ("local", "127.0.0.1", None)
        assert [(h.name, h.address) for h in registry.hosts()] == [("local", "127.0.0.1")]
        assert registry.migrations()[-1] == "0006_placement"
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT broker_host FROM tenants").fetchall() == [("local",)]
    conn.close()


def test_a_move_not_yet_copied_cannot_be_moved_on_to_a_third_server(
    data: Path, capsys: pytest.CaptureFixture[str], pg_dsn: str, pg_schemas: list[str]
) -> None:
    """pg1 -> pg2, then pg2 -> pg3 before any bridge copied the first: the bridges would have copied from pg2,
    which the data never reached, and the tenant would have started afresh on pg3 with its history left on
    pg1, without an error. Provisioning asks pg2 whether the first move landed there."""
    import psycopg
    from psycopg import sql

    tenant = unique_tenant("chain")
    pg_schemas.append(tenant)
    assert run(capsys, data, "storage", "add", "pg1", "--dsn", DSN, "--no-check")[0] == 0
    assert run(capsys, data, "storage", "add", "pg2", "--dsn", pg_dsn)[0] == 0
    assert (
        run(capsys, data, "storage", "add", "pg3", "--dsn", "postgresql://bridge@db3:5432/factory", "--no-check")[0]
        == 0
    )
    assert run(capsys, data, "tenant", "create", tenant, "--domain", "test", "--storage", "pg1")[0] == 0
    assert run(capsys, data, "tenant", "move", tenant, "--storage", "pg2")[0] == 0
    before = index(data)[tenant]
    code, out, err = run(capsys, data, "tenant", "move", tenant, "--storage", "pg3")
    assert (code, out) == (1, "")
    assert err == (
        f"Error: tenant {tenant}: its move from storage server pg1 to pg2 is not copied yet; wait until the "
        "bridges log 'tenant storage moved; ingest resumed', or move it back with --storage pg1\n"
    )
    assert index(data)[tenant] == before
    # Once a bridge has copied it (its mark on pg2), the tenant moves on, from pg2.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(tenant)))
        conn.execute(
            sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, direction text NOT NULL)").format(
                sql.Identifier(tenant, "bridge_move")
            )
        )
        conn.execute(sql.SQL("INSERT INTO {} (direction) VALUES ('in')").format(sql.Identifier(tenant, "bridge_move")))
    assert run(capsys, data, "tenant", "move", tenant, "--storage", "pg3")[0] == 0
    assert index(data)[tenant]["storage_previous"] == {"backend": "postgres", "dsn": pg_dsn}


def test_a_dsn_refused_is_quoted_without_its_password(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for dsn in ("host=127.0.0.1 password=S3cret dbname=test sslmode", "postgresql://u:S3cret@h/db?sslmode=x&y"):
        code, _, err = run(capsys, data, "storage", "add", "s9", "--dsn", dsn)
        assert code == 1 and err.startswith("Error: --dsn ") and "not a PostgreSQL connection string" in err
        assert "S3cret" not in err and "***" in err


def test_a_storage_server_is_reached_when_added_and_one_database_is_not_registered_twice(
    data: Path, capsys: pytest.CaptureFixture[str], pg_dsn: str
) -> None:
    """A typo in a DSN used to be found only when a tenant moved there (paused until a bridge reached it), and
    one database registered under two names hung a storage move between them."""
    from psycopg import conninfo

    from tests.helpers import free_port

    port = free_port()
    nowhere = f"postgresql://postgres@127.0.0.1:{port}/test"
    code, out, err = run(capsys, data, "storage", "add", "pg9", "--dsn", nowhere)
    assert (code, out, err) == (
        1,
        "",
        f"Error: storage server pg9: cannot connect with --dsn '{nowhere}': connection failed: connection to server "
        f'at "127.0.0.1", port {port} failed: Connection refused (the bridges must reach it; --no-check registers '
        "it all the same)\n",
    )
    assert run(capsys, data, "storage", "list")[1].count("pg9") == 0
    assert run(capsys, data, "storage", "add", "pg9", "--dsn", nowhere, "--no-check")[0] == 0

    assert run(capsys, data, "storage", "add", "pg1", "--dsn", pg_dsn)[0] == 0
    # The same database, spelt as key=value pairs: the same PostgreSQL system identifier and database name.
    alias = " ".join(f"{key}={value}" for key, value in conninfo.conninfo_to_dict(pg_dsn).items())
    assert alias != pg_dsn
    code, out, err = run(capsys, data, "storage", "add", "pg2", "--dsn", alias)
    assert (code, err) == (
        1,
        f"Error: --dsn {alias!r} is the database of storage server pg1 (the same PostgreSQL system and database)\n",
    )
    # Another database of that server is another storage server.
    other = conninfo.make_conninfo(pg_dsn, dbname="postgres")
    assert run(capsys, data, "storage", "add", "pg2", "--dsn", other)[0] == 0
