"""``agent check-config FILE``: validate a config and show what one poll will do."""

from __future__ import annotations

import argparse
from typing import Any

from drivers.config import ModbusDeviceBase, OpcuaDevice
from drivers.modbus.plan import Limits, plan_reads
from factory_edge.units import format_duration

from .config import AgentConfig, load_config


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "check-config", help="validate a config file and print its devices, tags and read plan",
        description="Validate FILE. Prints a summary (devices, tags, the Modbus requests each poll makes) "
                    "or every error, one per line, naming the file, the path inside it and the problem (exit code 2).")
    p.add_argument("file", metavar="FILE", help="agent config (YAML)")
    p.set_defaults(handler=run)


def summary_lines(config: AgentConfig) -> list[str]:
    """The summary printed for a valid config."""
    lines: list[str] = []
    total_tags = total_requests = 0
    for device in config.devices:
        total_tags += len(device.tags)
        head = f"  {device.name}  {device.protocol} {device.address}"
        if isinstance(device, ModbusDeviceBase):
            reads = plan_reads(device.tags, Limits.of(device))
            total_requests += len(reads)
            lines.append(f"{head} unit {device.unit}  poll {format_duration(device.poll)}  "
                         f"{len(device.tags)} tags  {len(reads)} requests per poll")
            lines += [f"    {r}" for r in reads]
        elif isinstance(device, OpcuaDevice):
            security = "" if device.security.policy == "None" else f"  {device.security.policy}/{device.security.mode}"
            if device.mode == "poll":
                total_requests += 1
                how = f"poll {format_duration(device.poll)}  1 read request per poll"
            else:
                how = f"subscribe, sampling {format_duration(device.poll)}  {len(device.tags)} monitored items"
            lines.append(f"{head}{security}  {len(device.tags)} tags  {how}")
    gateway = config.gateway or "(from provisioning)"
    header = (f"OK: gateway {gateway}, {len(config.devices)} devices, {total_tags} tags, "
              f"{total_requests} requests per poll cycle")
    return [header, *lines]


def run(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print("\n".join(summary_lines(config)))
    return 0
