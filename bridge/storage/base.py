"""What the ingest pipeline asks of a tenant's store, whatever the backend.

One store per tenant: a SQLite file ``<path>/<tenant>.db`` or a PostgreSQL
schema named after the tenant. Every commit window is one transaction
(``with store.transaction() as tx``): the batches claimed, their points, the
status, events, mapped rows, dead letters, the newest value of each series,
and the alert changes they caused commit together or not at all. Only then
are the messages acknowledged.

Tables (DESIGN.md): ``points``, ``batches`` (``(gw, seq)`` unique),
``status``, ``events``, ``alerts`` (every state change), ``dead_letters``,
one table per mapping; and the bridge's own ``latest``, ``alert_state``,
``webhook_outbox``, ``alert_series``, ``gateway_buffer`` (each gateway's newest
buffer figures from its status), ``device_meta`` (each device's tags from
its retained meta) and ``usage_hourly`` (metering, ``metering.py``).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from factory_edge.errors import StorageError

from ..alerts.model import Change, Instance, OutboxItem, SeriesLast
from ..mapping import MappingRule
from ..messages import DataBatch, DeadLetter, EventRow, MetaRow, StatusRow
from ..metering import Usage

LatestRow = tuple[str, str, str, int, Any, str, str | None, int, int | None]
"""``(gw, device, tag, ts, value, quality, error, received_at, seen_at)``."""


# A status row past the retention (``s``: the row; ``{t}``: the table) that is neither its gateway's newest nor its
# newest naming a version: what the console shows of a gateway long silent stays.
STATUS_EXPIRED = (
    "s.received_at < {ph} AND s.ts < (SELECT max(m.ts) FROM {t} m WHERE m.gw = s.gw) AND s.ts < "
    "coalesce((SELECT max(m.ts) FROM {t} m WHERE m.gw = s.gw AND m.version IS NOT NULL), 9223372036854775807)"
)


class Tx(abc.ABC):
    """One open transaction on a tenant's store."""

    @abc.abstractmethod
    def claim_batches(self, batches: Sequence[DataBatch]) -> list[DataBatch]:
        """Record each ``(gw, seq)``; return the batches not stored before (in the given order)."""

    @abc.abstractmethod
    def differing(self, batches: Sequence[DataBatch]) -> set[tuple[str, int]]:
        """Of batches already stored, those whose stored device or point count differs: the ``(gw, seq)`` was used
        for another batch (a gateway whose buffer started again). They are not confirmed."""

    @abc.abstractmethod
    def insert_points(self, batches: Sequence[DataBatch]) -> None: ...

    @abc.abstractmethod
    def insert_status(self, rows: Sequence[StatusRow]) -> None:
        """Append to ``status``; a row with buffer figures also updates ``gateway_buffer`` (newest ``ts`` wins)."""

    @abc.abstractmethod
    def save_meta(self, rows: Sequence[MetaRow]) -> None:
        """Keep each device's newest meta in ``device_meta`` (in order; ``tags`` None deletes it)."""

    @abc.abstractmethod
    def insert_events(self, rows: Sequence[EventRow]) -> None: ...

    @abc.abstractmethod
    def insert_mapped(self, table: str, rows: Sequence[dict[str, Any]]) -> None: ...

    @abc.abstractmethod
    def insert_dead_letters(self, rows: Sequence[DeadLetter]) -> None: ...

    @abc.abstractmethod
    def upsert_latest(self, rows: Sequence[LatestRow]) -> None:
        """Keep the newest reading per series (a row with an older ``ts`` never replaces a newer one)."""

    @abc.abstractmethod
    def record_alerts(self, changes: Sequence[Change]) -> list[int]:
        """Append the changes to ``alerts``; return their ids."""

    @abc.abstractmethod
    def save_alert_states(self, states: Sequence[Instance]) -> None: ...

    @abc.abstractmethod
    def save_alert_series(self, rows: Sequence[SeriesLast]) -> None:
        """The newest reading the alert engine evaluated, per series (never moved backwards)."""

    @abc.abstractmethod
    def queue_webhooks(self, items: Sequence[tuple[str, bytes, int]]) -> list[int]:
        """Add ``(webhook, payload, created_at)`` deliveries to the outbox; return their ids."""

    @abc.abstractmethod
    def delete_outbox(self, ids: Sequence[int]) -> None: ...

    @abc.abstractmethod
    def record_usage(self, rows: Sequence[Usage]) -> None:
        """Add to ``usage_hourly`` (``metering.py``): counts summed into each ``(hour, gw)`` row."""


