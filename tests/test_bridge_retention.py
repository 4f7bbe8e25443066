"""Retention: readings older than a tenant's ``retention_days`` are removed by the bridge's upkeep job, SQLite in
bounded transactions that let ingest commit in between, PostgreSQL by dropping whole day partitions."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.config import BridgeConfig, validate_config
from bridge.messages import DataBatch
from bridge.storage.base import Store
from bridge.storage.postgres import DAY_MS, PostgresStore
from bridge.storage.sqlite import EXPIRE_ROWS, SqliteStore
from tests.bridge_fixtures import (
    BridgeProcess,
    Gateway,
    StoreView,
    backend,
    batch,
    now_ms,
    pg_dsn,
    pg_rows,
    pg_schemas,
    sqlite_rows,
    tenant_entry,
    unique_tenant,
    wait_until,
    write_config,
)
from tests.infra import Mosquitto, TenantPki

__all__ = ["backend", "pg_dsn", "pg_schemas"]  # fixtures used here

GW = "gw-01"


def readings(device: str, seq: int, values: list[tuple[str, int, Any]]) -> DataBatch:
    return DataBatch(GW, device, seq, [(GW, device, tag, ts, v, "good", None, seq) for tag, ts, v in values], 0)


def store_batches(store: Store, *batches: DataBatch) -> None:
    with store.transaction() as tx:
        tx.insert_points(tx.claim_batches(batches))


def test_sqlite_removes_old_readings_in_bounded_transactions_while_ingest_commits(tmp_path: Path) -> None:
    now = now_ms()
    old = now - 40 * DAY_MS
    store = SqliteStore(tmp_path, "acme")
    store.open()
    seq = 0
    for device in ("press-1", "press-2", "press-3"):  # 45,000 old readings, 15,000 per series
        for first in range(0, 15_000, 5_000):
            seq += 1
            store_batches(store, readings(device, seq, [("temp", old + first + i, float(i)) for i in range(5_000)]))
    seq += 1
    store_batches(store, readings("press-1", seq, [("temp", now, 1.0), ("other", now - DAY_MS, 2.0)]))

    commits: list[float] = []
    assert store._db is not None

    def traced(statement: str) -> None:
        if statement == "COMMIT":
            commits.append(time.monotonic())

    store._db.set_trace_callback(traced)
    writer = SqliteStore(tmp_path, "acme")
    writer.open()
    ingested: list[float] = []
    stop, errors = threading.Event(), []

    def ingest() -> None:
        n = 1_000_000
        try:
            while not stop.is_set():
                n += 1
                store_batches(writer, readings("press-9", n, [(f"t{i}", now, float(i)) for i in range(100)]))
                ingested.append(time.monotonic())
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=ingest)
    thread.start()
    try:
        removed = store.expire(now - 30 * DAY_MS)
    finally:
        stop.set()
        thread.join(30)
        writer.close()
        store.close()
    assert errors == []
    assert removed == 45_000
    assert len(commits) >= 45_000 // EXPIRE_ROWS  # never more than EXPIRE_ROWS readings in one transaction
    # Ingest committed between the retention's transactions, not only before or after them.
    assert any(commits[0] < t < commits[-1] for t in ingested)
    kept = sqlite_rows(tmp_path / "acme.db", "SELECT device, tag, ts FROM points WHERE device != 'press-9' ORDER BY ts")
    assert kept == [("press-1", "other", now - DAY_MS), ("press-1", "temp", now)]
    assert sqlite_rows(tmp_path / "acme.db", "SELECT count(*) FROM points WHERE device = 'press-9'") == [
        (100 * len(ingested),)
    ]


def test_sqlite_keeps_numbering_readings_after_everything_expired(tmp_path: Path) -> None:
    """The console's rollup reads new readings by rowid: an emptied table must not number them from 1 again."""
    store = SqliteStore(tmp_path, "acme")
    store.open()
    try:
        old = now_ms() - 40 * DAY_MS
        store_batches(store, readings("press-1", 1, [("temp", old + i, float(i)) for i in range(100)]))
        removed = store.expire(now_ms())
        store_batches(store, readings("press-1", 2, [("temp", now_ms(), 5.0)]))
    finally:
        store.close()
    assert removed == 99  # all but the row stored last
    assert sqlite_rows(tmp_path / "acme.db", "SELECT rowid, value FROM samples ORDER BY rowid") == [
        (100, 99.0),
        (101, 5.0),
    ]


