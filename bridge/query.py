"""``bridge query``: a tenant's recent values, points, alert history and dead letters, from the terminal."""

from __future__ import annotations

import argparse
import base64
import json
import time
from datetime import UTC, datetime
from typing import Any

from factory_edge.errors import ConfigError
from factory_edge.units import parse_duration

from .config import load_config
from .storage import Table, make_store
from .storage.base import QUERY_KINDS

_TIME_COLUMNS = {"ts", "since", "received_at", "changed_at"}


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "query",
        help="print a tenant's newest values, points, alerts or dead letters as a table or JSON",
        description="Read a tenant's store (read-only). values: the newest reading of every series; points: "
        "recent readings, newest first; alerts: the alert history (every state change), or with "
        "--active the alerts pending or firing now; dead-letters: messages that could not be stored, "
        "with the reason; counts: rows per table.",
    )
    p.add_argument("what", choices=QUERY_KINDS, help="what to show")
    p.add_argument("--config", required=True, metavar="FILE", help="bridge config (YAML): where the storage is")
    p.add_argument("--tenant", metavar="NAME", help="the tenant (optional when the config has only one)")
    p.add_argument("--gateway", metavar="GW", help="only this gateway")
    p.add_argument("--device", metavar="NAME", help="only this device")
    p.add_argument("--tag", metavar="NAME", help="only this tag")
    p.add_argument("--since", metavar="DURATION", help="only the last DURATION (e.g. 10m, 2h)")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="at most N rows (default 100)")
    p.add_argument("--active", action="store_true", help="alerts: only those pending or firing now")
    p.add_argument("--json", action="store_true", help="print JSON: one object per row, times in epoch ms")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.tenant:
        tenant = config.tenant(args.tenant).name
    elif len(config.tenants) == 1:
        tenant = config.tenants[0].name
    else:
        raise ConfigError(f"--tenant: choose one of {', '.join(t.name for t in config.tenants)}")
    since_ms = None
    if args.since:
        try:
            since_ms = int((time.time() - parse_duration(args.since)) * 1000)
        except ValueError as exc:
            raise ConfigError(f"--since: {exc}") from None
    if args.limit < 1:
        raise ConfigError("--limit: must be at least 1")
    store = make_store(config.tenant_storage(config.tenant(tenant)), tenant)
    store.open_read()
    try:
        table = store.query(
            args.what,
            gw=args.gateway,
            device=args.device,
            tag=args.tag,
            since_ms=since_ms,
            limit=args.limit,
            active=args.active,
        )
    finally:
        store.close()
    if args.json:
        print(json.dumps([_json_row(table.columns, row) for row in table.rows], ensure_ascii=False))
    else:
        print("\n".join(table_lines(table)))
    return 0


def _json_row(columns: tuple[str, ...], row: tuple[Any, ...]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name, value in zip(columns, row):
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            try:
                doc[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                doc[f"{name}_base64"] = base64.b64encode(data).decode()
            continue
        doc[name] = value
    return doc


def _cell(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name in _TIME_COLUMNS and isinstance(value, int):
        moment = datetime.fromtimestamp(value / 1000, UTC)
        return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{value % 1000:03d}Z"
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8", "replace")
        text = text.replace("\n", " ")
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def table_lines(table: Table) -> list[str]:
    if not table.rows:
        return ["(no rows)"]
    rows = [tuple(c.upper() for c in table.columns)]
    rows += [tuple(_cell(name, value) for name, value in zip(table.columns, row)) for row in table.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(table.columns))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
