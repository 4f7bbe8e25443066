"""Metering: per tenant and gateway, the points, messages and bytes stored each hour.

What is counted is what a commit window newly stored: the data batches the
store claimed (``(gw, seq)`` not seen before), so a batch delivered again
after a crash or a lost PUBACK is never counted twice. The counts are
written to ``usage_hourly`` in the window's own transaction, next to the
data: they can neither run ahead of the data nor be lost with a crash.

| column | meaning |
|---|---|
| ``hour`` | start of the hour (epoch ms, UTC) in which the bridge received the batch |
| ``gw`` | the gateway |
| ``points`` | readings stored |
| ``messages`` | data messages (batches) stored |
| ``bytes`` | their MQTT payload bytes, as received |
| ``delayed_points`` | of those, points that came above the tenant's ``limits.points_per_s`` (``ratelimit.py``) |

Days are sums of hours (UTC). Pure functions here; the stores write and
read the rows (``Tx.record_usage``, ``Store.usage``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .messages import DataBatch

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True, slots=True)
class Usage:
    """One gateway's usage in one period (an hour, or a day: ``period`` is its start, epoch ms)."""

    period: int
    gw: str
    points: int
    messages: int
    bytes: int
    delayed_points: int = 0

    def row(self) -> tuple[int, str, int, int, int, int]:
        return (self.period, self.gw, self.points, self.messages, self.bytes, self.delayed_points)


def hourly(batches: Sequence[DataBatch], delayed: Mapping[str, int] | None = None) -> list[Usage]:
    """The usage rows of newly stored batches; ``delayed``: points above the rate, per gateway."""
    sums: dict[tuple[int, str], list[int]] = {}
    for batch in batches:
        key = (batch.received_at - batch.received_at % HOUR_MS, batch.gw)
        entry = sums.get(key)
        if entry is None:
            entry = sums[key] = [0, 0, 0, 0]
        entry[0] += len(batch.rows)
        entry[1] += 1
        entry[2] += batch.size
    for gw, points in (delayed or {}).items():
        hour = next((h for h, g in sums if g == gw), None)
        if hour is not None and points:
            sums[(hour, gw)][3] += points
    return [Usage(hour, gw, *counts) for (hour, gw), counts in sorted(sums.items())]


def by_day(hours: Iterable[Usage]) -> list[Usage]:
    """Hours summed into UTC days."""
    sums: dict[tuple[int, str], list[int]] = {}
    for u in hours:
        entry = sums.setdefault((u.period - u.period % DAY_MS, u.gw), [0, 0, 0, 0])
        entry[0] += u.points
        entry[1] += u.messages
        entry[2] += u.bytes
        entry[3] += u.delayed_points
    return [Usage(day, gw, *counts) for (day, gw), counts in sorted(sums.items())]


def total(rows: Iterable[Usage], *, period: int = 0, gw: str = "*") -> Usage:
    points = messages = size = delayed = 0
    for u in rows:
        points += u.points
        messages += u.messages
        size += u.bytes
        delayed += u.delayed_points
    return Usage(period, gw, points, messages, size, delayed)


# -- thresholds -----------------------------------------------------------------

_PER_DAY = {"bytes_per_day": "bytes", "points_per_day": "points", "delayed_points_per_day": "delayed_points"}
_PER_S = {"messages_per_s": "messages", "points_per_s": "points"}


@dataclass(frozen=True)
class Crossing:
    """A tenant above a threshold rule: its highest day (or busiest hour) in the window."""

    tenant: str
    rule: str
    metric: str
    value: float
    above: float
    period: int  # the day or hour it was measured in (epoch ms)
    calls_for: str

    def message(self) -> str:
        when = _when(self.period, hourly=self.metric in _PER_S)
        return (
            f"tenant {self.tenant}: {measure(self.metric, self.value)} ({when}), above the {self.rule} threshold "
            f"({measure(self.metric, self.above)}): calls for {self.calls_for}"
        )

    def as_json(self) -> dict[str, object]:
        return {
            "tenant": self.tenant,
            "rule": self.rule,
            "metric": self.metric,
            "value": self.value,
            "above": self.above,
            "period": self.period,
            "calls_for": self.calls_for,
            "message": self.message(),
        }


def peak(metric: str, hours: Sequence[Usage]) -> tuple[float, int]:
    """A tenant's highest value of ``metric`` in these hours (all gateways): ``(value, period start)``."""
    if metric in _PER_DAY:
        field, periods, seconds = _PER_DAY[metric], by_day(_tenant_wide(hours)), 1.0
    elif metric in _PER_S:
        field, periods, seconds = _PER_S[metric], _tenant_wide(hours), HOUR_MS / 1000
    else:
        raise ValueError(f"unknown usage metric {metric!r}")
    best = max(periods, key=lambda u: getattr(u, field), default=None)
    if best is None:
        return 0.0, 0
    return getattr(best, field) / seconds, best.period


def crossings(tenant: str, hours: Sequence[Usage], rules: Iterable[Any]) -> list[Crossing]:
    """The rules (``ThresholdRule``: name, metric, above, calls_for) the tenant's usage is above."""
    found = []
    for rule in rules:
        value, period = peak(rule.metric, hours)
        if value > rule.above:
            found.append(Crossing(tenant, rule.name, rule.metric, value, rule.above, period, rule.calls_for))
    return found


def _tenant_wide(hours: Iterable[Usage]) -> list[Usage]:
    sums: dict[int, list[Usage]] = {}
    for u in hours:
        sums.setdefault(u.period, []).append(u)
    return [total(rows, period=period) for period, rows in sorted(sums.items())]


def measure(metric: str, value: float) -> str:
    """``140 GB/day``, ``62.5 messages/s``, ``1.2M points/day``."""
    if metric == "bytes_per_day":
        return f"{size_text(value)}/day"
    if metric in _PER_S:
        return f"{value:,.1f}".removesuffix(".0") + f" {metric.removesuffix('_per_s')}/s"
    return f"{count_text(value)} {metric.removesuffix('_per_day').replace('_', ' ')}/day"


def size_text(size: float) -> str:
    """Decimal units, as the thresholds are written: ``140 GB``, ``3.2 MB``, ``512 B``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"


def count_text(count: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return f"{count:.0f}"


def _when(period: int, *, hourly: bool) -> str:
    moment = dt.datetime.fromtimestamp(period / 1000, dt.UTC)
    return f"busiest hour {moment:%Y-%m-%d %H:00} UTC" if hourly else f"{moment:%Y-%m-%d}"


__all__ = [
    "DAY_MS",
    "HOUR_MS",
    "Crossing",
    "Usage",
    "by_day",
    "count_text",
    "crossings",
    "hourly",
    "measure",
    "peak",
    "size_text",
    "total",
]
