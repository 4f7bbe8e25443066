"""``agent read --config FILE [--device NAME] [--json]``: poll once and print every tag."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from drivers.base import open_driver
from drivers.configtypes import ModbusTag
from drivers.modbus.notation import modicon_hint
from drivers.points import Point, Quality
from factory_edge.errors import ConfigError, DriverError
from factory_edge.logs import fields

from .configtypes import AgentConfig

log = logging.getLogger(__name__)


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "read",
        help="poll the devices once and print every tag's value, quality and error",
        description="Poll every device (or one) once and print each tag's decoded value, unit, quality "
        "and error. Exit code 1 when any tag could not be read.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="agent config (YAML)")
    p.add_argument("--device", metavar="NAME", help="only this device")
    p.add_argument("--json", action="store_true", help="print JSON: one object per device with its points")
    p.add_argument("--state-dir", metavar="DIR", help="where generated OPC UA client certificates are kept")
    p.set_defaults(handler=run)


async def read_devices(config: AgentConfig, devices: list[Any], state_dir: str | None) -> dict[str, list[Point]]:
    """Read the devices concurrently, each bounded by its own timeouts."""
    results: dict[str, list[Point]] = {}

    async def one(device: Any) -> None:
        options = {"state_dir": state_dir or config.state_dir} if device.protocol == "opcua" else {}
        try:
            async with open_driver(device, **options) as driver:
                results[device.name] = await driver.read()
        except Exception as exc:  # one broken driver must not hide the other devices' readings
            log.error("driver failed", exc_info=True, extra=fields(device=device.name))
            results[device.name] = [Point.bad(device.name, t.name, f"driver error: {exc}") for t in device.tags]

    async with asyncio.TaskGroup() as group:
        for device in devices:
            group.create_task(one(device), name=f"read[{device.name}]")
    return {d.name: results[d.name] for d in devices}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def table_lines(config: AgentConfig, results: dict[str, list[Point]]) -> list[str]:
    units = {(d.name, t.name): (t.unit or "") for d in config.devices for t in d.tags}
    rows = [("DEVICE", "TAG", "VALUE", "UNIT", "QUALITY", "ERROR")]
    for device, points in results.items():
        for p in points:
            rows.append((device, p.tag, _text(p.value), units.get((device, p.tag), ""), str(p.quality), p.error or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return [("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5]).rstrip() for r in rows]


def run(args: argparse.Namespace) -> int:
    from .config import load_config  # pydantic: not loaded by agent run

    config = load_config(args.config)
    devices = [d for d in config.devices if d.enabled]
    if args.device:  # a device named on the command line is read even when disabled
        devices = [d for d in config.devices if d.name == args.device]
        if not devices:
            names = ", ".join(d.name for d in config.devices) or "none"
            raise ConfigError(f"{args.config}: no device named {args.device!r} (devices: {names})")
    if not devices:
        raise ConfigError(f"{args.config}: devices: no enabled devices configured")
    results = asyncio.run(read_devices(config, devices, args.state_dir))
    if args.json:
        doc = [{"dev": name, "points": [p.to_payload() for p in points]} for name, points in results.items()]
        print(json.dumps(doc, indent=None))
    else:
        print("\n".join(table_lines(config, results)))
    failed = [(name, p) for name, points in results.items() for p in points if p.quality is not Quality.GOOD]
    if failed:
        total = sum(len(p) for p in results.values())
        first_device, first = failed[0]
        hint = ""
        if first.error == "illegal data address":
            tag = next(t for t in config.device(first_device).tags if t.name == first.tag)
            protocol = getattr(config.device(first_device), "addressing", "protocol") == "protocol"
            hint = f"; {modicon_hint(tag)}" if protocol and isinstance(tag, ModbusTag) and modicon_hint(tag) else ""
        raise DriverError(
            f"{len(failed)} of {total} tags not good (first: {first_device}.{first.tag}: "
            f"{first.error or first.quality}{hint})"
        )
    sys.stdout.flush()
    return 0
