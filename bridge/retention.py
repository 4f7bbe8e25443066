"""Task ``retention[<tenant>]``: the tenant's storage upkeep, at start and then every hour.

Each run opens a connection of its own (the ingest loop keeps its store),
prepares the coming days (PostgreSQL: day partitions ahead) and, when the
tenant keeps readings for a limited time (``limits.retention_days``, else
``storage.retention_days``), removes the older ones, and those dated more
than the retention ahead (a clock far off must not keep readings past it): PostgreSQL drops whole
day partitions (TimescaleDB: chunks), never deleting row by row; SQLite
deletes in bounded transactions so ingest commits in between.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from factory_edge.errors import StorageError
from factory_edge.logs import fields

from .config import StorageConfig
from .storage import make_store

log = logging.getLogger(__name__)

INTERVAL_S = 3600.0
DAY_MS = 86_400_000
CLOCK_SLACK_MS = 3_600_000  # the newest receipt is known to the hour


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_once(storage: StorageConfig, tenant: str, retention_days: int | None, now_ms: int) -> int | None:
    """One upkeep run; returns what ``Store.expire`` removed, or None without a retention."""
    store = make_store(storage, tenant)
    store.open(())
    try:
        store.maintain(now_ms)
        if retention_days is None:
            return None
        newest = store.newest_receipt_hour()
        if newest is not None and now_ms < newest - CLOCK_SLACK_MS:
            # A clock gone back (an RTC reset, NTP not yet synced) would date every stored reading "ahead" of
            # now, and the retention would remove them all: remove nothing until the clock is right.
            log.error(
                "retention skipped: this host's clock is behind the data it has received; nothing is removed "
                "until the clock is right (check NTP: timedatectl)",
                extra=fields(tenant=tenant, now=_iso(now_ms), newest_received_in_hour=_iso(newest)),
            )
            return None
        before, after = now_ms - retention_days * DAY_MS, now_ms + retention_days * DAY_MS
        started = time.monotonic()
        removed = store.expire(before, after)
        received = store.expire_received(before)
        log.info(
            "retention run",
            extra=fields(
                tenant=tenant,
                backend=storage.backend,
                retention_days=retention_days,
                before=before,
                after=after,
                removed=removed,
                records_removed=received,  # dead letters, events, status rows
                unit=store.expire_unit,
                seconds=round(time.monotonic() - started, 2),
            ),
        )
        return removed
    finally:
        store.close()


async def run(
    storage: StorageConfig,
    tenant: str,
    retention_days: Callable[[], int | None],
    *,
    interval_s: float = INTERVAL_S,
    wake: asyncio.Event | None = None,
) -> None:
    """Forever: a run now, then one every ``interval_s`` or as soon as ``wake`` is set (the plan's retention
    changed). ``retention_days`` is asked at each run. A failed run is logged and tried again next time."""
    while True:
        if wake is not None:
            wake.clear()
        try:
            await asyncio.to_thread(run_once, storage, tenant, retention_days(), int(time.time() * 1000))
        except StorageError as exc:
            log.error("storage upkeep failed; tried again at the next run", extra=fields(tenant=tenant, err=str(exc)))
        except Exception as exc:  # never take the tenant's ingest down with it
            log.exception("storage upkeep failed", extra=fields(tenant=tenant, err=f"{type(exc).__name__}: {exc}"))
        if wake is None:
            await asyncio.sleep(interval_s)
            continue
        try:
            # Not asyncio.wait_for: on Python 3.11 it returns the wake instead of a cancellation arriving in the
            # same moment, and this job would never stop (the bridge's stop waited for ever).
            async with asyncio.timeout(interval_s):
                await wake.wait()
        except TimeoutError:
            pass
