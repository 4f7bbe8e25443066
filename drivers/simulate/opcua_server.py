"""A simulated industrial oven as an OPC UA server, for demos, tests and benchmarks.

::

    async with OpcuaSimulator(port=4840) as sim:
        print(sim.endpoint)                       # opc.tcp://127.0.0.1:4840/factory-edge/
        await sim.set("Oven.Zone1.Temp", 71.5)    # force a value (the simulation stops driving it)
        await sim.set("Oven.Zone2.Temp", None, status="BadSensorFailure")

The oven heats two zones toward ``Oven.Setpoint`` (writable by clients),
bakes a batch once zone 1 is within 2 degC of it, opens its door to unload,
counts the batch and loads the next recipe, whose temperature becomes the
setpoint. Every node lives in namespace ``urn:factory-edge:simulator``
(index 2) with a string NodeId equal to its dotted name
(``ns=2;s=Oven.Zone1.Temp``) and a browse path made of the same parts
(``2:Oven/2:Zone1/2:Temp``). ``node_table()`` lists them.

``stop()`` then ``start()`` restarts the server on the same port, as a
machine reboot would: sessions and subscriptions are gone, values are kept.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import math
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.user_managers import UserManager

from factory_edge.errors import FactoryEdgeError
from factory_edge.logs import fields
from factory_edge.tasks import cancel_and_wait

from ..opcua.security import generate_certificate
from ..opcua.values import coerce_for_write

log = logging.getLogger(__name__)


def _node(name: str) -> ua.NodeId:
    """The simulator's nodes: string ids in namespace 2."""
    return ua.NodeId(ua.String(name), ua.Int16(2))


