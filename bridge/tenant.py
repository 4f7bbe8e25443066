"""One tenant in the bridge: its store, broker connection(s), ingest loop(s), alert engine and webhooks.

Alone (no ``shared_group``), one connection feeds one ingest loop that
stores the data and evaluates the alerts in the same transaction.

With ``shared_group``, the data arrives through ``$share/<group>/…`` and
each process stores its share; the alerts need every reading, so they are
evaluated by one process only, the holder of the tenant's alert lock, on
its own subscription (not shared) that stores only alert state. That
session has an identity of its own (``alerts_cert_file``: CN
``bridge-alerts``), since the broker binds the client id to the
certificate and the process's own ingest session already uses its
``bridge.<instance>`` identity. See ``alerts/leader.py``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx

from factory_edge.errors import ConfigError, StorageError
from factory_edge.logs import fields
from factory_edge.mqtt import BrokerSettings, tls_context
from factory_edge.sparkplug.topics import state_topic
from factory_edge.tasks import cancel_and_wait

from . import retention
from .alerts.engine import AlertEngine
from .alerts.leader import alert_lock
from .alerts.webhooks import WebhookSender
from .config import BridgeConfig, TenantConfig, TenantLimits, client_id
from .consumer import Consumer
from .ingest import Ingest
from .ratelimit import TokenBucket
from .router import Router, ingest_builtins, plan
from .storage import Store, make_store

log = logging.getLogger(__name__)

LOCK_RETRY_S = 2.0
LOCK_CHECK_S = 5.0


class AlertLockLost(Exception):
    pass


def broker_settings(t: TenantConfig) -> BrokerSettings:
    """How an instance reaches the tenant's broker (``t`` as ``for_instance`` gives it: with its own certificate)."""
    return BrokerSettings.from_url(
        t.url,
        connect_host=t.connect_host,
        ca_file=t.ca_file,
        cert_file=t.cert_file,
        key_file=t.key_file,
        username=t.username,
        password=t.password,
        keepalive_s=t.keepalive,
        origin=f"tenants[{t.name}].",
    )


