"""``bridge check-config FILE``: validate a bridge config and say what it will do."""

from __future__ import annotations

import argparse
from typing import Any

from factory_edge.units import format_duration

from .alerts.rules import Rule
from .config import BridgeConfig, StorageConfig, load_config
from .router import ingest_builtins, plan
from .storage.postgres import describe_dsn


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "check-config",
        help="validate a bridge config and print its tenants, subscriptions and rules",
        description="Validate FILE. Prints a summary (storage, tenants, the subscriptions each connection makes, "
        "mapped tables, alert rules) or every error, one per line, naming the file, the path inside "
        "it and the problem (exit code 2).",
    )
    p.add_argument("file", metavar="FILE", help="bridge config (YAML)")
    p.set_defaults(handler=run)


def summary_lines(config: BridgeConfig) -> list[str]:
    storage = config.storage
    where = f"{storage.path}/<tenant>.db" if storage.backend == "sqlite" else "one schema per tenant"
    lines = [
        f"OK: {len(config.tenants)} tenants, storage {storage.backend} ({where}), "
        f"{len(config.mappings)} mappings, commit window {config.ingest.max_messages} messages, "
        f"receive maximum {config.ingest.window}"
    ]
    for tenant in config.tenants:
        subscriptions = plan(config.mappings, builtins=ingest_builtins(tenant.shared_group))
        via = f" via {tenant.connect_host}" if tenant.connect_host else ""
        shared = f"  shared group {tenant.shared_group}" if tenant.shared_group else ""
        lines.append(f"  {tenant.name}  {tenant.url}{via}{shared}")
        lines.append("    subscribes " + " ".join(s.topic(tenant.shared_group) for s in subscriptions))
        if tenant.storage is not None:
            moving = f" (moving from {_where(tenant.storage_previous)})" if tenant.storage_previous else ""
            lines.append(f"    storage {_where(tenant.storage)}{moving}")
        for rule in config.tenant_alerts(tenant).rules:
            condition = Rule.of(rule).condition
            extra = f" for {format_duration(rule.for_)}" if rule.for_ else ""
            notify = f" -> {', '.join(rule.notify)}" if rule.notify else ""
            lines.append(
                f"    alert {rule.name}: {rule.gateway}/{rule.device}/{rule.tag or '*'} "
                f"{condition}{extra} [{rule.severity}]{notify}"
            )
    for mapping in config.mappings:
        lines.append(f"  mapping {mapping.topic} -> table {mapping.table} ({', '.join(mapping.columns)})")
    return lines


def _where(storage: StorageConfig | None) -> str:
    if storage is None:
        return "the bridge's storage"
    if storage.backend == "postgres":
        return describe_dsn(storage.dsn or "")
    return f"sqlite {storage.path}"


def run(args: argparse.Namespace) -> int:
    print("\n".join(summary_lines(load_config(args.file))))
    return 0