@dataclass(frozen=True)
class Table:
    """Rows for ``bridge query``: column names and tuples."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]


class Store(abc.ABC):
    """A tenant's storage. Not thread-safe: one owner thread at a time (the tenant's store thread)."""

    tenant: str
    where: str  # the file or schema, for messages

    @abc.abstractmethod
    def open(self, mappings: Sequence[MappingRule] = ()) -> None:
        """Connect, create or migrate the tenant's tables and the mapped tables."""

    @abc.abstractmethod
    def open_read(self) -> None:
        """Open existing storage read-only (``bridge query``); StorageError when the tenant has none yet."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[Tx]: ...

    # ---------------------------------------------------------------- upkeep, from the retention job

    def maintain(self, now_ms: int) -> list[str]:
        """Prepare for the coming readings (PostgreSQL: day partitions ahead); returns what was created."""
        return []

    @property
    def expire_unit(self) -> str:
        """What ``expire`` counts."""
        return "readings"

    @abc.abstractmethod
    def expire(self, before_ms: int, after_ms: int | None = None) -> int:
        """Remove the readings (``points``) older than ``before_ms``, and those dated at or after ``after_ms`` (a
        clock far ahead must not keep readings past the retention), in steps that never hold ingest up for long.

        SQLite deletes rows in bounded transactions and returns the readings removed; PostgreSQL drops whole
        day partitions (TimescaleDB: chunks) and returns how many.
        """

    @abc.abstractmethod
    def newest_receipt_hour(self) -> int | None:
        """The hour (start, epoch ms, by the bridge's clock) in which the newest data batch stored was received,
        from the metering table (its key leads with the hour); None before any."""

    @abc.abstractmethod
    def expire_received(self, before_ms: int) -> int:
        """Remove the dead letters, events and status rows the bridge received before ``before_ms`` (by the
        bridge's clock; each gateway's newest status, and newest naming a version, stay), in bounded
        transactions; returns the rows removed."""

    # ---------------------------------------------------------------- state the engine resumes from

    @abc.abstractmethod
    def load_alert_states(self) -> list[Instance]: ...

    @abc.abstractmethod
    def load_alert_series(self) -> Iterator[SeriesLast]: ...

    @abc.abstractmethod
    def load_outbox(self) -> list[OutboxItem]: ...

    @abc.abstractmethod
    def last_alerts(self) -> list[dict[str, Any]]:
        """The newest ``alerts`` row of every alert instance (republished, retained, after a connect)."""

    # ---------------------------------------------------------------- reading, for `bridge query` and tests

    @abc.abstractmethod
    def usage(self, *, gw: str | None = None, since_ms: int | None = None, totals: bool = False) -> list[Usage]:
        """``usage_hourly`` rows (oldest first), from the hour holding ``since_ms``; [] before the table exists.
        ``totals``: one row per gateway (period 0), summed by the database."""

    @abc.abstractmethod
    def query(
        self,
        what: str,
        *,
        gw: str | None = None,
        device: str | None = None,
        tag: str | None = None,
        since_ms: int | None = None,
        limit: int = 100,
        active: bool = False,
    ) -> Table:
        """``values`` (newest per series), ``points``, ``alerts`` (history, or current with ``active``),
        ``dead-letters`` or ``counts``: newest first."""


QUERY_KINDS = ("values", "points", "alerts", "dead-letters", "counts")


class SeriesIds:
    """Series ids committed to the store, ``(gw, device) -> tag -> id``: reused by later transactions without
    asking the database. Only ids from a committed transaction are remembered (an id a rolled-back
    transaction created does not exist); past ``limit`` ids all are forgotten at once and asked again."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self.known: dict[tuple[str, str], dict[str, int]] = {}
        self._count = 0
        self._limit = limit

    def remember(self, new_series: dict[tuple[str, str], dict[str, int]]) -> None:
        """What a committed transaction created or looked up."""
        if not new_series:
            return
        if self._count > self._limit:
            self.known.clear()
            self._count = 0
        for key, tags in new_series.items():
            self.known.setdefault(key, {}).update(tags)
            self._count += len(tags)


class DataRejected(StorageError):
    """The store refused the data itself (a value, a constraint), not the connection or the disk.

    Retrying the same window would fail the same way: the ingest loop finds
    the message responsible and sends it to the dead letters instead.
    """
