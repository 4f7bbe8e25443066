"""``agent status [--state-dir D] [--json]``: what the running agent is doing."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from factory_edge.errors import FactoryEdgeError

from .buffer import NOT_LOST, age_seconds
from .bufferread import read_stats
from .configtypes import DEFAULT_STATE_DIR
from .runtime import BUFFER_FILE, STATUS_FILE

STALE_AFTER_S = 10.0


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "status",
        help="show connection state, buffer depth, drops and every device's last read",
        description="Show the running agent's broker connection, buffer depth and oldest point age, drops, "
        "points/s, and every device's state, last good read and last error. Reads the state "
        "directory, so it works while the agent runs (and tells when it does not).",
    )
    p.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR, help=f"default {DEFAULT_STATE_DIR}")
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    p.set_defaults(handler=run)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect(state_dir: Path) -> dict[str, Any]:
    """Status file of the running agent (if any) plus the buffer's own figures."""
    if not state_dir.is_dir():
        raise FactoryEdgeError(f"{state_dir}: no such state directory (see --state-dir)")
    doc: dict[str, Any] = {}
    status_path = state_dir / STATUS_FILE
    if status_path.exists():
        for attempt in range(3):  # on a full disk the agent rewrites the file in place: a read may catch it midway
            try:
                doc = json.loads(status_path.read_text())
                break
            except (OSError, ValueError) as exc:
                if attempt == 2:
                    raise FactoryEdgeError(f"{status_path}: unreadable status file: {exc}") from exc
                time.sleep(0.1)
    running = bool(doc) and _alive(int(doc.get("pid", 0))) and time.time() - doc.get("updated", 0) < STALE_AFTER_S
    doc["running"] = running
    if not running and "connection" in doc:
        doc["connection"]["state"] = "stopped"
    stats = read_stats(state_dir / BUFFER_FILE)
    if stats is not None:
        drops = dict(stats.drops)
        if running:  # what the running agent could not count on disk yet (no room) is in its status
            for reason, points in doc.get("writer", {}).get("dropped_unsaved", {}).items():
                drops[reason] = drops.get(reason, 0) + points
        doc["buffer"] = {
            "batches": stats.batches,
            "points": stats.points,
            "bytes": stats.bytes,
            "oldest_age_s": _age(stats.oldest_ms),
            "unconfirmed_batches": stats.unconfirmed,
            "unconfirmed_points": stats.unconfirmed_points,
            "oldest_unconfirmed_age_s": _age(stats.oldest_unconfirmed_ms),
            "disk_bytes": stats.disk_bytes,
            "dropped_points": sum(n for reason, n in drops.items() if reason not in NOT_LOST),
            "dropped_batches": stats.dropped_batches,
            "dropped_by_reason": drops,
            "next_seq": stats.next_seq,
            "events_pending": stats.events,
        }
    if not running:
        doc.pop("writer", None)
        if "publish" in doc:
            doc["publish"]["points_per_s"] = 0.0  # a stopped agent publishes nothing
    if not doc.get("connection") and stats is None:
        raise FactoryEdgeError(f"{state_dir}: no agent has run with this state directory")
    return doc


def _age(ms: int | None) -> float | None:
    return None if ms is None else round(age_seconds(ms) or 0, 1)


def _ago(ms: int | None) -> str:
    if ms is None:
        return "never"
    seconds = time.time() - ms / 1000
    return f"{seconds:.1f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def text_lines(doc: dict[str, Any]) -> list[str]:
    conn = doc.get("connection", {})
    pub = doc.get("publish", {})
    buf = doc.get("buffer", {})
    drops = buf.get("dropped_by_reason", {})
    lines = [
        f"gateway      {doc.get('gw', '?')}  ({'running, pid ' + str(doc.get('pid')) if doc['running'] else 'not running'})",
        f"broker       {conn.get('broker', '?')}  {conn.get('state', 'unknown')}"
        + (f"  last error: {conn['last_error']}" if conn.get("last_error") else ""),
        f"buffer       {buf.get('points', 0)} points in {_n(buf.get('batches', 0), 'batch', 'batches')} to send"
        + (f", oldest {buf['oldest_age_s']}s" if buf.get("oldest_age_s") is not None else "")
        + f"; {_n(buf.get('unconfirmed_batches', 0), 'batch', 'batches')} awaiting storage confirmation"
        + (f", oldest {buf['oldest_unconfirmed_age_s']}s" if buf.get("oldest_unconfirmed_age_s") is not None else "")
        + f"; {buf.get('disk_bytes', 0)} bytes on disk"
        + ("  DISK FULL: readings are dropped" if doc.get("writer", {}).get("disk_full") else ""),
        f"dropped      {buf.get('dropped_points', 0)} points"
        + (
            " ("
            + ", ".join(f"{reason} {n}" for reason, n in sorted(drops.items()) if n and reason not in NOT_LOST)
            + ")"
            if any(n for r, n in drops.items() if r not in NOT_LOST)
            else ""
        )
        + (f"; {drops['released']} released to the broker's keeping (buffer full)" if drops.get("released") else ""),
        (
            "publishing   "
            + (f"{pub.get('points_per_s', 0)} points/s, " if doc["running"] else "stopped; last run: ")
            + f"{pub.get('acked_points', 0)} accepted by the broker, {pub.get('confirmed_points', 0)} confirmed stored"
            + (f", {_n(conn.get('reconnects', 0), 'reconnect', 'reconnects')}" if conn else "")
        ),
    ]
    config = doc.get("config")
    if config:
        what = f"pushed version {config.get('version')}" if config.get("source") == "pushed" else "local file"
        line = f"config       {what}, hash {config.get('hash')}"
        last = config.get("last")
        if last:
            line += f"; last push: version {last.get('version')} {str(last.get('state', '')).replace('_', ' ')}"
            line += f" ({last['reason']})" if last.get("reason") else ""
        lines.append(line)
    devices = doc.get("devices", {})
    if devices:
        rows = [("DEVICE", "STATE", "LAST GOOD READ", "POINTS", "LAST ERROR")]
        for name, dev in devices.items():
            rows.append(
                (
                    name,
                    dev["state"],
                    _ago(dev.get("last_good_ms")),
                    str(dev.get("points", 0)),
                    dev.get("last_error") or "",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines.append("")
        lines += [("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]).rstrip() for r in rows]
    return lines


def run(args: argparse.Namespace) -> int:
    doc = collect(Path(args.state_dir))
    print(json.dumps(doc) if args.json else "\n".join(text_lines(doc)))
    return 0
