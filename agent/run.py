"""``agent run --config FILE [--state-dir D]``: poll, buffer and publish until stopped."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from factory_edge.errors import FactoryEdgeError
from factory_edge.logs import fields
from factory_edge.mqtt import tls_context

from .configproc import load_config
from .identity import resolve
from .remote import startup
from .runtime import Agent

log = logging.getLogger(__name__)


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "run",
        help="poll the devices, buffer every reading and publish to the broker until stopped",
        description="Run the agent: poll every device on its schedule, commit every reported point to the "
        "buffer in the state directory, and publish batches over MQTT v5 (QoS 1) to the broker "
        "from the config's mqtt: section or the provisioned identity. SIGTERM or Ctrl-C stops "
        "cleanly: a read under way gets up to 2 s to be answered and buffered, buffered batches up to 3 s to "
        "reach the broker, then a retained offline status; "
        "anything still unacknowledged stays buffered for the next start.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="agent config (YAML)")
    p.add_argument("--state-dir", metavar="DIR", help="buffer, identity and status (default: the config's state_dir)")
    p.set_defaults(handler=run, default_log_level="info")


def dump_stacks_on_sigusr2(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """``kill -USR2 <pid>`` writes every thread's stack to stderr (the journal), and, once the event loop gets
    to it, every task's: what a hung agent is doing."""
    import faulthandler

    if loop is not None:
        loop.add_signal_handler(signal.SIGUSR2, _dump_tasks)
    faulthandler.register(signal.SIGUSR2, all_threads=True, chain=loop is not None)


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        print(f"Task {task.get_name()}:", file=sys.stderr)
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


async def serve(config_path: Path, state_dir: str | None) -> None:
    # A stop asked while starting (the config is checked in a child process first) is kept, not fatal:
    # the agent then stops as soon as it can, with exit status 0 like any stop. A plain handler, run at
    # once even while this thread waits for the child; the event loop's handlers replace it below.
    loop = asyncio.get_running_loop()
    asked: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: asked.append(signum))
    try:
        local = load_config(config_path)
        directory = Path(state_dir or local.state_dir)  # the local file's: a pushed config cannot move the state
        directory.mkdir(parents=True, exist_ok=True)
        start = startup(config_path, directory)  # the local file, or the configuration pushed over it (remote.py)
    except FactoryEdgeError:
        if asked:  # the stop also reached a child checking a config (systemd stops the whole cgroup)
            log.info("stopped while starting")
            return
        raise
    if asked:
        log.info("stopped while starting")
        return
    for note in start.notes:
        log.warning("configuration", extra=fields(note=note))
    config = start.config
    source = str(config_path) if start.running.source == "local" else f"pushed config version {start.running.version}"
    gateway, broker = resolve(config, directory, base_dir=config_path.resolve().parent, source=source)
    if broker.tls:
        tls_context(broker)  # a wrong TLS file is a config error now, not a retry loop
    log.info(
        "configuration",
        extra=fields(source=start.running.source, version=start.running.version, config_hash=start.running.hash),
    )
    async with Agent(
        config,
        gateway=gateway,
        broker=broker,
        state_dir=directory,
        config_path=config_path,
        running=start.running,
        outcome=start.outcome,
    ) as agent:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        if asked:
            agent.stop()
        dump_stacks_on_sigusr2(loop)
        await agent.wait_stopped()


def run(args: argparse.Namespace) -> int:
    dump_stacks_on_sigusr2()
    asyncio.run(serve(Path(args.config), args.state_dir))
    return 0
