"""``bridge leave --config FILE --instance NAME``: end a retired instance's sessions on every tenant broker.

Mosquitto hands a shared group's messages round-robin to every member
session, connected or not: an instance that was stopped for good keeps
receiving its share, queued in its session, until the session expires
(``ingest.shared_session_expiry``). ``leave`` connects once as that
instance, with a session expiry of 0, and disconnects: the broker ends the
session, the instance leaves every group at once, and the instances still
running get all the messages. What its session held is dropped with it:
the agents send those batches again, as nothing confirmed them.

Run it only for an instance that is stopped (a running one would take its
session back at its next reconnect), on a host that has its certificate.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from factory_edge.errors import ConfigError, PublishError
from factory_edge.logs import fields

from .config import BridgeConfig, TenantConfig, client_id, load_config
from .mqtt import Session
from .tenant import broker_settings

log = logging.getLogger(__name__)


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "leave",
        help="end a stopped instance's sessions so its shared groups stop queueing its share",
        description="For a bridge instance stopped for good: connect as it to every tenant broker with a "
        "session expiry of 0 and disconnect, so the broker ends its session and its shared groups give "
        "everything to the instances still running. What its session still held is dropped; agents "
        "send those batches again. Stop the instance first.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="bridge config (YAML)")
    p.add_argument("--instance", required=True, metavar="NAME", help="the instance that leaves (identity bridge.NAME)")
    p.add_argument("--tenant", metavar="NAME", help="only this tenant (default: every tenant)")
    p.set_defaults(handler=run, default_log_level="warning")


async def leave(config: BridgeConfig, instance: str, tenants: list[TenantConfig]) -> list[str]:
    """End ``instance``'s session on each tenant's broker; returns one line per tenant."""
    lines = []
    for tenant in tenants:
        own = tenant.for_instance(instance)
        settings = broker_settings(own)
        session = Session(
            settings,
            client_id=client_id(instance),
            generation=1,
            receive_maximum=1,
            session_expiry_s=0,  # replaces the session's expiry: it ends with this connection
            on_message=lambda message: None,  # not acknowledged: dropped with the session
            on_lost=lambda reason: None,
        )
        try:
            await session.open()
        except PublishError as exc:
            lines.append(f"{tenant.name}: not left: {exc}")
            continue
        await session.close()
        log.info("left the tenant's shared groups", extra=fields(tenant=tenant.name, instance=instance))
        lines.append(f"{tenant.name}: session of bridge.{instance} ended ({settings.describe()})")
    return lines


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    tenants = config.tenants if args.tenant is None else [config.tenant(args.tenant)]
    if not tenants:
        raise ConfigError(f"{args.config}: no tenant to leave")
    lines = asyncio.run(leave(config, args.instance, tenants))
    print("\n".join(lines))
    return 1 if any(": not left: " in line for line in lines) else 0
