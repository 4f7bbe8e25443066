"""The pushed configuration's files at start: a crash at any step leaves the old or the new one, never a mix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.config import parse_config_text
from agent.remote import ConfigStore, Outcome, Push, parse_push, startup, text_hash
from factory_edge.errors import ConfigError


def config_text(port: int) -> str:
    return yaml.safe_dump(
        {
            "devices": [
                {
                    "name": "d",
                    "protocol": "modbus-tcp",
                    "host": "10.0.0.5",
                    "port": port,
                    "tags": [{"name": "r{address}", "addresses": "0-3"}],
                }
            ]
        }
    )


def push(version: int, port: int) -> Push:
    text = config_text(port)
    return Push(version=version, hash=text_hash(text.encode()), yaml=text, config=parse_config_text(text, "t"))


@pytest.fixture
def local(tmp_path: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(config_text(502))
    return path


def test_no_push_runs_the_local_file(tmp_path: Path, local: Path) -> None:
    start = startup(local, tmp_path / "state")
    assert start.running.source == "local" and start.running.hash == text_hash(local.read_bytes())
    assert start.outcome is None and start.notes == []


def test_an_applied_push_runs_after_a_restart(tmp_path: Path, local: Path) -> None:
    store = ConfigStore(tmp_path / "state")
    store.begin(push(1, 1502), text_hash(local.read_bytes()))
    store.commit(push(1, 1502), text_hash(local.read_bytes()))
    start = startup(local, tmp_path / "state")
    assert (start.running.source, start.running.version) == ("pushed", 1)
    assert start.config.devices[0].address == "10.0.0.5:1502"
    assert oct((tmp_path / "state" / "config" / "running.json").stat().st_mode & 0o777) == "0o600"


def test_a_crash_while_applying_comes_back_on_the_previous_push(tmp_path: Path, local: Path) -> None:
    store = ConfigStore(tmp_path / "state")
    base = text_hash(local.read_bytes())
    store.commit(push(1, 1502), base)
    store.begin(push(2, 2502), base)  # the process dies here: switched or not, never committed
    start = startup(local, tmp_path / "state")
    assert (start.running.version, start.config.devices[0].address) == (1, "10.0.0.5:1502")
    assert start.outcome == Outcome(
        "rolled_back", 2, push(2, 2502).hash, "the agent stopped while applying version 2; running version 1",
        start.outcome.ts if start.outcome else 0,
    )  # fmt: skip
    assert not (tmp_path / "state" / "config" / "candidate.json").exists()
    assert startup(local, tmp_path / "state").outcome == start.outcome  # remembered, said again


def test_a_crash_between_commit_and_cleanup_keeps_the_new_one(tmp_path: Path, local: Path) -> None:
    store = ConfigStore(tmp_path / "state")
    base = text_hash(local.read_bytes())
    store.begin(push(2, 2502), base)
    store._write(
        "running.json", {"version": 2, "hash": push(2, 2502).hash, "yaml": config_text(2502), "local_hash": base}
    )
    start = startup(local, tmp_path / "state")
    assert (start.running.version, start.config.devices[0].address) == (2, "10.0.0.5:2502")
    assert start.outcome is None


def test_a_local_edit_wins_and_says_so(tmp_path: Path, local: Path) -> None:
    ConfigStore(tmp_path / "state").commit(push(1, 1502), text_hash(local.read_bytes()))
    local.write_text(config_text(503))
    start = startup(local, tmp_path / "state")
    assert start.running.source == "local" and start.config.devices[0].address == "10.0.0.5:503"
    assert start.notes == [
        f"{local} changed since version 1 was pushed: running the local file "
        "(a local override; the cloud sees it as drift until the next push)"
    ]


def test_an_unreadable_state_file_is_ignored(tmp_path: Path, local: Path) -> None:
    (tmp_path / "state" / "config").mkdir(parents=True)
    (tmp_path / "state" / "config" / "running.json").write_text("{not json")
    assert startup(local, tmp_path / "state").running.source == "local"


@pytest.mark.parametrize(
    ("payload", "reasons"),
    [
        ({"config": "devices: []"}, ["version: must be a whole number, at least 1 (got None)"]),
        ("text", ['expected {"version": N, "config": "<agent config YAML>"}']),
        ({"version": 1, "config": "gateway: gw-02\n" + config_text(502)},
         ["config version 1: gateway: 'gw-02' is not this gateway ('gw-01')"]),
        ({"version": 1, "config": "devices: []\n"},
         ["config version 1: devices: none configured, so the agent would poll nothing"]),
        ({"version": 1, "config": "state_dir: /tmp/x\npublish: {max_points: 10}\n" + config_text(502)},
         ["config version 1: state_dir: cannot change while the agent runs (restart needed): change it in the local file",
          "config version 1: publish: cannot change while the agent runs (restart needed): change it in the local file"]),
    ],
)  # fmt: skip
def test_a_push_is_refused_with_every_reason(payload: object, reasons: list[str]) -> None:
    running = parse_config_text(config_text(502), "agent.yaml")
    with pytest.raises(ConfigError) as caught:
        parse_push(payload, running, "gw-01")
    assert str(caught.value).splitlines() == reasons
