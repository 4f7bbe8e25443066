"""The ingest loop of one tenant connection: window → decode → one transaction → PUBACKs → alerts out.

::

    broker ──PUBLISH──▶ Consumer queue ──window──▶ decode (Router) ──▶ alert evaluation (pure)
                                                                        │
      PUBACK ◀── ack in receive order ◀── COMMIT ◀── one transaction ◀──┘
      gw/{gw}/ack (the seqs now stored), alerts/{gw}/{device}/{rule} (retained),
      webhook outbox ◀── after the commit

The confirmation on ``gw/{gw}/ack`` is what lets a gateway delete a batch
from its buffer (``factory_edge/acks.py``): it names every data batch of
the window that the store now holds, repeats and dead letters included,
since sending those again could not change what is stored.

Whatever arrives while a commit runs is the next window, so under load the
windows grow and the commits stay few; when idle every message is
committed on its own, at once. Storage work runs on the tenant's own
thread, so a slow disk or database never blocks the event loop, and a
failed commit is retried (with backoff) without acknowledging anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from factory_edge.acks import ack_topic, encode_acks
from factory_edge.backoff import Backoff
from factory_edge.errors import StorageError
from factory_edge.logs import fields

from . import metering
from .alerts.engine import AlertEngine, Evaluation
from .alerts.model import Change, OutboxItem
from .alerts.webhooks import WebhookSender
from .consumer import Consumer
from .messages import DataBatch, DeadLetter, Decoded, Received
from .ratelimit import TokenBucket
from .router import Router
from .storage import DataRejected, Store

log = logging.getLogger(__name__)
T = TypeVar("T")
RATE_SLICE_S = 0.5  # an over-rate tenant's wait re-reads its bucket this often
STATS_EVERY_S = 60.0
_DATA_TOPIC = re.compile(r"^gw/([^/]+)/data/[^/]+$")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class IngestStats:
    messages: int = 0
    batches: int = 0
    duplicates: int = 0
    points: int = 0
    dead_letters: int = 0
    alerts: int = 0
    commits: int = 0
    confirmations: int = 0
    delayed_points: int = 0  # stored above the tenant's rate (ratelimit.py)
    delayed_s: float = 0.0  # time the loop waited for the rate

    def snapshot(self) -> dict[str, float]:
        return dict(vars(self))


@dataclass
class Outcome:
    changes: list[tuple[Change, int]] = field(default_factory=list)
    outbox: list[OutboxItem] = field(default_factory=list)
    stored: dict[str, list[int]] = field(default_factory=dict)  # gateway -> seqs now in the store
    replies: list[tuple[str, bytes]] = field(default_factory=list)  # e.g. Sparkplug rebirth requests
    conflicts: set[tuple[str, int]] = field(default_factory=set)  # (gw, seq) stored before for another batch


class Ingest:
    """Task ``ingest[<tenant>]``. ``store_data`` off: only alerts (the alert role with shared subscriptions)."""

    def __init__(
        self,
        *,
        tenant: str,
        store: Store,
        consumer: Consumer,
        router: Router,
        engine: AlertEngine | None,
        store_data: bool,
        max_messages: int,
        webhooks: dict[str, WebhookSender] | None = None,
        bucket: TokenBucket | None = None,
    ) -> None:
        self.tenant = tenant
        self.store = store
        self.consumer = consumer
        self.router = router
        self.engine = engine if engine else None
        self.store_data = store_data
        self.max_messages = max_messages
        self.webhooks = webhooks or {}
        self.bucket = bucket if store_data else None  # the tenant's rate limit; the alert role stores no data
        self.stats = IngestStats()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"store[{tenant}]")
        self._delivered: list[int] = []
        self._last_tick = 0
        self._published_for = 0  # the consumer's connection count when alerts were last republished
        self._stats_at = time.monotonic()
        self._logged = IngestStats()
        self._rate_logged_at = -STATS_EVERY_S
        self._rate_logged_points = 0
        self._rate_logged_s = 0.0

    async def _in_store(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the store's thread; if we are cancelled meanwhile, let it finish first."""
        future = asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    def webhook_done(self, outbox_id: int) -> None:
        """A webhook sender is finished with an outbox item (delivered or given up)."""
        self._delivered.append(outbox_id)

    # ---------------------------------------------------------------- the loop

    async def run(self) -> None:
        try:
            await self._resume()
            tick_s = self.engine.tick_s if self.engine else None
            while True:
                timeout = tick_s if tick_s is not None else (1.0 if self.webhooks else None)
                size = self.bucket.window(self.max_messages) if self.bucket else self.max_messages
                window = await self.consumer.next_window(size, timeout)
                if (
                    self.engine is not None
                    and self.consumer.connects != self._published_for
                    and self.consumer.connected.is_set()
                ):
                    await self._republish()  # before this window's changes, which are newer
                window, outcome = await self._commit(window)
                self.consumer.ack(window)
                self._send(outcome)
                self._log_stats()
                if self.bucket is not None:
                    await self._keep_rate(self.bucket)
        finally:
            self._thread.shutdown(wait=True)
            log.info(
                "ingest stopped",
                extra=fields(
                    tenant=self.tenant,
                    store_data=self.store_data,
                    evaluates_alerts=self.engine is not None,
                    **self.stats.snapshot(),
                ),
            )

    async def _keep_rate(self, bucket: TokenBucket) -> None:
        """Over the tenant's rate: wait before the next window (the broker keeps the rest queued)."""
        delay = bucket.delay_s()
        if delay <= 0:
            return
        if time.monotonic() - self._rate_logged_at >= STATS_EVERY_S:
            self._rate_logged_at = time.monotonic()
            log.warning(
                "tenant over its rate: ingest delayed (nothing is dropped; the broker queues the rest)",
                extra=fields(
                    tenant=self.tenant,
                    points_per_s=bucket.rate,
                    delayed_points=self.stats.delayed_points - self._rate_logged_points,
                    waited_s=round(self.stats.delayed_s - self._rate_logged_s, 1),
                ),
            )
            self._rate_logged_points, self._rate_logged_s = self.stats.delayed_points, self.stats.delayed_s
        # In slices: a plan changed meanwhile (a higher rate, or none) shortens the wait at once.
        while delay > 0:
            step = min(delay, RATE_SLICE_S)
            await asyncio.sleep(step)
            self.stats.delayed_s += step
            delay = bucket.delay_s()

    async def _resume(self) -> None:
        """Alert states, the newest reading of every series and the webhook outbox, from the store."""
        if self.engine is None:
            return
        engine = self.engine

        def load() -> list[OutboxItem]:
            engine.load(self.store.load_alert_states(), self.store.load_alert_series(), now_ms=now_ms())
            return self.store.load_outbox()

        backoff = Backoff(initial_s=0.5, max_s=30.0)
        while True:
            try:
                outbox = await self._in_store(load)
                break
            except StorageError as exc:
                delay = backoff.next_delay()
                log.error(
                    "cannot load the alert states",
                    extra=fields(tenant=self.tenant, err=str(exc), retry_in_s=round(delay, 1)),
                )
                await asyncio.sleep(delay)
        for item in outbox:
            sender = self.webhooks.get(item.webhook)
            if sender is None:
                log.warning(
                    "webhook no longer configured: delivery dropped",
                    extra=fields(tenant=self.tenant, webhook=item.webhook, outbox_id=item.id),
                )
                self._delivered.append(item.id)
            else:
                sender.submit(item)

    async def _commit(self, window: list[Received]) -> tuple[list[Received], Outcome]:
        """Commit the window (retrying while the store fails); returns what was committed."""
        backoff = Backoff(initial_s=0.5, max_s=30.0)
        last_error = None
        while True:
            window = self.consumer.current(window)
            delivered, self._delivered = self._delivered, []
            try:
                return window, await self._in_store(self._process, window, delivered)
            except DataRejected as exc:
                self._delivered[:0] = delivered
                return window, await self._isolate(window, exc)
            except StorageError as exc:
                self._delivered[:0] = delivered
                delay = backoff.next_delay()
                if str(exc) != last_error:
                    log.error(
                        "cannot commit to tenant storage; nothing is acknowledged until it works",
                        extra=fields(
                            tenant=self.tenant, err=str(exc), messages=len(window), retry_in_s=round(delay, 1)
                        ),
                    )
                last_error = str(exc)
                await asyncio.sleep(delay)

    async def _isolate(self, window: list[Received], exc: DataRejected) -> Outcome:
        """The store refused something in the window: commit message by message; the culprit is a dead letter."""
        if len(window) == 1:
            message = window[0]
            log.warning(
                "message refused by the store: dead letter",
                extra=fields(tenant=self.tenant, topic=message.topic, err=str(exc)),
            )
            dead = DeadLetter(message.topic, message.payload, f"refused by the store: {exc}", message.received_at)
            backoff = Backoff(initial_s=0.5, max_s=30.0)
            while True:
                try:
                    return await self._in_store(self._process, [], [], dead)
                except DataRejected as again:
                    log.error(
                        "message refused even as a dead letter: dropped",
                        extra=fields(
                            tenant=self.tenant, topic=message.topic, bytes=len(message.payload), err=str(again)
                        ),
                    )
                    return Outcome()
                except StorageError as failed:
                    log.error("cannot store a dead letter", extra=fields(tenant=self.tenant, err=str(failed)))
                    await asyncio.sleep(backoff.next_delay())
        total = Outcome()
        for message in window:
            _, outcome = await self._commit([message])
            total.changes += outcome.changes
            total.outbox += outcome.outbox
            for gw, seqs in outcome.stored.items():
                total.stored.setdefault(gw, []).extend(seqs)
            total.replies += outcome.replies
        return total

    def _process(
        self, window: Sequence[Received], delivered: Sequence[int], refused: DeadLetter | None = None
    ) -> Outcome:
        """On the store's thread: decode, evaluate, commit, then let the engine move on."""
        decoded = self.router.decode(window) if window else Decoded()
        if refused is not None:
            decoded.dead.append(refused)
        now = now_ms()
        evaluation = self._evaluate(decoded, now)
        changes = evaluation.changes if evaluation else []
        dirty = evaluation.dirty() if evaluation else []
        if not (window or delivered or changes or dirty or decoded.dead):
            return Outcome()
        outcome = Outcome()
        new_batches = new_points = 0
        delayed: dict[str, int] = {}
        with self.store.transaction() as tx:
            if self.store_data:
                batches = tx.claim_batches(decoded.batches)
                new_batches, new_points = len(batches), sum(len(b.rows) for b in batches)
                if new_batches < len(decoded.batches):  # repeats: really the same batch?
                    claimed = {id(b) for b in batches}
                    outcome.conflicts = tx.differing([b for b in decoded.batches if id(b) not in claimed])
                tx.insert_points(batches)
                if batches:
                    delayed = self._delayed(batches, new_points)
                    tx.record_usage(metering.hourly(batches, delayed))
                if decoded.statuses:
                    tx.insert_status(decoded.statuses)
                if decoded.metas:
                    tx.save_meta(decoded.metas)
                if decoded.events:
                    tx.insert_events(decoded.events)
                for table, rows in decoded.mapped.items():
                    tx.insert_mapped(table, rows)
                if decoded.dead:
                    tx.insert_dead_letters(decoded.dead)
                if decoded.batches:
                    tx.upsert_latest(_latest(decoded))
            if changes:
                ids = tx.record_alerts(changes)
                outcome.changes = list(zip(changes, ids))
                queued = [(name, change.payload(i), now) for change, i in outcome.changes for name in change.notify]
                if queued:
                    outbox_ids = tx.queue_webhooks(queued)
                    outcome.outbox = [
                        OutboxItem(o, name, payload, now) for o, (name, payload, _) in zip(outbox_ids, queued)
                    ]
            if dirty:
                tx.save_alert_states(dirty)
            if evaluation is not None and evaluation.series:
                tx.save_alert_series(evaluation.series_rows())
            if delivered:
                tx.delete_outbox(delivered)
        if self.bucket is not None:
            self.bucket.take(*_cost(window, decoded))
        if evaluation is not None and self.engine is not None:
            self.engine.apply(evaluation)
        if self.store_data:
            outcome.stored = _stored(decoded, outcome.conflicts)
            outcome.replies = decoded.replies
            for gw, seq in sorted(outcome.conflicts):
                log.error(
                    "a gateway sent a batch under a seq already stored for another batch: not confirmed "
                    "(did its buffer start again?)",
                    extra=fields(tenant=self.tenant, gw=gw, seq=seq),
                )
        s = self.stats
        s.commits += 1
        s.messages += len(window)
        if self.store_data:
            s.batches += new_batches
            s.duplicates += len(decoded.batches) - new_batches
            s.points += new_points
            s.delayed_points += sum(delayed.values())
            s.dead_letters += len(decoded.dead)
        s.alerts += len(changes)
        return outcome

    def _delayed(self, batches: Sequence[DataBatch], points: int) -> dict[str, int]:
        """Per gateway, the points of these new batches above the tenant's rate (the last ones of the window)."""
        over = self.bucket.over(points) if self.bucket is not None else 0
        if not over:
            return {}
        delayed: dict[str, int] = {}
        within = points - over
        for batch in batches:
            n = len(batch.rows)
            late = n - min(n, max(0, within))
            within -= n
            if late:
                delayed[batch.gw] = delayed.get(batch.gw, 0) + late
        return delayed

    def _evaluate(self, decoded: Decoded, now: int) -> Evaluation | None:
        engine = self.engine
        if engine is None:
            return None
        evaluation = engine.evaluation(now)
        point = evaluation.point
        for batch in decoded.batches:
            at = batch.received_at
            for gw, device, tag, ts, value, quality, _, _ in batch.rows:
                point(gw, device, tag, ts, value, quality, at)
        for status in decoded.statuses:
            evaluation.status(status.gw, status.state, status.received_at)
        if now - self._last_tick >= engine.tick_s * 1000:
            self._last_tick = now
            evaluation.tick()
        return evaluation

    # ---------------------------------------------------------------- after the commit

    def _send(self, outcome: Outcome) -> None:
        for gw, seqs in outcome.stored.items():
            if self.consumer.publish(ack_topic(gw), encode_acks(seqs), retain=False):
                self.stats.confirmations += 1
        for topic, payload in outcome.replies:
            self.consumer.publish(topic, payload, retain=False)
        for change, alert_id in outcome.changes:
            self.consumer.publish(change.topic, change.payload(alert_id), retain=True)
            log.info(
                "alert",
                extra=fields(
                    tenant=self.tenant,
                    rule=change.rule,
                    state=str(change.state),
                    gw=change.gw,
                    device=change.device,
                    tag=change.tag,
                    value=change.value,
                    severity=change.severity,
                ),
            )
        for item in outcome.outbox:
            sender = self.webhooks.get(item.webhook)
            if sender is not None:
                sender.submit(item)

    async def _republish(self) -> None:
        """After each (re)connect: the current state of every alert, retained (a publish may have been lost)."""
        try:
            rows = await self._in_store(self.store.last_alerts)
        except StorageError as exc:
            log.error("cannot read the alert states to republish them", extra=fields(tenant=self.tenant, err=str(exc)))
            return
        self._published_for = self.consumer.connects
        for row in rows:
            doc = {
                "id": row["id"],
                "tenant": self.tenant,
                **{
                    k: row[k]
                    for k in (
                        "rule",
                        "state",
                        "previous",
                        "severity",
                        "gw",
                        "device",
                        "tag",
                        "value",
                        "since",
                        "ts",
                        "condition",
                        "message",
                    )
                },
            }
            self.consumer.publish(
                f"alerts/{row['gw']}/{row['device']}/{row['rule']}",
                json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode(),
                retain=True,
            )

    def _log_stats(self) -> None:
        if time.monotonic() - self._stats_at < STATS_EVERY_S:
            return
        self._stats_at = time.monotonic()
        now, before = self.stats.snapshot(), self._logged.snapshot()
        delta = {k: now[k] - before[k] for k in now}
        self._logged = dataclasses.replace(self.stats)
        if delta["messages"]:
            log.info(
                "ingest",
                extra=fields(
                    tenant=self.tenant,
                    window_s=STATS_EVERY_S,
                    **delta,
                    webhook_backlog=sum(s.backlog for s in self.webhooks.values()),
                ),
            )


