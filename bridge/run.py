"""``bridge run --config FILE [--instance NAME]``: ingest every tenant until stopped."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from .config import load_config
from .service import Bridge


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "run",
        help="connect to every tenant broker and store what arrives until stopped",
        description="Run the bridge: connect to each tenant's broker with the bridge's certificate (MQTT v5, "
        "persistent session), store gateway batches, status, events and mapped topics in the "
        "tenant's own SQLite file or PostgreSQL schema, evaluate the alert rules, and acknowledge "
        "each message only once its rows are committed. SIGTERM or Ctrl-C stops cleanly; anything "
        "not yet acknowledged is delivered again by the broker at the next start. With tenants_from, "
        "tenants added, removed or changed in tenants.json are started, stopped or restarted within "
        "2 s (at once on SIGHUP) without touching the others.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="bridge config (YAML)")
    p.add_argument(
        "--instance",
        metavar="NAME",
        help="this process's name, unique among the processes sharing a tenant: it picks the "
        "process's own certificate (identity bridge.NAME) from tenants_from or a tenant's "
        "identities (default: the config's instance, else main)",
    )
    p.set_defaults(handler=run, default_log_level="info")


async def serve(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    async with Bridge(config, instance=args.instance) as bridge:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, bridge.stop)
        loop.add_signal_handler(signal.SIGHUP, bridge.reload)  # read tenants.json again now
        await bridge.wait_stopped()


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(args))
    return 0
