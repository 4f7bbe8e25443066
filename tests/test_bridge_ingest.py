"""The bridge end to end: a real Mosquitto (TLS, the tenant's PKI, the bridge's certificate), ``bridge run``
as a process, and real storage: SQLite files and the PostgreSQL at ``FACTORY_EDGE_PG_DSN``."""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.cli import main
from bridge.storage.postgres import describe_dsn
from tests.bridge_fixtures import (
    BridgeProcess,
    Gateway,
    MappingBroker,
    StoreView,
    backend,
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

__all__ = ["backend", "pg_dsn", "pg_schemas"]  # fixtures used here

GW = "gw-01"


@pytest.fixture
def tenant_pki(tmp_path: Path, backend: StoreView, request: pytest.FixtureRequest) -> TenantPki:
    """A tenant with a unique name (its PostgreSQL schema is dropped after the test)."""
    name = unique_tenant("acme")
    if backend.backend == "postgres":
        request.getfixturevalue("pg_schemas").append(name)
    return TenantPki(tmp_path / f"pki-{name}", name)


@pytest.fixture
def running(
    tmp_path: Path, tenant_pki: TenantPki, backend: StoreView
) -> Iterator[tuple[Mosquitto, Callable[..., BridgeProcess]]]:
    """A mapping-capable broker for the tenant, and ``start(**config)`` for a bridge on it."""
    broker = MappingBroker(tmp_path / "broker", tenant_pki).start()
    started: list[BridgeProcess] = []

    def start(**config: Any) -> BridgeProcess:
        path = write_config(
            tmp_path / f"bridge{len(started)}.yaml",
            tenants=[tenant_entry(tenant_pki, broker)],
            storage=backend.storage,
            **config,
        )
        bridge = BridgeProcess(path, instance=f"t{len(started)}").start()
        started.append(bridge)
        bridge.wait_connected()
        return bridge

    yield broker, start
    for bridge in started:
        bridge.stop()
    broker.stop()


def test_batches_status_and_events_land_as_rows(running: Any, tenant_pki: TenantPki, backend: StoreView) -> None:
    broker, start = running
    bridge = start()
    tenant = tenant_pki.tenant
    t0 = now_ms()
    with Gateway(tenant_pki, broker, GW) as gw:
        gw.publish(
            f"gw/{GW}/status",
            json.dumps({"state": "online", "ts": t0, "version": "0.1.0", "config_hash": "c0ffee"}),
            retain=True,
        )
        gw.publish(
            f"gw/{GW}/data/press-1",
            batch(
                GW,
                "press-1",
                1,
                [("spindle_temp", t0, 71.25), ("recipe", t0, "PN-7 ✓"), ("door", t0, True), ("count", t0, 2**60)],
            ),
        )
        gw.publish(f"gw/{GW}/data/press-1", batch(GW, "press-1", 2, 500))
        gw.publish(f"gw/{GW}/data/press-1", batch(GW, "press-1", 2, 500))  # a redelivery: stored once
        gw.publish(
            f"gw/{GW}/events", json.dumps({"type": "device_down", "ts": t0, "device": "press-1", "err": "timeout"})
        )
        wait_until(
            lambda: backend.count(tenant, "points") == 504 and backend.count(tenant, "events") == 1,
            what="504 points and 1 event",
        )
    value = "value_text" if backend.backend == "postgres" else "value"
    rows = backend.rows(tenant, "SELECT gw, device, tag, ts, value, quality FROM {points} WHERE seq = 1 ORDER BY tag")
    assert [(r[0], r[1], r[2], r[3], r[5]) for r in rows] == [
        (GW, "press-1", t, t0, "good") for t in ("count", "door", "recipe", "spindle_temp")
    ]
    values = dict((r[2], r[4]) for r in rows)
    assert values["spindle_temp"] == 71.25 and values["door"] == 1
    assert backend.rows(tenant, f"SELECT {value} FROM {{points}} WHERE tag = 'recipe'") == [("PN-7 ✓",)]
    assert backend.rows(tenant, f"SELECT {value} FROM {{points}} WHERE tag = 'count'")[0][0] in (2**60, str(2**60))
    assert backend.rows(tenant, "SELECT gw, seq, points FROM {batches} ORDER BY seq") == [(GW, 1, 4), (GW, 2, 500)]
    assert backend.rows(tenant, "SELECT gw, state, ts, version, config_hash FROM {status}") == [
        (GW, "online", t0, "0.1.0", "c0ffee")
    ]
    assert backend.rows(tenant, "SELECT gw, type, ts FROM {events}") == [(GW, "device_down", t0)]
    assert backend.count(tenant, "dead_letters") == 0
    bridge.stop()
    stopped = [e for e in bridge.logs() if e.get("msg") == "ingest stopped"]
    assert stopped[0]["batches"] == 2 and stopped[0]["duplicates"] == 1 and stopped[0]["points"] == 504


def test_a_mapping_rule_maps_a_third_party_topic_into_its_table(
    running: Any, tenant_pki: TenantPki, backend: StoreView
) -> None:
    broker, start = running
    start(
        mappings=[
            {
                "topic": "plant/{line}/{machine}/temp",
                "table": "temps",
                "key": ["line", "machine", "ts"],
                "fields": {"value": {"path": "$.value", "type": "float"}, "unit": "$.unit", "ts": "$.ts"},
            },
            {
                "topic": "plant/{line}/counter",
                "table": "counters",
                "payload": "text",
                "fields": {"count": {"type": "int"}},
            },
        ]
    )
    tenant = tenant_pki.tenant
    with Gateway(tenant_pki, broker, "plc-7") as plc:
        plc.publish("plant/line-2/m7/temp", json.dumps({"value": "71.5", "unit": "degC", "ts": 1732276800000}))
        plc.publish("plant/line-2/m7/temp", json.dumps({"value": "71.5", "unit": "degC", "ts": 1732276800000}))
        plc.publish("plant/line-2/m8/temp", json.dumps({"value": 68, "unit": "degC", "ts": "2024-11-22T12:00:01Z"}))
        plc.publish("plant/line-2/m9/temp", json.dumps({"unit": "degC"}))
        plc.publish("plant/line-2/counter", "1234")
        wait_until(
            lambda: backend.count(tenant, "counters") == 1 and backend.count(tenant, "dead_letters") == 1,
            what="mapped rows and one dead letter",
        )
    rows = backend.rows(tenant, "SELECT line, machine, value, unit, ts FROM {temps} ORDER BY machine")
    assert rows == [("line-2", "m7", 71.5, "degC", 1732276800000), ("line-2", "m8", 68.0, "degC", 1732276801000)]
    assert backend.rows(tenant, "SELECT count FROM {counters}") == [(1234,)]
    ((topic, reason),) = backend.rows(tenant, "SELECT topic, reason FROM {dead_letters}")
    assert (topic, reason) == ("plant/line-2/m9/temp", "table temps: fields.value: $.value not found in the payload")


# ---------------------------------------------------------------- malformed payloads, fuzzed

NAME = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)


