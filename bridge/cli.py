"""The ``bridge`` command.

Each subcommand lives in its own module; this one parses arguments, sets up
logging and turns the project's errors into one line on stderr with a
non-zero exit code (2 for config errors).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from factory_edge.cli import accept_global_options_anywhere, add_global_options, run_command

from . import checkconfig, leave, query, run, usage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bridge",
        description="factory-edge bridge: tenant brokers into tenant storage and the alert engine.",
    )
    add_global_options(parser, log_level_help="default: info for run, error otherwise")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (run, query, checkconfig, leave, usage):
        module.add_parser(commands)
    accept_global_options_anywhere(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, default_log_level="error")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
