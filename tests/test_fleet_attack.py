"""Fleet configuration under attack: configs that pass a glance but would misread, exhaust or crash a gateway.

Each case is an input a user or a peer's bad push really produces; each must
end in the right addresses or a one-line error naming file, field and value,
never a traceback, and a pushed one must leave the running agent as it was.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import load_config
from drivers.config import ModbusDeviceBase, Table
from drivers.simulate.modbus_server import ModbusSimulator
from factory_edge.errors import ConfigError
from provisioning.errors import Invalid
from provisioning.fleet import check_config_text
from tests.infra import Mosquitto, TenantPki
from tests.test_config_expand import agent, one_line
from tests.test_fleet_push import GW, agent_config, cloud, model, online, wait

pytestmark = pytest.mark.timeout(60)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def modicon_device(tags: str) -> str:
    return (
        "gateway: gw-01\n"
        "devices:\n"
        "  - name: plc\n"
        "    protocol: modbus-tcp\n"
        "    host: 127.0.0.1\n"
        "    addressing: modicon\n"
        "    tags:\n" + tags
    )


def test_modicon_coil_numbers_with_leading_zeros_are_not_read_as_octal(tmp_path: Path) -> None:
    """00010 is coil 10 (address 9) in the 5-digit notation, 000011 coil 11 in the 6-digit one; YAML says 8 and 9."""
    path = write(
        tmp_path,
        modicon_device(
            "      - {name: c10, address: 00010}\n"
            "      - {name: c11, address: 000011}\n"
            "      - {name: c1, address: 00001}\n"
            "      - {name: 'k{n}', address: 00020, count: 3}\n"
            "      - {name: 'm{n}', addresses: 00030-00031}\n"
            "      - {name: h10, address: 40010}\n"
        ),
    )
    device = load_config(path).devices[0]
    assert isinstance(device, ModbusDeviceBase)
    got = {t.name: (t.table, t.address) for t in device.tags}
    assert got == {
        "c10": (Table.COIL, 9),
        "c11": (Table.COIL, 10),
        "c1": (Table.COIL, 0),
        "k1": (Table.COIL, 19),
        "k2": (Table.COIL, 20),
        "k3": (Table.COIL, 21),
        "m1": (Table.COIL, 29),
        "m2": (Table.COIL, 30),
        "h10": (Table.HOLDING, 9),
    }


@pytest.mark.parametrize("written", ["1", "9999", "4001", "'1'"])
def test_a_modicon_number_shorter_than_5_digits_is_refused_not_padded_into_a_coil(tmp_path: Path, written: str) -> None:
    """Under addressing: modicon, 1 or 9999 is not guessed to be 00001 or 09999 (coils 0 and 9998)."""
    path = write(tmp_path, modicon_device(f"      - {{name: t, address: {written}}}\n"))
    line = one_line(agent("check-config", path), 2)
    assert (
        "is not 5- or 6-digit Modicon notation (addressing: modicon)" in line and "devices[plc].tags[t].address" in line
    )


def test_a_modicon_range_written_short_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, modicon_device("      - {name: 'c{n}', addresses: 1-3}\n"))
    assert "is not 5- or 6-digit Modicon notation" in one_line(agent("check-config", path), 2)


def test_a_short_config_expanding_to_millions_of_tags_is_refused_in_one_line(tmp_path: Path) -> None:
    """A 1 KB file: 4 full-size ranges in a profile used by 20 devices is 5.2 million tags (gigabytes to check)."""
    ranges = "".join(f'      - {{name: "r{k}_{{address}}", addresses: 0-65535}}\n' for k in range(4))
    devices = "".join(f"  - {{name: d{i}, profile: big, host: 127.0.0.1}}\n" for i in range(20))
    text = "gateway: gw-01\nprofiles:\n  big:\n    protocol: modbus-tcp\n    tags:\n" + ranges + "devices:\n" + devices
    assert len(text) < 1500
    line = one_line(agent("check-config", write(tmp_path, text)), 2)
    assert line == (
        f"Error: {tmp_path / 'agent.yaml'}: devices[d0].tags[1]: the configuration expands to more than 100000 "
        "tags here (profiles and ranges counted for each device); at most 100000 on one gateway"
    )


def test_one_tag_list_shared_by_yaml_aliases_counts_once_per_device(tmp_path: Path) -> None:
    """An anchor of 1,000 tags aliased by 200 devices is 200,000 tags, whatever the file's size."""
    tags = "".join(f"      - {{name: t{i}, address: {i}}}\n" for i in range(1000))
    devices = "".join(f"  - {{name: d{i}, protocol: modbus-tcp, host: 127.0.0.1, tags: *t}}\n" for i in range(1, 200))
    text = (
        "gateway: gw-01\ndevices:\n  - name: d0\n    protocol: modbus-tcp\n    host: 127.0.0.1\n"
        "    tags: &t\n" + tags + devices
    )
    line = one_line(agent("check-config", write(tmp_path, text)), 2)
    assert line.endswith("at most 100000 on one gateway") and "devices[d100].tags[t0]" in line


