"""A tenant's storage moves to another PostgreSQL server while gateways stream: nothing lost, nothing doubled.

Two real servers: the machine's (``FACTORY_EDGE_PG_DSN``) and one this
module starts (``tests/pgserver.py``). Two ``bridge run`` instances share the
tenant (shared subscription); ``tenants.json`` is rewritten as ``provisioning
tenant move NAME --storage S2`` does (``storage`` and ``storage_previous``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bridge.alerts.model import State
from bridge.cli import main as bridge_main
from bridge.config import StorageConfig, load_config
from bridge.storage.move import move_tenant
from bridge.storage.postgres import PostgresStore, describe_dsn
from factory_edge.errors import StorageError
from provisioning.cli import main as provisioning_main
from tests.bridge_fixtures import (
    BridgeProcess,
    Gateway,
    MappingBroker,
    StoreView,
    batch,
    now_ms,
    pg_dsn,
    pg_rows,
    pg_schemas,
    tenant_entry,
    unique_tenant,
    wait_until,
    write_config,
)
from tests.console_fixtures import FleetWriter
from tests.infra import TenantPki
from tests.pgserver import PgServer, pg_bin

__all__ = ["pg_dsn", "pg_schemas"]

GW = "gw-01"


@pytest.fixture(scope="module")
def second_server() -> Iterator[PgServer]:
    if pg_bin() is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    with PgServer() as server:
        yield server


def provision(data: Path, entries: list[dict[str, Any]]) -> None:
    tmp = data / ".tenants.json.tmp"
    tmp.write_text(json.dumps({"tenants": entries}, indent=2) + "\n")
    tmp.replace(data / "tenants.json")


def logged(bridge: BridgeProcess, msg: str) -> list[dict[str, Any]]:
    return [e for e in bridge.logs() if e.get("msg") == msg]


def own_session(bridge: BridgeProcess) -> bool:
    """The instance's own (shared) ingest session is connected."""
    return any(e.get("client_id") == f"bridge.{bridge.instance}" for e in logged(bridge, "connected to tenant broker"))


def following_config(path: Path, provisioning_data: Path, tmp_path: Path) -> Path:
    """A bridge following ``provisioning_data``'s tenants.json, with a mapping and an alert rule (their tables and
    state move with the tenant)."""
    return write_config(
        path,
        tenants=[],
        storage={"backend": "sqlite", "path": str(tmp_path / "unused")},
        tenants_from=str(provisioning_data),
        mappings=[
            {
                "topic": "plant/{line}/counter",
                "table": "counters",
                "fields": {"count": "$.count"},
                "key": ["line", "count"],
            }
        ],
        alerts={"rules": [{"name": "hot", "device": "press-*", "tag": "t1", "above": 1e12}]},
    )


