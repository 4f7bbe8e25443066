"""Profiles, tag ranges and Modicon register notation: a short config that runs like the long one it stands for."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.checkconfig import summary_lines
from agent.config import AgentConfig, load_config, parse_config
from drivers.config import ModbusDeviceBase, Table
from drivers.modbus.plan import Limits, plan_reads
from drivers.simulate.modbus_server import ModbusSimulator, RegisterModel
from factory_edge.errors import ConfigError
from factory_edge.mqtt import BrokerSettings
from tests.agentproc import AgentProcess, Collector
from tests.helpers import ROOT, free_port
from tests.infra import Mosquitto, TenantPki

pytestmark = pytest.mark.timeout(60)


def agent(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def short_config(port: int) -> dict[str, Any]:
    """Three presses of one model: a profile, a 1,000-register range, a structure of 8 pumps."""
    return {
        "gateway": "gw-01",
        "profiles": {
            "press-v2": {
                "protocol": "modbus-tcp",
                "host": "127.0.0.1",
                "port": port,
                "poll": "500ms",
                "max_concurrent_requests": 4,
                "tags": [
                    {"name": "r{address}", "addresses": "0-999", "unit": "count", "description": "raw {n}"},
                    {"name": "temp", "table": "input", "address": 0, "type": "float32", "unit": "degC"},
                    {"name": "pump{n}_speed", "table": "input", "address": 100, "count": 8, "stride": 10,
                     "type": "int32", "order": "CDAB", "scale": 0.1, "unit": "rpm"},
                    {"name": "setpoint", "address": 1000, "type": "int16", "writable": True},
                ],
            }
        },
        "devices": [
            {"name": "press-1", "profile": "press-v2", "unit": 1},
            {"name": "press-2", "profile": "press-v2", "unit": 2},
            # press-3's setpoint lives elsewhere: its own tag replaces the profile's.
            {"name": "press-3", "profile": "press-v2", "unit": 3,
             "tags": [{"name": "setpoint", "address": 1001, "type": "int16", "writable": True}]},
        ],
    }  # fmt: skip


def long_config(port: int) -> dict[str, Any]:
    """The same plant written out by hand, tag by tag."""

    def device(name: str, unit: int, setpoint: int) -> dict[str, Any]:
        tags: list[dict[str, Any]] = [
            {"name": f"r{a}", "address": a, "unit": "count", "description": f"raw {a + 1}"} for a in range(1000)
        ]
        tags.append({"name": "temp", "table": "input", "address": 0, "type": "float32", "unit": "degC"})
        tags += [
            {"name": f"pump{i + 1}_speed", "table": "input", "address": 100 + 10 * i, "type": "int32",
             "order": "CDAB", "scale": 0.1, "unit": "rpm"}
            for i in range(8)
        ]  # fmt: skip
        tags.append({"name": "setpoint", "address": setpoint, "type": "int16", "writable": True})
        return {"name": name, "protocol": "modbus-tcp", "host": "127.0.0.1", "port": port, "unit": unit,
                "poll": "500ms", "max_concurrent_requests": 4, "tags": tags}  # fmt: skip

    return {"gateway": "gw-01", "devices": [device("press-1", 1, 1000), device("press-2", 2, 1000),
                                           device("press-3", 3, 1001)]}  # fmt: skip


def devices_of(config: AgentConfig) -> list[dict[str, Any]]:
    return [d.model_dump(mode="json", exclude={"profile"}) for d in config.devices]


def plans_of(config: AgentConfig) -> list[list[str]]:
    return [
        [str(r) for r in plan_reads(d.tags, Limits.of(d))] for d in config.devices if isinstance(d, ModbusDeviceBase)
    ]


def plant_model(unit: int) -> RegisterModel:
    model = RegisterModel()
    model.set_registers(Table.HOLDING, 0, [(unit * 7919 + a * 31) & 0xFFFF for a in range(1002)])
    model.set_registers(Table.INPUT, 0, [(unit * 13 + a) & 0xFFFF for a in range(200)])
    return model


def test_profile_and_ranges_expand_to_the_hand_written_config(tmp_path: Path) -> None:
    short = parse_config(short_config(502), "short.yaml")
    long = parse_config(long_config(502), "long.yaml")
    assert [d.profile for d in short.devices] == ["press-v2"] * 3
    assert devices_of(short) == devices_of(long)
    assert plans_of(short) == plans_of(long)
    assert sum(len(d.tags) for d in short.devices) == 3 * 1010


def test_profile_and_ranges_read_the_same_points_as_the_hand_written_config(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(short_config(port), sort_keys=False))
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(long_config(port), sort_keys=False))

    async def read_both() -> list[subprocess.CompletedProcess[str]]:
        async with ModbusSimulator(units={u: plant_model(u) for u in (1, 2, 3)}, port=port):
            return [
                await asyncio.to_thread(agent, "read", "--json", "--config", tmp_path / name)
                for name in ("short.yaml", "long.yaml")
            ]

    short, long = asyncio.run(read_both())
    assert short.returncode == 0 and long.returncode == 0, short.stderr + long.stderr

    def points(out: str) -> dict[tuple[str, str], Any]:
        return {(d["dev"], p["tag"]): (p["v"], p["q"]) for d in json.loads(out) for p in d["points"]}

    a, b = points(short.stdout), points(long.stdout)
    assert len(a) == 3 * 1010 and a == b
    assert a[("press-2", "r5")] == ((2 * 7919 + 5 * 31) & 0xFFFF, "good")
    assert a[("press-3", "setpoint")] == (
        ((3 * 7919 + 1001 * 31) & 0xFFFF) - 65536 * (((3 * 7919 + 1001 * 31) & 0xFFFF) > 32767),
        "good",
    )


def test_check_config_expand_shows_every_tag_and_the_plan(tmp_path: Path) -> None:
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump(short_config(5020), sort_keys=False))
    result = agent("check-config", "--expand", path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        'press-1: modbus-tcp {unit: 1, profile: "press-v2", poll: "500ms", max_concurrent_requests: 4, '
        'host: "127.0.0.1", port: 5020}'
    )
    assert '  r999: {table: "holding", address: 999, unit: "count", description: "raw 1000"}' in lines
    assert (
        '  pump8_speed: {table: "input", address: 170, unit: "rpm", type: "int32", order: "CDAB", scale: 0.1}' in lines
    )
    assert "OK: gateway gw-01, 3 devices, 3030 tags, 33 requests per poll cycle" in lines
    assert (
        "  press-1  modbus-tcp 127.0.0.1:5020  profile press-v2 unit 1  poll 500ms  1010 tags  11 requests per poll"
        in lines
    )
    assert "    holding 0..124 (125 registers, 125 tags)" in lines


MODICON = """\
devices:
  - name: meter
    protocol: modbus-tcp
    host: 127.0.0.1
    addressing: modicon
    tags:
      - {{name: a, address: {a}}}
      - {{name: b, address: {b}, type: float32}}
      - {{name: c, address: "{c}"}}
      - {{name: d, address: {d}}}