@st.composite
def malformed(draw: st.DrawFn, seq: int) -> tuple[str, bytes, str]:
    """A payload for a built-in topic that is invalid by construction, that topic, and what the bridge must do
    with it: ``dead`` (a dead letter) or ``bad point`` (a batch is stored, its first reading bad because no
    store can hold its value; the batch's other readings as they are)."""
    kind = draw(
        st.sampled_from(
            ["truncated", "wrong_type", "huge", "not_a_number", "unicode", "binary", "not_object", "status", "event"]
        )
    )
    doc: dict[str, Any] = {
        "v": 1,
        "gw": GW,
        "dev": "press-1",
        "seq": seq,
        "points": [
            {"tag": draw(NAME), "ts": now_ms(), "v": draw(st.floats(-1e6, 1e6)), "q": "good"}
            for _ in range(draw(st.integers(1, 3)))
        ],
    }
    topic = f"gw/{GW}/data/press-1"
    point = doc["points"][0]
    if kind == "truncated":
        text = json.dumps(doc)
        return topic, text[: draw(st.integers(1, len(text) - 1))].encode(), "dead"
    if kind == "wrong_type":
        field = draw(st.sampled_from(["v", "gw", "dev", "seq", "points", "tag", "ts", "value", "q"]))
        wrong = {
            "v": st.sampled_from([0, 2, "1", None]),
            "gw": st.sampled_from(["gw-02", 1, None]),
            "dev": st.sampled_from(["press-2", [], None]),
            "seq": st.sampled_from(["1", 1.5, -1, None, [1]]),
            "points": st.sampled_from([{}, "[]", 1]),
            "tag": st.sampled_from([1, "", None, ["t"], "a/b"]),
            "ts": st.sampled_from(["now", 1.5, -1, None]),
            "value": st.sampled_from([[], {"x": 1}]),
            "q": st.sampled_from(["fine", 1, None]),
        }[field]
        target = point if field in ("tag", "ts", "value", "q") else doc
        target["v" if field == "value" else field] = draw(wrong)
        return topic, json.dumps(doc).encode(), "dead"
    if kind == "huge":
        which = draw(st.sampled_from(["v", "ts", "seq", "literal"]))
        if which == "v":  # beyond 64 bits: no store column holds it
            point["v"] = draw(st.integers(2**63, 2**200))
            return topic, json.dumps(doc).encode(), "bad point"
        if which == "literal":  # 1e999: not finite once read
            return topic, json.dumps(doc).replace(json.dumps(point["v"]), "1e999", 1).encode(), "bad point"
        if which == "ts":
            point["ts"] = draw(st.integers(10**16, 10**30))
        else:
            doc["seq"] = draw(st.integers(2**63, 2**100))
        return topic, json.dumps(doc).encode(), "dead"
    if kind == "not_a_number":
        point["v"] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return topic, json.dumps(doc).encode(), "dead"  # Python writes NaN / Infinity, which JSON does not have
    if kind == "unicode":
        which = draw(st.sampled_from(["tag", "surrogate"]))
        if which == "tag":
            point["tag"] = draw(st.text(min_size=1, max_size=8).filter(lambda t: not t.isascii()))
            return topic, json.dumps(doc, ensure_ascii=False).encode(), "dead"
        point["v"] = "\ud800"  # a lone surrogate: no store's text holds it
        return topic, json.dumps(doc).encode(), "bad point"
    if kind == "binary":
        return topic, b"\xff" + draw(st.binary(max_size=50)), "dead"
    if kind == "not_object":
        return topic, json.dumps(draw(st.sampled_from([[], 1, "batch", None, [doc]]))).encode(), "dead"
    if kind == "status":
        return (
            f"gw/{GW}/status",
            json.dumps({"state": draw(st.sampled_from(["up", 1, None])), "ts": 1}).encode(),
            "dead",
        )
    return f"gw/{GW}/events", json.dumps({"type": draw(st.sampled_from(["", 5, None])), "ts": 1}).encode(), "dead"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
