"""Moving a tenant: its broker to another broker host, or its data to another storage server.

A broker move (``move_broker``), in this order::

    1 render + try      the tenant's mosquitto.conf for the new host (a trial Mosquitto loads it)
    2 stop the old one  its conf is renamed (mosquitto.conf.moved) so nothing restarts it; SIGTERM,
                        and Mosquitto writes its persistence (sessions, queued QoS 1 messages,
                        retained messages) as it exits                      <- the interruption starts
    3 carry the state   <old>/data/mosquitto.db is copied to <new>/data/ (the old one is kept)
    4 the new broker    its conf appears in hosts/<new>/<tenant>/: what runs brokers on that host
                        starts it (systemd path unit, an operator); awaited up to --wait
    5 switch            registry, HAProxy config and SNI map, tenants.json; every proxy running
                        from the config is reloaded (SIGUSR2, seamless)    <- gateways get through
    6 gateways          reconnect by themselves, through the proxy, to the new broker

Nothing is lost: a persistent session (the bridge's, a gateway's) comes
back on the new host with the QoS 1 messages queued for it, because the
old broker wrote them at its clean stop and the new one loads that file. A
gateway's batches the storage had not confirmed stay in its buffer and are
sent again after the reconnect (the agent deletes only what the bridge
acknowledged), so they are stored once. Messages published while the
tenant has no broker are not accepted by anyone: their senders keep them.

If the new broker does not answer in time the move is undone (the new
conf renamed ``mosquitto.conf.failed``, the old one put back, the registry
and the proxies never changed) and the error says to start the old broker
again; its persistence file was never touched.

Provisioning stops the old broker itself when it can see the process (same
machine, any network namespace). A broker on a separate machine it cannot
see: the operator stops it there, copies its ``data/mosquitto.db`` to the
new host's directory, and runs the move with ``--broker-stopped``.

A storage move (``move_storage``) only changes the placement: the tenant's
``tenants.json`` entry gets ``storage`` = the new server and
``storage_previous`` = the old one, and the bridge copies the tenant's
data from the one to the other while it holds ingest for that tenant.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from factory_edge.errors import ProvisioningError
from factory_edge.logs import fields
from provisioning import brokers, checks, placement
from provisioning.layout import DataDir, TenantFiles, private_dir, write_text
from provisioning.registry import Registry, Tenant
from provisioning.tenants import admin_link, apply_proxy, broker_conf, get_tenant, plan_limit, render_proxy

log = logging.getLogger(__name__)

PERSISTENCE_FILE = "mosquitto.db"
STOP_TIMEOUT_S = 30.0
WAIT_S = 60.0


@dataclass
class BrokerMove:
    """What a broker move did, with its timings (seconds, monotonic clock)."""

    tenant: str
    old_host: str
    new_host: str
    new_address: str
    new_conf: Path
    stopped_pids: list[int] = dataclasses.field(default_factory=list)
    carried_bytes: int | None = None  # None: the old broker had persisted nothing
    stopped_s: float = 0.0  # SIGTERM sent -> old broker gone (its persistence written)
    answered_s: float = 0.0  # SIGTERM sent -> new broker answers
    switched_s: float = 0.0  # SIGTERM sent -> proxies reloaded: the interruption provisioning causes
    proxy: str = ""


def move_broker(
    data: DataDir,
    name: str,
    host: str,
    *,
    wait_s: float = WAIT_S,
    broker_stopped: bool = False,
    progress: Callable[[str], None] | None = None,
) -> BrokerMove:
    """Move tenant ``name``'s broker to broker host ``host`` (see the module docstring for the steps)."""
    say = progress or (lambda line: None)
    data.require()
    with Registry(data.registry) as registry:
        tenant = get_tenant(registry, name)
        target = placement.get_host(registry, host)
        if tenant.broker_host == target.name:
            raise ProvisioningError(f"tenant {name} is already on host {host} ({target.address})")
        moved = dataclasses.replace(tenant, broker_host=target.name, broker_address=target.address)
        old = data.tenant(name, tenant.broker_host)
        new = data.tenant(name, target.name)
        result = BrokerMove(name, tenant.broker_host, target.name, target.address, new.conf)

        # 1. The new config, tried before anything stops.
        conf_text = broker_conf(new, moved, max_packet_size=plan_limit(registry, name, "message_size"))
        checks.check_mosquitto(conf_text)
        say(f"1/5 rendered {new.conf} (listener {target.address}:{tenant.broker_port}), loads")

        # 2. Stop the old broker so it writes its persistence.
        pids = brokers.find_process("mosquitto", ("-c", "--config-file"), old.conf)
        if not pids and not broker_stopped:
            raise ProvisioningError(
                f"the broker of tenant {name} on host {tenant.broker_host} is not running where provisioning can "
                f"see it: stop it on {tenant.broker_host}, copy its {old.persistence / PERSISTENCE_FILE} to "
                f"{new.persistence}/ on {host}, then run the move again with --broker-stopped"
            )
        parked = _park(old.conf, "moved")
        started = time.monotonic()
        try:
            _stop(pids, name)
        except ProvisioningError:
            _unpark(parked, old.conf)
            raise
        result.stopped_pids = pids
        result.stopped_s = time.monotonic() - started
        say(
            f"2/5 stopped the broker on {tenant.broker_host} (pid {', '.join(map(str, pids)) or 'none visible'}) "
            f"in {result.stopped_s:.2f}s"
        )

        # 3. Carry its state; 4. the new broker.
        try:
            result.carried_bytes = _carry(old, new)
            say(
                f"3/5 carried {result.carried_bytes} bytes of sessions and queued messages to {new.persistence}"
                if result.carried_bytes is not None
                else "3/5 nothing persisted by the old broker (no sessions, no queued messages)"
            )
            _clear_park(new.conf)
            write_text(new.conf, conf_text)
            say(f"4/5 waiting up to {wait_s:g}s for the broker on {host}: mosquitto -c {new.conf}")
            _await_broker(admin_link(data, moved), wait_s)
        except BaseException:
            _park(new.conf, "failed")
            _unpark(parked, old.conf)
            raise
        result.answered_s = time.monotonic() - started

        # 5. Switch: registry, proxy config and map, tenants.json; reload every proxy.
        try:
            with registry.transaction():
                registry.place_tenant(name, host=target.name)
                render_proxy(data, registry)
        except ProvisioningError as exc:
            raise ProvisioningError(
                f"tenant {name}'s broker now runs on {host} with its sessions, but the new proxy configuration "
                f"was refused, so the registry and the proxies still place it on {tenant.broker_host}: {exc}"
            ) from exc
        result.proxy = apply_proxy(data)
        result.switched_s = time.monotonic() - started
        say(f"5/5 proxies switched to {target.address}:{tenant.broker_port}: {result.proxy}")
    log.info(
        "tenant broker moved",
        extra=fields(
            tenant=name,
            old=result.old_host,
            new=result.new_host,
            carried_bytes=result.carried_bytes,
            interruption_s=round(result.switched_s, 3),
        ),
    )
    return result