def upkeep_store(tenant: str, backend: StoreView, request: pytest.FixtureRequest) -> tuple[BridgeConfig, Store]:
    """A bridge config with ``tenant`` alone on ``backend``, and the tenant's store there (not yet open); its
    PostgreSQL schema is dropped after the test."""
    if backend.dsn:
        request.getfixturevalue("pg_schemas").append(tenant)
    config = validate_config({"storage": backend.storage, "tenants": [{"name": tenant, "url": "mqtt://x:1"}]})
    store: Store = PostgresStore(backend.dsn, tenant) if backend.dsn else SqliteStore(backend.directory, tenant)
    return config, store


@pytest.fixture
def tenant_pki(tmp_path: Path, backend: StoreView, request: pytest.FixtureRequest) -> TenantPki:
    name = unique_tenant("keep")
    if backend.backend == "postgres":
        request.getfixturevalue("pg_schemas").append(name)
    return TenantPki(tmp_path / f"pki-{name}", name)


@pytest.fixture
def broker(tmp_path: Path, tenant_pki: TenantPki) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "broker", tenant_pki).start()
    yield broker
    broker.stop()


def day_partitions(dsn: str, tenant: str) -> set[str]:
    return {
        name
        for (name,) in pg_rows(
            dsn,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(%s)",
            (f'"{tenant}".samples',),
        )
    }


def day_name(ms: int) -> str:
    return "samples_" + time.strftime("%Y%m%d", time.gmtime(ms / 1000))


def test_the_bridge_removes_readings_past_the_tenants_retention_at_start(
    tmp_path: Path, tenant_pki: TenantPki, broker: Mosquitto, backend: StoreView
) -> None:
    tenant, now = tenant_pki.tenant, now_ms()
    store: Store = PostgresStore(backend.dsn, tenant) if backend.dsn else SqliteStore(backend.directory, tenant)
    store.open()
    try:
        for seq, age in enumerate((20, 9, 6, 1), start=1):  # days old
            store_batches(store, readings("press-1", seq, [("temp", now - age * DAY_MS, float(age))]))
        store.maintain(now)  # PostgreSQL: the old days get their partitions (they waited in the default)
    finally:
        store.close()
    if backend.dsn:
        assert {day_name(now - age * DAY_MS) for age in (20, 9, 6)} <= day_partitions(backend.dsn, tenant)

    config = write_config(
        tmp_path / "bridge.yaml",
        tenants=[tenant_entry(tenant_pki, broker, limits={"retention_days": 7})],
        storage=backend.storage,
    )
    with BridgeProcess(config) as bridge:
        bridge.wait_connected()
        bridge.wait_log("retention run")
        run = next(e for e in bridge.logs() if e.get("msg") == "retention run")
        with Gateway(tenant_pki, broker, GW) as gw:  # ingest goes on
            gw.publish(f"gw/{GW}/data/press-2", batch(GW, "press-2", 100, [("temp", now, 5.0)]))
            wait_until(lambda: backend.count(tenant, "points", "WHERE device = 'press-2'") == 1, what="new reading")
    assert run["tenant"] == tenant and run["retention_days"] == 7
    assert backend.rows(tenant, "SELECT value FROM {points} WHERE device = 'press-1' ORDER BY ts") == [(6.0,), (1.0,)]
    if backend.dsn:
        assert run["removed"] == 2 and run["unit"] == "day partitions"
        left = day_partitions(backend.dsn, tenant)
        assert not {day_name(now - 20 * DAY_MS), day_name(now - 9 * DAY_MS)} & left
        assert {day_name(now - 6 * DAY_MS), day_name(now), "samples_default"} <= left
    else:
        assert run["removed"] == 2 and run["unit"] == "readings"


def test_a_bridge_wide_retention_applies_to_tenants_whose_plan_sets_none(tmp_path: Path) -> None:
    config = validate_config(
        {
            "storage": {"backend": "sqlite", "path": str(tmp_path), "retention_days": 30},
            "tenants": [
                {"name": "acme", "url": "mqtts://mqtt.acme.example.com:8883"},
                {"name": "beta", "url": "mqtts://mqtt.beta.example.com:8883", "limits": {"retention_days": 90}},
                {
                    "name": "gamma",
                    "url": "mqtts://mqtt.gamma.example.com:8883",
                    "storage": {"backend": "sqlite", "path": str(tmp_path / "g"), "retention_days": 10},
                },
            ],
        }
    )
    assert [config.tenant_retention(t) for t in config.tenants] == [30, 90, 10]