def test_fuzzed_malformed_payloads_land_in_dead_letters_and_the_bridge_survives(
    running: Any, tenant_pki: TenantPki, backend: StoreView
) -> None:
    broker, start = running
    bridge = start()
    tenant = tenant_pki.tenant
    dead_sent: list[tuple[str, bytes]] = []
    stored_seqs: list[int] = []
    with Gateway(tenant_pki, broker, GW) as gw:

        @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.data())
        def publish(data: st.DataObject) -> None:
            seq = 10_000 + len(dead_sent) + len(stored_seqs)
            topic, payload, verdict = data.draw(malformed(seq=seq))
            gw.publish(topic, payload, wait=False)
            if verdict == "dead":
                dead_sent.append((topic, payload))
            else:
                stored_seqs.append(seq)

        publish()
        gw.publish(f"gw/{GW}/data/press-1", batch(GW, "press-1", 1, 10))
        wait_until(
            lambda: (
                backend.count(tenant, "dead_letters") >= len(dead_sent)
                and backend.count(tenant, "batches") == len(stored_seqs) + 1
            ),
            what=f"{len(dead_sent)} dead letters, {len(stored_seqs)} batches with a bad reading and the valid batch",
        )
    assert bridge.proc is not None and bridge.proc.poll() is None
    dead = backend.rows(tenant, "SELECT topic, payload, reason FROM {dead_letters} ORDER BY id")
    assert len(dead) == len(dead_sent)
    assert sorted((t, bytes(p)) for t, p, _ in dead) == sorted(dead_sent)
    assert all(reason and "\n" not in reason for _, _, reason in dead)
    assert sorted(seq for (seq,) in backend.rows(tenant, "SELECT seq FROM {batches}")) == sorted([1, *stored_seqs])
    refused = backend.rows(tenant, "SELECT seq, value, quality, error FROM {points} WHERE seq <> 1 AND quality = 'bad'")
    assert sorted(seq for seq, *_ in refused) == sorted(stored_seqs)  # exactly the one unstorable reading of each
    assert all(value is None and error.startswith("refused by the bridge: ") for _, value, _, error in refused)
    assert backend.count(tenant, "points") >= 10 + len(stored_seqs)


