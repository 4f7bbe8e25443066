"""OPC UA subscription throughput: the driver against a bare asyncua subscription.

::

    python bench/bench_opcua.py [--nodes 1000] [--seconds 10] [--interval-ms 100]

Starts the oven simulator with ``--nodes`` extra float variables on a free
loopback port, in a child process (so the server's work does not share the
measuring event loop), and changes every one of them each interval. Then,
for ``--seconds`` each, counts the data-change notifications received:

1. by ``OpcuaDriver`` in subscribe mode (points emitted), then
2. by a bare asyncua client subscription (iterator API, no driver),

and prints both rates and their ratio (also per change the server made,
since the server's pace varies a little), then the time of one batched
poll-mode read of every node, by the driver and by asyncua's
``read_values``. Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import math
import multiprocessing
import multiprocessing.connection
import socket
import statistics
import sys
import time
from typing import Any

from asyncua import Client, ua
from asyncua.common.subscription import DataChangeEvent, Subscription

from drivers.config import OpcuaDevice
from drivers.opcua.driver import OpcuaDriver
from drivers.opcua.monitor import QUEUE_SIZE
from drivers.points import Point, Quality
from drivers.simulate.opcua_server import OpcuaSimulator

STARTUP_TIMEOUT_S = 60.0
DRAIN_S = 2.0
"""After the measuring window, wait until no notification of its rounds arrived for this long."""


def serve(
    port: int, nodes: int, interval_s: float, lifetime_s: float, conn: multiprocessing.connection.Connection
) -> None:
    """Child process: run the simulator and change every extra node each interval.

    Commands on ``conn``: ``count`` (reply: rounds of changes so far, time),
    ``pause``, ``resume``, ``stop``.
    """
    # A publish request racing the bare client's subscription delete draws a logged service fault.
    logging.basicConfig(level=logging.CRITICAL)
    asyncio.run(_serve(port, nodes, interval_s, lifetime_s, conn))


async def _serve(
    port: int, nodes: int, interval_s: float, lifetime_s: float, conn: multiprocessing.connection.Connection
) -> None:
    async with OpcuaSimulator(port=port, extra_nodes=nodes, update_interval_s=None) as sim:
        conn.send(sim.endpoint)
        loop = asyncio.get_running_loop()
        started = next_at = loop.time()
        rounds, paused = 0, False
        while loop.time() - started < lifetime_s:
            while conn.poll():
                command = conn.recv()
                if command == "count":
                    conn.send((rounds, time.perf_counter()))
                elif command in ("pause", "resume"):
                    paused = command == "pause"
                    conn.send(command)
                else:
                    return
            if not paused:
                await sim.tick_extra()
                rounds += 1
            # Fixed rate; when a round of changes takes longer than the interval, the next starts at once.
            next_at = max(next_at + interval_s, loop.time())
            await asyncio.sleep(next_at - loop.time())


class Server:
    """The simulator child process, seen from the benchmark."""

    def __init__(self, conn: multiprocessing.connection.Connection, nodes: int) -> None:
        self.conn = conn
        self.nodes = nodes

    def ask(self, command: str) -> Any:
        self.conn.send(command)
        if not self.conn.poll(30):
            raise SystemExit(f"simulator did not answer {command!r}")
        return self.conn.recv()

    def rounds(self) -> tuple[int, float]:
        """Rounds of changes completed so far, and when (the child's monotonic clock)."""
        rounds, at = self.ask("count")
        return int(rounds), float(at)


class Tally:
    """Notifications received, by the round of changes they come from (``floor(value)``)."""

    def __init__(self, nodes: int) -> None:
        self.by_round: collections.Counter[int] = collections.Counter()
        self.total = 0
        self.nodes = nodes
        self.initial_values = asyncio.Event()

    def add(self, value: object) -> None:
        self.total += 1
        if isinstance(value, float):
            self.by_round[math.floor(value)] += 1
        if self.total >= self.nodes:
            self.initial_values.set()

    async def measure(self, server: Server, seconds: float) -> Result:
        """Count the notifications of the rounds of changes made during ``seconds``.

        Counting by round, after the last round's notifications have
        arrived, makes the window exact: no change is counted twice or half.
        """
        first, start = server.rounds()
        cpu = time.process_time()
        await asyncio.sleep(seconds)
        last, end = server.rounds()
        cpu = time.process_time() - cpu
        expected = (last - first) * server.nodes
        delivered, quiet_since = 0, time.monotonic()
        while delivered < expected and time.monotonic() - quiet_since < DRAIN_S:
            await asyncio.sleep(0.1)
            now_delivered = sum(self.by_round[r] for r in range(first + 1, last + 1))
            if now_delivered > delivered:
                delivered, quiet_since = now_delivered, time.monotonic()
        return Result(delivered / (end - start), expected / (end - start), cpu / max(delivered, 1))


@dataclasses.dataclass(frozen=True)
class Result:
    rate: float
    """Notifications per second received."""
    made: float
    """Changes per second the server made in the same window."""
    cpu_s: float
    """CPU seconds the measuring process spent per notification (the server runs elsewhere)."""

    def line(self, label: str) -> str:
        return (
            f"{label:<33} {self.rate:>7,.0f} notifications/s of {self.made:,.0f} changes/s made "
            f"({self.rate / self.made:.0%}), {self.cpu_s * 1e6:.0f} us CPU each"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_device(endpoint: str, nodes: int, interval_ms: int, mode: str) -> OpcuaDevice:
    return OpcuaDevice.model_validate(
        {
            "name": "bench",
            "protocol": "opcua",
            "endpoint": endpoint,
            "mode": mode,
            "poll": f"{interval_ms}ms",
            "timeout": "5s",
            "tags": [{"name": f"v{i}", "node": f"ns=2;s=Bench.Value{i}"} for i in range(nodes)],
        }
    )


async def measure_driver(server: Server, endpoint: str, interval_ms: int, seconds: float) -> Result:
    """Notifications emitted as points by the driver in subscribe mode."""
    tally = Tally(server.nodes)

    async def emit(points: list[Point]) -> None:
        for point in points:
            tally.add(point.value)

    driver = OpcuaDriver(bench_device(endpoint, server.nodes, interval_ms, "subscribe"))
    task = asyncio.create_task(driver.run(emit), name="run[bench]")
    try:
        await asyncio.wait_for(tally.initial_values.wait(), STARTUP_TIMEOUT_S)
        return await tally.measure(server, seconds)
    finally:
        await driver.close()
        await asyncio.wait_for(task, 10)


async def measure_raw(server: Server, endpoint: str, interval_ms: int, seconds: float) -> Result:
    """Notifications received by a bare asyncua subscription (its iterator API)."""
    tally = Tally(server.nodes)

    async def consume(subscription: Subscription) -> None:
        async for event in subscription:
            if isinstance(event, DataChangeEvent):
                tally.add(event.value)

    client = Client(endpoint, timeout=5)
    client.session_timeout = 60_000
    async with client:
        subscription = await client.create_subscription(interval_ms, queue_maxsize=server.nodes * 20)
        consumer = asyncio.create_task(consume(subscription), name="consume[raw]")
        try:
            node_list = [client.get_node(f"ns=2;s=Bench.Value{i}") for i in range(server.nodes)]
            # The same queue size as the driver asks for, so both see the same notifications.
            await subscription.subscribe_data_change(
                node_list, queuesize=QUEUE_SIZE, sampling_interval=ua.Duration(interval_ms)
            )
            await asyncio.wait_for(tally.initial_values.wait(), STARTUP_TIMEOUT_S)
            return await tally.measure(server, seconds)
        finally:
            await subscription.delete()  # ends the iterator
            await asyncio.wait_for(consumer, 10)


async def measure_poll(endpoint: str, nodes: int, interval_ms: int, reads: int = 5) -> tuple[list[float], list[float]]:
    """Seconds per batched read of every node: by the driver, and by a bare asyncua ``read_values``."""
    async with OpcuaDriver(bench_device(endpoint, nodes, interval_ms, "poll")) as driver:
        good = sum(p.quality is Quality.GOOD for p in await driver.read())
        if good != nodes:
            raise SystemExit(f"poll read: only {good} of {nodes} nodes read good")
        ours = []
        for _ in range(reads):
            start = time.perf_counter()
            await driver.read()
            ours.append(time.perf_counter() - start)
    client = Client(endpoint, timeout=5)
    client.session_timeout = 60_000
    async with client:
        node_list = [client.get_node(f"ns=2;s=Bench.Value{i}") for i in range(nodes)]
        raw = []
        for _ in range(reads):
            start = time.perf_counter()
            await client.read_values(node_list)
            raw.append(time.perf_counter() - start)
    return ours, raw


async def run(server: Server, endpoint: str, interval_ms: int, seconds: float) -> None:
    nodes = server.nodes
    print(f"server changes {nodes} nodes every {interval_ms} ms (at most {nodes * 1000 / interval_ms:,.0f}/s)")
    ours = await measure_driver(server, endpoint, interval_ms, seconds)
    print(ours.line("driver (OpcuaDriver, subscribe):"))
    raw = await measure_raw(server, endpoint, interval_ms, seconds)
    print(raw.line("raw (asyncua subscription):"))
    print(
        f"ratio driver/raw: {ours.rate / raw.rate:.2f} in notifications/s, "
        f"{(ours.rate / ours.made) / (raw.rate / raw.made):.2f} per change made, "
        f"{raw.cpu_s / ours.cpu_s:.2f} in CPU efficiency"
    )
    server.ask("pause")
    our_reads, raw_reads = await measure_poll(endpoint, nodes, interval_ms)
    print(
        f"poll mode, one Read of {nodes} nodes (server idle, median of {len(our_reads)}): "
        f"driver {statistics.median(our_reads) * 1000:.1f} ms, raw asyncua read_values "
        f"{statistics.median(raw_reads) * 1000:.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per subscriber")
    parser.add_argument("--interval-ms", type=int, default=100, help="publishing/sampling interval and change period")
    args = parser.parse_args(argv)
    # asyncua logs every publish after a subscription is deleted; only errors matter here.
    logging.basicConfig(level=logging.ERROR)

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    lifetime_s = STARTUP_TIMEOUT_S + 2 * (args.seconds + STARTUP_TIMEOUT_S) + 60
    process = context.Process(
        target=serve,
        name="opcua-sim",
        daemon=True,
        args=(free_port(), args.nodes, args.interval_ms / 1000, lifetime_s, theirs),
    )
    process.start()
    try:
        if not ours.poll(STARTUP_TIMEOUT_S):
            raise SystemExit("simulator did not start")
        endpoint = ours.recv()
        print(f"simulator at {endpoint} (pid {process.pid})")
        asyncio.run(run(Server(ours, args.nodes), endpoint, args.interval_ms, args.seconds))
        ours.send("stop")
    finally:
        process.join(10)
        if process.is_alive():
            process.terminate()
            process.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
