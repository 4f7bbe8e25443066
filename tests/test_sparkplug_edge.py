"""The agent's Sparkplug edge node against a broker that takes small packets (a tenant plan's message size)."""

from __future__ import annotations

import json
from pathlib import Path

from agent.config import parse_config
from agent.sparkplug import EdgeNode
from drivers.points import Point
from factory_edge.mqtt import packet_size
from factory_edge.sparkplug.payload import decode

LIMIT = 4096


def edge_with(tmp_path: Path, tags: dict[str, int]) -> EdgeNode:
    config = parse_config(
        {
            "gateway": "gw-01",
            "mqtt": {"url": "mqtts://mqtt.acme.test:8883"},
            "devices": [
                {
                    "name": name,
                    "protocol": "modbus-tcp",
                    "host": "127.0.0.1",
                    "tags": [{"name": f"r{i}", "address": i} for i in range(count)],
                }
                for name, count in tags.items()
            ],
        },
        "test",
    )
    edge = EdgeNode(group="acme", edge_node="gw-01", devices=config.devices, state_dir=tmp_path, version="1")
    for name, count in tags.items():
        edge.observe(name, [Point(name, f"r{i}", 1_767_225_600_000, 7) for i in range(count)])
    return edge


def fits(topic: str, payload: bytes) -> bool:
    return packet_size(topic, payload) <= LIMIT


def test_a_device_whose_birth_is_too_large_is_not_born_and_takes_no_seq(tmp_path: Path) -> None:
    """A 300-tag DBIRTH (about 6.5 KB) cannot go to a broker that takes 4 KiB. The device is not born: its
    readings go to the store as JSON batches (a DDATA without its DBIRTH is what a host cannot read), and
    the seq numbers the host counts have no gap where the birth would have been."""
    edge = edge_with(tmp_path, {"big": 300, "small": 3})
    edge.connecting()
    edge.devices_up |= {"big", "small"}
    births = edge.births(fits)
    assert [m.topic.split("/")[2:] for m in births] == [["NBIRTH", "gw-01"], ["DBIRTH", "gw-01", "small"]]
    assert [decode(m.payload).seq for m in births] == [0, 1]
    assert not edge.alive("big") and edge.alive("small")
    batch = json.dumps({"v": 1, "gw": "gw-01", "dev": "small", "seq": 5, "points": [{"tag": "r1", "ts": 1, "v": 3}]})
    assert decode(edge.data(5, batch.encode(), historical=False).payload).seq == 2
    # Going down, it has nothing to end; coming up again, the same limit leaves it unborn.
    assert edge.device_state("big", False, fits) is None
    assert edge.device_state("big", True, fits) is None and not edge.alive("big")
    # A broker that takes it: born at the next births.
    assert [m.topic.split("/")[2] for m in edge.births()] == ["NBIRTH", "DBIRTH", "DBIRTH"]
    assert edge.alive("big")
