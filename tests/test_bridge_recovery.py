"""Crashes and scale-out: ``kill -9`` mid-stream, two processes on a shared subscription, restarts.

Every point reaches the tenant's store exactly once: the bridge acknowledges
a message only after its rows are committed, the broker redelivers what was
not acknowledged, and ``(gw, seq)`` is claimed once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.bridge_fixtures import (
    BridgeProcess,
    Gateway,
    StoreView,
    Watcher,
    batch,
    now_ms,
    pg_dsn,
    pg_schemas,
    tenant_entry,
    unique_tenant,
    wait_until,
    write_config,
)
from tests.infra import Mosquitto, TenantPki

__all__ = ["pg_dsn", "pg_schemas"]

GW = "gw-01"


def exactly_once(view: StoreView, tenant: str, *, batches: int, points: int) -> None:
    assert view.rows(tenant, "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM {batches}") == [
        (batches, batches, 1, batches)
    ]
    assert view.count(tenant, "points") == points
    distinct = view.rows(tenant, "SELECT count(*) FROM (SELECT DISTINCT gw, device, tag, ts, seq FROM {points}) d")
    assert distinct == [(points,)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_kill_9_during_a_stream_of_100000_points_then_restart_stores_each_point_once(
    store: str, tmp_path: Path, make_broker: Callable[..., Mosquitto], request: pytest.FixtureRequest
) -> None:
    tenant = unique_tenant("acme")
    if store == "postgres":
        view = StoreView("postgres", tmp_path, request.getfixturevalue("pg_dsn"))
        request.getfixturevalue("pg_schemas").append(tenant)
    else:
        view = StoreView("sqlite", tmp_path / "data")
    pki = TenantPki(tmp_path / "pki", tenant)
    broker = make_broker(pki)
    # A small commit window: many commits in flight when the process dies.
    config = write_config(
        tmp_path / "bridge.yaml", tenants=[tenant_entry(pki, broker)], storage=view.storage, ingest={"max_messages": 20}
    )
    batches, per_batch = 400, 250
    bridge = BridgeProcess(config).start()
    bridge.wait_connected()
    sent = []
    with Gateway(pki, broker, GW) as gw:
        stream = threading.Thread(
            target=lambda: sent.append(gw.batches("press-1", range(1, batches + 1), per_batch, pace_s=0.006)),
            name="stream",
        )
        stream.start()
        at_kill = wait_until(
            lambda: (n := view.count(tenant, "points")) >= 20_000 and n, timeout_s=30, what="20,000 points stored"
        )
        bridge.kill()
        assert stream.is_alive(), "the stream ended before the kill; make it slower"
        stream.join(60)
    assert sent == [batches * per_batch]
    assert at_kill < batches * per_batch
    bridge = BridgeProcess(config, log=tmp_path / "bridge-restarted.log").start()
    try:
        wait_until(lambda: view.count(tenant, "points") >= batches * per_batch, timeout_s=60, what="every point")
        time.sleep(0.5)  # anything still arriving would be a duplicate
        exactly_once(view, tenant, batches=batches, points=batches * per_batch)
    finally:
        bridge.stop()
    stopped = next(e for e in bridge.logs() if e.get("msg") == "ingest stopped")
    # The restarted bridge took the rest: all but what committed between the count and the kill (a window
    # or two of max_messages 20 at most).
    assert stopped["batches"] + stopped["duplicates"] >= batches - at_kill // per_batch - 2 * 20


@pytest.mark.timeout(120)
def test_two_bridges_on_a_shared_subscription_store_every_point_once_and_alert_once(
    tmp_path: Path, make_broker: Callable[..., Mosquitto], pg_dsn: str, pg_schemas: list[str]
) -> None:
    tenant = unique_tenant("acme")
    pg_schemas.append(tenant)
    view = StoreView("postgres", tmp_path, pg_dsn)
    pki = TenantPki(tmp_path / "pki", tenant)
    broker = make_broker(pki)
    config = write_config(
        tmp_path / "bridge.yaml",
        tenants=[tenant_entry(pki, broker, shared_group="bridge")],
        storage=view.storage,
        alerts={"rules": [{"name": "hot", "device": "press-*", "tag": "t1", "above": 150_000.0}]},
    )
    one, two = BridgeProcess(config, instance="one").start(), BridgeProcess(config, instance="two").start()
    try:
        one.wait_connected()
        two.wait_connected()
        wait_until(
            lambda: sum(1 for b in (one, two) for e in b.logs() if e.get("msg") == "connected to tenant broker") == 3,
            what="both shared sessions and the alert session",
        )
        with Gateway(pki, broker, GW) as gw:
            gw.batches("press-1", range(1, 201), 250)
        wait_until(lambda: view.count(tenant, "points") >= 50_000, timeout_s=60, what="50,000 points")
        time.sleep(0.5)
        exactly_once(view, tenant, batches=200, points=50_000)
        wait_until(lambda: view.count(tenant, "alerts") >= 1, what="the alert")
        leader, standby = (one, two) if is_leader(one) else (two, one)
        assert not is_leader(standby)
        # The alert evaluator dies: the other process takes the lock and carries on from the stored state.
        leader.kill()
        with Gateway(pki, broker, GW) as gw:
            gw.publish(f"gw/{GW}/data/press-1", batch(GW, "press-1", 201, [("t1", now_ms(), 1.0)]))
        wait_until(lambda: view.count(tenant, "alerts") == 2, timeout_s=30, what="resolved by the standby")
        assert is_leader(standby)
    finally:
        one.stop()
        two.stop()
    stopped = [e for e in standby.logs() if e.get("msg") == "ingest stopped" and e.get("store_data")]
    assert 0 < stopped[0]["batches"] < 201  # the broker spread the load over both
    assert stopped[0]["duplicates"] == 0
    assert view.rows(tenant, "SELECT rule, state FROM {alerts} ORDER BY id") == [("hot", "firing"), ("hot", "resolved")]


def is_leader(bridge: BridgeProcess) -> bool:
    return any(e.get("msg") == "this process evaluates the tenant's alerts" for e in bridge.logs())


def test_a_restarted_bridge_neither_refires_nor_forgets_an_alert(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    view = StoreView("sqlite", tmp_path / "data")
    config = write_config(
        tmp_path / "bridge.yaml",
        tenants=[tenant_entry(pki_acme, broker_acme)],
        storage=view.storage,
        alerts={"rules": [{"name": "hot", "tag": "temp", "above": 80, "for": "1500ms", "clear_below": 70}]},
    )
    with Gateway(pki_acme, broker_acme, GW) as gw:
        with BridgeProcess(config) as bridge:
            bridge.wait_connected()
            # ``for:`` counts from the reading's own timestamp: take it now, not before the bridge started.
            t0 = now_ms()
            gw.publish(f"gw/{GW}/data/cnc-1", batch(GW, "cnc-1", 1, [("temp", t0, 90.0)]))
            wait_until(lambda: view.count("acme", "alerts") == 1, what="pending")
        # Stopped while pending: the restarted bridge promotes it once for: has passed.
        with BridgeProcess(config, log=tmp_path / "second.log") as bridge:
            bridge.wait_connected()
            wait_until(lambda: view.count("acme", "alerts") == 2, what="firing after the restart")
            gw.publish(f"gw/{GW}/data/cnc-1", batch(GW, "cnc-1", 2, [("temp", t0 + 2000, 95.0)]))
            gw.publish(f"gw/{GW}/data/cnc-1", batch(GW, "cnc-1", 2, [("temp", t0 + 2000, 95.0)]))
            time.sleep(0.5)
        with (
            BridgeProcess(config, log=tmp_path / "third.log") as bridge,
            Watcher(pki_acme, broker_acme, ["alerts/#"]) as watcher,
        ):
            bridge.wait_connected()
            gw.publish(f"gw/{GW}/data/cnc-1", batch(GW, "cnc-1", 3, [("temp", t0 + 3000, 65.0)]))
            wait_until(lambda: view.count("acme", "alerts") == 3, what="resolved")
            wait_until(lambda: any(d["state"] == "resolved" for d in watcher.docs()), what="resolved published")
    assert view.rows("acme", "SELECT state, previous FROM {alerts} ORDER BY id") == [
        ("pending", "ok"),
        ("firing", "pending"),
        ("resolved", "firing"),
    ]
    assert view.rows("acme", "SELECT state FROM {alert_state}") == [("resolved",)]
    published = watcher.docs("alerts/gw-01/cnc-1/hot")
    assert published[0]["state"] == "firing"  # retained, republished by the restarted bridge on connect
    assert (published[-1]["state"], published[-1]["previous"], published[-1]["since"]) == (
        "resolved",
        "firing",
        t0 + 3000,
    )
