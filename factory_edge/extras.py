"""Which optional parts of factory-edge are installed, and the one line that says how to add one.

The base distribution is the agent with Modbus; the rest comes in extras::

    pip install factory-edge              # agent, Modbus TCP/RTU
    pip install 'factory-edge[opcua]'     # + OPC UA devices (asyncua)
    pip install 'factory-edge[cloud]'     # + provisioning service and bridge

Code that needs an extra asks here first (``require``), so a missing one is
a ``MissingExtra`` naming the extra and the command, never an ImportError
traceback. The Debian package for gateways carries the base and ``[opcua]``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

from .errors import FactoryEdgeError

EXTRAS: dict[str, tuple[str, ...]] = {
    "opcua": ("asyncua",),
    "cloud": ("fastapi", "uvicorn", "sqlite_utils", "psycopg", "orjson", "aiomqtt", "argon2"),
}
WHAT = {"opcua": "OPC UA", "cloud": "the cloud side (provisioning, bridge, console)"}


class MissingExtra(FactoryEdgeError):
    """A part of factory-edge needs an extra that is not installed."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing ("google" for google.protobuf)
        return False


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (empty when it is installed)."""
    return [module for module in EXTRAS[extra] if not _installed(module)]


def install_hint(extra: str) -> str:
    return f"pip install 'factory-edge[{extra}]'"


def require(extra: str, what: str) -> None:
    """Raise MissingExtra, naming ``what`` needs it, unless every module of ``extra`` is installed."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(
            f"{what} needs the [{extra}] extra ({', '.join(absent)} not installed): {install_hint(extra)}"
        )


def guarded_main(extra: str, command: str, module: str, argv: Sequence[str] | None = None) -> int:
    """Run ``module.main(argv)``, a command that lives in an extra, or say in one line how to install it (exit 1)."""
    try:
        require(extra, f"the {command} command")
    except MissingExtra as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    main: Callable[[Sequence[str] | None], int] = importlib.import_module(module).main
    return main(argv)
