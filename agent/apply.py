"""Applying a pushed configuration: the ``cmd/config`` command, the switch, the watch and the rollback.

    cmd/config ─▶ parse_push (check-config's checks) ─▶ rejected: reply with every reason
                       │ ok: reply "applying"
                       ▼
    task config[v<N>]: candidate.json ─▶ swap devices (and broker) ─▶ watch ≤ deadline
                       ├─ broker reached, devices that read fine read again ─▶ running.json, "applied"
                       └─ broker unreachable / too many such devices failing ─▶ swap back, "rolled_back"

Every state goes out three ways: the retained status (``config`` and
``config_version``), an event on ``gw/<gw>/events`` (buffered like data,
so a rollback that happened while the broker was unreachable is still
told), and the log. ``remote.py`` has the files and why they are safe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from drivers.base import DeviceState
from drivers.points import now_ms
from factory_edge.errors import ConfigError, FactoryEdgeError
from factory_edge.logs import fields
from factory_edge.mqtt import BrokerSettings, tls_context
from factory_edge.units import format_duration

from .identity import resolve
from .publisher import ConnectionState
from .remote import ConfigStore, Outcome, Push, Running, parse_push

if TYPE_CHECKING:
    from .runtime import Agent

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.1
MAX_NAMED = 10  # failing devices (or refusals) named in the status's reason


def same_broker(a: BrokerSettings, b: BrokerSettings) -> bool:
    """The same connection, whichever file named it (``origin`` only words errors)."""
    return dataclasses.replace(a, origin="") == dataclasses.replace(b, origin="")


class Applier:
    """The pushed-configuration half of one agent."""

    def __init__(self, agent: Agent, store: ConfigStore, outcome: Outcome | None) -> None:
        self.agent = agent
        self.store = store
        self.outcome = outcome
        self.task: asyncio.Task[None] | None = None
        self._checking = False
        self._pending: Any = None  # the version under check

    @property
    def busy(self) -> bool:
        """A pushed configuration is being applied (switched, or under watch)."""
        return self._checking or (self.task is not None and not self.task.done())

    async def command(self, payload: Any) -> dict[str, Any]:
        """``cmd/config``: check it now, apply it in the background, answer at once.

        The check runs in a thread: validating 100,000 tags takes seconds on a small box, and the polls
        go on meanwhile."""
        agent = self.agent
        version = payload.get("version") if isinstance(payload, dict) else None
        if not agent.config.remote_config.enabled:
            return await self._rejected(
                version, None, ["remote configuration is off here (remote_config.enabled: false)"]
            )
        if self.busy or agent.reloading:
            busy = self.outcome.version if self.outcome and self.outcome.state == "applying" else self._pending
            reason = (
                f"version {busy} is being applied; push again when it is done"
                if self.busy
                else "the local configuration is being reloaded; push again when it is done"
            )
            # Answered, not recorded: the status keeps telling how the push under way goes.
            return {"ok": False, "state": "rejected", "version": version, "error": reason, "reasons": [reason]}
        self._checking = True  # one push at a time, from its check on
        self._pending = version
        try:
            push, broker = await asyncio.to_thread(self._check, payload)
        except ConfigError as exc:
            return await self._rejected(version, None, str(exc).splitlines())
        except Exception as exc:  # a check that breaks must refuse the push, never take the agent down
            log.error("checking a pushed configuration failed", exc_info=True, extra=fields(version=version))
            return await self._rejected(version, None, [f"cannot check this configuration: {exc!r}"])
        finally:
            self._checking = False
        running = agent.running
        if running.source == "pushed" and running.version is not None:
            if push.version == running.version and push.hash == running.hash:
                return {"ok": True, "state": "applied", "version": push.version, "hash": push.hash, "unchanged": True}
            if push.version <= running.version:
                return await self._rejected(
                    push.version,
                    push.hash,
                    [f"version {push.version} is not newer than the running version {running.version}"],
                )
        await self._report(Outcome("applying", push.version, push.hash, ts=now_ms()))
        group = agent.task_group
        self.task = group.create_task(self._apply(push, broker), name=f"config[v{push.version}]")
        return {"ok": True, "state": "applying", "version": push.version, "hash": push.hash}

    def _check(self, payload: Any) -> tuple[Push, BrokerSettings]:
        push = parse_push(payload, self.agent.config, self.agent.gateway)
        return push, self._broker(push)

    def _broker(self, push: Push) -> BrokerSettings:
        agent = self.agent
        base = agent.config_path.resolve().parent if agent.config_path else None
        source = f"config version {push.version}"
        gateway, broker = resolve(push.config, agent.state_dir, base_dir=base, source=source)
        if gateway != agent.gateway:
            raise ConfigError(f"{source}: gateway: {gateway!r} is not this gateway ({agent.gateway!r})")
        if broker.tls:
            tls_context(broker)  # a missing or wrong TLS file is a reason to refuse, not a retry loop
        return broker

    async def _rejected(self, version: Any, hash_: str | None, reasons: list[str]) -> dict[str, Any]:
        number = version if isinstance(version, int) and not isinstance(version, bool) else None
        summary = "; ".join(reasons[:MAX_NAMED])  # the status keeps the first ones, the reply has them all
        if len(reasons) > MAX_NAMED:
            summary += f"; and {len(reasons) - MAX_NAMED} more"
        await self._report(Outcome("rejected", number, hash_, summary, now_ms()))
        return {"ok": False, "state": "rejected", "version": number, "error": "; ".join(reasons), "reasons": reasons}

    async def _report(self, outcome: Outcome) -> None:
        agent = self.agent
        self.outcome = outcome
        if outcome.state != "applying":
            await asyncio.to_thread(self.store.record, outcome)  # fsynced: off the event loop
        agent.event("config", state=outcome.state, version=outcome.version, hash=outcome.hash, reason=outcome.reason)
        agent.publisher.publish_status()
        level = logging.WARNING if outcome.state in ("rejected", "rolled_back") else logging.INFO
        log.log(
            level,
            f"configuration {outcome.state.replace('_', ' ')}",
            extra=fields(version=outcome.version, config_hash=outcome.hash, reason=outcome.reason),
        )

    async def _apply(self, push: Push, broker: BrokerSettings) -> None:
        agent = self.agent
        before = (agent.config, agent.broker, agent.running)
        rc = agent.config.remote_config  # the running configuration's rules judge the new one
        local_hash = agent.local_hash
        try:
            await asyncio.to_thread(self.store.begin, push, local_hash)
        except OSError as exc:  # a full or read-only disk: nothing was switched
            await self._report(
                Outcome("rejected", push.version, push.hash, f"cannot write the candidate: {exc}", now_ms())
            )
            return
        healthy = sorted(name for name, driver in agent.drivers.items() if driver.state is DeviceState.UP)
        switched_at = time.time()
        running = Running(source="pushed", hash=push.hash, version=push.version, yaml=push.yaml)
        changed = not same_broker(broker, before[1])
        try:
            await agent.swap(push.config, broker if changed else before[1], running)
            since_ms = now_ms()  # after the old polls stopped: a reading the old configuration took does not count
            reason = await self._watch(healthy, broker if changed else None, switched_at, since_ms, rc)
            if agent.stopping:
                reason = f"the agent stopped while applying version {push.version}"
            if reason is None:
                await asyncio.to_thread(self.store.commit, push, local_hash)
                await self._report(Outcome("applied", push.version, push.hash, ts=now_ms()))
                return
        except (FactoryEdgeError, OSError) as exc:
            # A driver that cannot start, a disk that refuses the commit: back to what ran, never half of each.
            log.error("applying a configuration failed", exc_info=True, extra=fields(version=push.version))
            reason = f"applying failed: {exc}"
        await agent.swap(*before)
        try:
            await asyncio.to_thread(self.store.abort)
        except OSError as exc:  # at the next start the candidate is recognised and discarded all the same
            log.warning("cannot remove the candidate", extra=fields(err=str(exc)))
        await self._report(Outcome("rolled_back", push.version, push.hash, reason, now_ms()))

    async def _watch(
        self, healthy: list[str], new_broker: BrokerSettings | None, switched_at: float, since_ms: int, rc: Any
    ) -> str | None:
        """None when the new configuration holds; else why it is rolled back."""
        agent = self.agent
        loop = asyncio.get_running_loop()
        end = loop.time() + rc.deadline
        sent_before = agent.publisher.stats.batches
        while True:
            publisher = agent.publisher
            stats = publisher.stats
            connected = publisher.state is ConnectionState.CONNECTED
            reached = connected and (stats.connected_since or 0) >= switched_at
            # Connected is not delivered: a broker without the tenant's bridge (staging, another site) accepts
            # everything and stores nothing, and the cloud could never push to this gateway again. With storage
            # confirmations, the new broker counts once the tenant's storage confirmed something through it.
            stored = not publisher.policy.storage or (stats.last_confirmed or 0) >= (stats.connected_since or 0)
            broker_ok = new_broker is None or (reached and stored)
            watched = [name for name in healthy if name in agent.drivers]
            # Every device that read fine is gone (removed or renamed): the new ones must read instead,
            # or a push replacing them all by devices that cannot be read would be applied unwatched.
            replaced = bool(healthy) and not watched
            if replaced:
                watched = sorted(agent.drivers)
            failing = [n for n in watched if (agent.device_stats[n].last_good_ms or 0) < since_ms]
            if broker_ok and not failing:
                return None
            if loop.time() >= end or agent.stopping:
                break
            await asyncio.sleep(WATCH_INTERVAL_S)
        deadline = format_duration(rc.deadline)
        if not broker_ok and reached and publisher.stats.batches == sent_before:
            broker_ok = True  # nothing was sent there to be confirmed (no readings): the connection is all to go by
        if not broker_ok:
            assert new_broker is not None
            if reached:
                return (
                    f"connected to {new_broker.describe()}, but the tenant's storage confirmed nothing sent "
                    f"there within {deadline}"
                    " (no bridge of this tenant behind that broker?)"
                )
            return (
                f"cannot reach the broker {new_broker.describe()} within {deadline}: "
                f"{publisher.last_error or 'not connected'}"
            )
        if watched and len(failing) > rc.max_failed_share * len(watched):
            details = "; ".join(
                f"{name}: {agent.drivers[name].last_error or agent.device_stats[name].last_error or 'no good reading'}"
                for name in failing[:MAX_NAMED]
            )
            if len(failing) > MAX_NAMED:  # the reason rides in the retained status, which stays small
                details += f"; and {len(failing) - MAX_NAMED} more"
            counted = f"{len(failing)} of {len(watched)}"
            what = f"{counted} devices that read fine before"
            if replaced:
                gone = ", ".join(healthy[:MAX_NAMED]) + (", …" if len(healthy) > MAX_NAMED else "")
                what = f"none of the devices that read fine before is left ({gone}), and {counted} new devices"
            return (
                f"{what} fail after {deadline} "
                f"(more than remote_config.max_failed_share {rc.max_failed_share:g}): {details}"
            )
        return None

    def doc(self) -> dict[str, Any]:
        """``config`` of the status and the birth: what runs, and the last push's outcome."""
        doc = self.agent.running.doc()
        if self.outcome is not None:
            doc["last"] = self.outcome.doc()
        return doc
