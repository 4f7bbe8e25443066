"""Shared pieces of the console tests: tenant stores written by the bridge's own storage code, accounts, clients.

A fleet is written through ``bridge.storage.sqlite.SqliteStore`` (the same
transaction the ingest pipeline commits), so the console reads exactly
what the bridge stores.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from argon2 import PasswordHasher

from bridge.alerts.model import Change, Instance, State
from bridge.messages import BufferFigures, DataBatch, EventRow, MetaRow, StatusRow
from bridge.storage import Store
from bridge.storage.sqlite import SqliteStore
from console.api import create_app
from console.service import Console, Settings

PASSWORD = "correct horse battery"
# Argon2id with small parameters: the fixtures create and log in many accounts on a shared 2-core machine.
# test_login_… checks the stored hash of the production parameters.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def now_ms() -> int:
    return int(time.time() * 1000)


class FleetWriter:
    """Writes a tenant's store as the bridge does: batches, latest values, status, events, alerts."""

    def __init__(self, directory: Path, tenant: str, *, store: Store | None = None) -> None:
        self.store = store or SqliteStore(directory, tenant, fsync=False)
        self.store.open()
        self.seq: dict[str, int] = {}

    def close(self) -> None:
        self.store.close()

    def status(
        self,
        gw: str,
        state: str,
        *,
        ts: int | None = None,
        version: str = "0.1.0",
        config: str = "c0ffee",
        received: int | None = None,
    ) -> None:
        at = ts or now_ms()
        with self.store.transaction() as tx:
            tx.insert_status([StatusRow(gw, state, at, version, config, received or at)])

    def buffer(self, gw: str, ts: int, *, pending: int, unconfirmed: int, dropped: int, oldest: int | None) -> None:
        """A status carrying the agent's buffer figures, measured at ``ts`` (republished: the birth's ``ts``)."""
        figures = BufferFigures(ts, pending, pending * 10, unconfirmed, dropped, oldest, None)
        with self.store.transaction() as tx:
            tx.insert_status([StatusRow(gw, "online", 1, "0.1.0", "c0ffee", now_ms(), figures)])

    def meta(self, gw: str, device: str, tags: list[dict[str, Any]] | None) -> None:
        """The device's retained meta as the bridge decoded it (None: cleared)."""
        text = None if tags is None else json.dumps(tags)
        with self.store.transaction() as tx:
            tx.save_meta([MetaRow(gw, device, text, now_ms())])

    def points(
        self, gw: str, device: str, rows: list[tuple[str, int, Any]], *, quality: str = "good", error: str | None = None
    ) -> None:
        """``rows``: ``(tag, ts, value)``, one batch."""
        seq = self.seq[gw] = self.seq.get(gw, 0) + 1
        at = now_ms()
        full = [(gw, device, tag, ts, value, quality, error, seq) for tag, ts, value in rows]
        with self.store.transaction() as tx:
            tx.claim_batches([DataBatch(gw, device, seq, full, at)])
            tx.insert_points([DataBatch(gw, device, seq, full, at)])
            newest: dict[str, tuple[Any, ...]] = {}
            for tag, ts, value in rows:
                if tag not in newest or ts > newest[tag][3]:
                    newest[tag] = (gw, device, tag, ts, value, quality, error, at, at)
            tx.upsert_latest(list(newest.values()))

    def event(self, gw: str, kind: str, payload: str) -> None:
        at = now_ms()
        digest = hashlib.sha256(payload.encode()).hexdigest()
        with self.store.transaction() as tx:
            tx.insert_events([EventRow(gw, kind, at, payload, digest, at)])

    def alert(self, gw: str, device: str, rule: str, state: State, value: float, *, since: int | None = None) -> None:
        at = now_ms()
        begun = since or at
        with self.store.transaction() as tx:
            tx.record_alerts(
                [
                    Change(
                        "t",
                        gw,
                        device,
                        rule,
                        state,
                        State.OK,
                        "critical",
                        begun,
                        at,
                        value,
                        "spindle_temp",
                        "above 85",
                        f"{rule} {state} on {gw}/{device}",
                        (),
                    )
                ]
            )
            tx.save_alert_states([Instance(gw, device, rule, state, begun, value, "spindle_temp", {}, True, at)])


def bridge_config(path: Path, storage: Path, tenants: list[str], *, dsn: str | None = None) -> Path:
    doc = {
        "storage": {"backend": "postgres", "dsn": dsn} if dsn else {"backend": "sqlite", "path": str(storage)},
        "tenants": [{"name": t, "url": f"mqtts://mqtt.{t}.example.com:8883"} for t in tenants],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def make_console(
    tmp_path: Path, tenants: list[str], *, provisioning: Path | None = None, dsn: str | None = None, **settings: Any
) -> Console:
    settings.setdefault("hasher", FAST_HASHER)
    storage = tmp_path / "storage"
    config = bridge_config(tmp_path / "bridge.yaml", storage, tenants, dsn=dsn)
    return Console(
        Settings(state_dir=tmp_path / "console", bridge_config=config, provisioning_dir=provisioning, **settings)
    )


class Client:
    """A blocking client of the whole ASGI app that keeps cookies as a browser does, over ``https://``
    (the session cookie is Secure: a browser sends it only over HTTPS)."""

    def __init__(self, console: Console) -> None:
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(console, live_interval_s=0.05), client=("127.0.0.1", 50000)),
            base_url="https://testserver",
        )

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return asyncio.run(self._client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


def client(console: Console) -> Client:
    return Client(console)


def logged_in(console: Console, name: str) -> tuple[Client, str]:
    c = client(console)
    answer = c.post("/api/login", json={"name": name, "password": PASSWORD})
    assert answer.status_code == 200, answer.text
    return c, answer.json()["csrf"]
