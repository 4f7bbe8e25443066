"""``agent simulate``: Modbus TCP and OPC UA servers playing a small plant."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import Any

from factory_edge.extras import install_hint, missing
from factory_edge.logs import fields

log = logging.getLogger(__name__)


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "simulate",
        help="run simulated machines: a Modbus TCP server and an OPC UA server",
        description="Serve a CNC, a press and a compressor over Modbus TCP (unit ids 1, 2, 3) and an oven "
        "over OPC UA, with values that move over time, until interrupted. "
        "config/agent-demo.yaml reads them. Register map and node list: docs/simulator.md.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--modbus-port", type=int, default=5020, metavar="P", help="Modbus TCP port (default 5020; 0 disables)"
    )
    p.add_argument("--opcua-port", type=int, default=4840, metavar="P", help="OPC UA port (default 4840; 0 disables)")
    p.add_argument("--quiet", action="store_true", help="do not print the register map and node list")
    p.set_defaults(handler=run, default_log_level="info")


async def serve(args: argparse.Namespace) -> None:
    from drivers.simulate.machines import demo_machines, register_map_lines  # not loaded by agent run
    from drivers.simulate.modbus_server import ModbusSimulator

    async with contextlib.AsyncExitStack() as stack:
        if args.modbus_port:
            machines = demo_machines()
            await stack.enter_async_context(ModbusSimulator(machines=machines, host=args.host, port=args.modbus_port))
            if not args.quiet:
                print(f"Modbus TCP on {args.host}:{args.modbus_port}")
                print("\n".join(register_map_lines(machines)))
        if args.opcua_port and missing("opcua"):
            print(f"OPC UA: not simulated (oven-1 needs the [opcua] extra: {install_hint('opcua')})", flush=True)
            log.warning(
                "OPC UA not simulated",
                extra=fields(reason="the [opcua] extra is not installed", fix=install_hint("opcua")),
            )
        elif args.opcua_port:
            from drivers.simulate.opcua_server import OpcuaSimulator, node_table

            opcua = await stack.enter_async_context(OpcuaSimulator(host=args.host, port=args.opcua_port))
            if not args.quiet:
                print(f"OPC UA on {opcua.endpoint}")
                for node, kind, text in node_table():
                    print(f"  {node:<32} {kind:<8} {text}")
        print("simulating; Ctrl-C stops", flush=True)
        log.info("simulator ready", extra=fields(modbus_port=args.modbus_port, opcua_port=args.opcua_port))
        await asyncio.Event().wait()


def run(args: argparse.Namespace) -> int:
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0