@pytest.mark.timeout(240)
def test_a_tenant_moved_to_another_server_during_a_stream_loses_and_doubles_nothing(
    tmp_path: Path, pg_dsn: str, pg_schemas: list[str], second_server: PgServer
) -> None:
    tenant = unique_tenant("acme")
    pg_schemas.append(tenant)
    s1, s2 = StoreView("postgres", tmp_path, pg_dsn), StoreView("postgres", tmp_path, second_server.dsn)
    pki = TenantPki(tmp_path / "pki", tenant)
    broker = MappingBroker(tmp_path / "broker", pki).start()
    data = tmp_path / "provisioning"
    data.mkdir()
    entry = tenant_entry(pki, broker, storage=s1.storage)
    provision(data, [entry])
    config = following_config(tmp_path / "bridge.yaml", data, tmp_path)
    # A third instance reads its own copy of tenants.json, which reaches it late (a host synced by hand).
    late_data = tmp_path / "provisioning-late"
    late_data.mkdir()
    provision(late_data, [entry])
    late_config = following_config(tmp_path / "bridge-late.yaml", late_data, tmp_path)
    one = BridgeProcess(config, instance="one").start()
    two = BridgeProcess(config, instance="two").start()
    late = BridgeProcess(late_config, instance="t0").start()
    batches, per_batch = 300, 50
    fresh: BridgeProcess | None = None
    try:
        wait_until(
            lambda: (
                all(own_session(b) for b in (one, two, late))
                and any(logged(b, "this process evaluates the tenant's alerts") for b in (one, two, late))
            ),
            what="three shared sessions and the alert role",
        )
        with Gateway(pki, broker, GW) as gw, Gateway(pki, broker, "plc-7") as plc:
            # Before the move: an alert fired (alerts, alert_state), a mapped row, a status.
            gw.publish(f"gw/{GW}/status", json.dumps({"state": "online", "ts": now_ms()}), retain=True)
            gw.publish(f"gw/{GW}/data/press-1", batch(GW, "press-1", 1, [("t1", now_ms(), 2e12)]))
            plc.publish("plant/line-1/counter", json.dumps({"count": 1}))
            wait_until(lambda: s1.count(tenant, "alerts") == 1 and s1.count(tenant, "counters") == 1, what="alert")
            sent: list[int] = []
            stream = threading.Thread(
                target=lambda: sent.append(gw.batches("press-1", range(2, batches + 2), per_batch, pace_s=0.02)),
                name="stream",
            )
            stream.start()
            wait_until(lambda: s1.count(tenant, "points") >= 3000, what="part of the stream stored on S1")
            moved_entry = {**entry, "storage": s2.storage, "storage_previous": s1.storage}
            provision(data, [moved_entry])
            one.wait_log("tenant storage moved; ingest resumed")
            time.sleep(2.0)  # the late instance still commits to S1 meanwhile: the fence refuses it, nothing acked
            provision(late_data, [moved_entry])
            stream.join(60)
            assert not stream.is_alive() and sent == [batches * per_batch]
            plc.publish("plant/line-1/counter", json.dumps({"count": 2}))
            gw.publish(f"gw/{GW}/data/press-1", batch(GW, "press-1", batches + 2, [("t1", now_ms(), 1.0)]))
        total_points = batches * per_batch + 2
        wait_until(lambda: s2.count(tenant, "points") >= total_points, timeout_s=90, what="every point on S2")
        wait_until(lambda: s2.count(tenant, "alerts") == 2, what="the alert resolved on S2, after the move")
        # An instance started now, with storage_previous still in tenants.json, sees the move done on S2.
        fresh = BridgeProcess(config, instance="t1").start()
        wait_until(partial(own_session, fresh), what="a new instance on S2")
        assert not logged(fresh, "copying the tenant's data to its new storage server")
        time.sleep(1.0)  # anything still arriving would be a duplicate
    finally:
        one.stop()
        two.stop()
        late.stop()
        if fresh is not None:
            fresh.stop()
        broker.stop()
    # Exactly once on the new server: every batch and point, the claims that make it so, the older rows too.
    assert s2.rows(tenant, "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM {batches}") == [
        (batches + 2, batches + 2, 1, batches + 2)
    ]
    assert s2.count(tenant, "points") == total_points
    assert s2.rows(tenant, "SELECT count(*) FROM (SELECT DISTINCT gw, device, tag, ts, seq FROM {points}) d") == [
        (total_points,)
    ]
    assert s2.rows(tenant, "SELECT rule, state FROM {alerts} ORDER BY id") == [("hot", "firing"), ("hot", "resolved")]
    assert s2.rows(tenant, "SELECT count(*) FROM {alert_state}") == [(1,)]
    assert s2.rows(tenant, "SELECT count FROM {counters} ORDER BY count") == [(1,), (2,)]
    assert s2.count(tenant, "status") >= 1
    # The old server keeps a read-only copy of what it had: fenced against any late writer.
    stored_on_s1 = s1.count(tenant, "points")
    assert 3000 <= stored_on_s1 < total_points
    with psycopg.connect(pg_dsn, autocommit=True) as conn, pytest.raises(psycopg.Error, match="moved to"):
        conn.execute(f'DELETE FROM "{tenant}".batches')  # the claims: a table in every layout
    # One instance copied, both resumed on S2, and each says how long its ingest was paused.
    refused = [e for e in logged(late, "cannot commit to tenant storage; nothing is acknowledged until it works")]
    assert refused and "moved to" in refused[0]["err"]
    moved = [e for b in (one, two, late) for e in logged(b, "tenant storage moved; ingest resumed")]
    assert len(moved) == 3 and sorted(e["copied_here"] for e in moved) == [False, False, True]
    copier = next(e for e in moved if e["copied_here"])
    assert copier["rows"] >= stored_on_s1 and copier["target"] == f"postgresql://127.0.0.1:{second_server.port}/test"
    assert all(0 < e["paused_s"] < 60 for e in moved)
    print("move:", {k: copier[k] for k in ("rows", "tables", "copy_s", "paused_s")})


