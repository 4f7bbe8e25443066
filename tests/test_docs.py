"""The project checks itself: every command documented, every documented key real."""

from __future__ import annotations

import argparse
from pathlib import Path

import pydantic
import pytest

from agent.cli import build_parser
from drivers.simulate.machines import demo_machines, register_map_lines
from tests.helpers import documented_models

DOCS = Path(__file__).resolve().parent.parent / "docs"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_agent_command_has_help_and_a_docs_section() -> None:
    cli_doc = (DOCS / "cli.md").read_text()
    parser = build_parser()
    for name, sub in subcommands(parser).items():
        assert sub.description, f"agent {name} has no --help description"
        assert f"\n## agent {name}\n" in cli_doc, f"docs/cli.md has no section for agent {name}"
        for action in sub._actions:
            assert action.help, f"agent {name}: option {action.dest} has no help text"


@pytest.mark.parametrize(
    ("models", "keys"),
    documented_models(DOCS / "config.md"),
    ids=lambda v: getattr(v, "__name__", "") if isinstance(v, type) else None,
)
def test_config_doc_and_models_agree(models: list[type[pydantic.BaseModel]], keys: set[str]) -> None:
    fields = set().union(*(m.model_fields for m in models))
    assert keys - fields == set(), f"documented but not in {models}: {keys - fields}"
    assert fields - keys == set(), f"in {models} but not documented: {fields - keys}"


def test_simulator_doc_shows_the_register_map_and_node_list() -> None:
    from drivers.simulate.opcua_server import node_table

    text = (DOCS / "simulator.md").read_text()
    for line in register_map_lines(demo_machines()):
        assert line in text, f"docs/simulator.md is missing: {line}"
    for node, kind, meaning in node_table():
        assert f"| `{node}` | {kind} | {meaning} |" in text, f"docs/simulator.md is missing node {node}"