def _park(conf: Path, why: str) -> Path | None:
    """Rename ``conf`` to ``<conf>.<why>`` (nothing starts a broker from it then); the new path, None if absent."""
    if not conf.exists():
        return None
    parked = conf.with_name(f"{conf.name}.{why}")
    os.replace(conf, parked)
    return parked


def _unpark(parked: Path | None, conf: Path) -> None:
    if parked is not None and parked.exists():
        os.replace(parked, conf)


def _clear_park(conf: Path) -> None:
    """A tenant coming back to a host it left: its old conf's parked copy is outdated."""
    conf.with_name(f"{conf.name}.moved").unlink(missing_ok=True)


def _stop(pids: list[int], tenant: str) -> None:
    """SIGTERM and wait until every process is gone (Mosquitto saves its persistence as it exits)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        except PermissionError as exc:
            raise ProvisioningError(
                f"cannot stop the broker of tenant {tenant} (pid {pid}): permission denied; "
                "run provisioning as the user the brokers run as"
            ) from exc
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise ProvisioningError(
                f"the broker of tenant {tenant} (pid {', '.join(map(str, pids))}) did not stop within "
                f"{STOP_TIMEOUT_S:g}s; nothing was moved"
            )
        time.sleep(0.01)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited (its parent has not collected it yet)


def _carry(old: TenantFiles, new: TenantFiles) -> int | None:
    """Copy the persistence file to the new broker directory (fsynced, then renamed); its size, None if none."""
    source = old.persistence / PERSISTENCE_FILE
    if new.broker_dir is not None:
        private_dir(new.broker_dir.parent)
        private_dir(new.broker_dir)
    private_dir(new.persistence)
    target = new.persistence / PERSISTENCE_FILE
    if not source.exists():
        target.unlink(missing_ok=True)  # a stale file from an earlier stay on that host must not come back
        return None
    partial = target.with_name(f".{PERSISTENCE_FILE}.new")
    try:
        with open(source, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(partial, 0o600)
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ProvisioningError(f"cannot copy {source} to {target}: {exc.strerror or exc}") from exc
    return target.stat().st_size


def _await_broker(link: brokers.AdminLink, wait_s: float) -> None:
    """Until the broker answers an MQTT session of the service over TLS at ``link``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            brokers.send_commands(link, [], timeout_s=2.0)
            return
        except ProvisioningError as exc:
            if time.monotonic() > deadline:
                raise ProvisioningError(
                    f"the new broker did not answer at {link.dial}:{link.port} within {wait_s:g}s ({exc}); "
                    "the move was undone: start the old broker again"
                ) from None
        time.sleep(0.05)


