"""What every command-line tool shares: logging setup and one-line errors.

Each tool builds its argparse parser (subcommands set ``handler`` and
optionally ``default_log_level``) and calls ``run_command``; the project's
errors become ``Error: …`` lines on stderr and the error's exit code, never
a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from . import __version__
from .errors import FactoryEdgeError
from .logs import setup_logging


def add_global_options(parser: argparse.ArgumentParser, *, log_level_help: str) -> None:
    """``--version``, ``--log-format`` and ``--log-level``, the same for every tool."""
    parser.add_argument("--version", action="version", version=f"factory-edge {__version__}")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="log lines as key=value text (default) or JSON")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None,
                        help=f"least severe log level shown ({log_level_help})")


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, default_log_level: str) -> int:
    """Parse ``argv``, set up logging, run the chosen handler and map its errors to an exit code."""
    args = parser.parse_args(argv)
    setup_logging(fmt=args.log_format, level=args.log_level or getattr(args, "default_log_level", default_log_level))
    try:
        result = args.handler(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except FactoryEdgeError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"Error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