"""


def test_modicon_notation_five_and_six_digits(tmp_path: Path) -> None:
    path = tmp_path / "meter.yaml"
    path.write_text(MODICON.format(a=40001, b=400001 + 10, c="000017", d="30001.3"))
    result = agent("check-config", "--expand", path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no "looks like Modicon" warning: the device says it is
    assert '  a: {table: "holding", address: 0}' in result.stdout
    assert '  b: {table: "holding", address: 10, type: "float32"}' in result.stdout
    assert '  c: {table: "coil", address: 16}' in result.stdout
    assert '  d: {table: "input", address: 0, bit: 3}' in result.stdout
    assert (
        "    addresses: Modicon notation, 1-based, table from the first digit (40001 and 400001: holding register 0), "
        "converted to protocol addresses below" in result.stdout.splitlines()
    )
    path.write_text(MODICON.format(a=40001, b=400001, c="000017", d=4000001))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}: devices[meter].tags[d].address: 4000001 is not 5- or 6-digit Modicon notation "
        "(addressing: modicon): 40001 or 400001 is holding register 0"
    )


def test_protocol_addressing_is_stated_and_the_default(tmp_path: Path) -> None:
    path = tmp_path / "plant.yaml"
    path.write_text(MODICON.format(a=0, b=10, c=20, d=30).replace("    addressing: modicon\n", ""))
    assert (
        "    addresses: 0-based protocol addresses, as sent on the wire (holding register 40001 of a manual is address 0)"
        in summary_lines(load_config(path))
    )


@pytest.mark.parametrize(
    ("device", "error"),
    [
        ("profile: press", "devices[d1].profile: no profile 'press' (profiles: press-v2)"),
        (
            "tags: [{name: reg, addresses: 0-9}]",
            "devices[d1].tags[reg].name: a range's name is a template with {address}, {i} or {n}, "
            "like r{address} (got 'reg')",
        ),
        (
            'tags: [{name: "f{i}", addresses: 0-8, type: float32}]',
            "devices[d1].tags[0].addresses: 0-8 is 9 addresses, not a whole number of elements of 2 (stride)",
        ),
        (
            'tags: [{name: "f{i}", addresses: 9-0}]',
            "devices[d1].tags[0].addresses: expected a range like 0-999 (got '9-0')",
        ),
        (
            'tags: [{name: "f{i}", address: 0, count: 0}]',
            "devices[d1].tags[0].count: must be a whole number, at least 1 (got 0)",
        ),
        (
            "addressing: modicon\n    tags: [{name: a, address: 40001, table: input}]",
            "devices[d1].tags[a].table: input disagrees with address 40001, a holding register in Modicon notation",
        ),
        (
            "addressing: modicon\n    tags: [{name: a, address: 20001}]",
            "devices[d1].tags[a].address: 20001 is not a Modicon register (addressing: modicon): the first digit "
            "names the table (0 coil, 1 discrete, 3 input, 4 holding), the rest counts from 1 up to 9999",
        ),
        ("addressing: octal", "devices[d1].addressing: must be protocol or modicon (got 'octal')"),
        (
            'protocol: opcua\n    endpoint: opc.tcp://h:4840\n    tags: [{name: "t{n}", node: "ns=2;s=T", count: 3}]',
            "devices[d1].tags[0].count: ranges are for Modbus registers; list OPC UA nodes one by one",
        ),
        (
            'addressing: modicon\n    tags: [{name: "r{address}", addresses: 49990-50009}]',
            "devices[d1].tags[r50000].address: 50000 is not a Modicon register (addressing: modicon): the first "
            "digit names the table (0 coil, 1 discrete, 3 input, 4 holding), the rest counts from 1 up to 9999",
        ),
        (
            'tags: [{name: "r{i}", addresses: 65530-65539}]',
            "devices[d1].tags[0].addresses: the range runs to address 65539, past the last one, 65535 "
            "(0-based protocol address)",
        ),
    ],
)
def test_bad_profiles_and_ranges_are_one_line_naming_file_field_value(tmp_path: Path, device: str, error: str) -> None:
    path = tmp_path / "plant.yaml"
    path.write_text(
        "profiles:\n  press-v2: {port: 5020}\n"
        f"devices:\n  - name: d1\n    protocol: modbus-tcp\n    host: 127.0.0.1\n    {device}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: {error}"


def test_a_bad_range_through_the_real_command(tmp_path: Path) -> None:
    path = tmp_path / "plant.yaml"
    path.write_text("devices:\n  - {name: d1, protocol: modbus-tcp, host: h, tags: [{name: r, addresses: 0-9}]}\n")
    assert one_line(agent("check-config", path), 2) == (
        f"Error: {path}: devices[d1].tags[r].name: a range's name is a template with {{address}}, {{i}} or {{n}}, "
        "like r{address} (got 'r')"
    )


def test_expansion_does_not_change_what_it_was_given() -> None:
    data = short_config(502)
    before = json.dumps(data, sort_keys=True)
    parse_config(data, "x.yaml")
    assert json.dumps(data, sort_keys=True) == before
    with pytest.raises(ConfigError, match=r"profiles\.p\.name: not allowed in a profile"):
        parse_config({"profiles": {"p": {"name": "x"}}, "devices": []}, "x.yaml")


@pytest.mark.fault
async def test_profile_and_ranges_publish_the_same_points_as_the_hand_written_config(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    """Two real agents, one per file, polling the same machines: the broker sees the same points and meta."""
    port = free_port()

    def with_broker(config: dict[str, Any], gateway: str) -> dict[str, Any]:
        cert, key = pki_acme.client(gateway)
        mqtt = {"url": f"mqtts://{pki_acme.host}:{broker_acme.port}", "connect_host": "127.0.0.1",
                "ca_file": str(pki_acme.ca_file), "cert_file": str(cert), "key_file": str(key)}  # fmt: skip
        return {**config, "gateway": gateway, "mqtt": mqtt, "buffer": {"confirm": "broker"}}

    cert, key = pki_acme.bridge
    seen = Collector(
        BrokerSettings(host=pki_acme.host, port=broker_acme.port, tls=True, connect_host="127.0.0.1",
                       ca_file=str(pki_acme.ca_file), cert_file=str(cert), key_file=str(key)),
        ["gw/#"],
        client_id="bridge",
    )  # fmt: skip

    def points(gw: str) -> dict[tuple[str, str], Any]:
        """Good readings by tag (two agents on one simulator in the test's loop may time out a request)."""
        docs = seen.docs(f"gw/{gw}/data/")
        return {(d["dev"], p["tag"]): p["v"] for d in docs for p in d["points"] if p["q"] == "good"}

    def meta(gw: str) -> dict[str, Any]:
        return {d["device"]: d["tags"] for d in seen.docs(f"gw/{gw}/meta/")}

    async with ModbusSimulator(units={u: plant_model(u) for u in (1, 2, 3)}, port=port):
        with (
            seen,
            AgentProcess(tmp_path / "short", with_broker(short_config(port), "gw-short")) as short,
            AgentProcess(tmp_path / "long", with_broker(long_config(port), "gw-long")) as long,
        ):
            short.start()
            long.start()
            await asyncio.to_thread(
                seen.wait,
                lambda: len(points("gw-short")) == 3030 and len(points("gw-long")) == 3030,
                30,
                "every tag of both agents",
            )
            for agent in (short, long):  # a request cancelled while it waited for a slot once broke the poll
                assert [line for line in agent.logs() if line.get("msg") == "driver failed"] == []
    assert points("gw-short") == points("gw-long")
    assert meta("gw-short") == meta("gw-long")
    temp = next(t for t in meta("gw-short")["press-1"] if t["name"] == "r999")
    assert temp == {"name": "r999", "type": "uint16", "unit": "count", "writable": False, "description": "raw 1000"}