@dataclass(frozen=True)
class StorageMove:
    tenant: str
    old: str
    new: str


def move_storage(data: DataDir, name: str, storage: str) -> StorageMove:
    """Place tenant ``name``'s data on storage server ``storage``; the bridge copies it (``storage_previous``)."""
    data.require()
    with Registry(data.registry) as registry:
        tenant = get_tenant(registry, name)
        target = placement.get_storage(registry, storage)
        if tenant.storage == target.name:
            raise ProvisioningError(f"tenant {name} is already on storage server {storage}")
        if tenant.storage is None:
            raise ProvisioningError(
                f"tenant {name} is on the bridge's own storage, which the bridge cannot copy from by placement: "
                "register that database with 'provisioning storage add' and place new tenants there"
            )
        previous = tenant.storage_previous
        if previous is not None and target.name != previous:
            # A move not yet copied, moved on again: the bridges would copy from the server the data never
            # reached, and the tenant would start afresh on the third one with its history left behind.
            landed = _move_landed(placement.get_storage(registry, tenant.storage).dsn, name)
            if landed is not True:
                why = "not copied yet" if landed is False else f"not known to be copied ({landed})"
                raise ProvisioningError(
                    f"tenant {name}: its move from storage server {previous} to {tenant.storage} is {why}; "
                    f"wait until the bridges log 'tenant storage moved; ingest resumed', or move it back with "
                    f"--storage {previous}"
                )
        with registry.transaction():
            registry.place_tenant_storage(name, storage=target.name, previous=tenant.storage)
            render_proxy(data, registry)
    log.info("tenant storage moved", extra=fields(tenant=name, old=tenant.storage, new=target.name))
    return StorageMove(name, tenant.storage, target.name)


def _move_landed(dsn: str, tenant: str) -> bool | str:
    """True when the tenant's last storage move was copied onto the server at ``dsn`` (the bridge marks it there
    in its ``bridge_move`` table, bridge/storage/move.py); False when not; why not when the server cannot be
    asked."""
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
            row = conn.execute(
                sql.SQL("SELECT direction FROM {} ORDER BY id DESC LIMIT 1").format(
                    sql.Identifier(tenant, "bridge_move")
                )
            ).fetchone()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        return False
    except psycopg.Error as exc:
        return f"cannot ask the server: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    return row is not None and row[0] == "in"


def describe(tenant: Tenant) -> str:
    where = f"host {tenant.broker_host} ({tenant.broker_address}:{tenant.broker_port})"
    return where + (f", storage {tenant.storage}" if tenant.storage else ", the bridge's own storage")


__all__ = ["PERSISTENCE_FILE", "BrokerMove", "StorageMove", "describe", "move_broker", "move_storage"]