class TenantBridge:
    def __init__(self, config: BridgeConfig, tenant: TenantConfig, *, instance: str, http: httpx.AsyncClient) -> None:
        self.config = config
        self.tenant = tenant
        self.name = tenant.name
        self.instance = instance
        self.http = http
        self.alerts = config.tenant_alerts(tenant)
        self.store: Store = make_store(config.tenant_storage(tenant), tenant.name)
        self.ingests: list[Ingest] = []
        self.consumers: list[Consumer] = []
        self.alert_role_active = False
        self.bucket = TokenBucket(tenant.limits.points_per_s)  # the plan's rate, for this process's ingest
        self.upkeep_now = asyncio.Event()  # set: the retention job runs again at once (the plan's retention changed)

    def set_limits(self, limits: TenantLimits) -> None:
        """The plan changed (``tenants.json`` rewritten): the new rate from the next window, the new retention at
        once (the retention job runs again with it)."""
        if limits.points_per_s != self.bucket.rate:
            log.info(
                "tenant rate limit changed",
                extra=fields(tenant=self.name, points_per_s=limits.points_per_s, before=self.bucket.rate),
            )
            self.bucket.rate = limits.points_per_s
        before = self.config.tenant_retention(self.tenant)
        self.tenant = self.tenant.model_copy(update={"limits": limits})
        if self.config.tenant_retention(self.tenant) != before:
            log.info(
                "tenant retention changed; storage upkeep runs now",
                extra=fields(tenant=self.name, retention_days=self.config.tenant_retention(self.tenant), before=before),
            )
            self.upkeep_now.set()

    @property
    def settings(self) -> BrokerSettings:
        return broker_settings(self.tenant)

    @property
    def alerts_settings(self) -> BrokerSettings:
        """The alert role's session: its own certificate when there is one (the broker binds client ids to them)."""
        t = self.tenant
        if t.alerts_cert_file is None:
            return self.settings
        return BrokerSettings.from_url(
            t.url,
            connect_host=t.connect_host,
            ca_file=t.ca_file,
            cert_file=t.alerts_cert_file,
            key_file=t.alerts_key_file,
            keepalive_s=t.keepalive,
            origin=f"tenants[{self.name}].alerts_",
        )

    @property
    def runs_alert_role(self) -> bool:
        """One process of a shared group holds the tenant's single role: the alerts, and the Sparkplug STATE.

        Without alert rules it still publishes STATE (edge nodes that name the bridge as their primary
        host wait for it), subscribing to nothing, when the tenant gives it the identity to do so.
        """
        return bool(self.tenant.shared_group and (self.alerts.rules or self.tenant.alerts_cert_file))

    async def open(self) -> None:
        """Check the TLS files and open (create, migrate) the tenant's store: an error now, not a retry loop."""
        for key in ("ca_file", "cert_file", "key_file", "alerts_cert_file", "alerts_key_file"):
            path = getattr(self.tenant, key)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"tenants[{self.name}].{key}: {path}: no such file")
        if self.runs_alert_role and self.tenant.cert_file is not None and self.tenant.alerts_cert_file is None:
            raise ConfigError(
                f"tenants[{self.name}]: alerts_cert_file: required with shared_group and alert rules: "
                "the alert session needs a certificate of its own (CN bridge-alerts; provisioning "
                "issues it), as the broker gives each certificate one session"
            )
        if self.settings.tls:
            tls_context(self.settings)  # a file of the wrong kind: "tenants[acme].ca_file: …: not a PEM certificate"
        await asyncio.to_thread(self.store.open, self.config.mappings)

    async def close(self) -> None:
        await asyncio.to_thread(self.store.close)

    def _engine(self) -> AlertEngine | None:
        if not self.alerts.rules:
            return None
        return AlertEngine(
            self.name,
            self.alerts.rules,
            max_series_per_gateway=self.alerts.max_series_per_gateway,
            forget_resolved_ms=int(self.alerts.forget_resolved * 1000),
        )

    def _consumer(self, *, client: str, topics: list[tuple[str, int]], state: bool = False) -> Consumer:
        ingest = self.config.ingest
        alerts = client == client_id(self.instance, role="alerts")
        settings = self.alerts_settings if alerts else self.settings
        # Mosquitto hands a shared group's messages round-robin to every member session, connected or not:
        # a member whose host died keeps receiving its share until its session expires (docs/bridge.md).
        shared = bool(self.tenant.shared_group) and not alerts
        consumer = Consumer(
            tenant=self.name,
            settings=settings,
            client_id=client,
            subscriptions=topics,
            receive_maximum=ingest.window,
            session_expiry_s=ingest.shared_session_expiry if shared else ingest.session_expiry,
            sparkplug_state=state_topic(self.config.sparkplug.host_id) if state else None,
        )
        self.consumers.append(consumer)
        return consumer

    def _ingest(
        self, *, store: Store, consumer: Consumer, router: Router, engine: AlertEngine | None, store_data: bool
    ) -> tuple[Ingest, list[WebhookSender]]:
        ingest = Ingest(
            tenant=self.name,
            store=store,
            consumer=consumer,
            router=router,
            engine=engine,
            store_data=store_data,
            max_messages=self.config.ingest.max_messages,
            bucket=self.bucket,
        )
        senders = []
        if engine is not None:
            for name, hook in self.alerts.webhooks.items():
                sender = WebhookSender(
                    tenant=self.name, name=name, config=hook, client=self.http, on_done=ingest.webhook_done
                )
                ingest.webhooks[name] = sender
                senders.append(sender)
        self.ingests.append(ingest)
        return ingest, senders

    async def run(self) -> None:
        group_name = self.tenant.shared_group
        subscriptions = plan(self.config.mappings, builtins=ingest_builtins(group_name))
        topics = [(s.topic(group_name), s.id) for s in subscriptions]
        # One Sparkplug host per tenant publishes STATE: this process when alone; with a shared group, the
        # holder of the alert role (a singleton), see _alert_role.
        consumer = self._consumer(client=client_id(self.instance), topics=topics, state=not group_name)
        engine = None if group_name else self._engine()
        ingest, senders = self._ingest(
            store=self.store, consumer=consumer, router=Router(subscriptions), engine=engine, store_data=True
        )
        async with asyncio.TaskGroup() as group:
            group.create_task(consumer.run(), name=f"mqtt[{self.name}]")
            group.create_task(ingest.run(), name=f"ingest[{self.name}]")
            for sender in senders:
                group.create_task(sender.run(), name=f"webhook[{self.name}/{sender.name}]")
            if self.runs_alert_role:
                group.create_task(self._alert_role(), name=f"alerts[{self.name}]")
            group.create_task(
                retention.run(
                    self.config.tenant_storage(self.tenant),
                    self.name,
                    lambda: self.config.tenant_retention(self.tenant),  # the plan as it is at each run
                    wake=self.upkeep_now,
                ),
                name=f"retention[{self.name}]",
            )

    async def _alert_role(self) -> None:
        """Wait for the tenant's alert lock; then evaluate alerts until it is lost (or we stop)."""
        lock = alert_lock(self.config.tenant_storage(self.tenant), self.name)
        while True:
            while not await asyncio.to_thread(lock.acquire):
                await asyncio.sleep(LOCK_RETRY_S)
            if self.alerts.rules:
                log.info("this process evaluates the tenant's alerts", extra=fields(tenant=self.name))
            else:
                log.info("this process publishes the tenant's Sparkplug STATE", extra=fields(tenant=self.name))
            self.alert_role_active = True
            store = make_store(self.config.tenant_storage(self.tenant), self.name)
            try:
                try:
                    await asyncio.to_thread(store.open, ())
                except StorageError as exc:
                    log.error("cannot open the tenant's store for alerts", extra=fields(tenant=self.name, err=str(exc)))
                    await asyncio.sleep(LOCK_RETRY_S)
                    continue
                subscriptions = plan((), builtins=("data", "status", "sparkplug")) if self.alerts.rules else []
                consumer = self._consumer(
                    client=client_id(self.instance, role="alerts"),
                    topics=[(s.filter, s.id) for s in subscriptions],
                    state=True,
                )
                ingest, senders = self._ingest(
                    store=store,
                    consumer=consumer,
                    router=Router(subscriptions),
                    engine=self._engine(),
                    store_data=False,
                )
                tasks = [
                    asyncio.create_task(consumer.run(), name=f"mqtt[{self.name}/alerts]"),
                    asyncio.create_task(ingest.run(), name=f"ingest[{self.name}/alerts]"),
                    *(asyncio.create_task(s.run(), name=f"webhook[{self.name}/{s.name}]") for s in senders),
                ]
                try:
                    while await asyncio.to_thread(lock.alive):
                        done = [t for t in tasks if t.done()]
                        if done:
                            await done[0]  # a failed task: raise its error
                        await asyncio.sleep(LOCK_CHECK_S)
                    log.error(
                        "lost the tenant's alert lock; another process takes over", extra=fields(tenant=self.name)
                    )
                finally:
                    for task in reversed(tasks):
                        await cancel_and_wait(task)
            finally:
                self.alert_role_active = False
                await asyncio.to_thread(store.close)
                await asyncio.to_thread(lock.release)
