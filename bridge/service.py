"""The bridge process: every configured tenant, side by side, until stopped; tenants follow ``tenants.json``.

``async with Bridge(config) as bridge: await bridge.wait_stopped()`` first
checks every tenant's TLS files and opens its store (a tenant that cannot
start is an error at start, not a retry loop), then runs one task per
tenant (``tenant[acme]``). A tenant whose broker is down keeps retrying
without affecting the others.

With ``tenants_from``, the provisioning service's ``tenants.json`` is
followed while the bridge runs (task ``tenants[watch]``: its modification
time every 2 s, its content's hash when that moved, and at once on
``reload()``, which ``bridge run`` calls on SIGHUP):

- a tenant added is opened and started;
- a tenant removed is stopped: its session closed cleanly (the broker keeps
  it), its store closed;
- a tenant whose plan limits changed gets them in place (the rate from its
  next commit window);
- a tenant whose entry changed otherwise (broker, certificates, storage) is
  stopped and started again with the new entry; one whose ``storage``
  changed with ``storage_previous`` set is moved first (``storage/move.py``).

The other tenants are not touched. A file that cannot be read or is not
valid is logged in one line and the running tenants are kept as they are.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

from factory_edge.backoff import Backoff
from factory_edge.errors import ConfigError, FactoryEdgeError, StorageError
from factory_edge.logs import fields
from factory_edge.names import bridge_identity
from factory_edge.systemd import Notifier
from factory_edge.tasks import cancel_and_wait

from .config import TENANTS_INDEX, BridgeConfig, TenantConfig, default_instance, parse_tenants
from .storage.move import move_tenant
from .tenant import TenantBridge

log = logging.getLogger(__name__)

WATCH_EVERY_S = 2.0


@dataclass
class _Running:
    entry: TenantConfig  # as listed (before for_instance), to compare with the next reading of tenants.json
    tenant: TenantBridge | None  # None while its storage moves
    task: asyncio.Task[None] | None = None


class Bridge:
    def __init__(self, config: BridgeConfig, *, instance: str | None = None) -> None:
        self.config = config
        self.instance = instance or config.instance or default_instance()
        bridge_identity(self.instance)  # InvalidName (one line) for a bad --instance
        self.http = httpx.AsyncClient(follow_redirects=False)
        self._running: dict[str, _Running] = {}
        for entry in config.tenants:
            own = entry.for_instance(self.instance)  # ConfigError: no identity for the instance
            moving = entry.storage_previous is not None
            tenant = None if moving else TenantBridge(config, own, instance=self.instance, http=self.http)
            self._running[entry.name] = _Running(entry, tenant)
        self._listed = config.listed_names
        self._stopped = asyncio.Event()
        self._reload = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self.systemd = Notifier()

    @property
    def tenants(self) -> list[TenantBridge]:
        """The tenants running now (not those paused for a storage move)."""
        return [r.tenant for r in self._running.values() if r.tenant is not None]

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
                tenants=",".join(self._running),
                storage=self.config.storage.backend,
            ),
        )
        if not self._running:
            log.warning(
                "no tenant yet: waiting for the provisioning service to list one",
                extra=fields(source=str(Path(self.config.tenants_from or "") / TENANTS_INDEX)),
            )
        self._task = asyncio.create_task(self._run(), name="bridge")
        self.systemd.ready(f"{len(self._running)} tenants, storage {self.config.storage.backend}")
        return self

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for name, running in self._running.items():
                    if running.tenant is not None:
                        running.task = group.create_task(running.tenant.run(), name=f"tenant[{name}]")
                    else:
                        running.task = group.create_task(self._move(running.entry, None), name=f"tenant[{name}]")
                if self.config.tenants_from is not None:
                    group.create_task(
                        self._watch(Path(self.config.tenants_from) / TENANTS_INDEX), name="tenants[watch]"
                    )
                if self.systemd.watchdog_interval_s:
                    group.create_task(self._watchdog(self.systemd.watchdog_interval_s), name="watchdog")
        finally:
            self._stopped.set()

    def reload(self) -> None:
        """Read ``tenants.json`` again now (SIGHUP), whether or not it looks changed."""
        self._reload.set()

    # ---------------------------------------------------------------- following tenants.json

    async def _watch(self, path: Path) -> None:
        """Apply what ``tenants.json`` says whenever it changes (or on ``reload()``); retry tenants that failed."""
        # Read once at the first tick whatever the file looks like: it may have changed between the config's
        # load and this task's start (entries that did not change are left alone).
        seen: tuple[float, int] | None = None
        applied: str | None = None
        failed: set[str] = set()
        while True:
            try:
                async with asyncio.timeout(WATCH_EVERY_S):
                    await self._reload.wait()
            except TimeoutError:
                pass
            forced = self._reload.is_set()
            self._reload.clear()
            stamp = _stamp(path)
            if stamp == seen and not failed and not forced:
                continue
            seen = stamp
            try:
                text = path.read_bytes()
            except OSError as exc:
                log.warning(
                    "cannot read the provisioned tenants; keeping the running ones",
                    extra=fields(source=str(path), err=str(exc)),
                )
                continue
            digest = hashlib.sha256(text).hexdigest()
            if digest == applied and not failed and not forced:
                continue
            try:
                listed = [self.config.from_provisioning(t) for t in parse_tenants(text, path)]
            except ConfigError as exc:
                log.warning(
                    "bad provisioned tenants file; keeping the running tenants",
                    extra=fields(source=str(path), err=str(exc).replace("\n", "; ")),
                )
                applied = digest
                continue
            applied = digest
            failed = await self._apply(listed, path)

    async def _apply(self, provisioned: list[TenantConfig], source: Path) -> set[str]:
        """Start, stop, restart or move tenants so that the running set is the wanted one; returns the failed."""
        wanted = {t.name: t for t in self.config.tenants if t.name in self._listed}
        for entry in provisioned:
            wanted.setdefault(entry.name, entry)
        failed: set[str] = set()
        for name in sorted(set(self._running) - set(wanted)):
            await self._stop(name)
            log.info("tenant removed", extra=fields(tenant=name, source=str(source)))
        for name, entry in wanted.items():
            running = self._running.get(name)
            if running is not None and running.entry == entry:
                continue
            try:
                own = entry.for_instance(self.instance)
            except ConfigError as exc:
                failed.add(name)
                log.error("cannot start a tenant; retrying", extra=fields(tenant=name, err=str(exc)))
                continue
            if running is None:
                if entry.storage_previous is not None:
                    self._spawn(entry, None, self._move(entry, None))
                    continue
                if not await self._start(entry, own):
                    failed.add(name)
                else:
                    log.info("tenant added", extra=fields(tenant=name, source=str(source)))
                continue
            changed = _changed(running.entry, entry)
            if changed == ["limits"] and running.tenant is not None:  # a plan change: applied in place
                running.tenant.set_limits(entry.limits)
                running.entry = entry
                continue
            if "storage" in changed and entry.storage_previous is not None:
                paused = time.monotonic()
                await self._stop(name)
                log.info(
                    "tenant paused for a storage move; its broker session keeps queuing",
                    extra=fields(tenant=name, changed=",".join(changed)),
                )
                self._spawn(entry, None, self._move(entry, paused))
                continue
            if "storage" in changed:
                log.warning(
                    "tenant's storage changed without storage_previous: it starts afresh there, its data stays "
                    "where it was (provisioning tenant move copies it)",
                    extra=fields(tenant=name),
                )
            await self._stop(name)
            if await self._start(entry, own):
                log.info("tenant restarted with its new entry", extra=fields(tenant=name, changed=",".join(changed)))
            else:
                failed.add(name)
        return failed

    async def _start(self, entry: TenantConfig, own: TenantConfig) -> bool:
        tenant = TenantBridge(self.config, own, instance=self.instance, http=self.http)
        try:
            await tenant.open()
        except FactoryEdgeError as exc:
            log.error("cannot start a tenant; retrying", extra=fields(tenant=entry.name, err=str(exc)))
            return False
        self._spawn(entry, tenant, tenant.run())
        return True

    def _spawn(self, entry: TenantConfig, tenant: TenantBridge | None, work: object) -> None:
        assert self._group is not None
        running = _Running(entry, tenant)
        running.task = self._group.create_task(work, name=f"tenant[{entry.name}]")  # type: ignore[arg-type]
        self._running[entry.name] = running

    async def _stop(self, name: str) -> None:
        running = self._running.pop(name, None)
        if running is None:
            return
        await cancel_and_wait(running.task)
        if running.tenant is not None:
            await running.tenant.close()

    # ---------------------------------------------------------------- storage moves

    async def _move(self, entry: TenantConfig, paused: float | None) -> None:
        """Task ``tenant[<name>]`` of a tenant whose storage moves: the copy (once, by one instance), then ingest."""
        assert entry.storage is not None and entry.storage_previous is not None
        started = paused if paused is not None else time.monotonic()
        backoff = Backoff(initial_s=1.0, max_s=30.0)
        while True:
            try:
                report = await asyncio.to_thread(
                    move_tenant,
                    entry.name,
                    entry.storage_previous,
                    entry.storage,
                    self.config.mappings,
                    instance=self.instance,
                )
                break
            except StorageError as exc:
                delay = backoff.next_delay()
                log.error(
                    "cannot move the tenant's storage; its ingest stays paused",
                    extra=fields(tenant=entry.name, err=str(exc), retry_in_s=round(delay, 1)),
                )
                await asyncio.sleep(delay)
        tenant = TenantBridge(self.config, entry.for_instance(self.instance), instance=self.instance, http=self.http)
        while True:
            try:
                await tenant.open()
                break
            except FactoryEdgeError as exc:
                delay = backoff.next_delay()
                log.error(
                    "cannot open the tenant's new storage; its ingest stays paused",
                    extra=fields(tenant=entry.name, err=str(exc), retry_in_s=round(delay, 1)),
                )
                await asyncio.sleep(delay)
        running = self._running.get(entry.name)
        if running is not None:
            running.tenant = tenant
        if report.copied or paused is not None:
            log.info(
                "tenant storage moved; ingest resumed",
                extra=fields(
                    tenant=entry.name,
                    source=report.source,
                    target=report.target,
                    copied_here=report.copied,
                    rows=report.total_rows,
                    tables=len(report.rows),
                    copy_s=round(report.copy_s, 2),
                    waited_s=round(report.waited_s, 2),
                    paused_s=round(time.monotonic() - started, 2),
                ),
            )
        await tenant.run()

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


def _changed(before: TenantConfig, after: TenantConfig) -> list[str]:
    old, new = before.model_dump(), after.model_dump()
    return sorted(k for k in new if old.get(k) != new[k])


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns / 1e9, st.st_size
