"""The OPC UA driver against the oven simulator, a real asyncua server on loopback.

One simulator serves the module (an asyncua server takes seconds to build
its address space); the restart and security scenarios start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509

from drivers.base import DeviceState
from drivers.config import OpcuaDevice
from drivers.opcua.driver import OpcuaDriver
from drivers.opcua.security import application_uri
from drivers.points import Point, Quality
from drivers.simulate.opcua_server import OpcuaSimulator
from factory_edge.errors import WriteRefused
from tests.helpers import free_port, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="module")

SOURCE_TS = 1_700_000_000_123


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def oven() -> AsyncIterator[OpcuaSimulator]:
    async with OpcuaSimulator(port=free_port(), update_interval_s=None) as sim:
        yield sim


def device(endpoint: str, tags: list[dict], **extra: object) -> OpcuaDevice:
    return OpcuaDevice.model_validate(
        {
            "protocol": "opcua",
            "name": extra.pop("name", "oven"),
            "endpoint": endpoint,
            "mode": "poll",
            "poll": "100ms",
            "timeout": "1s",
            "backoff_max": "1s",
            "tags": tags,
            **extra,
        }
    )


def by_tag(points: list[Point]) -> dict[str, Point]:
    return {p.tag: p for p in points}


class Collector:
    """An ``emit`` that keeps every batch."""

    def __init__(self) -> None:
        self.batches: list[list[Point]] = []

    async def __call__(self, points: list[Point]) -> None:
        self.batches.append(list(points))

    @property
    def points(self) -> list[Point]:
        return [p for batch in self.batches for p in batch]

    def values(self, tag: str) -> list[object]:
        return [p.value for p in self.points if p.tag == tag and p.quality is Quality.GOOD]


def asyncua_client_tasks() -> list[asyncio.Task[object]]:
    """Tasks asyncua clients start (watchdog, publish loop, channel renewal); a closed driver leaves none."""
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").startswith(("Client.", "UaSession."))
    ]


@contextlib.asynccontextmanager
async def running(driver: OpcuaDriver, emit: Collector) -> AsyncIterator[asyncio.Task[None]]:
    """``driver.run(emit)`` in a task for the block; cancelled and the driver closed afterwards."""
    task = asyncio.create_task(driver.run(emit), name=f"run[{driver.device.name}]")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await driver.close()


async def test_poll_reads_every_type_with_quality_and_source_timestamp(oven: OpcuaSimulator) -> None:
    started = dt.datetime(2024, 3, 1, 6, 30, 15, 250000, tzinfo=dt.UTC)
    await oven.set("Oven.Zone1.Temp", 71.5, source_ts_ms=SOURCE_TS)
    await oven.set("Oven.Heater.Power", 42.7, source_ts_ms=SOURCE_TS + 1)
    await oven.set("Oven.Door.Open", True, source_ts_ms=SOURCE_TS + 2)
    await oven.set("Oven.Recipe", "Rye-180", source_ts_ms=SOURCE_TS + 3)
    await oven.set("Oven.BatchCount", 4_000_000_000, source_ts_ms=SOURCE_TS + 4)
    await oven.set("Oven.BatchStart", started, source_ts_ms=SOURCE_TS + 5)
    nodes = {
        "zone1": "Oven.Zone1.Temp",
        "power": "Oven.Heater.Power",
        "door": "Oven.Door.Open",
        "recipe": "Oven.Recipe",
        "batches": "Oven.BatchCount",
        "started": "Oven.BatchStart",
    }
    tags = [{"name": name, "node": f"ns=2;s={node}"} for name, node in nodes.items()]
    async with OpcuaDriver(device(oven.endpoint, tags)) as driver:
        points = await driver.read()
        assert driver.state is DeviceState.UP
    assert points == [
        Point("oven", "zone1", SOURCE_TS, 71.5),
        Point("oven", "power", SOURCE_TS + 1, 42.7),  # a Float node: 42.7, not 42.70000076293945
        Point("oven", "door", SOURCE_TS + 2, True),
        Point("oven", "recipe", SOURCE_TS + 3, "Rye-180"),
        Point("oven", "batches", SOURCE_TS + 4, 4_000_000_000),
        Point("oven", "started", SOURCE_TS + 5, "2024-03-01T06:30:15.250000+00:00"),
    ]


async def test_status_codes_become_quality(oven: OpcuaSimulator) -> None:
    await oven.set("Oven.Zone2.Temp", None, status="BadSensorFailure", source_ts_ms=SOURCE_TS)
    await oven.set("Oven.Heater.Power", 12.5, status="UncertainLastUsableValue", source_ts_ms=SOURCE_TS)
    tags = [{"name": "zone2", "node": "ns=2;s=Oven.Zone2.Temp"}, {"name": "power", "node": "ns=2;s=Oven.Heater.Power"}]
    async with OpcuaDriver(device(oven.endpoint, tags)) as driver:
        points = await driver.read()
    assert points == [
        Point("oven", "zone2", SOURCE_TS, None, Quality.BAD, "BadSensorFailure"),
        Point("oven", "power", SOURCE_TS, 12.5, Quality.UNCERTAIN, "UncertainLastUsableValue"),
    ]


async def test_unknown_node_and_path_are_bad_for_that_tag_only(oven: OpcuaSimulator) -> None:
    await oven.set("Oven.Zone1.Temp", 180.25, source_ts_ms=SOURCE_TS)
    await oven.set("Oven.Door.Open", False, source_ts_ms=SOURCE_TS)
    tags = [
        {"name": "zone1", "node": "ns=2;s=Oven.Zone1.Temp"},
        {"name": "ghost", "node": "ns=2;s=Oven.Zone9.Temp"},
        {"name": "door", "path": "2:Oven/2:Door/2:Open"},
        {"name": "lost", "path": "2:Oven/2:Zone9/2:Temp"},
    ]
    async with OpcuaDriver(device(oven.endpoint, tags)) as driver:
        points = by_tag(await driver.read())
        assert driver.state is DeviceState.UP
    assert points["zone1"] == Point("oven", "zone1", SOURCE_TS, 180.25)
    assert points["door"] == Point("oven", "door", SOURCE_TS, False)
    assert (points["ghost"].quality, points["ghost"].value, points["ghost"].error) == (
        Quality.BAD,
        None,
        "BadNodeIdUnknown",
    )
    assert (points["lost"].quality, points["lost"].value, points["lost"].error) == (Quality.BAD, None, "BadNoMatch")


async def test_subscription_reports_changes_beyond_the_deadband(oven: OpcuaSimulator) -> None:
    await oven.set("Oven.Zone1.Temp", 50.0)
    await oven.set("Oven.Door.Open", False)
    tags: list[dict[str, Any]] = [
        {"name": "zone1", "node": "ns=2;s=Oven.Zone1.Temp", "deadband": 0.5},
        {"name": "door", "path": "2:Oven/2:Door/2:Open"},
        {"name": "ghost", "node": "ns=2;s=Nope"},
    ]
    driver = OpcuaDriver(device(oven.endpoint, tags, mode="subscribe"))
    got = Collector()
    task = asyncio.create_task(driver.run(got), name="run[oven]")
    await wait_for(lambda: got.values("zone1") == [50.0] and got.values("door") == [False], what="initial values")
    assert [(p.tag, p.error) for p in got.points if p.quality is Quality.BAD] == [("ghost", "BadNodeIdUnknown")]
    assert driver.state is DeviceState.UP

    await oven.set("Oven.Zone1.Temp", 50.3)  # within the deadband: no point
    await oven.set("Oven.Door.Open", True)
    await wait_for(lambda: got.values("door") == [False, True], what="door change")
    await oven.set("Oven.Zone1.Temp", 51.0)
    await wait_for(lambda: got.values("zone1")[-1:] == [51.0], what="zone1 change")
    assert got.values("zone1") == [50.0, 51.0]

    await driver.close()
    await asyncio.wait_for(task, 5)  # close() ends run()
    assert driver.state is DeviceState.CLOSED
    await wait_for(lambda: asyncua_client_tasks() == [], timeout_s=2, what="asyncua client tasks ended")
    await wait_for(lambda: oven.session_count == 0, what="session closed on the server")


async def test_write_converts_to_the_node_type_and_refuses_other_tags(oven: OpcuaSimulator) -> None:
    await oven.set("Oven.Setpoint", 200.0)
    tags: list[dict[str, Any]] = [
        {"name": "setpoint", "node": "ns=2;s=Oven.Setpoint", "writable": True},
        {"name": "zone1", "node": "ns=2;s=Oven.Zone1.Temp"},
    ]
    async with OpcuaDriver(device(oven.endpoint, tags)) as driver:
        await driver.write("setpoint", 185)
        assert oven.get("Oven.Setpoint") == 185.0
        assert by_tag(await driver.read())["setpoint"].value == 185.0
        await driver.write("setpoint", "172.5")
        assert oven.get("Oven.Setpoint") == 172.5
        with pytest.raises(WriteRefused, match=r"oven\.zone1 is not writable \(mark it writable: true in the config\)"):
            await driver.write("zone1", 20.0)
        with pytest.raises(WriteRefused, match="no tag named 'fan'"):
            await driver.write("fan", 1)
        with pytest.raises(WriteRefused, match="setpoint: expected a number, got 'hot'"):
            await driver.write("setpoint", "hot")
    assert oven.get("Oven.Setpoint") == 172.5


async def test_unreachable_server_gives_bad_points_not_errors() -> None:
    port = free_port()  # nothing listens there
    tags: list[dict[str, Any]] = [
        {"name": "zone1", "node": "ns=2;s=Oven.Zone1.Temp"},
        {"name": "door", "path": "2:Oven/2:Door/2:Open"},
    ]
    async with OpcuaDriver(device(f"opc.tcp://127.0.0.1:{port}/factory-edge/", tags)) as driver:
        points = await driver.read()
        again = await driver.read()  # within the backoff: no new attempt, same reason
        assert driver.state is DeviceState.DOWN
        assert driver.sessions_opened == 0
    assert [(p.tag, p.quality, p.value, p.error) for p in points + again] == [
        ("zone1", Quality.BAD, None, "connection refused"),
        ("door", Quality.BAD, None, "connection refused"),
    ] * 2


@pytest.mark.slow
async def test_server_restart_is_survived_by_both_modes() -> None:
    """Stop the server, see the devices go down, start it on the same port: both drivers resume on one session."""
    sim = OpcuaSimulator(port=free_port(), update_interval_s=None)
    await sim.start()
    try:
        await sim.set("Oven.Zone1.Temp", 70.0)
        tags: list[dict[str, Any]] = [
            {"name": "zone1", "node": "ns=2;s=Oven.Zone1.Temp"},
            {"name": "door", "path": "2:Oven/2:Door/2:Open"},
        ]
        subscriber = OpcuaDriver(device(sim.endpoint, tags, name="sub", mode="subscribe"))
        poller = OpcuaDriver(device(sim.endpoint, tags, name="poll", poll="200ms"))
        sub_points, poll_points = Collector(), Collector()
        async with running(subscriber, sub_points), running(poller, poll_points):
            await wait_for(
                lambda: sub_points.values("zone1") == [70.0] and 70.0 in poll_points.values("zone1"),
                what="first values",
            )
            assert sim.session_count == 2

            await sim.stop()
            await wait_for(
                lambda: subscriber.state is DeviceState.DOWN and poller.state is DeviceState.DOWN,
                what="both devices down",
            )
            await wait_for(lambda: any(p.quality is Quality.BAD for p in poll_points.points), what="bad poll points")
            await asyncio.sleep(1.5)  # several failed reconnect attempts while the server is away
            outage = [batch for batch in sub_points.batches if batch[0].quality is Quality.BAD]
            assert outage == [
                [
                    Point("sub", "zone1", outage[0][0].ts, None, Quality.BAD, "connection lost"),
                    Point("sub", "door", outage[0][0].ts, None, Quality.BAD, "connection lost"),
                ]
            ]
            assert {p.error for p in poll_points.points if p.quality is Quality.BAD} <= {
                "connection lost",
                "connection refused",
            }

            await sim.start()
            await wait_for(
                lambda: subscriber.state is DeviceState.UP and poller.state is DeviceState.UP,
                timeout_s=20,
                what="both devices up again",
            )
            await sim.set("Oven.Zone1.Temp", 88.5)
            await wait_for(lambda: sub_points.values("zone1")[-1:] == [88.5], what="new value by subscription")
            await wait_for(lambda: poll_points.values("zone1")[-1:] == [88.5], what="new value by polling")
            assert sim.session_count == 2  # one live session per driver, none left over
            assert (subscriber.sessions_opened, poller.sessions_opened) == (2, 2)
        await wait_for(lambda: sim.session_count == 0, what="sessions closed")
        # The clients of the lost sessions were closed too, not just forgotten.
        await wait_for(lambda: asyncua_client_tasks() == [], timeout_s=2, what="asyncua client tasks ended")
    finally:
        await sim.stop()


async def test_secure_endpoints_with_a_certificate_generated_on_first_use(tmp_path: Path) -> None:
    state_dir = tmp_path / "agent"
    tags = [{"name": "zone1", "node": "ns=2;s=Oven.Zone1.Temp"}]
    login = {"username": "operator", "password": "secret"}
    async with OpcuaSimulator(
        port=free_port(),
        update_interval_s=None,
        security=True,
        users={"operator": "secret"},
        state_dir=tmp_path / "sim",
    ) as sim:
        await sim.set("Oven.Zone1.Temp", 123.5, source_ts_ms=SOURCE_TS)
        expected = [Point("oven", "zone1", SOURCE_TS, 123.5)]
        cert_file, key_file = state_dir / "opcua-client-cert.pem", state_dir / "opcua-client-key.pem"

        sign = device(sim.endpoint, tags, security={"policy": "Basic256Sha256", "mode": "Sign"}, **login)
        async with OpcuaDriver(sign, state_dir=state_dir) as driver:
            assert await driver.read() == expected
        assert key_file.stat().st_mode & 0o777 == 0o600
        first = cert_file.read_bytes()
        san = x509.load_pem_x509_certificate(first).extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [application_uri()]

        encrypt = device(sim.endpoint, tags, security={"policy": "Basic256Sha256", "mode": "SignAndEncrypt"}, **login)
        async with OpcuaDriver(encrypt, state_dir=state_dir) as driver:
            assert await driver.read() == expected
        assert cert_file.read_bytes() == first  # reused, not regenerated

        wrong = device(
            sim.endpoint,
            tags,
            security={"policy": "Basic256Sha256", "mode": "SignAndEncrypt"},
            username="operator",
            password="guess",
        )
        async with OpcuaDriver(wrong, state_dir=state_dir) as driver:
            points = await driver.read()
            assert (driver.state, driver.last_error) == (DeviceState.DOWN, "BadUserAccessDenied")
        assert [(p.quality, p.value, p.error) for p in points] == [(Quality.BAD, None, "BadUserAccessDenied")]

        anonymous = device(sim.endpoint, tags)
        async with OpcuaDriver(anonymous, state_dir=state_dir) as driver:
            assert [p.error for p in await driver.read()] == ["BadIdentityTokenRejected"]
        assert sim.session_count == 0
