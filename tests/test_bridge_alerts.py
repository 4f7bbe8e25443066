"""Alerts end to end: a real broker, ``bridge run``, a real local HTTP server for webhooks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.alerts.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.bridge_fixtures import (
    BlackHole,
    BridgeProcess,
    Gateway,
    StoreView,
    Watcher,
    WebhookServer,
    batch,
    now_ms,
    tenant_entry,
    wait_until,
    write_config,
)
from tests.infra import Mosquitto, TenantPki

GW = "gw-01"
SECRET = "s3cret-for-tests"


@pytest.fixture
def view(tmp_path: Path) -> StoreView:
    return StoreView("sqlite", tmp_path / "data")


@pytest.fixture
def start(tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, view: StoreView) -> Iterator[Any]:
    started: list[BridgeProcess] = []

    def start(alerts: dict[str, Any]) -> BridgeProcess:
        path = write_config(
            tmp_path / "bridge.yaml", tenants=[tenant_entry(pki_acme, broker_acme)], storage=view.storage, alerts=alerts
        )
        bridge = BridgeProcess(path).start()
        started.append(bridge)
        bridge.wait_connected()
        return bridge

    yield start
    for bridge in started:
        bridge.stop()


def states(view: StoreView, rule: str) -> list[str]:
    return [r[0] for r in view.rows("acme", "SELECT state FROM {alerts} WHERE rule = ? ORDER BY id", (rule,))]


def test_threshold_with_for_fires_once_after_the_duration_and_resolves_on_the_clear_condition(
    start: Any, pki_acme: TenantPki, broker_acme: Mosquitto, view: StoreView
) -> None:
    with (
        WebhookServer() as hook,
        Watcher(pki_acme, broker_acme, ["alerts/#"]) as watcher,
        Gateway(pki_acme, broker_acme, GW) as gw,
    ):
        start(
            {
                "webhooks": {"ops": {"url": hook.url, "secret": SECRET}},
                "rules": [
                    {
                        "name": "spindle-overtemp",
                        "device": "cnc-*",
                        "tag": "spindle_temp",
                        "above": 85,
                        "for": "1s",
                        "clear_below": 80,
                        "severity": "critical",
                        "notify": ["ops"],
                        "message": "{device} spindle at {value:.1f} degC (limit {threshold})",
                    }
                ],
            }
        )

        def send(seq: int, value: float) -> None:
            ts = max(now_ms(), last[0] + 1)  # one reading per millisecond at most, as a gateway reads
            last[0] = ts
            gw.publish(f"gw/{GW}/data/cnc-1", batch(GW, "cnc-1", seq, [("spindle_temp", ts, value)]))

        last = [0]

        started = time.monotonic()
        send(1, 86.0)
        wait_until(lambda: states(view, "spindle-overtemp") == ["pending"], what="pending")
        send(2, 90.0)
        send(3, 88.0)
        wait_until(lambda: "firing" in states(view, "spindle-overtemp"), what="firing")
        assert time.monotonic() - started >= 1.0
        send(4, 82.0)  # below the trigger, above the clear limit: still firing
        send(5, 86.0)
        time.sleep(0.5)
        assert states(view, "spindle-overtemp") == ["pending", "firing"]
        send(6, 79.5)
        wait_until(lambda: states(view, "spindle-overtemp") == ["pending", "firing", "resolved"], what="resolved")
        wait_until(lambda: len(hook.requests) == 2, what="two webhook deliveries")
        wait_until(lambda: len(watcher.docs("alerts/")) == 3, what="three alert messages")
    published = watcher.docs("alerts/gw-01/cnc-1/spindle-overtemp")
    assert [d["state"] for d in published] == ["pending", "firing", "resolved"]
    firing = published[1]
    assert (firing["severity"], firing["value"], firing["tag"]) == ("critical", 88.0, "spindle_temp")
    assert firing["message"] == "cnc-1 spindle at 88.0 degC (limit 85)"
    assert published[2]["value"] == 79.5
    bodies = []
    for headers, body in hook.requests:
        assert headers["Content-Type"] == "application/json"
        assert verify(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
        assert not verify("wrong secret", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
        bodies.append(json.loads(body))
    assert [(b["state"], b["rule"], b["device"], b["tenant"]) for b in bodies] == [
        ("firing", "spindle-overtemp", "cnc-1", "acme"),
        ("resolved", "spindle-overtemp", "cnc-1", "acme"),
    ]
    assert view.count("acme", "webhook_outbox") == 0
    retained = [m for m in watcher.messages if m[3]]
    assert retained == []  # live messages; the retained copy is for later subscribers:
    with Watcher(pki_acme, broker_acme, ["alerts/#"]) as later:
        wait_until(lambda: later.docs(), what="the retained alert")
        assert later.docs()[0]["state"] == "resolved"


def test_stale_fires_when_data_stops_and_resolves_when_it_returns(
    start: Any, pki_acme: TenantPki, broker_acme: Mosquitto, view: StoreView
) -> None:
    start(
        {
            "rules": [
                {"name": "silent", "device": "*", "stale": "1s", "severity": "warning"},
                {"name": "gw-down", "offline": True},
            ]
        }
    )
    with Gateway(pki_acme, broker_acme, GW) as gw:
        gw.publish(f"gw/{GW}/status", json.dumps({"state": "online", "ts": now_ms()}), retain=True)
        for seq in range(1, 6):
            gw.publish(f"gw/{GW}/data/press-1", batch(GW, "press-1", seq, [("temp", now_ms(), 20.0)]))
            time.sleep(0.2)
        assert states(view, "silent") == []
        stopped = time.monotonic()
        wait_until(lambda: states(view, "silent") == ["firing"], what="stale firing")
        assert time.monotonic() - stopped >= 0.8
        gw.publish(f"gw/{GW}/data/press-1", batch(GW, "press-1", 6, [("temp", now_ms(), 20.0)]))
        wait_until(lambda: states(view, "silent") == ["firing", "resolved"], what="stale resolved")
        gw.publish(f"gw/{GW}/status", json.dumps({"state": "offline", "ts": now_ms()}), retain=True)
        wait_until(lambda: states(view, "gw-down") == ["firing"], what="gateway offline")
    assert view.rows("acme", "SELECT device, severity, message FROM {alerts} WHERE rule = 'silent' ORDER BY id")[0] == (
        "press-1",
        "warning",
        "press-1: no data for 1s",
    )
    assert view.rows("acme", "SELECT device, message FROM {alerts} WHERE rule = 'gw-down'") == [
        ("_gateway", "gateway gw-01 is offline")
    ]


@pytest.mark.timeout(90)
def test_a_dead_webhook_does_not_slow_ingestion(
    start: Any, pki_acme: TenantPki, broker_acme: Mosquitto, view: StoreView
) -> None:
    devices = [f"press-{i}" for i in range(20)]
    with BlackHole() as dead:
        bridge = start(
            {
                "webhooks": {"ops": {"url": dead.url, "secret": SECRET, "timeout": "20s", "max_attempts": 3}},
                "rules": [{"name": "hot", "device": "press-*", "tag": "t1", "above": 0, "notify": ["ops"]}],
            }
        )
        began = time.monotonic()
        with Gateway(pki_acme, broker_acme, GW) as gw:
            for i, device in enumerate(devices):  # every device fires: 20 webhook deliveries queued
                gw.batches(device, range(i * 10 + 1, i * 10 + 11), 250)
        wait_until(lambda: view.count("acme", "points") == 50_000, timeout_s=30, what="50,000 points")
        ingest_s = time.monotonic() - began
        wait_until(lambda: view.count("acme", "alerts") == 20, what="20 alerts")
        # The endpoint holds the first delivery's connection open; everything else went on.
        assert len(dead.accepted) == 1
        assert view.count("acme", "webhook_outbox") == 20
        assert ingest_s < 15, f"ingesting 50,000 points took {ingest_s:.1f}s"
        bridge.stop()
    assert not [e for e in bridge.logs() if e.get("level") == "error"]