def _cost(window: Sequence[Received], decoded: Decoded) -> tuple[int, int]:
    """What a window takes from the tenant's rate: ``(points, messages)``. Every data batch counts its points,
    stored now or a repeat (a replay is decoded and claimed all the same), and every other message (status, meta,
    event, a dead letter) one point: a flood of anything is delayed like data."""
    points = sum(len(b.rows) for b in decoded.batches)
    return points + max(0, len(window) - len(decoded.batches)), len(window)


def _stored(decoded: Decoded, conflicts: Collection[tuple[str, int]] = ()) -> dict[str, list[int]]:
    """Per gateway, the seqs of the window's data batches the store now holds (dead letters included)."""
    stored: dict[str, list[int]] = {}
    for batch in decoded.batches:
        if (
            batch.seq >= 0 and (batch.gw, batch.seq) not in conflicts
        ):  # negative: another Sparkplug implementation's message, keyed by the bridge itself
            stored.setdefault(batch.gw, []).append(batch.seq)
    for dead in decoded.dead:
        match = _DATA_TOPIC.match(dead.topic)
        if match is None:
            continue
        try:
            seq = json.loads(dead.payload).get("seq")
        except (ValueError, AttributeError, RecursionError):
            continue  # not even JSON with a seq: nothing a confirmation could name
        if type(seq) is int and 0 <= seq < 2**63:
            stored.setdefault(match.group(1), []).append(seq)
    return stored


def _latest(decoded: Decoded) -> list[tuple[Any, ...]]:
    """The newest reading of each series in the window."""
    newest: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    for batch in decoded.batches:
        at = batch.received_at
        for gw, device, tag, ts, value, quality, error, _ in batch.rows:
            key = (gw, device, tag)
            row = newest.get(key)
            if row is None or ts > row[3]:
                newest[key] = (gw, device, tag, ts, value, quality, error, at, at if quality != "bad" else None)
    return list(newest.values())
