"""What the console reads from a tenant's store: the fleet, a gateway's values, trends, alerts.

Read-only, always: the console never writes the bridge's tables. A SQLite
store is opened with ``mode=ro`` (one connection per request, so requests
never share a cursor); a PostgreSQL store through its own connection, with
every table qualified by the tenant's schema. The SQL is written once, with
``?`` placeholders and ``{s}`` for the table prefix, and each dialect fills
those in.

Where each overview figure comes from (DESIGN.md's topic tree, as the
bridge stores it):

| figure | table |
|---|---|
| online / offline, since | the ``status`` row received last (the agent's retained birth, its will, or the offline a revocation publishes; a will carries an older ``ts`` than the birth it follows) |
| version, config hash | newest ``status`` row that carries them |
| last seen | newest ``received_at`` of ``latest`` and ``status`` |
| data lag | now minus the newest reading's ``ts`` (how far behind the cloud is) |
| a tag's unit and description | ``device_meta``: the tags of the device's retained meta |
| backlog, unconfirmed batches | ``gateway_buffer``: the newest buffer figures of the gateway's status (the agent's own) |
| dropped points | the agent's own count from ``gateway_buffer``; for an agent that reports none, the sum of ``points`` of the gateway's ``buffer_drop`` events |
| devices with errors | devices whose newest reading of some tag has quality ``bad`` |
| active alerts | ``alert_state`` pending or firing |

Trends are downsampled in the database (``buckets`` groups with min, max,
mean and count each), from the raw points or, for long ranges, from the
console's per-minute rollup (``console.rollup``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory_edge.errors import StorageError

MINUTE_MS = 60_000
EXPORT_SLICE_MS = 3600_000  # the CSV export reads the points an hour at a time
# A gateway whose agent has not reported its buffer (an older agent, Sparkplug, never connected).
NO_BUFFER: dict[str, Any] = {
    "buffer_ts": None,
    "backlog_batches": None,
    "backlog_points": None,
    "unconfirmed_batches": None,
    "oldest_backlog_ts": None,
    "oldest_unconfirmed_ts": None,
}


@dataclass(frozen=True)
class Series:
    gw: str
    device: str
    tag: str

    @property
    def key(self) -> str:
        return f"{self.gw}/{self.device}/{self.tag}"

    @classmethod
    def parse(cls, text: str) -> Series:
        parts = text.split("/")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"series {text!r}: expected GATEWAY/DEVICE/TAG")
        return cls(*parts)


def empty_row(gateway: str, state: str) -> dict[str, Any]:
    """A fleet row with nothing known of the gateway yet but its name and ``state``."""
    return {
        "gateway": gateway,
        "state": state,
        "since": None,
        "last_seen": None,
        "version": None,
        "config_hash": None,
        "newest_reading": None,
        "lag_ms": None,
        "devices": 0,
        "tags": 0,
        "bad_tags": 0,
        "devices_with_errors": [],
        "dropped_points": 0,
        "active_alerts": 0,
        **NO_BUFFER,
    }


class TenantData:
    """One tenant's store, read. Use as a context manager: one connection for one request."""

    dialect = "sqlite"

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant

    def __enter__(self) -> TenantData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def iterate(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        yield from self.rows(sql, params)

    # SQL fragments that differ between the dialects
    value_sql = "value"
    drop_points_sql = "json_extract(payload, '$.points')"
    numeric_sql = "typeof(value) IN ('integer', 'real')"

    # ---------------------------------------------------------------- the fleet

    def fleet(self, now_ms: int) -> list[dict[str, Any]]:
        """One row per gateway the store has heard of, sorted by name."""
        gateways: dict[str, dict[str, Any]] = {}

        def gw(name: str) -> dict[str, Any]:
            return gateways.setdefault(name, empty_row(name, "unknown"))

        status = self.rows(
            "SELECT gw, state, ts, version, config_hash, received_at FROM (SELECT gw, state, ts, version, config_hash, "
            "received_at, row_number() OVER (PARTITION BY gw ORDER BY received_at DESC, ts DESC) AS n "
            "FROM {s}status) AS newest WHERE n = 1"
        )
        for name, state, ts, version, config_hash, received in status:
            row = gw(name)
            row.update(state=state, since=ts, last_seen=received, version=version, config_hash=config_hash)
        for name, version, config_hash in self.rows(
            "SELECT gw, version, config_hash FROM (SELECT gw, version, config_hash, row_number() OVER "
            "(PARTITION BY gw ORDER BY ts DESC) AS n FROM {s}status WHERE version IS NOT NULL) AS v WHERE n = 1"
        ):
            gw(name).update(version=version, config_hash=config_hash)
        for name, newest, received, devices, tags, bad in self.rows(
            "SELECT gw, max(ts), max(received_at), count(DISTINCT device), count(*), "
            "sum(CASE WHEN quality = 'bad' THEN 1 ELSE 0 END) FROM {s}latest GROUP BY gw"
        ):
            row = gw(name)
            row.update(newest_reading=newest, lag_ms=max(0, now_ms - newest), devices=devices, tags=tags)
            row["bad_tags"] = int(bad or 0)
            row["last_seen"] = max(row["last_seen"] or 0, received)
        for name, device in self.rows(
            "SELECT DISTINCT gw, device FROM {s}latest WHERE quality = 'bad' ORDER BY gw, device"
        ):
            gw(name)["devices_with_errors"].append(device)
        for name, dropped in self.rows(
            f"SELECT gw, sum({self.drop_points_sql}) FROM {{s}}events WHERE type = 'buffer_drop' GROUP BY gw"
        ):
            gw(name)["dropped_points"] = int(dropped or 0)
        for name, ts, pending, pending_points, unconfirmed, dropped, oldest, oldest_unconfirmed in self.rows(
            "SELECT gw, ts, pending_batches, pending_points, unconfirmed_batches, dropped_points, oldest_pending_ts, "
            "oldest_unconfirmed_ts FROM {s}gateway_buffer"
        ):
            gw(name).update(
                buffer_ts=ts,
                backlog_batches=pending,
                backlog_points=pending_points,
                unconfirmed_batches=unconfirmed,
                oldest_backlog_ts=oldest,
                oldest_unconfirmed_ts=oldest_unconfirmed,
                dropped_points=int(dropped),
            )
        for name, active in self.rows(
            "SELECT gw, count(*) FROM {s}alert_state WHERE state IN ('pending', 'firing') GROUP BY gw"
        ):
            gw(name)["active_alerts"] = int(active)
        return [gateways[name] for name in sorted(gateways)]

    # ---------------------------------------------------------------- one gateway

    def values(self, gw: str) -> list[dict[str, Any]]:
        """The newest reading of each tag of ``gw``: device, tag, ts, value, quality, error."""
        return [
            {"device": d, "tag": t, "ts": ts, "value": v, "quality": q, "error": e, "received_at": r}
            for d, t, ts, v, q, e, r in self.rows(
                f"SELECT device, tag, ts, {self.value_sql}, quality, error, received_at FROM {{s}}latest "
                "WHERE gw = ? ORDER BY device, tag",
                (gw,),
            )
        ]

    def tag_meta(self, gw: str) -> dict[tuple[str, str], dict[str, Any]]:
        """``(device, tag)`` -> ``{"unit", "description"}`` from the devices' retained meta."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for device, tags in self.rows("SELECT device, tags FROM {s}device_meta WHERE gw = ?", (gw,)):
            for tag in tags if isinstance(tags, list) else json.loads(tags):
                out[(device, tag["name"])] = {"unit": tag.get("unit"), "description": tag.get("description")}
        return out

    def known(self, gw: str) -> bool:
        return bool(
            self.rows("SELECT 1 FROM {s}latest WHERE gw = ? LIMIT 1", (gw,))
            or self.rows("SELECT 1 FROM {s}status WHERE gw = ? LIMIT 1", (gw,))
        )

    def events(self, gw: str, *, limit: int = 50) -> list[dict[str, Any]]:
        out = []
        for type_, ts, payload in self.rows(
            "SELECT type, ts, payload FROM {s}events WHERE gw = ? ORDER BY ts DESC LIMIT ?", (gw, limit)
        ):
            doc = payload if isinstance(payload, dict) else json.loads(payload)
            out.append({"type": type_, "ts": ts, "detail": doc})
        return out

    # ---------------------------------------------------------------- trends

    def trend(self, series: Series, start_ms: int, end_ms: int, buckets: int) -> list[list[Any]]:
        """``[[t, min, max, mean, count], …]`` over ``[start, end)`` in at most ``buckets`` groups, raw points."""
        width = max(1, -(-(end_ms - start_ms) // buckets))
        return [
            [start_ms + int(b) * width, lo, hi, mean, n]
            for b, lo, hi, mean, n in self.rows(
                f"SELECT (ts - ?) / ?, min({self.value_sql}), max({self.value_sql}), avg({self.value_sql}), count(*) "
                f"FROM {{s}}points WHERE gw = ? AND device = ? AND tag = ? AND ts >= ? AND ts < ? AND {self.numeric_sql} "
                "GROUP BY 1 ORDER BY 1",
                (start_ms, width, series.gw, series.device, series.tag, start_ms, end_ms),
            )
        ]

    def minute_trend(self, series: Series, start_ms: int, end_ms: int, buckets: int) -> list[list[Any]] | None:
        """Like ``trend``, from the store's own per-minute table; None when the store keeps none (SQLite)."""
        return None

    def points(self, series: Series, start_ms: int, end_ms: int) -> Iterator[tuple[Any, ...]]:
        """Every raw point ``(ts, value, quality, error)`` of the range, oldest first (CSV export).

        Read an hour at a time, each hour one whole statement: an export that takes long to download holds
        no read transaction on the store between hours (a SQLite store can checkpoint its write-ahead log
        meanwhile), and no more than an hour of points is in memory (PostgreSQL's cursor fetches it all).
        """
        sql = (
            f"SELECT ts, {self.value_sql}, quality, error FROM {{s}}points "
            "WHERE gw = ? AND device = ? AND tag = ? AND ts >= ? AND ts < ? ORDER BY ts"
        )
        for first in range(start_ms, end_ms, EXPORT_SLICE_MS):
            yield from self.rows(
                sql, (series.gw, series.device, series.tag, first, min(end_ms, first + EXPORT_SLICE_MS))
            )

    # ---------------------------------------------------------------- alerts

    def active_alerts(self) -> list[dict[str, Any]]:
        keys = ("gw", "device", "rule", "state", "since", "value", "tag", "changed_at")
        return [
            dict(zip(keys, r))
            for r in self.rows(
                "SELECT gw, device, rule, state, since, value, tag, changed_at FROM {s}alert_state "
                "WHERE state IN ('pending', 'firing') ORDER BY since DESC"
            )
        ]

    def alert_history(self, *, limit: int = 200, gw: str | None = None) -> list[dict[str, Any]]:
        keys = ("id", "ts", "gw", "device", "rule", "state", "previous", "severity", "tag", "value", "since", "message")
        where, params = ("WHERE gw = ?", (gw,)) if gw else ("", ())
        return [
            dict(zip(keys, r))
            for r in self.rows(
                "SELECT id, ts, gw, device, rule, state, previous, severity, tag, value, since, message "
                f"FROM {{s}}alerts {where} ORDER BY id DESC LIMIT ?",
                (*params, limit),
            )
        ]

    def alert_since(self, gw: str, device: str, rule: str) -> tuple[str, int | None] | None:
        rows = self.rows(
            "SELECT state, since FROM {s}alert_state WHERE gw = ? AND device = ? AND rule = ?", (gw, device, rule)
        )
        return (rows[0][0], rows[0][1]) if rows else None


class SqliteData(TenantData):
    """``<path>/<tenant>.db``, read-only."""

    def __init__(self, directory: str | Path, tenant: str) -> None:
        super().__init__(tenant)
        self.path = Path(directory) / f"{tenant}.db"
        self._db: sqlite3.Connection | None = None
        if self.path.exists():
            try:
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
                if not self._db.execute("PRAGMA user_version").fetchone()[0]:
                    self._db.close()
                    self._db = None
            except sqlite3.Error as exc:
                raise StorageError(f"{self.path}: cannot read: {exc}") from exc

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.iterate(sql, params))

    def iterate(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        if self._db is None:  # no data yet: an empty fleet, not an error
            return
        try:
            yield from self._db.execute(sql.replace("{s}", ""), tuple(params))
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: {exc}") from exc


class PostgresData(TenantData):
    """The tenant's schema in PostgreSQL, read through its own connection."""

    dialect = "postgres"
    value_sql = "value"
    drop_points_sql = "(payload->>'points')::bigint"
    numeric_sql = "value IS NOT NULL"

    def __init__(self, dsn: str, tenant: str) -> None:
        super().__init__(tenant)
        import psycopg

        self._psycopg = psycopg
        try:
            self._conn = psycopg.connect(
                dsn, autocommit=True, connect_timeout=10, application_name="factory-edge console"
            )
            found = self._conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (tenant,)).fetchone()
        except psycopg.Error as exc:
            raise StorageError(f"postgresql: cannot connect: {str(exc).strip().splitlines()[0]}") from exc
        self._schema = '"' + tenant.replace('"', '""') + '".' if found else None

    def close(self) -> None:
        self._conn.close()

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.iterate(sql, params))

    def iterate(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        if self._schema is None:
            return
        text = sql.replace("{s}", self._schema).replace("?", "%s")
        try:
            with self._conn.cursor() as cursor:
                cursor.execute(text.encode(), tuple(params))
                yield from cursor
        except self._psycopg.Error as exc:
            raise StorageError(f"postgresql schema {self.tenant}: {str(exc).strip().splitlines()[0]}") from exc

    def minute_trend(self, series: Series, start_ms: int, end_ms: int, buckets: int) -> list[list[Any]] | None:
        """From ``points_minute``, which the bridge keeps in the commit of the points (schema version 2)."""
        if self._schema is None or not self.rows("SELECT to_regclass(?)", (f"{self._schema}points_minute",))[0][0]:
            return None
        first, last = start_ms // MINUTE_MS, -(-end_ms // MINUTE_MS)
        width = max(1, -(-(last - first) // buckets))
        return [
            [(first + int(b) * width) * MINUTE_MS, lo, hi, mean, int(n)]
            for b, lo, hi, mean, n in self.rows(
                "SELECT (minute - ?) / ?, min(lo), max(hi), sum(total) / sum(n), sum(n) FROM {s}points_minute "
                "WHERE gw = ? AND device = ? AND tag = ? AND minute >= ? AND minute < ? GROUP BY 1 ORDER BY 1",
                (first, width, series.gw, series.device, series.tag, first, last),
            )
        ]

    def values(self, gw: str) -> list[dict[str, Any]]:
        return [
            {"device": d, "tag": t, "ts": ts, "value": v if text is None else text, "quality": q, "error": e}
            | {"received_at": r}
            for d, t, ts, v, text, q, e, r in self.rows(
                "SELECT device, tag, ts, value, value_text, quality, error, received_at FROM {s}latest "
                "WHERE gw = ? ORDER BY device, tag",
                (gw,),
            )
        ]


__all__ = ["NO_BUFFER", "PostgresData", "Series", "SqliteData", "TenantData"]
