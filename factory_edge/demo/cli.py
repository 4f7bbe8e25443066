"""The demo's command line: bring the story up, show it, stop everything cleanly on Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from factory_edge.errors import FactoryEdgeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="The whole story on this machine, on 127.0.0.1: simulated machines, two tenants with their "
        "own Mosquitto behind one SNI-routing HAProxy, the provisioning API, a gateway provisioned "
        "with a key, the agent, and the bridge storing into SQLite and alerting when the CNC "
        "overheats. Runs until Ctrl-C, which stops everything.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("state/demo"),
        help="where the demo keeps its files and logs (default state/demo; emptied at start)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="stop once the alert has fired and resolved (exit 0), or exit 1 if that takes "
        "longer than --timeout: for scripts and tests",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long the CNC may take to overheat and cool down (default 120)",
    )
    parser.add_argument(
        "--port-offset",
        type=int,
        default=0,
        metavar="N",
        help="add N to every port (5020, 4840, 8883, 8443, 18831, 18832) to run beside something that uses them",
    )
    return parser


_stopping = False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    global _stopping
    _stopping = True
    raise KeyboardInterrupt


def _cut_lock(exc: RuntimeError) -> bool:
    """The stop landed inside a lock's wait (queue.get): CPython then fails releasing that lock, and the
    KeyboardInterrupt becomes "release unlocked lock". That is the stop, not a fault."""
    return _stopping and "release unlocked lock" in str(exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported once the arguments are parsed: --help works with a bare python3 (scripts/demo --help).
    from .stack import Ports, Stack, say, shown
    from .story import Story, stored, where

    ports = Ports.with_offset(args.port_offset)
    if min(ports.modbus, ports.opcua) < 1024 or max(ports.brokers) > 65535:
        print(f"Error: --port-offset {args.port_offset}: ports must stay within 1024..65535", file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell's background job starts with it ignored
        signal.signal(signum, _interrupt)
    stack = Stack(args.dir, ports)
    story: Story | None = None
    started = time.monotonic()
    code = 0
    try:
        say(f"factory-edge demo: the whole story on this machine; files and logs in {shown(stack.root)}/")
        stack.up()
        story = Story(stack)
        story.first_data()
        where(stack)
        if not story.overheat(args.timeout):
            if args.once:
                raise FactoryEdgeError(
                    f"the alert did not fire and resolve within {args.timeout:g}s; "
                    f"see {shown(stack.logs)}/bridge.log and agent.log"
                )
            say(f"  (no alert within {args.timeout:g} s; see {shown(stack.logs)}/bridge.log)")
        say()
        stored(stack)
        say()
        if args.once:
            say(f"Done in {time.monotonic() - started:.0f} s (--once); stopping.")
        else:
            say("Running until Ctrl-C. Alerts show here as they change; the technician command above keeps working.")
            story.follow()
    except KeyboardInterrupt:
        say()
        say("Stopping.")
    except RuntimeError as exc:
        if not _cut_lock(exc):
            raise
        say()
        say("Stopping.")
    except (FactoryEdgeError, OSError) as exc:  # OSError: a file or program the demo could not use
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean stop short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if story is not None:
            story.close()
        if stack.down():
            say(f"Stopped every process; the files stay in {shown(stack.root)}/ until the next run.")
    return code
