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
    """``--version``, ``--log-format`` and ``--log-level``, the same for every tool.

    Call ``accept_global_options_anywhere`` once the subcommands are added, so
    ``agent run --config X --log-format json`` works as well as
    ``agent --log-format json run --config X``.
    """
    parser.add_argument("--version", action="version", version=f"factory-edge {__version__}")
    _log_options(parser, log_level_help=log_level_help, default_format="text", default_level=None)


def _log_options(
    parser: argparse.ArgumentParser, *, log_level_help: str, default_format: object, default_level: object
) -> None:
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=default_format,
        help="log lines as key=value text (default) or JSON",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=default_level,
        help=f"least severe log level shown ({log_level_help})",
    )


def accept_global_options_anywhere(parser: argparse.ArgumentParser) -> None:
    """Let every subcommand (at any depth) take ``--log-format`` and ``--log-level`` after its name too.

    Their default there is ``SUPPRESS``: a subcommand sets them only when
    they are given after it, so the values given before it are kept.
    """
    level_help = next((a.help or "" for a in parser._actions if "--log-level" in a.option_strings), "")
    level_help = level_help.removeprefix("least severe log level shown (").removesuffix(")")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("--log-format" in a.option_strings for a in sub._actions):
                    _log_options(
                        sub,
                        log_level_help=level_help,
                        default_format=argparse.SUPPRESS,
                        default_level=argparse.SUPPRESS,
                    )
                accept_global_options_anywhere(sub)


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
        return report(exc)
    except BaseExceptionGroup as group:  # a task of a service's TaskGroup failed
        ours, rest = group.split(FactoryEdgeError)
        if ours is None or rest is not None:
            raise
        return max(report(exc) for exc in _leaves(ours))
    except KeyboardInterrupt:
        return 130
    except UnicodeEncodeError as exc:  # an argument of non-UTF-8 bytes, on its way to a database or a message
        print(f"Error: not UTF-8 text: {exc.object!r} ({exc.reason})", file=sys.stderr)
        return 2


def report(exc: FactoryEdgeError) -> int:
    """Print the error as ``Error: …`` lines on stderr; its exit code."""
    for line in str(exc).splitlines() or [type(exc).__name__]:
        print(f"Error: {line}", file=sys.stderr)
    return exc.exit_code


def _leaves(group: BaseExceptionGroup[FactoryEdgeError]) -> list[FactoryEdgeError]:
    out: list[FactoryEdgeError] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out