NAMESPACE_URI = "urn:factory-edge:simulator"
APPLICATION_URI = "urn:factory-edge:simulator:oven"
"""Distinct from the namespace: a server's own URI takes namespace index 1, ours must be 2."""
AMBIENT_C = 21.0
BAKE_S = 30.0
UNLOAD_S = 5.0
RECIPES = {"Bread-200": 200.0, "Croissant-190": 190.0, "Pizza-250": 250.0}
"""Recipe name -> its baking temperature, loaded into the setpoint when a batch starts."""
_ZERO: dict[ua.VariantType, Any] = {
    ua.VariantType.String: "",
    ua.VariantType.Double: 0.0,
    ua.VariantType.Float: 0.0,
    ua.VariantType.Boolean: False,
    ua.VariantType.UInt32: 0,
    ua.VariantType.DateTime: dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
}


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One simulated variable: dotted name (its string NodeId), OPC UA type, description."""

    name: str
    variant_type: ua.VariantType
    description: str
    writable: bool = False

    @property
    def node_id(self) -> str:
        return f"ns=2;s={self.name}"


NODES: tuple[NodeSpec, ...] = (
    NodeSpec("Oven.State", ua.VariantType.String, "Heating, Baking or Unloading"),
    NodeSpec("Oven.Recipe", ua.VariantType.String, "recipe of the batch in the oven"),
    NodeSpec("Oven.Setpoint", ua.VariantType.Double, "target temperature, degC (writable)", writable=True),
    NodeSpec("Oven.Zone1.Temp", ua.VariantType.Double, "zone 1 temperature, degC; follows the setpoint"),
    NodeSpec("Oven.Zone2.Temp", ua.VariantType.Double, "zone 2 temperature, degC; lags zone 1"),
    NodeSpec("Oven.Heater.Power", ua.VariantType.Float, "heater output, percent"),
    NodeSpec("Oven.Door.Open", ua.VariantType.Boolean, "true while the door is open"),
    NodeSpec("Oven.BatchCount", ua.VariantType.UInt32, "batches finished since the oven started"),
    NodeSpec("Oven.BatchStart", ua.VariantType.DateTime, "when the batch in the oven started"),
)


def node_table() -> list[tuple[str, str, str]]:
    """``(node id, type, description)`` of every documented node, for docs and ``agent simulate``."""
    return [(spec.node_id, spec.variant_type.name, spec.description) for spec in NODES]


class _PasswordUsers(UserManager):
    """Accepts exactly the configured user names and passwords."""

    def __init__(self, users: dict[str, str]) -> None:
        self._users = dict(users)

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        expected = self._users.get(username or "")
        if expected is None or password is None or not hmac.compare_digest(expected, password):
            return None
        return User(role=UserRole.User, name=username)


class OpcuaSimulator:
    """An oven behind an OPC UA server on ``host:port``; an async context manager.

    ``extra_nodes`` adds float variables ``ns=2;s=Bench.Value{i}`` (changed
    by ``tick_extra()``); ``users`` requires one of these user names and
    passwords instead of anonymous access; ``security`` adds Basic256Sha256
    Sign and SignAndEncrypt endpoints next to None (the server certificate
    is generated, and kept in ``state_dir`` when given; every client
    certificate is accepted, as on a commissioning bench).
    ``update_interval_s=None`` freezes the simulation.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 4840,
        extra_nodes: int = 0,
        users: dict[str, str] | None = None,
        security: bool = False,
        state_dir: Path | None = None,
        update_interval_s: float | None = 0.5,
    ) -> None:
        self.host = host
        self.port = port
        self.extra_nodes = extra_nodes
        self.users = dict(users) if users else None
        self.security = security
        self.state_dir = state_dir
        self.update_interval_s = update_interval_s
        self._specs = {spec.name: spec for spec in NODES}
        self._specs.update(
            {name: NodeSpec(name, ua.VariantType.Double, "benchmark value") for name in self._extra_names()}
        )
        started = dt.datetime.now(dt.UTC)
        self._values: dict[str, ua.DataValue] = {
            name: self._datavalue(name, value, None, None)
            for name, value in {
                "Oven.State": "Heating",
                "Oven.Recipe": "Bread-200",
                "Oven.Setpoint": RECIPES["Bread-200"],
                "Oven.Zone1.Temp": AMBIENT_C,
                "Oven.Zone2.Temp": AMBIENT_C,
                "Oven.Heater.Power": 0.0,
                "Oven.Door.Open": False,
                "Oven.BatchCount": 0,
                "Oven.BatchStart": started,
                **{name: 0.0 for name in self._extra_names()},
            }.items()
        }
        self._held: set[str] = set()
        self._phase_since = 0.0
        self._tick = 0
        self._certificate: tuple[bytes, bytes] | None = None
        self._server: Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OpcuaSimulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def endpoint(self) -> str:
        """The URL clients connect to."""
        return f"opc.tcp://{self.host}:{self.port}/factory-edge/"

    @property
    def node_ids(self) -> list[str]:
        """NodeIds of the documented oven nodes (not the extra benchmark nodes)."""
        return [spec.node_id for spec in NODES]

    @property
    def extra_node_ids(self) -> list[str]:
        """NodeIds of the ``extra_nodes`` benchmark variables."""
        return [f"ns=2;s={name}" for name in self._extra_names()]

    @property
    def session_count(self) -> int:
        """Sessions the server holds now, including ones whose connection dropped (they expire later)."""
        if self._server is None:
            return 0
        # asyncua keeps its session registry private; this is the only count of sessions
        # that outlive their connection, which is what a leak looks like.
        return len(self._server.iserver._external_sessions)

    async def start(self) -> None:
        """Build the address space and listen; the simulation starts unless frozen.

        A port already taken raises ``FactoryEdgeError`` naming it.
        """
        if self._server is not None:
            raise RuntimeError("simulator already running")
        server = Server(iserver=InternalServer(user_manager=_PasswordUsers(self.users) if self.users else None))
        server.disable_clock()  # its 1 s clock loop would delay stop(); the simulation ticks CurrentTime
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("factory-edge oven simulator")
        server.product_uri = "urn:factory-edge"
        await server.set_application_uri(APPLICATION_URI)
        server.set_identity_tokens([ua.UserNameIdentityToken] if self.users else [ua.AnonymousIdentityToken])
        policies = [ua.SecurityPolicyType.NoSecurity]
        if self.security:
            cert_pem, key_pem = await self._server_certificate()
            await server.load_certificate(cert_pem, format="pem")
            await server.load_private_key(key_pem, format="pem")
            policies += [ua.SecurityPolicyType.Basic256Sha256_Sign, ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt]
        server.set_security_policy(policies)
        index = await server.register_namespace(NAMESPACE_URI)
        if index != 2:
            raise RuntimeError(f"simulator namespace got index {index}, documented NodeIds need 2")
        await self._build_address_space(server)
        try:
            await server.start()
        except OSError as exc:
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise FactoryEdgeError(f"cannot listen on {self.host}:{self.port}: {reason}") from exc
        if self.port == 0 and server.bserver is not None:
            self.port = server.bserver.port  # keep it: a restart comes back on the same port
        self._server = server
        if self.update_interval_s is not None:
            self._task = asyncio.create_task(self._simulate(self.update_interval_s), name=f"opcua-sim[{self.port}]")
        log.info("opcua simulator listening", extra=fields(endpoint=self.endpoint, nodes=len(self._specs)))

    async def stop(self) -> None:
        """Stop simulating and close the server with every session; values are kept for a restart."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        server, self._server = self._server, None
        if server is not None:
            for name in self._specs:  # what clients wrote survives the restart too
                self._values[name] = server.read_attribute_value(_node(name))
            await server.stop()
            # asyncua keeps sessions (and their subscriptions) that lost their connection
            # alive for a later reconnect, even past stop(); a rebooted machine would not.
            for session in list(server.iserver._external_sessions.values()):
                await session.close_session(True)

    async def set(self, name: str, value: Any, *, status: str | None = None, source_ts_ms: int | None = None) -> None:
        """Set a node's value, status (a name like ``BadSensorFailure``) and source timestamp.

        The simulation stops driving the node until ``release(name)``.
        """
        datavalue = self._datavalue(name, value, status, source_ts_ms)
        self._held.add(name)
        await self._write(name, datavalue)

    def release(self, name: str) -> None:
        """Let the simulation drive a node set by ``set()`` again."""
        self._held.discard(name)

    def get(self, name: str) -> Any:
        """The value a node holds on the server now (including what clients wrote)."""
        self._spec(name)
        if self._server is None:
            value = self._values[name].Value
        else:
            value = self._server.read_attribute_value(_node(name)).Value
        return value.Value if value is not None else None

    async def tick_extra(self) -> int:
        """Change every extra node; returns the round number.

        Round ``n`` sets ``Bench.Value{i}`` to ``n + i / 1e6``: every monitored
        item reports, and ``floor(value)`` tells which round a value is from.
        """
        self._tick += 1
        for i, name in enumerate(self._extra_names()):
            await self._write(name, self._datavalue(name, self._tick + i / 1_000_000, None, None))
        return self._tick

    # ------------------------------------------------------------ internals

    def _extra_names(self) -> Iterable[str]:
        return (f"Bench.Value{i}" for i in range(self.extra_nodes))

    def _spec(self, name: str) -> NodeSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"the simulator has no node {name!r}") from None

    def _datavalue(self, name: str, value: Any, status: str | None, source_ts_ms: int | None) -> ua.DataValue:
        """The node's next DataValue; ``KeyError``/``ValueError`` for an unknown node, status or unfit value."""
        spec = self._spec(name)
        if status is not None and not hasattr(ua.StatusCodes, status):
            raise ValueError(f"unknown OPC UA status code {status!r}")
        now = dt.datetime.now(dt.UTC)
        source = now if source_ts_ms is None else dt.datetime.fromtimestamp(source_ts_ms / 1000, dt.UTC)
        code = ua.StatusCode(getattr(ua.StatusCodes, status)) if status else ua.StatusCode()
        if value is None or code.is_bad():
            variant = ua.Variant(None, ua.VariantType.Null)
        elif spec.variant_type is ua.VariantType.DateTime:
            if not isinstance(value, dt.datetime):
                raise ValueError(f"{name} takes a datetime, not {value!r}")
            variant = ua.Variant(value, spec.variant_type)
        else:
            variant = ua.Variant(coerce_for_write(value, spec.variant_type), spec.variant_type)
        # asyncua types timestamps as its own datetime subclass, and takes any datetime.
        return ua.DataValue(
            variant, StatusCode=code, SourceTimestamp=cast(ua.DateTime, source), ServerTimestamp=cast(ua.DateTime, now)
        )

    async def _write(self, name: str, datavalue: ua.DataValue) -> None:
        self._values[name] = datavalue
        if self._server is not None:
            await self._server.write_attribute_value(_node(name), datavalue)

    async def _build_address_space(self, server: Server) -> None:
        folders: dict[str, Any] = {}

        async def folder(path: str) -> Any:
            if path not in folders:
                parent_path, _, leaf = path.rpartition(".")
                parent = await folder(parent_path) if parent_path else server.nodes.objects
                folders[path] = await parent.add_object(_node(path), ua.QualifiedName(leaf, 2))
            return folders[path]

        for name, spec in self._specs.items():
            parent_path, _, leaf = name.rpartition(".")
            parent = await folder(parent_path)
            initial = ua.Variant(_ZERO[spec.variant_type], spec.variant_type)
            node = await parent.add_variable(_node(name), ua.QualifiedName(leaf, 2), initial)
            if spec.description and not name.startswith("Bench."):
                await node.write_attribute(
                    ua.AttributeIds.Description, ua.DataValue(ua.Variant(ua.LocalizedText(spec.description)))
                )
            if spec.writable:
                await node.set_writable()
            await server.write_attribute_value(node.nodeid, self._values[name])

    async def _server_certificate(self) -> tuple[bytes, bytes]:
        if self._certificate is None:
            self._certificate = await asyncio.to_thread(
                generate_certificate,
                application_uri=APPLICATION_URI,
                common_name="factory-edge oven simulator",
                hostnames=[self.host, "localhost"],
                server=True,
            )
            if self.state_dir is not None:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                (self.state_dir / "simulator-cert.pem").write_bytes(self._certificate[0])
                key_file = self.state_dir / "simulator-key.pem"
                key_file.touch(mode=0o600, exist_ok=True)
                key_file.chmod(0o600)
                key_file.write_bytes(self._certificate[1])
        return self._certificate

    async def _simulate(self, interval_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._phase_since = loop.time()
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._step(interval_s, loop.time())
            except Exception:
                log.exception("simulation step failed")

    async def _step(self, dt_s: float, now: float) -> None:
        """One step of the oven: first-order heating toward the setpoint, a batch cycle, sensor noise."""
        value = {name: (dv.Value.Value if dv.Value is not None else None) for name, dv in self._values.items()}
        setpoint = self.get("Oven.Setpoint")
        if not isinstance(setpoint, float):
            setpoint = 200.0
        zone1 = value["Oven.Zone1.Temp"] if isinstance(value["Oven.Zone1.Temp"], float) else AMBIENT_C
        zone2 = value["Oven.Zone2.Temp"] if isinstance(value["Oven.Zone2.Temp"], float) else AMBIENT_C
        state = value["Oven.State"]
        elapsed = now - self._phase_since
        door_open = state == "Unloading"
        target = AMBIENT_C + (setpoint - AMBIENT_C) * (0.4 if door_open else 1.0)
        zone1 += (target - zone1) * (1 - math.exp(-dt_s / 12.0)) + random.gauss(0, 0.05)
        zone2 += (zone1 - 2.0 - zone2) * (1 - math.exp(-dt_s / 18.0)) + random.gauss(0, 0.05)
        power = max(0.0, min(100.0, (setpoint - zone1) * 4.0 + 15.0 + random.gauss(0, 0.5)))
        updates: dict[str, Any] = {
            "Oven.Zone1.Temp": round(zone1, 2),
            "Oven.Zone2.Temp": round(zone2, 2),
            "Oven.Heater.Power": round(power, 1),
        }
        if state == "Heating" and abs(setpoint - zone1) < 2.0:
            updates["Oven.State"] = "Baking"
        elif state == "Baking" and elapsed >= BAKE_S:
            updates.update({"Oven.State": "Unloading", "Oven.Door.Open": True})
        elif state == "Unloading" and elapsed >= UNLOAD_S:
            count = value["Oven.BatchCount"] if isinstance(value["Oven.BatchCount"], int) else 0
            names = list(RECIPES)
            recipe = value["Oven.Recipe"]
            following = names[(names.index(recipe) + 1) % len(names)] if recipe in RECIPES else names[0]
            updates.update(
                {
                    "Oven.State": "Heating",
                    "Oven.Door.Open": False,
                    "Oven.BatchCount": count + 1,
                    "Oven.Recipe": following,
                    "Oven.Setpoint": RECIPES[following],
                    "Oven.BatchStart": dt.datetime.now(dt.UTC),
                }
            )
        if updates.get("Oven.State", state) != state:
            self._phase_since = now
        for name, new in updates.items():
            if name not in self._held:
                await self._write(name, self._datavalue(name, new, None, None))
        if self._server is not None:
            await self._server.write_attribute_value(
                ua.NodeId(ua.Int32(ua.ObjectIds.Server_ServerStatus_CurrentTime)),
                ua.DataValue(ua.Variant(dt.datetime.now(dt.UTC), ua.VariantType.DateTime)),
            )
