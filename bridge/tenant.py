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

from .alerts.engine import AlertEngine
from .alerts.leader import alert_lock
from .alerts.webhooks import WebhookSender
from .config import BridgeConfig, TenantConfig, client_id
from .consumer import Consumer
from .ingest import Ingest
from .router import Router, ingest_builtins, plan
from .storage import Store, make_store

log = logging.getLogger(__name__)

LOCK_RETRY_S = 2.0
LOCK_CHECK_S = 5.0


class AlertLockLost(Exception):
    pass


class TenantBridge:
    def __init__(self, config: BridgeConfig, tenant: TenantConfig, *, instance: str, http: httpx.AsyncClient) -> None:
        self.config = config
        self.tenant = tenant
        self.name = tenant.name
        self.instance = instance
        self.http = http
        self.alerts = config.tenant_alerts(tenant)
        self.store: Store = make_store(config.storage, tenant.name)
        self.ingests: list[Ingest] = []
        self.consumers: list[Consumer] = []
        self.alert_role_active = False

    @property
    def settings(self) -> BrokerSettings:
        t = self.tenant
        return BrokerSettings.from_url(
            t.url,
            connect_host=t.connect_host,
            ca_file=t.ca_file,
            cert_file=t.cert_file,
            key_file=t.key_file,
            username=t.username,
            password=t.password,
            keepalive_s=t.keepalive,
            origin=f"tenants[{self.name}].",
        )

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
        return bool(self.tenant.shared_group and self.alerts.rules)

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
        settings = self.alerts_settings if client == client_id(self.instance, role="alerts") else self.settings
        consumer = Consumer(
            tenant=self.name,
            settings=settings,
            client_id=client,
            subscriptions=topics,
            receive_maximum=ingest.window,
            session_expiry_s=ingest.session_expiry,
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

    async def _alert_role(self) -> None:
        """Wait for the tenant's alert lock; then evaluate alerts until it is lost (or we stop)."""
        lock = alert_lock(self.config.storage, self.name)
        while True:
            while not await asyncio.to_thread(lock.acquire):
                await asyncio.sleep(LOCK_RETRY_S)
            log.info("this process evaluates the tenant's alerts", extra=fields(tenant=self.name))
            self.alert_role_active = True
            store = make_store(self.config.storage, self.name)
            try:
                try:
                    await asyncio.to_thread(store.open, ())
                except StorageError as exc:
                    log.error("cannot open the tenant's store for alerts", extra=fields(tenant=self.name, err=str(exc)))
                    await asyncio.sleep(LOCK_RETRY_S)
                    continue
                subscriptions = plan((), builtins=("data", "status", "sparkplug"))
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
