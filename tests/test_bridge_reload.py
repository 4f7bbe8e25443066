"""The bridge follows ``tenants.json`` while it runs: tenants added, removed and changed, in place.

A real ``bridge run`` process with ``tenants_from``, real Mosquitto brokers
per tenant, SQLite and PostgreSQL stores. What the operator sees: the log
lines ``tenant added`` / ``tenant removed`` / ``tenant restarted with its new
entry``, data stored (or no longer stored) per tenant, and the other
tenants' sessions left alone (one connection each, from start to end).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.cli import main as bridge_main
from tests.bridge_fixtures import (
    BridgeProcess,
    Gateway,
    StoreView,
    Watcher,
    batch,
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


def provision(data: Path, entries: list[dict[str, Any]]) -> None:
    """``<data>/tenants.json`` as provisioning writes it: a new file renamed over the old one."""
    tmp = data / ".tenants.json.tmp"
    tmp.write_text(json.dumps({"tenants": entries}, indent=2) + "\n")
    tmp.replace(data / "tenants.json")


def connections(bridge: BridgeProcess, tenant: str) -> int:
    """Ingest sessions opened for ``tenant`` (not the alert/STATE role's)."""
    return sum(
        1
        for e in bridge.logs()
        if e.get("msg") == "connected to tenant broker"
        and e.get("tenant") == tenant
        and e.get("client_id") == f"bridge.{bridge.instance}"
    )


def send(pki: TenantPki, broker: Mosquitto, seq: int, points: int = 5) -> None:
    with Gateway(pki, broker, GW) as gw:
        gw.publish(f"gw/{GW}/data/press-1", batch(GW, "press-1", seq, points))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_tenants_added_removed_and_changed_in_tenants_json_follow_without_a_restart(
    backend: str, tmp_path: Path, make_broker: Callable[..., Mosquitto], request: pytest.FixtureRequest
) -> None:
    names = [unique_tenant(n) for n in ("acme", "globex", "initech")]
    if backend == "postgres":
        view = StoreView("postgres", tmp_path, request.getfixturevalue("pg_dsn"))
        request.getfixturevalue("pg_schemas").extend(names)
    else:
        view = StoreView("sqlite", tmp_path / "store")
    acme, globex, initech = (TenantPki(tmp_path / f"pki-{n}", n) for n in names)
    brokers = {p.tenant: make_broker(p) for p in (acme, globex, initech)}
    entry = {p.tenant: tenant_entry(p, brokers[p.tenant]) for p in (acme, globex, initech)}
    data = tmp_path / "provisioning"
    data.mkdir()
    provision(data, [entry[acme.tenant], entry[globex.tenant]])
    config = write_config(tmp_path / "bridge.yaml", tenants=[], storage=view.storage, tenants_from=str(data))
    with BridgeProcess(config) as bridge:
        wait_until(lambda: connections(bridge, acme.tenant) == connections(bridge, globex.tenant) == 1, what="both")
        # PostgreSQL tenants join the default shared group (another instance, on any host, would take its share);
        # a SQLite tenant is one host's file: not shared.
        subscribed = next(
            e["subscriptions"]
            for e in bridge.logs()
            if e.get("msg") == "connected to tenant broker" and e.get("client_id") == "bridge.test"
        )
        assert subscribed.startswith("$share/bridge/gw/+/data/+ " if backend == "postgres" else "gw/+/data/+ ")
        # Alone or shared, one process is the tenant's Sparkplug host: STATE online, retained.
        with Watcher(acme, brokers[acme.tenant], ["spBv1.0/STATE/#"]) as watcher:
            wait_until(lambda: watcher.docs("spBv1.0/STATE/"), what="the bridge's Sparkplug STATE")
            assert watcher.docs("spBv1.0/STATE/")[-1]["online"] is True
        send(acme, brokers[acme.tenant], 1)

        # Added: started within the watch interval, the others untouched.
        provision(data, [entry[acme.tenant], entry[globex.tenant], entry[initech.tenant]])
        bridge.wait_log("tenant added")
        wait_until(lambda: connections(bridge, initech.tenant) == 1, what="initech connected")
        send(initech, brokers[initech.tenant], 1)
        wait_until(lambda: view.count(initech.tenant, "points") == 5, what="initech's points")

        # Changed: globex's broker moves to another port; only globex restarts, on the new broker.
        moved = make_broker(globex)
        entry[globex.tenant] = tenant_entry(globex, moved)
        provision(data, [entry[acme.tenant], entry[globex.tenant], entry[initech.tenant]])
        bridge.wait_log("tenant restarted with its new entry")
        (restarted,) = [e for e in bridge.logs() if e.get("msg") == "tenant restarted with its new entry"]
        assert (restarted["tenant"], restarted["changed"]) == (globex.tenant, "url")
        wait_until(lambda: connections(bridge, globex.tenant) == 2, what="globex on its new broker")
        send(globex, moved, 1)
        wait_until(lambda: view.count(globex.tenant, "points") == 5, what="globex's points through its new broker")

        # Removed: stopped and its session closed; its data is no longer taken.
        provision(data, [entry[acme.tenant], entry[globex.tenant]])
        bridge.wait_log("tenant removed")
        send(initech, brokers[initech.tenant], 2)
        time.sleep(1.5)
        assert view.count(initech.tenant, "points") == 5

        # A bad file: one line, and the running tenants carry on as they were.
        (data / "tenants.json").write_text('{"tenants": [{"name": "acme"')
        bridge.wait_log("bad provisioned tenants file; keeping the running tenants")
        (bad,) = [
            e for e in bridge.logs() if e.get("msg") == "bad provisioned tenants file; keeping the running tenants"
        ]
        assert bad["err"].startswith(f"tenants_from: {data}/tenants.json: not JSON:") and "\n" not in bad["err"]
        send(acme, brokers[acme.tenant], 2)
        wait_until(lambda: view.count(acme.tenant, "points") == 10, what="acme still ingesting")

        # SIGHUP reads the file at once even when it looks unchanged (same size and time).
        limited = {**entry[acme.tenant], "limits": {"points_per_s": 1000}}
        provision(data, [limited, entry[globex.tenant]])
        bridge.wait_log("tenant rate limit changed")  # a plan change applies in place, without a new session
        stat = (data / "tenants.json").stat()
        tmp = data / ".tenants.json.tmp"  # given the old time before it replaces the file: never seen otherwise
        tmp.write_text(
            json.dumps({"tenants": [{**limited, "limits": {"points_per_s": 2000}}, entry[globex.tenant]]}, indent=2)
            + "\n"
        )
        os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        tmp.replace(data / "tenants.json")
        assert (data / "tenants.json").stat().st_size == stat.st_size
        time.sleep(3)
        assert sum(1 for e in bridge.logs() if e.get("msg") == "tenant rate limit changed") == 1
        assert bridge.proc is not None
        bridge.proc.send_signal(signal.SIGHUP)
        bridge.wait_log("tenant rate limit changed", count=2)
        (*_, last) = [e for e in bridge.logs() if e.get("msg") == "tenant rate limit changed"]
        assert (last["tenant"], last["points_per_s"]) == (acme.tenant, 2000)
        send(acme, brokers[acme.tenant], 3)
        wait_until(lambda: view.count(acme.tenant, "points") == 15, what="acme after its restarts")

        # acme kept its session through its plan changes; globex restarted once, for its new url.
        assert sum(1 for e in bridge.logs() if e.get("msg") == "tenant restarted with its new entry") == 1
        assert connections(bridge, acme.tenant) == 1
        assert connections(bridge, globex.tenant) == 2
        assert bridge.alive
    assert view.rows(acme.tenant, "SELECT count(*), count(DISTINCT seq) FROM {batches}") == [(3, 3)]


def test_a_bridge_started_before_any_tenant_waits_for_the_first(
    tmp_path: Path, make_broker: Callable[..., Mosquitto]
) -> None:
    view = StoreView("sqlite", tmp_path / "store")
    data = tmp_path / "provisioning"
    data.mkdir()
    provision(data, [])
    config = write_config(tmp_path / "bridge.yaml", tenants=[], storage=view.storage, tenants_from=str(data))
    with BridgeProcess(config) as bridge:
        bridge.wait_log("no tenant yet: waiting for the provisioning service to list one")
        pki = TenantPki(tmp_path / "pki", unique_tenant("acme"))
        broker = make_broker(pki)
        provision(data, [tenant_entry(pki, broker)])
        bridge.wait_log("tenant added")
        send(pki, broker, 1)
        wait_until(lambda: view.count(pki.tenant, "points") == 5, what="the first tenant's points")


def test_an_instance_added_takes_a_share_and_one_that_leaves_stops_receiving_it(
    tmp_path: Path, make_broker: Callable[..., Mosquitto], capsys: pytest.CaptureFixture[str]
) -> None:
    view = StoreView("sqlite", tmp_path / "store")  # processes of one host share the file
    pki = TenantPki(tmp_path / "pki", unique_tenant("acme"))
    broker = make_broker(pki)
    config = write_config(
        tmp_path / "bridge.yaml", tenants=[tenant_entry(pki, broker, shared_group="bridge")], storage=view.storage
    )
    with BridgeProcess(config, instance="one") as one:
        wait_until(lambda: connections(one, pki.tenant) == 1, what="instance one")
        two = BridgeProcess(config, instance="two").start()  # added while one runs: nothing restarted
        wait_until(lambda: connections(two, pki.tenant) == 1, what="instance two")
        with Gateway(pki, broker, GW) as gw:
            gw.batches("press-1", range(1, 21), 5)
            wait_until(lambda: view.count(pki.tenant, "batches") == 20, what="20 batches")
            assert two.stop() == 0
            shares = [e["batches"] for b in (two,) for e in b.logs() if e.get("msg") == "ingest stopped"]
            assert 0 < shares[0] < 20  # the broker gave the new instance part of the stream
            # Stopped, two is still a member: its share of what follows waits in its session.
            gw.batches("press-1", range(21, 31), 5)
            time.sleep(1.5)
            assert 20 < view.count(pki.tenant, "batches") < 30
            assert bridge_main(["leave", "--config", str(config), "--instance", "two"]) == 0
            assert capsys.readouterr().out.startswith(f"{pki.tenant}: session of bridge.two ended (")
            # Gone from the group: the instance still running gets everything.
            gw.batches("press-1", range(31, 41), 5)
            wait_until(
                lambda: view.rows(pki.tenant, "SELECT count(*) FROM {batches} WHERE seq > 30") == [(10,)],
                what="every batch after the leave",
            )
        assert connections(one, pki.tenant) == 1
