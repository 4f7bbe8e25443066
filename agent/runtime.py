"""The running agent: devices → points → buffer → publisher, as owned, named tasks.

    async with Agent(config, ...) as agent:
        await agent.wait_stopped()

    poll[press-1] ─┐                       ┌─ thread buffer-writer: one transaction per round, fsync
    poll[oven-2]  ─┼─ points ─▶ writer ────┤
                   ┘ (queue, never waits)   └─ on commit ─▶ mqtt: publish, PUBACK → accepted,
                                                             gw/{gw}/ack → confirmed → deleted

Tasks: ``poll[<device>]`` per device, ``mqtt`` (connection and drain,
``publisher.py``), ``status`` (the status file ``agent status`` reads),
``metrics`` (optional Prometheus endpoint); the buffer's writer is a thread
(``writer.py``) so that polling never waits for the disk. Data flows one
way; each stage owns its state.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from drivers.base import DeviceState, Driver, open_driver
from drivers.points import Point, Quality, now_ms
from factory_edge import __version__
from factory_edge.errors import ConfigError, FactoryEdgeError
from factory_edge.logs import fields
from factory_edge.mqtt import BrokerSettings
from factory_edge.systemd import Notifier
from factory_edge.tasks import cancel_all
from factory_edge.units import plural

from .apply import Applier
from .buffer import Buffer
from .bufferread import BufferReader, BufferStats
from .configproc import load_config
from .configtypes import AgentConfig
from .delivery import DeliveryPolicy
from .identity import sparkplug_group
from .publisher import ConnectionState, Publisher
from .remote import ConfigStore, Outcome, Running
from .renew import Renewer
from .report import ReportFilter
from .sparkplug import EdgeNode
from .writer import BufferWriter, Commit

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
BUFFER_FILE = "buffer.db"
STATUS_INTERVAL_S = 1.0
BUFFER_STATUS_EVERY_S = 10.0  # the retained status again when the buffer's figures changed: at most this often
FLUSH_ON_STOP_S = 3.0
WRITE_ON_STOP_S = 10.0
FINISH_POLL_S = 2.0  # a read under way when the agent stops gets this long to be answered and buffered
AGES_EVERY_S = 10.0


def config_hash(path: Path | None, config: AgentConfig) -> str:
    if path is not None and path.exists():
        data = path.read_bytes()
    else:  # a model (tests) or its plain copy (agent/configproc.py): either prints the same values
        dump = getattr(config, "model_dump_json", None)
        data = (dump() if dump is not None else repr(config)).encode()
    return hashlib.sha256(data).hexdigest()[:12]


class DeviceStats:
    def __init__(self) -> None:
        self.polls = 0
        self.points = 0
        self.reported = 0
        self.last_error: str | None = None
        self.last_good_ms: int | None = None


class Agent:
    """One gateway: its devices, its buffer and its broker connection."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        gateway: str,
        broker: BrokerSettings,
        state_dir: Path,
        config_path: Path | None = None,
        running: Running | None = None,
        outcome: Outcome | None = None,
    ) -> None:
        self.config = config
        self.gateway = gateway
        self.broker = broker
        self.state_dir = state_dir
        self.config_path = config_path
        self.local_hash = config_hash(config_path, config)  # of the local file, even when a pushed config runs
        self.running = running or Running(source="local", hash=self.local_hash)
        self.config_hash = self.running.hash
        self.started = time.time()
        b = config.buffer
        self.buffer = Buffer(
            state_dir / BUFFER_FILE,
            gateway=gateway,
            max_bytes=b.max_bytes,
            max_age_s=b.max_age,
            fsync=b.fsync,
            confirm=b.confirm,
        )
        self.buffer.clamp_accepted(now_ms())
        self.reader = BufferReader(self.buffer.path)  # the publisher's, on the event loop
        # The status file and the buffer's figures are written and read off the event loop too: on a busy
        # disk a rename or a full scan can take long, and polling must not wait for it.
        self._status_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="status")
        self._status_reader = BufferReader(self.buffer.path)
        self._ages: tuple[int | None, int | None] = (None, None)
        self._ages_at = 0.0
        # The buffer's figures the retained status carries: the last ones the status thread read (drops and ages
        # need the database), the pending and unconfirmed counts as the writer has them when the status is built.
        self._stats = self._status_reader.stats(self.buffer.figures(), self.buffer.committed_next_seq)
        self._status_ts = 0  # the status's ts: kept when the status is sent again for the buffer's figures alone
        self._keep_status_ts = False
        self._status_built = 0.0  # monotonic: when a status document was last built
        self._status_buffer: dict[str, Any] | None = None  # the figures it carried
        self.writer = BufferWriter(
            self.buffer,
            max_points=config.publish.max_points,
            max_batch_bytes=config.publish.max_bytes,
            queue_points=b.queue_points,
            min_free_bytes=b.min_free,
            on_commit=self._committed,
        )
        retry = config.mqtt
        self.edge = None
        if config.sparkplug is not None:
            sp = config.sparkplug
            self.edge = EdgeNode(
                group=sparkplug_group(config, state_dir),
                edge_node=sp.edge_node_id or gateway,
                devices=config.devices,
                state_dir=state_dir,
                version=__version__,
                primary_host=sp.primary_host,
                data_qos=sp.data_qos,
            )
        self.publisher = Publisher(
            settings=broker,
            gateway=gateway,
            writer=self.writer,
            reader=self.reader,
            policy=DeliveryPolicy(b.confirm, b.confirm_timeout, b.replay),
            inflight=config.publish.inflight,
            birth=self._birth,
            meta=self._meta,
            commands=self._command,
            on_state=self._write_status,
            edge=self.edge,
            **({"retry_initial_s": retry.retry_initial, "retry_max_s": retry.retry_max} if retry else {}),
        )
        self._status_warned = False
        self.drivers: dict[str, Driver] = {}
        self.device_stats: dict[str, DeviceStats] = {}
        self._device_tasks: dict[str, asyncio.Task[None]] = {}
        self._filter = ReportFilter.for_devices(config.devices)
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.systemd = Notifier()
        self.remote = Applier(self, ConfigStore(state_dir), outcome)

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Agent:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._start_devices()
        renewer = Renewer.for_agent(self.config, self.state_dir)  # only when running from a provisioned identity
        if renewer is not None:
            self._tasks.append(self._group.create_task(renewer.run(), name="renew"))
        self._tasks.append(self._group.create_task(self.publisher.run(), name="mqtt"))
        self._tasks.append(self._group.create_task(self._status_loop(), name="status"))
        if self.config.metrics_port:
            from .metrics import serve_metrics

            self._tasks.append(self._group.create_task(serve_metrics(self, self.config.metrics_port), name="metrics"))
        counts = self.buffer.figures()
        log.info(
            "agent started",
            extra=fields(
                gateway=self.gateway,
                devices=len(self.drivers),
                broker=self.broker.describe(),
                backlog=counts.pending_batches,
                unconfirmed=counts.unconfirmed_batches,
                confirm=self.config.buffer.confirm,
            ),
        )
        self.systemd.ready(f"{plural(len(self.drivers), 'device')}, broker {self.broker.describe()}")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._group is not None
        self.systemd.stopping()
        log.info("agent stopping", extra=fields(gateway=self.gateway))
        try:
            try:
                await self._stop_devices()
            except asyncio.CancelledError:
                # A task failed and the group cancelled us (or we are cancelled from outside): stop the rest
                # all the same; the group's exit below raises what failed, or this cancellation.
                if exc_info[0] is None:
                    raise
            # Every reading taken so far goes to disk before anything else stops.
            await asyncio.to_thread(self.writer.flush, WRITE_ON_STOP_S)
            if exc_info[0] is None:
                await self.publisher.flush(FLUSH_ON_STOP_S)
        finally:
            try:
                # Insists on a task that carries on after its cancellation; the group's exit collects failures.
                try:
                    await cancel_all([*self._tasks, *self._device_tasks.values()])
                finally:
                    await self._group.__aexit__(*exc_info)
            finally:
                self.publisher.state = ConnectionState.STOPPED
                await asyncio.to_thread(self.writer.close)
                self._write_status()
                self._status_io.shutdown(wait=True)
                left = self._status_reader.stats(
                    self.buffer.figures(), self.buffer.committed_next_seq, ages=(None, None)
                )
                self._status_reader.close()
                self.reader.close()
                self.buffer.close()
                log.info(
                    "agent stopped",
                    extra=fields(gateway=self.gateway, backlog=left.batches, unconfirmed=left.unconfirmed),
                )

    def stop(self) -> None:
        self._stopped.set()

    @property
    def stopping(self) -> bool:
        return self._stopped.is_set()

    @property
    def task_group(self) -> asyncio.TaskGroup:
        assert self._group is not None, "the agent is not running"
        return self._group

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # ------------------------------------------------------------ devices

    def _start_devices(self) -> None:
        assert self._group is not None
        for device in self.config.devices:
            if not device.enabled:
                continue
            options = {"state_dir": self.state_dir} if device.protocol == "opcua" else {}
            driver = open_driver(device, **options)
            self.drivers[device.name] = driver
            self.device_stats.setdefault(device.name, DeviceStats())
            self._device_tasks[device.name] = self._group.create_task(self._poll(driver), name=f"poll[{device.name}]")

    async def _stop_devices(self) -> None:
        # A read under way was served by the machine (it counted it): take the answer and buffer it, then stop.
        finishing = [task for name, task in self._device_tasks.items() if self.drivers[name].stop()]
        try:
            if finishing:
                await asyncio.wait(finishing, timeout=FINISH_POLL_S)
            tasks = list(self._device_tasks.values())
            await cancel_all(tasks)
            for task in tasks:
                if not task.cancelled():
                    task.result()  # a poll loop that failed while stopping
        finally:
            for driver in self.drivers.values():
                await driver.close()
            self._device_tasks.clear()
            self.drivers.clear()

    async def _poll(self, driver: Driver) -> None:
        name = driver.device.name
        stats = self.device_stats[name]
        state = driver.state

        async def emit(points: list[Point]) -> None:
            nonlocal state
            stats.polls += 1
            stats.points += len(points)
            if any(p.quality is Quality.GOOD for p in points):
                stats.last_good_ms = now_ms()
            errors = [p.error for p in points if p.error]
            stats.last_error = errors[0] if errors else stats.last_error
            if self.edge is not None:
                self.edge.observe(name, points)
            if driver.state is not state and driver.state in (DeviceState.UP, DeviceState.DOWN):
                self.event(
                    "device_up" if driver.state is DeviceState.UP else "device_down",
                    device=name,
                    error=driver.last_error if driver.state is DeviceState.DOWN else None,
                )
                state = driver.state
                self.publisher.device_state(name, state is DeviceState.UP)
            self.store(name, self._filter.select(points))

        while True:
            try:
                await driver.run(emit)
                return  # stopped: the read under way is emitted
            except (FactoryEdgeError, OSError) as exc:
                reason = f"driver error: {exc}"
            except Exception as exc:  # a driver bug must not take the other devices down
                log.error("driver failed", exc_info=True, extra=fields(device=name))
                reason = f"driver error: {type(exc).__name__}: {exc}"
            await emit([Point.bad(name, t.name, reason) for t in driver.device.tags])
            self.event("driver_error", device=name, error=reason)
            await driver.pause(min(30.0, max(1.0, driver.device.poll)))
            if driver.stopping:
                return

    def store(self, device: str, points: list[Point]) -> None:
        """Hand points to the buffer's writer (never waits for the disk); the publisher wakes on commit."""
        if not points:
            return
        self.device_stats.setdefault(device, DeviceStats()).reported += len(points)
        self.writer.submit(device, points)

    def _committed(self, commit: Commit) -> None:
        """The writer committed (on its thread): wake the publisher."""
        self.publisher.committed(commit)

    def event(self, kind: str, **details: Any) -> None:
        """Record a gateway event for ``gw/{gw}/events`` (kept in the buffer until published)."""
        doc = {"type": kind, "ts": now_ms(), **{k: v for k, v in details.items() if v is not None}}
        self.writer.event(doc)

    # ------------------------------------------------------------ what the broker sees

    def _birth(self) -> dict[str, Any]:
        ts = self._status_ts if self._keep_status_ts and self._status_ts else now_ms()
        figures = self._buffer_figures()
        self._status_ts, self._status_built, self._status_buffer = ts, time.monotonic(), figures
        return {
            "state": "online",
            "ts": ts,
            "version": __version__,
            "config_hash": self.config_hash,
            "config_version": self.running.version,
            "config": self.remote.doc(),
            "buffer": {"ts": now_ms(), **figures},
        }

    def _buffer_figures(self) -> dict[str, Any]:
        """What the retained status says of the buffer (docs/topics.md): backlog, unconfirmed, dropped.

        From the figures the status thread read last (at most a second old): the buffer's own lock is held
        through each commit, and the event loop never waits for the disk.
        """
        stats = self._stats
        return {
            "pending_batches": stats.batches,
            "pending_points": stats.points,
            "unconfirmed_batches": stats.unconfirmed,
            "dropped_points": stats.dropped_points,
            "oldest_pending_ts": stats.oldest_ms if stats.batches else None,
            "oldest_unconfirmed_ts": stats.oldest_unconfirmed_ms if stats.unconfirmed else None,
        }

    def _republish_buffer(self) -> None:
        """The retained status again if the buffer's figures changed, at most every ``BUFFER_STATUS_EVERY_S``.

        It keeps the ``ts`` of the status it follows (the gateway has been online since then); the
        figures carry their own ``ts``.
        """
        publisher = self.publisher
        if publisher.state is not ConnectionState.CONNECTED or self.edge is not None:
            return
        if time.monotonic() - self._status_built < BUFFER_STATUS_EVERY_S:
            return
        if self._buffer_figures() == self._status_buffer:
            return
        self._keep_status_ts = True
        try:
            publisher.publish_status()
        finally:
            self._keep_status_ts = False

    def _meta(self) -> dict[str, dict[str, Any]]:
        docs = {}
        for device in self.config.devices:
            tags = []
            for tag in device.tags:
                kind = getattr(tag, "data_type", None)
                tags.append(
                    {
                        "name": tag.name,
                        "type": str(kind) if kind else None,
                        "unit": tag.unit,
                        "writable": tag.writable,
                        **({"description": tag.description} if tag.description else {}),
                    }
                )
            docs[device.name] = {
                "device": device.name,
                "protocol": device.protocol,
                "address": device.address,
                "enabled": device.enabled,
                "tags": tags,
            }
        return docs

    # ------------------------------------------------------------ commands

    async def _command(self, name: str, payload: Any) -> dict[str, Any]:
        try:
            if name == "ping":
                return {
                    "ok": True,
                    "gw": self.gateway,
                    "ts": now_ms(),
                    "version": __version__,
                    "uptime_s": round(time.time() - self.started, 1),
                    "backlog": (await self.buffer_stats()).backlog,
                }
            if name == "write":
                return await self._write(payload)
            if name == "reload":
                if self.remote.busy:
                    return {"ok": False, "error": "a pushed configuration is being applied; reload when it is done"}
                return await self.reload()
            if name == "config":
                return await self.remote.command(payload)
            return {"ok": False, "error": f"unknown command {name!r} (commands: ping, write, reload, config)"}
        except FactoryEdgeError as exc:
            return {"ok": False, "error": str(exc)}

    async def _write(self, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, dict) or not {"device", "tag", "value"} <= payload.keys():
            return {"ok": False, "error": 'expected {"device": …, "tag": …, "value": …}'}
        driver = self.drivers.get(str(payload["device"]))
        if driver is None:
            return {"ok": False, "error": f"no device named {payload['device']!r}"}
        await driver.write(str(payload["tag"]), payload["value"])
        self.event("write", device=payload["device"], tag=payload["tag"], value=payload["value"])
        return {"ok": True, "device": payload["device"], "tag": payload["tag"], "value": payload["value"]}

    @property
    def reloading(self) -> bool:
        """A reload (or a pushed configuration's switch) is restarting the devices right now."""
        return self._reload_lock.locked()

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and restart the devices; the buffer and connection stay."""
        if self.config_path is None:
            raise ConfigError("this agent was not started from a config file")
        async with self._reload_lock:
            new = await asyncio.to_thread(load_config, self.config_path)  # a child process checks it
            later = [
                key
                for key in ("gateway", "state_dir", "mqtt", "buffer", "publish", "metrics_port", "sparkplug")
                if getattr(new, key) != getattr(self.config, key)
            ]
            await self._stop_devices()
            self.config = self.config.replace(devices=new.devices)
            self.local_hash = config_hash(self.config_path, self.config)
            self.running = Running(source="local", hash=self.local_hash)
            await asyncio.to_thread(self.remote.store.forget)
            self.config_hash = self.running.hash
            self._filter = ReportFilter.for_devices(self.config.devices)
            if self.edge is not None:  # new aliases and datatypes: new births, devices as they come up
                self.edge.configure(self.config.devices)
                self.edge.devices_up.clear()
                self.publisher.rebirth()
            self._start_devices()
        log.info("config reloaded", extra=fields(devices=len(self.drivers), config_hash=self.config_hash))
        self.event("reload", config_hash=self.config_hash)
        reply: dict[str, Any] = {"ok": True, "config_hash": self.config_hash, "devices": sorted(self.drivers)}
        if later:
            reply["restart_needed_for"] = later
        return reply

    async def swap(self, config: AgentConfig, broker: BrokerSettings, running: Running) -> None:
        """Another configuration in place (``apply.py``): new devices, and the broker when it changed.

        The buffer, its writer and the readings already taken stay; only the
        polls are restarted. Keys that would need a restart were refused
        before (``remote.FIXED_KEYS``).
        """
        async with self._reload_lock:
            await self._stop_devices()
            removed = tuple(sorted({d.name for d in self.config.devices} - {d.name for d in config.devices}))
            self.config = config.replace(state_dir=self.config.state_dir)
            self.running = running
            self.config_hash = running.hash
            self._filter = ReportFilter.for_devices(self.config.devices)
            if self.edge is not None:
                self.edge.configure(self.config.devices)
                self.edge.devices_up.clear()
                self.publisher.rebirth()
            if broker != self.broker:
                self.broker = broker
                self.publisher.switch_broker(broker, why=f"configuration {running.version or 'local'}")
            if not self._stopped.is_set():  # stopping: __aexit__ has stopped the devices, none start again
                self._start_devices()
            self.publisher.publish_status(meta=True, removed=removed)  # a new connection sends them anyway
        log.info(
            "configuration switched",
            extra=fields(
                version=running.version, config_hash=running.hash, devices=len(self.drivers), broker=broker.describe()
            ),
        )

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        publisher = self.publisher
        return {
            "gw": self.gateway,
            "pid": os.getpid(),
            "version": __version__,
            "updated": time.time(),
            "started": self.started,
            "config_hash": self.config_hash,
            "config": self.remote.doc(),
            "connection": {
                "state": str(publisher.state),
                "broker": self.broker.describe(),
                "last_error": publisher.last_error,
                "connected_since": publisher.stats.connected_since,
                "reconnects": publisher.stats.reconnects,
                "connect_attempts": publisher.stats.connect_attempts,
            },
            "publish": {
                "points_per_s": round(publisher.stats.points_per_s(), 1),
                "batches": publisher.stats.batches,
                "points": publisher.stats.points,
                "acked_points": publisher.stats.acked_points,
                "confirm": self.config.buffer.confirm,
                "confirmed_points": publisher.stats.confirmed_points,
                "confirmed_batches": publisher.stats.confirmed_batches,
                "last_confirmed": publisher.stats.last_confirmed,
                "rejected": publisher.stats.rejected,
                "resent": publisher.stats.resent,
                "replayed": publisher.stats.replayed,
            },
            "writer": self.writer.figures(),
            "devices": {
                name: {
                    "state": str(driver.state),
                    "protocol": driver.device.protocol,
                    "last_good_ms": self.device_stats[name].last_good_ms,
                    "last_error": driver.last_error or self.device_stats[name].last_error,
                    "polls": self.device_stats[name].polls,
                    "points": self.device_stats[name].points,
                    "reported": self.device_stats[name].reported,
                }
                for name, driver in self.drivers.items()
            },
        }

    async def buffer_stats(self) -> BufferStats:
        """The buffer's figures, on the status thread: counts from the writer, ages looked up every 10 s
        (finding the oldest pending batch can walk many accepted ones)."""
        return await asyncio.get_running_loop().run_in_executor(self._status_io, self._buffer_stats)

    def _buffer_stats(self) -> BufferStats:
        now = time.monotonic()
        counts = self.buffer.figures()
        # Looked up again at once when a backlog appears whose age is not known yet (the retained status says it).
        unknown = (counts.pending_batches and self._ages[0] is None) or (
            counts.unconfirmed_batches and self._ages[1] is None
        )
        if now >= self._ages_at or unknown:
            self._ages = self._status_reader.ages()
            self._ages_at = now + AGES_EVERY_S
        return self._status_reader.stats(counts, self.buffer.committed_next_seq, ages=self._ages)

    def _write_status(self) -> None:
        """Snapshot the status here (event loop), write the file on the status thread."""
        doc = json.dumps(self.status())
        try:
            self._status_io.submit(self._write_status_file, doc)
        except RuntimeError:  # stopping: the executor is shut down
            pass

    def _write_status_file(self, doc: str) -> None:
        path = self.state_dir / STATUS_FILE
        tmp = path.with_suffix(".tmp")
        # Padded to whole 4 KiB blocks: on a full disk the same blocks are written over in place.
        data = doc.encode()
        data += b" " * (-len(data) % 4096 or 0) + b"\n"
        try:
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not _overwrite(path, data):
                    raise
        except OSError as exc:
            if not self._status_warned:  # once per episode: a full disk must not flood the journal
                log.warning("cannot write status file", extra=fields(path=str(path), err=str(exc)))
            self._status_warned = True
            return
        if self._status_warned:
            log.info("status file written again", extra=fields(path=str(path)))
        self._status_warned = False

    async def _status_loop(self) -> None:
        """Status file every second, and systemd's watchdog: fed only while the event loop runs."""
        loop = asyncio.get_running_loop()
        interval = min(STATUS_INTERVAL_S, self.systemd.watchdog_interval_s or STATUS_INTERVAL_S)
        last_status = 0.0
        while True:
            self.systemd.watchdog()
            if loop.time() - last_status >= STATUS_INTERVAL_S:
                self._write_status()
                conn = self.publisher.state
                backlog = self._stats = await self.buffer_stats()
                self._republish_buffer()
                self.systemd.status(
                    f"{conn}, {plural(len(self.drivers), 'device')}, "
                    f"backlog {plural(backlog.batches, 'batch', 'batches')}, "
                    f"{backlog.unconfirmed} unconfirmed"
                )
                last_status = loop.time()
            await asyncio.sleep(interval)


def _overwrite(path: Path, data: bytes) -> bool:
    """Write ``data`` over the file's existing blocks (no new ones needed); False if it does not fit."""
    try:
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            if len(data) > size:
                return False
            f.write(data + b" " * (size - len(data)))
        return True
    except OSError:
        return False