# ---------------------------------------------------------------- tenants


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_two_tenants_each_see_only_their_own_rows(
    store: str,
    tmp_path: Path,
    make_broker: Callable[..., Mosquitto],
    make_proxy: Callable[..., Any],
    request: pytest.FixtureRequest,
) -> None:
    names = [unique_tenant("acme"), unique_tenant("globex")]
    if store == "postgres":
        view = StoreView("postgres", tmp_path, request.getfixturevalue("pg_dsn"))
        request.getfixturevalue("pg_schemas").extend(names)
    else:
        view = StoreView("sqlite", tmp_path / "data")
    pkis = [TenantPki(tmp_path / f"pki-{n}", n) for n in names]
    brokers = [make_broker(p) for p in pkis]
    # SQLite: both tenants through one HAProxy port, routed by SNI name as in production; PostgreSQL: direct.
    proxy = make_proxy(*brokers) if store == "sqlite" else None
    tenants = [tenant_entry(p, b) for p, b in zip(pkis, brokers)]
    if proxy is not None:
        tenants = [{**t, "url": f"mqtts://{p.host}:{proxy.port}"} for t, p in zip(tenants, pkis)]
    path = write_config(tmp_path / "bridge.yaml", storage=view.storage, tenants=tenants)
    with BridgeProcess(path) as bridge:
        bridge.wait_connected(2)
        # The same gateway id in both tenants: the tenant is the connection, never the topic or payload.
        for i, (pki, broker) in enumerate(zip(pkis, brokers)):
            with Gateway(pki, broker, GW) as gw:
                gw.publish(f"gw/{GW}/data/press-1", batch(GW, "press-1", 1, [("owner", 1000, f"tenant-{i}")]))
                gw.publish(f"gw/{GW}/data/press-{i}", batch(GW, f"press-{i}", 2, 5))
        wait_until(lambda: all(view.count(n, "points") == 6 for n in names), what="6 points in each tenant")
    value = "value_text" if store == "postgres" else "value"
    for i, name in enumerate(names):
        assert view.rows(name, f"SELECT {value} FROM {{points}} WHERE tag = 'owner'") == [(f"tenant-{i}",)]
        assert {r[0] for r in view.rows(name, "SELECT device FROM {points}")} == {"press-1", f"press-{i}"}
        assert view.count(name, "batches") == 2  # the other tenant's seq 1 is not a duplicate here
    if store == "sqlite":
        assert sorted(p.name for p in (tmp_path / "data").glob("*.db")) == sorted(f"{n}.db" for n in names)


def test_a_gateway_cannot_write_as_another(running: Any, tenant_pki: TenantPki, backend: StoreView) -> None:
    broker, start = running
    start()
    tenant = tenant_pki.tenant
    with Gateway(tenant_pki, broker, "gw-02") as intruder:
        # The broker refuses gw/gw-01/… from gw-02 (ACL); under its own topic a payload naming gw-01 is refused here.
        intruder.publish("gw/gw-01/data/press-1", batch("gw-01", "press-1", 1, 3))
        intruder.publish("gw/gw-02/data/press-1", batch("gw-01", "press-1", 2, 3))
        intruder.publish("gw/gw-02/data/press-1", batch("gw-02", "press-1", 3, 3))
        wait_until(
            lambda: backend.count(tenant, "points") == 3 and backend.count(tenant, "dead_letters") == 1,
            what="gw-02's own batch and one dead letter",
        )
    assert backend.rows(tenant, "SELECT DISTINCT gw FROM {points}") == [("gw-02",)]
    assert backend.rows(tenant, "SELECT reason FROM {dead_letters}") == [
        ("gw: payload says 'gw-01' but the topic's gateway is 'gw-02'",)
    ]


