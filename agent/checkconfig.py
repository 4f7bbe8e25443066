"""``agent check-config FILE``: validate a config and show what one poll will do."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from drivers.configtypes import ModbusDeviceBase, OpcuaDevice
from drivers.modbus.notation import address_warnings
from drivers.modbus.plan import Limits, plan_reads
from factory_edge.errors import ConfigError
from factory_edge.mqtt import tls_file_problems
from factory_edge.units import format_duration, plural

from .configtypes import AgentConfig
from .identity import broker_from_config


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "check-config",
        help="validate a config file and print its devices, tags and read plan",
        description="Validate FILE. Prints a summary (devices, tags, the Modbus requests each poll makes) "
        "or every error, one per line, naming the file, the path inside it and the problem (exit code 2).",
    )
    p.add_argument("file", metavar="FILE", nargs="?", help="agent config (YAML)")
    p.add_argument("--config", metavar="FILE", help="the same, as agent run and agent read take it")
    p.add_argument(
        "--expand",
        action="store_true",
        help="also print every device with its profile applied and its ranges expanded, one tag a line, "
        "with 0-based protocol addresses",
    )
    p.set_defaults(handler=run)


def summary_lines(config: AgentConfig) -> list[str]:
    """The summary printed for a valid config."""
    lines: list[str] = []
    total_tags = total_requests = 0
    for device in config.devices:
        total_tags += len(device.tags)
        head = f"  {device.name}  {device.protocol} {device.address}"
        if device.profile:
            head += f"  profile {device.profile}"
        if isinstance(device, ModbusDeviceBase):
            reads = plan_reads(device.tags, Limits.of(device))
            total_requests += len(reads)
            lines.append(
                f"{head} unit {device.unit}  poll {format_duration(device.poll)}  "
                f"{plural(len(device.tags), 'tag')}  {plural(len(reads), 'request')} per poll"
            )
            lines.append(f"    addresses: {NOTATION[device.addressing]}")
            lines += [f"    {r}" for r in reads]
        elif isinstance(device, OpcuaDevice):
            security = "" if device.security.policy == "None" else f"  {device.security.policy}/{device.security.mode}"
            if device.mode == "poll":
                total_requests += 1
                how = f"poll {format_duration(device.poll)}  1 read request per poll"
            else:
                how = (
                    f"subscribe, sampling {format_duration(device.poll)}  {plural(len(device.tags), 'monitored item')}"
                )
            lines.append(f"{head}{security}  {plural(len(device.tags), 'tag')}  {how}")
    gateway = config.gateway or "(from provisioning)"
    header = (
        f"OK: gateway {gateway}, {plural(len(config.devices), 'device')}, {plural(total_tags, 'tag')}, "
        f"{plural(total_requests, 'request')} per poll cycle"
    )
    return [header, *lines]


NOTATION = {
    "protocol": "0-based protocol addresses, as sent on the wire (holding register 40001 of a manual is address 0)",
    "modicon": "Modicon notation, 1-based, table from the first digit (40001 and 400001: holding register 0), "
    "converted to protocol addresses below",
}


def expanded_lines(config: AgentConfig) -> list[str]:
    """``--expand``: each device as the agent runs it, one tag per line (protocol addresses)."""
    lines: list[str] = []
    for device in config.devices:
        keys = device.model_dump(  # type: ignore[union-attr]  # check-config holds the models (agent/config.py)
            mode="json", exclude={"tags", "name", "protocol", "addressing"}, exclude_defaults=True
        )
        for key in ("poll", "timeout", "backoff_max"):
            if key in keys:
                keys[key] = format_duration(keys[key])
        if isinstance(device, ModbusDeviceBase):
            keys = {"unit": device.unit, **keys}
        lines.append(f"{device.name}: {device.protocol} {_flow(keys)}".rstrip())
        for tag in device.tags:
            tag_keys = tag.model_dump(mode="json", exclude={"name"}, exclude_defaults=True)  # type: ignore[union-attr]
            if isinstance(device, ModbusDeviceBase):
                tag_keys = {"table": str(tag.table), "address": tag.address, **tag_keys}  # type: ignore[union-attr]  # Modbus tags have both
            if tag.deadband is not None:
                tag_keys["deadband"] = str(tag.deadband)
            lines.append(f"  {tag.name}: {_flow(tag_keys)}")
    return lines


def _flow(keys: dict[str, Any]) -> str:
    if not keys:
        return ""
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in keys.items()) + "}"


def config_file(args: argparse.Namespace) -> str:
    """FILE or ``--config FILE``: one of them, or both naming the same file."""
    if args.file and args.config and args.file != args.config:
        raise ConfigError(f"two config files given: {args.file} and --config {args.config}; check one at a time")
    path: str | None = args.file or args.config
    if not path:
        raise ConfigError("no config file given: agent check-config FILE (or --config FILE)")
    return path


def check_tls_files(config: AgentConfig, path: str) -> None:
    """The CA, certificate and key files of the mqtt: section exist and are what their fields say."""
    broker = broker_from_config(config, base_dir=Path(path).resolve().parent, source=path)
    if broker is not None and broker.tls:
        problems = tls_file_problems(broker)
        if problems:
            raise ConfigError("\n".join(problems))


def check_devices(config: AgentConfig, path: str) -> None:
    """A config that polls nothing is a mistake (an empty file, devices: at the wrong indentation)."""
    if not config.devices:
        raise ConfigError(
            f"{path}: devices: none configured, so the agent would poll nothing; "
            "list the machines under devices: (docs/config.md)"
        )


def run(args: argparse.Namespace) -> int:
    from .config import load_config  # pydantic: loaded by the commands that check a file, not by agent run

    path = config_file(args)
    config = load_config(path)
    check_devices(config, path)
    check_tls_files(config, path)
    for warning in address_warnings(config, path):
        print(f"Warning: {warning}", file=sys.stderr)
    if args.expand:
        print("\n".join(expanded_lines(config)))
    print("\n".join(summary_lines(config)))
    return 0