def test_deeply_nested_yaml_is_a_one_line_error_on_the_gateway_and_in_the_cloud(tmp_path: Path) -> None:
    text = "gateway: gw-01\ndevices: " + "[" * 5000 + "]" * 5000 + "\n"
    line = one_line(agent("check-config", write(tmp_path, text)), 2)
    assert line == f"Error: {tmp_path / 'agent.yaml'}: invalid YAML: nested too deeply"
    with pytest.raises(Invalid, match=r"^gw-01\.yaml: invalid YAML: nested too deeply$"):
        check_config_text(text, "gw-01.yaml")


async def test_pushes_that_cannot_even_be_parsed_are_rejected_and_the_agent_keeps_running(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    """A lone surrogate (valid JSON, not UTF-8), deep nesting: a reply naming the reason, the old tags flow on."""
    from tests.agentproc import AgentProcess
    from tests.helpers import free_port

    port = free_port()
    async with ModbusSimulator(units={1: model()}, port=port):
        config = agent_config(pki_acme, broker_acme, port)
        with AgentProcess(tmp_path / "agent", config) as gw, cloud(pki_acme, broker_acme, "cloud-attack") as seen:
            gw.start()
            await asyncio.to_thread(wait, lambda: online(seen) and seen.tags() >= {"r0"}, 15, "first points")
            pid = gw.proc.pid if gw.proc else None
            text = yaml.safe_dump(config, sort_keys=False)
            bad: list[dict[str, Any]] = [
                {"version": 7, "config": text + "# \ud800\n"},
                {"version": 8, "config": "devices: " + "[" * 5000 + "]" * 5000},
            ]
            for n, payload in enumerate(bad, 1):
                body = json.dumps(payload).encode()  # ensure_ascii: the surrogate travels as \\ud800
                seen.client.publish(f"gw/{GW}/cmd/config", body, qos=1).wait_for_publish(5)
                await asyncio.to_thread(wait, lambda n=n: len(seen.replies()) >= n, 10, f"reply {n}")
            replies = seen.replies()
            assert [(r["ok"], r["state"], r["version"]) for r in replies] == [
                (False, "rejected", 7),
                (False, "rejected", 8),
            ]
            assert replies[0]["reasons"] == [
                f"config version 7: config: not UTF-8 text (surrogates not allowed at character {len(text) + 2})"
            ]
            assert replies[1]["reasons"] == ["config version 8: invalid YAML: nested too deeply"]
            mark = len(seen.messages)
            await asyncio.to_thread(wait, lambda: seen.tags(mark) >= {"r0", "r2"}, 10, "the old tags still flowing")
            assert gw.proc is not None and gw.proc.pid == pid and gw.proc.poll() is None
            assert seen.statuses()[-1]["config"]["source"] == "local"


def test_operator_tokens_reach_only_their_tenant_and_odd_bodies_get_one_line_errors(tmp_path: Path) -> None:
    """acme's token on globex is 403; a lone surrogate or bad gateway name is a 4xx naming it; only hashes stored."""
    import sqlite3

    import httpx

    from tests.helpers import free_port
    from tests.provisioning_fixtures import ApiServer, provisioning

    data = tmp_path / "data"
    provisioning(data, "init", "--proxy-bind", "127.0.0.1", "--proxy-port", str(free_port()))
    for tenant in ("acme", "globex"):
        provisioning(data, "tenant", "create", tenant, "--domain", "test", "--broker-port", str(free_port()))
    acme = provisioning(data, "operator-token", "create", "acme-ci", "--tenant", "acme").stdout.strip()
    everyone = provisioning(data, "operator-token", "create", "console").stdout.strip()
    with ApiServer(data, "--max-failures", "1000") as api:

        def call(method: str, path: str, token: str, **kwargs: Any) -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
            return httpx.request(
                method, f"{api.url}{path}", headers=headers, verify=api.context(), timeout=15.0, **kwargs
            )

        text = "devices:\n  - {name: d, protocol: modbus-tcp, host: 10.0.0.5, tags: [{name: r, address: 0}]}\n"
        theirs = call("PUT", f"/v1/tenants/globex/gateways/{GW}/config", acme, json={"yaml": text})
        assert (theirs.status_code, theirs.json()) == (
            403,
            {"detail": f"operator token {acme.split('_')[1]} is for tenant acme, not globex"},
        )
        assert call("GET", f"/v1/tenants/globex/gateways/{GW}/config", acme).status_code == 403
        assert call("GET", "/v1/tenants/globex/configs", acme).status_code == 403
        odd = call(
            "PUT",
            f"/v1/tenants/acme/gateways/{GW}/config",
            everyone,
            content=b'{"yaml": "devices: [] # \\ud800"}',
            headers={"content-type": "application/json"},
        )
        assert odd.status_code == 422, odd.text
        assert odd.json()["detail"].startswith("yaml: not UTF-8 text"), odd.text
        noted = call(
            "PUT",
            f"/v1/tenants/acme/gateways/{GW}/config",
            everyone,
            content=b'{"yaml": "devices: [{name: d}]", "note": "\\udcff"}',
            headers={"content-type": "application/json"},
        )
        assert noted.status_code == 422, noted.text
        assert noted.json()["detail"].startswith("note: "), noted.text
        named = call("PUT", "/v1/tenants/acme/gateways/no%20such%20gw/config", everyone, json={"yaml": text})
        assert named.status_code == 422 and "no such gw" in named.json()["detail"], named.text
        assert call("GET", "/v1/tenants/acme/gateways/no%20such%20gw/config", everyone).status_code in (404, 422)
    with sqlite3.connect(data / "registry.db") as db:
        stored = [str(v) for row in db.execute("SELECT * FROM operator_tokens") for v in row]
    assert stored and not any(acme.split("_", 2)[2] in v or everyone.split("_", 2)[2] in v for v in stored)


def test_a_push_cannot_turn_pushes_off(tmp_path: Path) -> None:
    """Applied, it would lock the cloud out for good: no later push could repair it. The local file still can."""
    from agent.remote import parse_push

    text = (
        "gateway: gw-01\nremote_config: {enabled: false}\n"
        "devices:\n  - {name: d, protocol: modbus-tcp, host: 127.0.0.1, tags: [{name: r, address: 0}]}\n"
    )
    running = load_config(write(tmp_path, text.replace("enabled: false", "enabled: true")))
    with pytest.raises(ConfigError) as refused:
        parse_push({"version": 2, "config": text}, running, "gw-01")
    assert str(refused.value) == (
        "config version 2: remote_config.enabled: false would refuse every later push, this one's repair "
        "included: turn pushes off in the local file"
    )
    assert load_config(write(tmp_path, text)).remote_config.enabled is False


@pytest.mark.fault
@pytest.mark.timeout(240)
def test_every_reading_is_stored_exactly_once_across_a_push_and_a_rollback(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    """The ground-truth machine, the bridge's store: v1 applied (faster polls), v2 (a wrong broker port) rolled
    back by itself; nothing the machine served is missing or stored twice."""
    from tests.agentproc import AgentProcess
    from tests.bridge_fixtures import BridgeProcess, StoreView, tenant_entry, wait_until, write_config
    from tests.faults import Plant, check_exactly_once, finish
    from tests.faults import agent_config as plant_agent_config
    from tests.helpers import free_port

    view = StoreView("sqlite", tmp_path / "store")
    bridge_yaml = write_config(
        tmp_path / "bridge.yaml", tenants=[tenant_entry(pki_acme, broker_acme)], storage=view.storage
    )
    with (
        Plant(tmp_path / "plant", units=(1, 2)) as plant,
        BridgeProcess(bridge_yaml) as bridge,
        cloud(pki_acme, broker_acme, "cloud-plant") as seen,
    ):
        bridge.wait_connected()
        config = plant_agent_config(pki_acme, broker_acme.port, plant, remote_config={"deadline": "3s"})
        gw = AgentProcess(tmp_path / "agent", config)
        gw.start()
        try:
            wait(lambda: online(seen), 15, "the agent online")
            time.sleep(2)
            v1 = {**config, "devices": plant.devices(poll="20ms")}
            seen.push(1, yaml.safe_dump(v1, sort_keys=False))
            wait(lambda: seen.events("applied"), 15, "v1 applied")
            time.sleep(2)
            v2 = {**v1, "mqtt": {**v1["mqtt"], "url": f"mqtts://{pki_acme.host}:{free_port()}"}}
            seen.push(2, yaml.safe_dump(v2, sort_keys=False))
            wait(lambda: seen.events("rolled_back"), 30, "v2 rolled back")
            rolled = seen.events("rolled_back")[0]
            assert rolled["version"] == 2 and rolled["reason"].startswith("cannot reach the broker"), rolled
            wait_until(lambda: gw.status().get("config", {}).get("version") == 1, timeout_s=15)
            time.sleep(2)
            finish(plant, gw)
        finally:
            gw.stop()
    report = check_exactly_once(plant, view, pki_acme.tenant)
    assert report["served"] > 100 and report["stored"] == report["served"], report


async def test_a_push_replacing_every_device_by_ones_that_cannot_be_read_rolls_back(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    """line-1 read fine; the push names it line-01 on a dead port. No device that read fine before is left
    to watch, so the new ones are watched: none reads within the deadline, the push is rolled back."""
    from tests.agentproc import AgentProcess
    from tests.helpers import free_port

    port = free_port()
    async with ModbusSimulator(units={1: model()}, port=port):
        config = agent_config(pki_acme, broker_acme, port)
        with AgentProcess(tmp_path / "agent", config) as gw, cloud(pki_acme, broker_acme, "cloud-rename") as seen:
            gw.start()
            await asyncio.to_thread(wait, lambda: online(seen) and seen.tags() >= {"r0"}, 15, "first points")
            renamed = agent_config(pki_acme, broker_acme, free_port())
            renamed["devices"][0]["name"] = "line-01"
            seen.push(2, renamed)
            await asyncio.to_thread(
                wait, lambda: seen.events("rolled_back") or seen.events("applied"), 20, "the outcome"
            )
            assert not seen.events("applied"), "applied a configuration in which no device reads"
            reason = seen.events("rolled_back")[0]["reason"]
            assert reason.startswith(
                "none of the devices that read fine before is left (line-1), and 1 of 1 new devices fail after 3s "
                "(more than remote_config.max_failed_share 0.5): line-01: "
            ), reason
            mark = len(seen.messages)
            await asyncio.to_thread(wait, lambda: seen.tags(mark) >= {"r0", "r2"}, 10, "good points again")


def test_a_control_character_in_the_yaml_is_one_line_naming_the_file_and_where(tmp_path: Path) -> None:
    from agent.remote import parse_push

    text = "gateway: gw-01\ndevices: [\x00]\n"
    line = one_line(agent("check-config", write(tmp_path, text)), 2)
    assert line == (
        f"Error: {tmp_path / 'agent.yaml'}: character 25: invalid YAML: unacceptable character #x0000: "
        "special characters are not allowed"
    )
    with pytest.raises(Invalid) as cloud_side:
        check_config_text(text, "gw-01.yaml")
    assert str(cloud_side.value) == (
        "gw-01.yaml: character 25: invalid YAML: unacceptable character #x0000: special characters are not allowed"
    )
    running = load_config(
        write(
            tmp_path,
            text.replace("[\x00]", "[{name: d, protocol: modbus-tcp, host: h, tags: [{name: r, address: 0}]}]"),
        )
    )
    with pytest.raises(ConfigError) as pushed:
        parse_push({"version": 3, "config": text}, running, "gw-01")
    assert str(pushed.value).splitlines() == [
        "config version 3: character 25: invalid YAML: unacceptable character #x0000: "
        "special characters are not allowed"
    ]


@pytest.mark.fault
def test_config_set_with_arguments_that_are_not_utf8_is_one_line(tmp_path: Path) -> None:
    """A note or a tenant of raw bytes (a Latin-1 terminal): refused naming the value, nothing stored."""
    from tests.helpers import free_port
    from tests.provisioning_fixtures import provisioning

    data = tmp_path / "data"
    provisioning(data, "init", "--proxy-bind", "127.0.0.1", "--proxy-port", str(free_port()))
    provisioning(data, "tenant", "create", "acme", "--domain", "test", "--broker-port", str(free_port()))
    text = "devices:\n  - {name: d, protocol: modbus-tcp, host: 10.0.0.5, tags: [{name: r, address: 0}]}\n"
    config = write(tmp_path, text)
    for args, shown in (
        (("acme", GW, str(config), "--note", "Pr\udce9sse 3"), "'Pr\\udce9sse 3'"),  # b"Pr\xe9sse 3"
        (("ac\udcffme", GW, str(config)), "'ac\\udcffme'"),
    ):
        result = provisioning(data, "config", "set", *args, check=False)
        assert "Traceback" not in result.stderr, result.stderr
        assert (result.returncode, result.stderr) == (2, f"Error: not UTF-8 text: {shown} (surrogates not allowed)\n")
    shown_versions = provisioning(data, "config", "show", "acme", GW, check=False)
    assert shown_versions.returncode != 0 and "no configuration stored" in shown_versions.stderr


async def test_older_repeated_and_racing_pushes(tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto) -> None:
    """v2 applied; v1 after it is refused, v2 again is 'unchanged', another text as v2 refused; v3 and v4 at
    the same instant: v4 is told v3 is being applied, v3 ends applied, and a restart comes back on v3."""
    from tests.agentproc import AgentProcess
    from tests.helpers import free_port

    port = free_port()
    async with ModbusSimulator(units={1: model()}, port=port):
        config = agent_config(pki_acme, broker_acme, port)
        with AgentProcess(tmp_path / "agent", config) as gw, cloud(pki_acme, broker_acme, "cloud-race") as seen:
            gw.start()
            await asyncio.to_thread(wait, lambda: online(seen) and seen.tags() >= {"r0"}, 15, "first points")

            async def outcome(n: int) -> dict[str, Any]:
                await asyncio.to_thread(wait, lambda: len(seen.replies()) >= n, 10, f"reply {n}")
                return seen.replies()[n - 1]

            v2 = agent_config(pki_acme, broker_acme, port, tags=4)
            seen.push(2, v2)
            assert (await outcome(1))["state"] == "applying"
            await asyncio.to_thread(wait, lambda: seen.events("applied"), 10, "v2 applied")
            seen.push(1, agent_config(pki_acme, broker_acme, port, tags=5))
            assert (await outcome(2))["reasons"] == ["version 1 is not newer than the running version 2"]
            seen.push(2, v2)
            assert await outcome(3) == {
                "ok": True,
                "state": "applied",
                "version": 2,
                "hash": seen.events("applied")[0]["hash"],
                "unchanged": True,
            }
            seen.push(2, agent_config(pki_acme, broker_acme, port, tags=6))
            assert (await outcome(4))["reasons"] == ["version 2 is not newer than the running version 2"]
            for version, tags in ((3, 7), (4, 8)):
                text = yaml.safe_dump(agent_config(pki_acme, broker_acme, port, tags=tags), sort_keys=False)
                seen.client.publish(f"gw/{GW}/cmd/config", json.dumps({"version": version, "config": text}), qos=1)
            racing = [await outcome(5), await outcome(6)]
            assert sorted((r["version"], r["state"]) for r in racing) == [(3, "applying"), (4, "rejected")]
            assert next(r for r in racing if r["version"] == 4)["reasons"] == [
                "version 3 is being applied; push again when it is done"
            ]
            await asyncio.to_thread(wait, lambda: len(seen.events("applied")) == 2, 10, "v3 applied")
            assert seen.events("applied")[-1]["version"] == 3
            assert gw.stop() == 0
            gw.start()
            await asyncio.to_thread(
                wait, lambda: gw.status().get("config", {}).get("version") == 3, 15, "v3 after a restart"
            )


@pytest.mark.parametrize(
    "crash_at,comes_back_on",
    [
        ("after the candidate was written (first push)", "local"),
        ("after the candidate was written (over version 2)", 2),
        ("between running.json and the candidate's removal", 3),
        ("after the rollback, before the candidate's removal", 2),
    ],
)
def test_kill_9_at_each_step_of_apply_comes_back_on_one_whole_config(
    tmp_path: Path, crash_at: str, comes_back_on: int | str
) -> None:
    """The files a kill -9 leaves at each step, as the agent wrote them (ConfigStore), read by the next start."""
    from agent.remote import ConfigStore, Push, startup, text_hash

    def device(host: str) -> str:
        return f"devices:\n  - {{name: d, protocol: modbus-tcp, host: {host}, tags: [{{name: r, address: 0}}]}}\n"

    local = write(tmp_path, "gateway: gw-01\n" + device("local.example"))
    local_hash = text_hash(local.read_bytes())
    store = ConfigStore(tmp_path / "state")

    def push(version: int) -> Push:
        text = device(f"v{version}.example")
        path = tmp_path / f"v{version}.yaml"
        path.write_text(text)
        return Push(version=version, hash=text_hash(text.encode()), yaml=text, config=load_config(path))

    if crash_at.startswith("after the candidate was written (first"):
        store.begin(push(1), local_hash)
    else:
        store.commit(push(2), local_hash)
        store.begin(push(3), local_hash)
        if crash_at.startswith("between"):
            store.commit(push(3), local_hash)
            store.begin(push(3), local_hash)  # the candidate's removal did not reach the disk
    start = startup(local, tmp_path / "state")
    host = start.config.devices[0].host  # type: ignore[union-attr]
    if comes_back_on == "local":
        assert (start.running.source, host) == ("local", "local.example")
    else:
        assert (start.running.source, start.running.version, host) == (
            "pushed",
            comes_back_on,
            f"v{comes_back_on}.example",
        )
    assert not (tmp_path / "state" / "config" / "candidate.json").exists()
    if comes_back_on != 3:
        assert start.outcome is not None and start.outcome.state == "rolled_back"
        assert start.notes and "the agent stopped while applying version" in start.notes[0]


@pytest.mark.fault
def test_a_configuration_too_large_for_the_brokers_packets_is_refused_when_stored(tmp_path: Path) -> None:
    """The rendered brokers take packets up to 1 MiB: a 1.5 MB configuration (30,000 tags written one by one)
    could be stored but never reach a gateway. It is refused at `config set`, saying why."""
    from provisioning.render import MAX_PACKET_SIZE
    from tests.helpers import free_port
    from tests.provisioning_fixtures import RenderedMosquitto, provisioning

    data = tmp_path / "data"
    provisioning(data, "init", "--proxy-bind", "127.0.0.1", "--proxy-port", str(free_port()))
    provisioning(data, "tenant", "create", "acme", "--domain", "test", "--broker-port", str(free_port()))
    tags = "".join(f"      - {{name: temperature_{i:05d}, address: {i}, unit: degC}}\n" for i in range(30000))
    big = write(tmp_path, "devices:\n  - name: d\n    protocol: modbus-tcp\n    host: 10.0.0.5\n    tags:\n" + tags)
    assert MAX_PACKET_SIZE < big.stat().st_size < 4 * 1024 * 1024
    with RenderedMosquitto(data, "acme"):
        result = provisioning(data, "config", "set", "acme", GW, str(big), "--push", check=False, timeout=60)
    assert "Traceback" not in result.stderr
    pushed = len(json.dumps({"version": 2**63, "config": big.read_text()}).encode())
    assert (result.returncode, result.stderr) == (
        1,
        f"Error: {big}: {pushed} bytes once pushed (as JSON), more than the broker's max_packet_size of "
        f"{MAX_PACKET_SIZE} bytes allows: write repeated tags as profiles and ranges (docs/config.md)\n",
    )
    shown = provisioning(data, "config", "show", "acme", GW, check=False)
    assert shown.returncode != 0 and "no configuration stored" in shown.stderr


@pytest.mark.fault
@pytest.mark.parametrize("delay_s", [0.0, 0.05, 0.3, 1.0])
async def test_a_push_arriving_as_the_agent_stops(
    delay_s: float, tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    """SIGTERM right after a push: a clean exit, every batch delivered, and the next start on one whole
    configuration (the pushed one if it was applied, else the local file) with no candidate left behind."""
    import signal

    from agent.bufferread import read_stats
    from tests.agentproc import AgentProcess
    from tests.helpers import free_port

    port = free_port()
    async with ModbusSimulator(units={1: model()}, port=port):
        config = agent_config(pki_acme, broker_acme, port)
        with AgentProcess(tmp_path / "agent", config) as gw, cloud(pki_acme, broker_acme, "cloud-stop") as seen:
            gw.start()
            await asyncio.to_thread(wait, lambda: online(seen) and seen.tags() >= {"r0"}, 15, "first points")
            seen.push(1, agent_config(pki_acme, broker_acme, port, tags=6))
            await asyncio.sleep(delay_s)
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(gw.proc.wait, 30)
            assert code == 0, (gw.workdir / "agent.log").read_text()[-3000:]
            last = read_stats(gw.state_dir / "buffer.db")
            assert last is not None
            # Whether the push was applied before the stop: the agent's own log says. The cloud learns the
            # outcome from the retained status (provisioning's 'config status' reads it there); the event
            # published as the agent stops may be on its way still, or not sent at all.
            applied = '"msg": "configuration applied"' in (gw.workdir / "agent.log").read_text()
            assert not (gw.state_dir / "config" / "candidate.json").exists() or not applied
            gw.start()
            want = 1 if applied else None
            await asyncio.to_thread(
                wait,
                lambda: (
                    gw.status().get("config", {}).get("source") is not None
                    and gw.status()["config"].get("version") == want
                ),
                15,
                f"back on version {want}",
            )
            assert not (gw.state_dir / "config" / "candidate.json").exists()
            if applied:
                assert gw.status()["config"]["last"]["state"] == "applied"
            await asyncio.to_thread(wait, lambda: max(seen.seqs(GW), default=0) >= last.next_seq - 1, 20, "all")
            seqs = sorted(set(seen.seqs(GW)))
            assert seqs[: last.next_seq - seqs[0]] == list(range(seqs[0], last.next_seq)), "a batch is missing"


@pytest.mark.fault
def test_drift_survives_a_gateway_that_publishes_odd_or_endless_statuses(tmp_path: Path) -> None:
    """A gateway may write its own status topic: one writes a status whose config is not a mapping, one
    republishes its status ten times a second. `config status` still answers, in bounded time, for all."""
    import subprocess
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from factory_edge.mqtt import BrokerSettings, tls_context
    from provisioning import pki as pkilib
    from tests.helpers import free_port
    from tests.provisioning_fixtures import RenderedMosquitto, provisioning

    data = tmp_path / "data"
    broker_port = free_port()
    provisioning(data, "init", "--proxy-bind", "127.0.0.1", "--proxy-port", str(free_port()))
    provisioning(data, "tenant", "create", "acme", "--domain", "test", "--broker-port", str(broker_port))
    text = "devices:\n  - {name: d, protocol: modbus-tcp, host: 10.0.0.5, tags: [{name: r, address: 0}]}\n"
    provisioning(data, "config", "set", "acme", "gw-odd", str(write(tmp_path, text)))
    files = data / "tenants" / "acme"
    ca_key, ca_cert = pkilib.load_private_key(files / "ca.key"), pkilib.load_cert(files / "ca.pem")

    def gateway(name: str) -> paho.Client:
        key, cert = pkilib.issue_client_cert(ca_key, ca_cert, name)
        pkilib.write_private_key(tmp_path / f"{name}.key", key)
        pkilib.write_pem(tmp_path / f"{name}.pem", cert)
        settings = BrokerSettings(
            host="mqtt.acme.test",
            port=broker_port,
            tls=True,
            connect_host="127.0.0.1",
            ca_file=str(files / "ca.pem"),
            cert_file=str(tmp_path / f"{name}.pem"),
            key_file=str(tmp_path / f"{name}.key"),
        )
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
        client.tls_set_context(tls_context(settings))
        client.connect("127.0.0.1", broker_port, keepalive=10)
        client.loop_start()
        return client

    stop = threading.Event()
    with RenderedMosquitto(data, "acme"):
        odd, noisy = gateway("gw-odd"), gateway("gw-noisy")
        try:
            for body in ({"state": "online", "config": "x", "config_hash": 5},):
                odd.publish("gw/gw-odd/status", json.dumps(body), qos=1, retain=True).wait_for_publish(5)

            def chatter() -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    doc = {"state": "online", "config": {"source": "local", "last": "?"}, "config_hash": str(n)}
                    noisy.publish("gw/gw-noisy/status", json.dumps(doc), qos=0, retain=True)
                    time.sleep(0.1)

            threading.Thread(target=chatter, daemon=True).start()
            time.sleep(0.5)
            try:
                result = provisioning(data, "config", "status", "acme", check=False, timeout=30)
            except subprocess.TimeoutExpired:
                raise AssertionError("config status never finished reading the statuses") from None
        finally:
            stop.set()
            for client in (odd, noisy):
                client.disconnect()
                client.loop_stop()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("gw-odd  drift  desired v1 ") for line in lines), result.stdout
    assert any(line.startswith("gw-noisy  not pushed  ") for line in lines), result.stdout


@pytest.mark.fault
@pytest.mark.timeout(180)
def test_a_push_to_a_reachable_broker_without_the_tenants_storage_rolls_back(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto, make_broker: Any
) -> None:
    """The staging broker: same CA, accepts the gateway, no bridge behind it. Connected is not delivered: with
    buffer.confirm: storage, no confirmation through it within the deadline rolls the push back, the gateway
    stays reachable by the cloud, and every reading is stored exactly once."""
    from tests.agentproc import AgentProcess
    from tests.bridge_fixtures import BridgeProcess, StoreView, tenant_entry, wait_until, write_config
    from tests.faults import Plant, check_exactly_once, finish
    from tests.faults import agent_config as plant_agent_config

    staging = make_broker(pki_acme)
    view = StoreView("sqlite", tmp_path / "store")
    bridge_yaml = write_config(
        tmp_path / "bridge.yaml", tenants=[tenant_entry(pki_acme, broker_acme)], storage=view.storage
    )
    with (
        Plant(tmp_path / "plant", units=(1,)) as plant,
        BridgeProcess(bridge_yaml) as bridge,
        cloud(pki_acme, broker_acme, "cloud-staging") as seen,
    ):
        bridge.wait_connected()
        config = plant_agent_config(pki_acme, broker_acme.port, plant, remote_config={"deadline": "4s"})
        gw = AgentProcess(tmp_path / "agent", config)
        gw.start()
        try:
            wait(lambda: online(seen), 15, "the agent online")
            time.sleep(1)
            wrong = {**config, "mqtt": {**config["mqtt"], "url": f"mqtts://{pki_acme.host}:{staging.port}"}}
            seen.push(1, yaml.safe_dump(wrong, sort_keys=False))

            def last() -> dict[str, Any]:
                return dict(gw.status().get("config", {}).get("last") or {})

            wait(lambda: last().get("state") in ("applied", "rolled_back"), 30, "the outcome")
            assert last()["state"] == "rolled_back", f"applied on a broker where nothing it sends is stored: {last()}"
            reason = last()["reason"]
            assert reason.startswith(
                f"connected to mqtts://{pki_acme.host}:{staging.port} via 127.0.0.1, but the tenant's storage "
                "confirmed nothing sent there within 4s"
            ), reason
            wait_until(lambda: gw.status().get("config", {}).get("source") == "local", timeout_s=15)
            # The right broker (a new connection: keepalive changed), the bridge behind it: applied.
            right = {**config, "mqtt": {**config["mqtt"], "keepalive": "20s"}, "devices": plant.devices(poll="20ms")}
            seen.push(2, yaml.safe_dump(right, sort_keys=False))
            wait(lambda: seen.events("applied"), 15, "the cloud still reaches the gateway: v2 applied")
            time.sleep(1)
            finish(plant, gw)
        finally:
            gw.stop()
    report = check_exactly_once(plant, view, pki_acme.tenant)
    assert report["stored"] == report["served"] > 20, report


def test_a_push_arriving_while_a_reload_restarts_the_devices_is_refused(
    tmp_path: Path, pki_acme: TenantPki, broker_acme: Mosquitto
) -> None:
    """A reload stops the devices, which takes as long as the read under way (the machine answers 1.5 s late
    here); a push arriving meanwhile is refused as busy, not applied over a half-done reload."""
    from tests.agentproc import AgentProcess
    from tests.faults import Plant

    with Plant(tmp_path / "plant", delay_ms=1500) as plant:
        config = agent_config(pki_acme, broker_acme, plant.port)
        config["devices"][0].update(timeout="5s", tags=[{"name": "r0", "address": 0}])
        with AgentProcess(tmp_path / "agent", config) as gw, cloud(pki_acme, broker_acme, "cloud-reload") as seen:
            gw.start()
            wait(lambda: online(seen) and len(plant.served()) >= 2, 20, "the agent polling")
            seen.client.publish(f"gw/{GW}/cmd/reload", "{}", qos=1).wait_for_publish(5)
            time.sleep(0.3)  # the reload is waiting for the read under way
            seen.push(2, agent_config(pki_acme, broker_acme, plant.port, tags=2))
            wait(lambda: seen.replies(), 10, "the push's reply")
            assert seen.replies()[0]["state"] == "rejected"
            assert seen.replies()[0]["reasons"] == [
                "the local configuration is being reloaded; push again when it is done"
            ]
            wait(lambda: seen.docs(f"gw/{GW}/cmd/reload/reply"), 10, "the reload's reply")
            assert seen.docs(f"gw/{GW}/cmd/reload/reply")[0]["ok"] is True
            assert gw.stop() == 0
