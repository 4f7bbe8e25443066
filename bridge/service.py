"""The bridge process: every configured tenant, side by side, until stopped.

``async with Bridge(config) as bridge: await bridge.wait_stopped()`` first
checks every tenant's TLS files and opens its store (a tenant that cannot
start is an error at start, not a retry loop), then runs one task per
tenant (``tenant[acme]``). A tenant whose broker is down keeps retrying
without affecting the others.

With ``tenants_from``, the provisioning service's ``tenants.json`` is
watched (task ``tenants[watch]``): a tenant created there is picked up
within seconds, without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import TracebackType

import httpx

from factory_edge.errors import ConfigError, FactoryEdgeError, StorageError
from factory_edge.logs import fields
from factory_edge.names import bridge_identity
from factory_edge.systemd import Notifier
from factory_edge.tasks import cancel_and_wait

from .config import TENANTS_INDEX, BridgeConfig, default_instance, provisioned_tenants
from .tenant import TenantBridge

log = logging.getLogger(__name__)

WATCH_EVERY_S = 2.0


class Bridge:
    def __init__(self, config: BridgeConfig, *, instance: str | None = None) -> None:
        self.config = config
        self.instance = instance or config.instance or default_instance()
        bridge_identity(self.instance)  # InvalidName (one line) for a bad --instance
        own = [t.for_instance(self.instance) for t in config.tenants]  # ConfigError: no identity for the instance
        self.http = httpx.AsyncClient(follow_redirects=False)
        self.tenants = [TenantBridge(config, t, instance=self.instance, http=self.http) for t in own]
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.systemd = Notifier()

    async def __aenter__(self) -> Bridge:
        opened: list[TenantBridge] = []
        try:
            for tenant in self.tenants:
                try:
                    await tenant.open()
                except StorageError as exc:
                    raise StorageError(f"tenant {tenant.name}: {exc}") from exc
                opened.append(tenant)
        except BaseException:
            for tenant in opened:
                await tenant.close()
            await self.http.aclose()
            raise
        log.info(
            "bridge started",
            extra=fields(
                instance=self.instance,
                tenants=",".join(t.name for t in self.tenants),
                storage=self.config.storage.backend,
            ),
        )
        self._task = asyncio.create_task(self._run(), name="bridge")
        self.systemd.ready(f"{len(self.tenants)} tenants, storage {self.config.storage.backend}")
        return self

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for tenant in self.tenants:
                    group.create_task(tenant.run(), name=f"tenant[{tenant.name}]")
                if self.config.tenants_from is not None:
                    group.create_task(
                        self._watch(group, Path(self.config.tenants_from) / TENANTS_INDEX), name="tenants[watch]"
                    )
                if self.systemd.watchdog_interval_s:
                    group.create_task(self._watchdog(self.systemd.watchdog_interval_s), name="watchdog")
        finally:
            self._stopped.set()

    async def _watch(self, group: asyncio.TaskGroup, path: Path) -> None:
        """Start the tenants that appear in the provisioning service's ``tenants.json``."""
        seen = _mtime(path)
        failed: set[str] = set()
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            mtime = _mtime(path)
            if mtime == seen and not failed:
                continue
            seen = mtime
            try:
                listed = provisioned_tenants(path.parent)
            except ConfigError as exc:
                log.warning("cannot read the provisioned tenants; keeping the current ones", extra=fields(err=str(exc)))
                continue
            running = {t.name for t in self.tenants}
            for entry in listed:
                if entry.name in running:
                    continue
                try:
                    tenant = TenantBridge(
                        self.config, entry.for_instance(self.instance), instance=self.instance, http=self.http
                    )
                    await tenant.open()
                except FactoryEdgeError as exc:
                    if entry.name not in failed:
                        log.error("cannot start a new tenant; retrying", extra=fields(tenant=entry.name, err=str(exc)))
                    failed.add(entry.name)
                    continue
                failed.discard(entry.name)
                self.tenants.append(tenant)
                log.info("tenant added", extra=fields(tenant=entry.name, source=str(path)))
                group.create_task(tenant.run(), name=f"tenant[{tenant.name}]")
            gone = running - {t.name for t in listed} - {t.name for t in self.config.tenants}
            for name in sorted(gone):
                log.warning(
                    "tenant no longer provisioned; it keeps running until the bridge restarts",
                    extra=fields(tenant=name),
                )

    async def _watchdog(self, interval_s: float) -> None:
        """Feed systemd's watchdog from the event loop: a hung loop stops feeding it."""
        while True:
            self.systemd.watchdog()
            await asyncio.sleep(interval_s)

    def stop(self) -> None:
        self.systemd.stopping()
        if self._task is not None:
            self._task.cancel()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.result()  # a tenant task failed: raise it

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await cancel_and_wait(self._task)
        for tenant in self.tenants:
            await tenant.close()
        await self.http.aclose()
        log.info("bridge stopped", extra=fields(instance=self.instance))


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns / 1e9
    except OSError:
        return None