def test_bridge_query_prints_values_alerts_and_dead_letters(
    running: Any, tenant_pki: TenantPki, backend: StoreView, capsys: pytest.CaptureFixture[str]
) -> None:
    broker, start = running
    bridge = start(
        alerts={
            "rules": [
                {
                    "name": "hot",
                    "device": "press-*",
                    "tag": "temp",
                    "above": 80,
                    "severity": "critical",
                    "message": "{device} at {value:.1f} degC",
                }
            ]
        }
    )
    tenant = tenant_pki.tenant
    with Gateway(tenant_pki, broker, GW) as gw:
        gw.publish(
            f"gw/{GW}/data/press-1",
            batch(GW, "press-1", 1, [("temp", 1000, 70.0), ("temp", 2000, 85.5), ("recipe", 2000, "PN-7")]),
        )
        gw.publish(f"gw/{GW}/data/press-1", b"oops")
        wait_until(
            lambda: backend.count(tenant, "alerts") == 1 and backend.count(tenant, "dead_letters") == 1,
            what="the alert and the dead letter",
        )

    def query(*args: str) -> str:
        capsys.readouterr()
        assert main(["query", "--config", str(bridge.config), *args]) == 0
        return capsys.readouterr().out

    docs = json.loads(query("values", "--json"))
    assert [(d["device"], d["tag"], d["ts"], d["quality"]) for d in docs] == [
        ("press-1", "recipe", 2000, "good"),
        ("press-1", "temp", 2000, "good"),
    ]
    assert {d["tag"]: d["value"] for d in docs} == {"recipe": "PN-7", "temp": 85.5}
    table = query("values", "--tag", "temp").splitlines()
    assert table[0].split() == ["GW", "DEVICE", "TAG", "TS", "VALUE", "QUALITY", "ERROR"]
    assert table[1].split() == [GW, "press-1", "temp", "1970-01-01", "00:00:02.000Z", "85.5", "good"]
    alerts = query("alerts")
    assert "hot" in alerts and "firing" in alerts and "press-1 at 85.5 degC" in alerts
    active = json.loads(query("alerts", "--active", "--json"))
    assert [(a["rule"], a["state"]) for a in active] == [("hot", "firing")]
    dead = json.loads(query("dead-letters", "--json"))
    assert [(d["payload"], d["reason"]) for d in dead] == [("oops", "invalid JSON: Expecting value at byte 0")]
    counts = dict((d["table"], d["rows"]) for d in json.loads(query("counts", "--json")))
    assert counts["points"] == 3 and counts["batches"] == 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_message_the_database_refuses_becomes_a_dead_letter_and_its_window_is_stored(
    running: Any, tenant_pki: TenantPki, backend: StoreView
) -> None:
    broker, start = running
    bridge = start(
        mappings=[
            {
                "topic": "plant/{line}/counter",
                "table": "counters",
                "key": ["serial"],
                "fields": {"serial": {"path": "$.serial", "type": "str"}, "count": "$.count"},
            }
        ]
    )
    tenant = tenant_pki.tenant
    huge = secrets.token_hex(5000)  # 10,000 random characters: more than a btree index entry may hold
    with Gateway(tenant_pki, broker, "plc-7") as plc:
        for i, serial in enumerate(["a-1", huge, "a-2"]):
            plc.publish("plant/line-1/counter", json.dumps({"serial": serial, "count": i}), wait=False)
        plc.publish("plant/line-1/counter", json.dumps({"serial": "a-3", "count": 3}))
        wait_until(
            lambda: backend.count(tenant, "counters") == 3 and backend.count(tenant, "dead_letters") == 1,
            what="three rows and one dead letter",
        )
    assert backend.rows(tenant, "SELECT serial FROM {counters} ORDER BY serial") == [("a-1",), ("a-2",), ("a-3",)]
    ((reason,),) = backend.rows(tenant, "SELECT reason FROM {dead_letters}")
    assert reason.startswith(f"refused by the store: {describe_dsn(backend.dsn or '')} schema {tenant}: index row")
    assert bridge.proc is not None and bridge.proc.poll() is None


def test_tenants_from_the_provisioning_service_including_one_created_while_running(
    tmp_path: Path, make_broker: Callable[..., Mosquitto]
) -> None:
    view = StoreView("sqlite", tmp_path / "data")
    data = tmp_path / "provisioning"
    data.mkdir()
    pkis = [TenantPki(tmp_path / f"pki-{n}", n) for n in ("acme", "globex")]
    brokers = [make_broker(p) for p in pkis]

    def provision(count: int) -> None:
        """``<data>/tenants.json`` as ``provisioning tenant create`` writes it (docs/provisioning.md)."""
        entries = [tenant_entry(p, b) for p, b in zip(pkis[:count], brokers[:count])]
        tmp = data / ".tenants.json.tmp"
        tmp.write_text(json.dumps({"tenants": entries}, indent=2) + "\n")
        tmp.replace(data / "tenants.json")

    provision(1)
    path = write_config(tmp_path / "bridge.yaml", tenants=[], storage=view.storage, tenants_from=str(data))
    with BridgeProcess(path) as bridge:
        bridge.wait_connected()
        provision(2)  # a tenant created while the bridge runs
        bridge.wait_log("tenant added")
        bridge.wait_connected(2)
        for pki, broker in zip(pkis, brokers):
            with Gateway(pki, broker, GW) as gw:
                gw.publish(f"gw/{GW}/data/press-1", batch(GW, "press-1", 1, 5))
        wait_until(
            lambda: view.count("acme", "points") == 5 and view.count("globex", "points") == 5,
            what="5 points in each tenant",
        )
