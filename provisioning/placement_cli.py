"""``provisioning host …``, ``provisioning storage …`` and ``provisioning tenant move``: where tenants run."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from factory_edge.errors import ProvisioningError
from provisioning import moves, placement
from provisioning.layout import DataDir
from provisioning.registry import Registry


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """The ``host`` and ``storage`` command groups."""
    host = commands.add_parser(
        "host",
        help="broker hosts tenant brokers run on",
        description="Broker hosts: machines running tenant Mosquittos, each listening on the host's address; "
        "the proxies route each tenant's SNI name there. The host 'local' (127.0.0.1) always exists.",
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = host.add_parser(
        "add",
        parents=[common],
        help="register a broker host",
        description="Register a broker host. Its tenants' configs are rendered under <data>/hosts/NAME/.",
    )
    p.add_argument("name", metavar="NAME", help="host name: a DNS label (lowercase letters, digits, '-')")
    p.add_argument("--address", required=True, metavar="ADDR", help="IPv4 address (or DNS name) brokers listen on")
    p.add_argument(
        "--capacity",
        type=int,
        default=placement.DEFAULT_CAPACITY,
        metavar="N",
        help=f"tenants it is meant to hold, the weight of least-load placement (default "
        f"{placement.DEFAULT_CAPACITY}; 0: only tenants placed on it by name)",
    )
    p.set_defaults(handler=cmd_host_add)
    p = host.add_parser(
        "set", parents=[common], help="change a host's capacity", description="Change a broker host's capacity."
    )
    p.add_argument("name", metavar="NAME", help="the host")
    p.add_argument("--capacity", type=int, required=True, metavar="N", help="tenants it is meant to hold (0: no more)")
    p.set_defaults(handler=cmd_host_set)
    p = host.add_parser(
        "list", parents=[common], help="list broker hosts", description="Broker hosts, their load and directory."
    )
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    p.set_defaults(handler=cmd_host_list)

    storage = commands.add_parser(
        "storage",
        help="storage servers tenant data is placed on",
        description="Storage servers: PostgreSQL servers the bridge stores tenants' data on. A tenant on "
        "none uses the bridge's own storage.",
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = storage.add_parser(
        "add", parents=[common], help="register a storage server", description="Register a PostgreSQL server."
    )
    p.add_argument("name", metavar="NAME", help="storage name: a DNS label (lowercase letters, digits, '-')")
    p.add_argument(
        "--dsn",
        required=True,
        help="connection string the bridge uses (postgresql://user@host:5432/db), no password: use ~/.pgpass",
    )
    p.add_argument(
        "--capacity",
        type=int,
        default=placement.DEFAULT_CAPACITY,
        metavar="N",
        help=f"tenants it is meant to hold (default {placement.DEFAULT_CAPACITY}; 0: only by name)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="do not connect to it first (it is checked to be reachable, and not a database already registered)",
    )
    p.set_defaults(handler=cmd_storage_add)
    p = storage.add_parser(
        "set",
        parents=[common],
        help="change a storage server's capacity",
        description="Change a storage server's capacity.",
    )
    p.add_argument("name", metavar="NAME", help="the storage server")
    p.add_argument("--capacity", type=int, required=True, metavar="N", help="tenants it is meant to hold (0: no more)")
    p.set_defaults(handler=cmd_storage_set)
    p = storage.add_parser(
        "list", parents=[common], help="list storage servers", description="Storage servers and their load."
    )
    p.add_argument("--json", action="store_true", help="one JSON document for scripts")
    p.set_defaults(handler=cmd_storage_list)


def add_tenant_move(tenant: Any, common: argparse.ArgumentParser) -> None:
    p = tenant.add_parser(
        "move",
        parents=[common],
        help="move a tenant's broker to another host, or its data to another storage server",
        description="Move a tenant. --host: stop its broker (it saves its sessions and queued messages), "
        "carry its persistence to the new host, wait for the broker there, switch the proxies; gateways "
        "reconnect by themselves. --storage: place its data on another server; the bridge copies it.",
    )
    p.add_argument("name", metavar="NAME", help="the tenant")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--host", metavar="HOST", help="the broker host to move its broker to")
    where.add_argument("--storage", metavar="STORAGE", help="the storage server to move its data to")
    p.add_argument(
        "--wait",
        type=float,
        default=moves.WAIT_S,
        metavar="SECONDS",
        help=f"how long to wait for the broker on the new host (default {moves.WAIT_S:g})",
    )
    p.add_argument(
        "--broker-stopped",
        action="store_true",
        help="the old broker runs where provisioning cannot see it and was stopped, its persistence copied",
    )
    p.set_defaults(handler=cmd_tenant_move)


def _data(args: argparse.Namespace) -> DataDir:
    data = DataDir.resolve(args.data_dir)
    data.require()
    return data


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def cmd_host_add(args: argparse.Namespace) -> int:
    data = _data(args)
    with Registry(data.registry) as registry:
        host = placement.add_host(registry, args.name, args.address, args.capacity)
    print(f"host {host.name} added: brokers listen on {host.address}, capacity {host.capacity} tenants")
    print(f"  its brokers' configs: {data.host_dir(host.name)}/<tenant>/mosquitto.conf")
    return 0


def cmd_host_set(args: argparse.Namespace) -> int:
    data = _data(args)
    with Registry(data.registry) as registry:
        host = placement.set_host_capacity(registry, args.name, args.capacity)
    print(f"host {host.name}: capacity {host.capacity} tenants")
    return 0


def cmd_host_list(args: argparse.Namespace) -> int:
    data = _data(args)
    with Registry(data.registry) as registry:
        hosts, load = registry.hosts(), placement.host_load(registry)
    if args.json:
        print(
            json.dumps(
                [
                    {"name": h.name, "address": h.address, "capacity": h.capacity, "tenants": load.get(h.name, 0)}
                    for h in hosts
                ]
            )
        )
        return 0
    _table(
        [("HOST", "ADDRESS", "TENANTS", "CAPACITY", "CONFIGS")]
        + [
            (
                h.name,
                h.address,
                str(load.get(h.name, 0)),
                str(h.capacity),
                str(data.root / "tenants") if h.name == placement.LOCAL_HOST else str(data.host_dir(h.name)),
            )
            for h in hosts
        ]
    )
    return 0


def cmd_storage_add(args: argparse.Namespace) -> int:
    data = _data(args)
    with Registry(data.registry) as registry:
        server = placement.add_storage(registry, args.name, args.dsn, args.capacity, check=not args.no_check)
    print(f"storage server {server.name} added: {server.dsn}, capacity {server.capacity} tenants")
    return 0


def cmd_storage_set(args: argparse.Namespace) -> int:
    data = _data(args)
    with Registry(data.registry) as registry:
        server = placement.set_storage_capacity(registry, args.name, args.capacity)
    print(f"storage server {server.name}: capacity {server.capacity} tenants")
    return 0


def cmd_storage_list(args: argparse.Namespace) -> int:
    data = _data(args)
    with Registry(data.registry) as registry:
        servers, load = registry.storage_servers(), placement.storage_load(registry)
    if args.json:
        print(
            json.dumps(
                [
                    {"name": s.name, "dsn": s.dsn, "capacity": s.capacity, "tenants": load.get(s.name, 0)}
                    for s in servers
                ]
            )
        )
        return 0
    if not servers:
        print("no storage servers: every tenant uses the bridge's own storage (add one: provisioning storage add)")
        return 0
    _table(
        [("STORAGE", "DSN", "TENANTS", "CAPACITY")]
        + [(s.name, s.dsn, str(load.get(s.name, 0)), str(s.capacity)) for s in servers]
    )
    return 0


def cmd_tenant_move(args: argparse.Namespace) -> int:
    data = _data(args)
    if args.storage is not None:
        moved = moves.move_storage(data, args.name, args.storage)
        print(f"tenant {moved.tenant}: storage {moved.old} -> {moved.new}")
        print(f"  {data.tenants_index}: storage = {moved.new}, storage_previous = {moved.old}")
        print("  the bridge copies the tenant's data from the old server while it holds the tenant's ingest")
        return 0
    if args.wait <= 0:
        raise ProvisioningError(f"--wait {args.wait:g} must be above 0 seconds")
    result = moves.move_broker(
        data, args.name, args.host, wait_s=args.wait, broker_stopped=args.broker_stopped, progress=print
    )
    print(
        f"tenant {result.tenant} moved from host {result.old_host} to {result.new_host} ({result.new_address}); "
        f"no broker for {result.answered_s:.2f}s, proxies switched after {result.switched_s:.2f}s"
    )
    return 0


__all__ = ["add_commands", "add_tenant_move"]
