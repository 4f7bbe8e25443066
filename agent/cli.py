"""The ``agent`` command.

Each subcommand lives in its own module; this one parses arguments, sets up
logging and turns the project's errors into one line on stderr with a
non-zero exit code (2 for config errors). Nothing below it prints tracebacks
for a user's mistake.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from factory_edge.cli import accept_global_options_anywhere, add_global_options, run_command

from . import checkconfig, provision, read, run, simulate, status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent",
        description="factory-edge agent: reads machines over Modbus and OPC UA and publishes to MQTT.",
    )
    add_global_options(
        parser,
        log_level_help="default: info for long-running commands, "
        "error for one-shot ones whose output already says what failed",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (run, checkconfig, read, status, simulate, provision):
        module.add_parser(commands)
    accept_global_options_anywhere(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, default_log_level="error")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