def test_a_plan_retention_changed_while_the_bridge_runs_applies_at_once(
    tmp_path: Path, tenant_pki: TenantPki, broker: Mosquitto, backend: StoreView
) -> None:
    """``provisioning tenant plan --retention-days`` rewrites tenants.json; the running bridge applies the plan in
    place: its upkeep job uses the new retention (run again at once), not the one it started with."""
    tenant, now = tenant_pki.tenant, now_ms()
    store: Store = PostgresStore(backend.dsn, tenant) if backend.dsn else SqliteStore(backend.directory, tenant)
    store.open()
    try:
        for seq, age in enumerate((20, 9, 1), start=1):  # days old
            store_batches(store, readings("press-1", seq, [("temp", now - age * DAY_MS, float(age))]))
    finally:
        store.close()
    data = tmp_path / "provisioning"
    data.mkdir()

    def provision(retention_days: int) -> None:
        entry = tenant_entry(tenant_pki, broker, limits={"retention_days": retention_days})
        staging = data / ".tenants.json.tmp"
        staging.write_text(json.dumps({"tenants": [entry]}))
        staging.replace(data / "tenants.json")

    provision(30)
    config = write_config(tmp_path / "bridge.yaml", tenants=[], storage=backend.storage, tenants_from=str(data))
    with BridgeProcess(config) as bridge:
        bridge.wait_connected()
        bridge.wait_log("retention run")
        assert backend.count(tenant, "points") == 3
        provision(7)
        wait_until(lambda: backend.count(tenant, "points") == 1, what="the readings past 7 days removed", timeout_s=30)
        bridge.wait_log("retention run", count=2)  # logged once the run has also expired dead letters and events
        runs = [e for e in bridge.logs() if e.get("msg") == "retention run"]
        assert [r["retention_days"] for r in runs] == [30, 7]
        assert connections_opened(bridge) == 1  # the plan applied in place: the session was kept
    assert backend.rows(tenant, "SELECT value FROM {points} ORDER BY ts") == [(1.0,)]


def connections_opened(bridge: BridgeProcess) -> int:
    return sum(
        1
        for e in bridge.logs()
        if e.get("msg") == "connected to tenant broker" and e.get("client_id") == f"bridge.{bridge.instance}"
    )


def test_readings_dated_beyond_the_retention_ahead_do_not_dodge_it(
    tmp_path: Path, backend: StoreView, request: pytest.FixtureRequest
) -> None:
    """A gateway sending readings dated 2100 (a clock gone wrong, or a tenant keeping data past its plan's
    retention) would keep them for ever: readings more than the retention ahead of now are removed like those
    more than it behind. Readings a few days ahead, within it, stay."""
    from bridge import retention

    tenant, now = unique_tenant("ahead"), now_ms()
    config, store = upkeep_store(tenant, backend, request)
    store.open()
    try:
        year_2100 = 4_102_444_800_000
        store_batches(
            store,
            readings("press-1", 1, [("temp", now, 1.0), ("temp", now + 3 * DAY_MS, 2.0), ("temp", year_2100, 3.0)]),
            readings("press-2", 2, [("temp", now - 20 * DAY_MS, 4.0), ("temp", year_2100 + 1, 5.0)]),
            readings("press-3", 3, [("temp", now + 1, 6.0)]),  # stored last (SQLite keeps its newest row)
        )
    finally:
        store.close()
    retention.run_once(config.storage, tenant, 7, now)
    assert backend.rows(tenant, "SELECT value FROM {points} ORDER BY ts") == [(1.0,), (6.0,), (2.0,)]


def test_dead_letters_and_events_past_the_retention_are_removed_too(
    tmp_path: Path, backend: StoreView, request: pytest.FixtureRequest
) -> None:
    """What a gateway sends that is not a reading (a malformed batch kept whole as a dead letter, an event with
    a big payload) is kept as long as the readings, by when the bridge received it, and no longer: otherwise a
    tenant could store without end past its plan's retention by sending its data malformed."""
    from bridge import retention
    from bridge.messages import DeadLetter, EventRow

    tenant, now = unique_tenant("junk"), now_ms()
    config, store = upkeep_store(tenant, backend, request)
    store.open()
    try:
        with store.transaction() as tx:
            tx.insert_dead_letters(
                [
                    DeadLetter(f"gw/{GW}/data/x", b"old" * 1000, "not JSON", now - 20 * DAY_MS),
                    DeadLetter(f"gw/{GW}/data/x", b"new", "not JSON", now - DAY_MS),
                ]
            )
            tx.insert_events(
                [
                    EventRow(GW, "log", now, '{"msg": "old"}', "d1", now - 20 * DAY_MS),
                    EventRow(GW, "log", now - 30 * DAY_MS, '{"msg": "new"}', "d2", now - DAY_MS),
                ]
            )
    finally:
        store.close()
    retention.run_once(config.storage, tenant, 7, now)
    assert [bytes(r[0]) for r in backend.rows(tenant, "SELECT payload FROM {dead_letters}")] == [b"new"]
    assert backend.rows(tenant, "SELECT digest FROM {events}") == [("d2",)]