def _store_points(dsn: str, tenant: str, seqs: range) -> None:
    from bridge.messages import DataBatch
    from bridge.storage.postgres import PostgresStore

    store = PostgresStore(dsn, tenant)
    store.open()
    try:
        at = now_ms()
        with store.transaction() as tx:
            batches = [DataBatch(GW, "press", s, [(GW, "press", "t", at + s, 1.0, "good", None, s)], at) for s in seqs]
            tx.insert_points(tx.claim_batches(batches))
    finally:
        store.close()


def _points(dsn: str, tenant: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{tenant}".points').fetchone()
        return int(row[0]) if row else 0


def test_a_move_undone_before_any_bridge_copied_it_keeps_the_data_where_it_is(
    pg_dsn: str, pg_schemas: list[str], second_server: PgServer
) -> None:
    """``tenant move --storage S2`` then back to S1 before a bridge saw the first (bridges stopped, or both within
    the 2 s poll): the entry says S1, previously S2, and S2 never held the tenant. The bridge must not empty S1 to
    copy S2's nothing into it: S1 is where the data is, and ingest resumes there. A move whose two ends both hold
    data of their own (which one is the tenant's?) is refused, nothing touched."""
    from bridge.config import StorageConfig
    from bridge.storage.move import move_tenant

    tenant = unique_tenant("undo")
    pg_schemas.append(tenant)
    s1 = StorageConfig(backend="postgres", dsn=pg_dsn)
    s2 = StorageConfig(backend="postgres", dsn=second_server.dsn)
    _store_points(pg_dsn, tenant, range(1, 11))
    report = move_tenant(tenant, s2, s1)
    assert not report.copied
    assert _points(pg_dsn, tenant) == 10
    _store_points(pg_dsn, tenant, range(11, 12))  # S1 takes writes: not fenced

    _store_points(second_server.dsn, tenant, range(100, 103))  # S2 now holds data of its own too
    with pytest.raises(StorageError, match="hold data"):
        move_tenant(tenant, s2, s1)
    assert (_points(pg_dsn, tenant), _points(second_server.dsn, tenant)) == (11, 3)
    _store_points(second_server.dsn, tenant, range(103, 104))  # and neither was fenced
    _store_points(pg_dsn, tenant, range(12, 13))


def counts(dsn: str, tenant: str) -> dict[str, int]:
    view = StoreView("postgres", Path("."), dsn)
    return {t: view.count(tenant, t) for t in ("batches", "points", "alerts", "alert_state", "latest", "status")}


def test_moving_there_back_and_there_again_copies_exactly_and_fences_the_server_left(
    pg_dsn: str, pg_schemas: list[str], second_server: PgServer
) -> None:
    tenant = unique_tenant("shuttle")
    pg_schemas.append(tenant)
    s1 = StorageConfig(backend="postgres", dsn=pg_dsn)
    s2 = StorageConfig(backend="postgres", dsn=second_server.dsn)
    writer = FleetWriter(Path("."), tenant, store=PostgresStore(pg_dsn, tenant))
    for i in range(10):
        writer.points(GW, "press-1", [(f"t{j}", 1_700_000_000_000 + i * 100 + j, float(i)) for j in range(5)])
    writer.status(GW, "online")
    writer.alert(GW, "press-1", "hot", State.FIRING, 91.0)
    writer.close()
    # A table partitioned by day, as a store may keep its readings: partitions S2 lacks are made there.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{tenant}".daily (ts bigint NOT NULL, v integer) PARTITION BY RANGE (ts)')
        for day in (0, 1):
            start, end = 1_700_000_000_000 + day * 86_400_000, 1_700_000_000_000 + (day + 1) * 86_400_000
            conn.execute(
                f'CREATE TABLE "{tenant}".daily_{day} PARTITION OF "{tenant}".daily FOR VALUES FROM ({start}) TO ({end})'
            )
            conn.execute(f'INSERT INTO "{tenant}".daily VALUES ({start + 1}, {day})')
    before = counts(pg_dsn, tenant)
    assert before == {"batches": 10, "points": 50, "alerts": 1, "alert_state": 1, "latest": 5, "status": 1}

    report = move_tenant(tenant, s1, s2)
    # Tables as the store lays them out (``points`` may be a view over others): every row of every one.
    assert report.copied and report.rows["batches"] == 10 and report.total_rows >= 10 + 50
    assert counts(second_server.dsn, tenant) == before
    assert report.rows["daily"] == 2
    assert pg_rows(second_server.dsn, f'SELECT tableoid::regclass::text, v FROM "{tenant}".daily ORDER BY v') == [
        (f'"{tenant}".daily_0', 0),
        (f'"{tenant}".daily_1', 1),
    ]
    with psycopg.connect(pg_dsn, autocommit=True) as conn, pytest.raises(psycopg.Error, match="moved to"):
        conn.execute(f'INSERT INTO "{tenant}".daily_0 VALUES (1700000000002, 9)')  # a partition, written directly
    assert not move_tenant(tenant, s1, s2).copied  # done already: nothing copied twice
    # The server left is fenced: a late writer is refused, with the new server named.
    late = FleetWriter(Path("."), tenant, store=PostgresStore(pg_dsn, tenant))
    with pytest.raises(StorageError, match=f"moved to postgresql://127.0.0.1:{second_server.port}/test"):
        late.points(GW, "press-1", [("t0", 1_800_000_000_000, 1.0)])
    late.close()

    # New data on S2 (ids continue after the copied ones), then back to S1, which still has its old copy.
    there = FleetWriter(Path("."), tenant, store=PostgresStore(second_server.dsn, tenant))
    there.seq[GW] = 10
    there.points(GW, "press-1", [("t0", 1_800_000_000_000, 2.0)])
    there.alert(GW, "press-1", "hot", State.RESOLVED, 80.0)
    there.close()
    assert StoreView("postgres", Path("."), second_server.dsn).rows(tenant, "SELECT id FROM {alerts} ORDER BY id") == [
        (1,),
        (2,),
    ]
    assert move_tenant(tenant, s2, s1).copied
    expected = {**before, "batches": 11, "points": 51, "alerts": 2}
    assert counts(pg_dsn, tenant) == expected  # S1's stale copy replaced, not added to
    back = FleetWriter(Path("."), tenant, store=PostgresStore(pg_dsn, tenant))  # S1 takes writes again
    back.seq[GW] = 11
    back.points(GW, "press-1", [("t0", 1_800_000_001_000, 3.0)])
    back.close()
    # And there again: S2's newest record is its move out, so this is a new copy, not "done".
    report = move_tenant(tenant, s1, s2)
    assert report.copied and counts(second_server.dsn, tenant) == {**expected, "batches": 12, "points": 52}


def test_a_move_needs_postgresql_on_both_sides(tmp_path: Path, pg_dsn: str) -> None:
    sqlite = StorageConfig(backend="sqlite", path=str(tmp_path))
    with pytest.raises(StorageError) as caught:
        move_tenant("acme", sqlite, StorageConfig(backend="postgres", dsn=pg_dsn))
    assert str(caught.value) == (
        "tenant acme: a storage move needs PostgreSQL on both servers (from sqlite to postgres); "
        "SQLite files are moved by copying them while the bridge is stopped"
    )


def test_the_entry_provisioning_tenant_move_writes_is_the_move_the_bridge_makes(
    tmp_path: Path, pg_dsn: str, pg_schemas: list[str], second_server: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = unique_tenant("prov").replace("-", "")
    pg_schemas.append(tenant)
    data = tmp_path / "data"

    def provisioning(*args: str) -> None:
        assert provisioning_main([*args, "--data-dir", str(data)]) == 0, capsys.readouterr().err

    provisioning("init")
    provisioning("storage", "add", "pg1", "--dsn", pg_dsn)
    provisioning("storage", "add", "pg2", "--dsn", second_server.dsn)
    provisioning("tenant", "create", tenant, "--domain", "test", "--storage", "pg1")
    config = write_config(
        tmp_path / "bridge.yaml", tenants=[], storage={"path": str(tmp_path / "own")}, tenants_from=str(data)
    )
    (placed,) = load_config(config).tenants
    assert placed.storage == StorageConfig(backend="postgres", dsn=pg_dsn) and placed.shared_group == "bridge"
    writer = FleetWriter(Path("."), tenant, store=PostgresStore(pg_dsn, tenant))
    writer.points(GW, "press-1", [("t0", 1_700_000_000_000, 1.0)])
    writer.close()

    provisioning("tenant", "move", tenant, "--storage", "pg2")
    capsys.readouterr()
    assert bridge_main(["check-config", str(config)]) == 0
    assert f"    storage {describe_dsn(second_server.dsn)} (moving from {describe_dsn(pg_dsn)})" in (
        capsys.readouterr().out.splitlines()
    )
    (moved,) = load_config(config).tenants
    assert moved.storage_previous == placed.storage
    assert moved.storage is not None and moved.storage_previous is not None
    report = move_tenant(tenant, moved.storage_previous, moved.storage)
    assert report.copied and StoreView("postgres", Path("."), second_server.dsn).count(tenant, "points") == 1