def test_status_history_past_the_retention_is_removed_but_each_gateways_newest_stays(
    tmp_path: Path, backend: StoreView, request: pytest.FixtureRequest
) -> None:
    """A gateway (or a stolen certificate) publishing status after status adds a row each time: past the
    retention they go, but each gateway's newest status, and its newest one naming a version, stay whatever their
    age (what the console shows for a gateway long silent)."""
    from bridge import retention
    from bridge.messages import StatusRow

    tenant, now = unique_tenant("stat"), now_ms()
    config, store = upkeep_store(tenant, backend, request)
    store.open()
    old = now - 20 * DAY_MS
    try:
        with store.transaction() as tx:
            tx.insert_status(
                [StatusRow("gw-a", "online", old + i, None, None, old + i) for i in range(50)]  # the flood
                + [
                    StatusRow("gw-a", "online", old + 100, "1.4.2", "abc", old + 100),  # its newest with a version
                    StatusRow("gw-a", "offline", now - DAY_MS, None, None, now - DAY_MS),
                    StatusRow("gw-b", "online", old, "1.4.0", None, old),  # silent for 20 days: its newest stays
                    StatusRow("gw-b", "online", old - 5, None, None, old - 5),
                ]
            )
    finally:
        store.close()
    retention.run_once(config.storage, tenant, 7, now)
    assert backend.rows(tenant, "SELECT gw, state, version FROM {status} ORDER BY gw, ts") == [
        ("gw-a", "online", "1.4.2"),
        ("gw-a", "offline", None),
        ("gw-b", "online", "1.4.0"),
    ]


async def test_the_retention_task_stops_when_cancelled_as_its_wake_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan change wakes the upkeep job; a bridge stopping in that same moment must still stop it. (Python
    3.11's ``asyncio.wait_for`` returned the wake instead of the cancellation, the job carried on and the
    bridge's stop waited for ever.)"""
    import asyncio

    from bridge import retention

    tenant = unique_tenant("wake")
    config = validate_config({"storage": {"path": str(tmp_path)}, "tenants": [{"name": tenant, "url": "mqtt://x:1"}]})
    done = threading.Event()
    run_once = retention.run_once

    def recorded(*args: Any) -> int | None:
        try:
            return run_once(*args)
        finally:
            done.set()

    monkeypatch.setattr(retention, "run_once", recorded)
    wake = asyncio.Event()
    task = asyncio.create_task(retention.run(config.storage, tenant, lambda: 7, interval_s=3600, wake=wake))
    assert await asyncio.to_thread(done.wait, 10), "the first upkeep run never finished"
    for _ in range(20):  # the task takes the run's result and waits for its wake
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    wake.set()
    task.cancel()
    await asyncio.wait([task], timeout=5)
    stopped = task.done() and task.cancelled()
    if not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=5)
    assert stopped, "the upkeep job carried on after it was cancelled"


def test_a_clock_gone_back_removes_nothing_and_says_why(
    tmp_path: Path, backend: StoreView, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """A bridge host whose clock went back 40 days (an RTC reset, NTP not yet synced) saw every stored reading
    as dated more than the 30-day retention ahead, and removed them all. The store knows the hour it last
    received data in: a clock behind it removes nothing, and the log says why."""
    from bridge import retention
    from bridge.metering import hourly

    tenant, now = unique_tenant("clock"), now_ms()
    config, store = upkeep_store(tenant, backend, request)
    store.open()
    try:
        batches = [
            DataBatch(GW, "press-1", seq, [(GW, "press-1", "temp", now - seq * 3_600_000, 1.0, "good", None, seq)], now)
            for seq in range(1, 48)
        ]
        with store.transaction() as tx:
            tx.insert_points(tx.claim_batches(batches))
            tx.record_usage(hourly(batches))
    finally:
        store.close()
    assert retention.run_once(config.storage, tenant, 30, now - 40 * DAY_MS) is None
    assert backend.rows(tenant, "SELECT count(*) FROM {points}") == [(47,)]
    skipped = [r for r in caplog.records if r.getMessage().startswith("retention skipped")]
    assert skipped and "clock is behind" in skipped[0].getMessage()
    # The clock right again: the readings are within the retention and stay.
    retention.run_once(config.storage, tenant, 30, now)
    assert backend.rows(tenant, "SELECT count(*) FROM {points}") == [(47,)]
