"""The documented examples are real: every command line parses, every config example validates.

Walks docs/*.md and README.md. A command line is a line of a fenced code
block or an indented (4 spaces) block whose command is ``agent``,
``provisioning``, ``bridge``, ``console`` or ``./scripts/demo`` (also ``.venv/bin/agent``, ``ExecStart=…``,
after ``sudo`` or ``VAR=value``). Its subcommand path must exist and every
``--option`` must be accepted by that subcommand's argparse parser, with
synopsis brackets (``[--uses N]``) and alternatives (``list|revoke``) read as
the docs mean them. A YAML example (a fenced ``yaml`` block, or an indented
block starting with a top-level config key) is validated with the real
agent or bridge model; ``…`` stands for a value left out on purpose and is
replaced by a placeholder first.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pydantic
import pytest
import yaml

from agent.cli import build_parser as agent_parser
from agent.config import AgentConfig, parse_config
from bridge.cli import build_parser as bridge_parser
from bridge.config import BridgeConfig
from console.cli import build_parser as console_parser
from factory_edge.configfile import validate
from factory_edge.demo.cli import build_parser as demo_parser
from factory_edge.errors import ConfigError
from provisioning.cli import build_parser as provisioning_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
PARSERS = {
    "agent": agent_parser,
    "provisioning": provisioning_parser,
    "bridge": bridge_parser,
    "console": console_parser,
    "demo": demo_parser,
}  # ./scripts/demo
SHELL_STOPS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1", "-->", "<--"}
AGENT_KEYS = {"gateway", "state_dir", "mqtt", "buffer", "publish", "metrics_port", "devices"}
BRIDGE_KEYS = {"instance", "storage", "tenants", "tenants_from", "ingest", "mappings", "alerts"}


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the block's first line
    lang: str
    lines: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """Fenced blocks (with their language) and indented blocks (language '')."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)", lines[i])
        if fence:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append(Block(path.name, start + 1, fence.group(2), tuple(body)))
            i += 1
            continue
        if lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            start, body = i, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            indent = min(len(x) - len(x.lstrip()) for x in body if x.strip())
            blocks.append(Block(path.name, start + 1, "", tuple(x[indent:] for x in body)))
            continue
        i += 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in code_blocks(page)]


# -- commands ------------------------------------------------------------------


def command_words(line: str) -> tuple[str, list[str]] | None:
    """``(program, arguments)`` if the line runs one of our commands, else None."""
    line = re.sub(r"(^|\s)#.*$", "", line).strip()
    line = re.sub(r"^\$\s+", "", line)
    line = re.sub(r"^ExecStart=", "", line)
    if not line or "$(" in line:
        return None
    try:
        words = shlex.split(line)
    except ValueError:
        return None
    while words and (words[0] == "sudo" or re.match(r"^[A-Z_][A-Z0-9_]*=", words[0])):
        words = words[1:]
    if not words:
        return None
    program = words[0].rsplit("/", 1)[-1]
    if program not in PARSERS or (
        words[0] != program and "/bin/" not in words[0] and not words[0].endswith(f"scripts/{program}")
    ):
        return None
    if len(words) > 1 and not re.match(r"^\[?(-|[a-z][a-z|-]*$|[A-Z]+\b)", words[1]):
        return None  # output that begins with the word (e.g. 'bridge  /path/bridge.pem'), not a command
    return program, words[1:]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return None


def check_command(program: str, words: list[str]) -> list[str]:
    """Problems with one documented command line (empty: it matches the parsers)."""
    parser = PARSERS[program]()
    path = [program]
    problems: list[str] = []
    i = 0
    while i < len(words):
        word = words[i].strip("[]")
        i += 1
        if words[i - 1] in SHELL_STOPS or word in SHELL_STOPS:
            break
        if not word or word in {"…", "...", "|"}:
            continue
        if word.startswith("-") and len(word) > 1 and not re.match(r"^-\d", word):
            option = word.split("=", 1)[0]
            action = parser._option_string_actions.get(option)
            if action is None:
                problems.append(f"{' '.join(path)}: no option {option}")
                continue
            if isinstance(action, argparse._VersionAction | argparse._HelpAction):
                break  # the command prints and exits: nothing else is needed
            if action.nargs != 0 and "=" not in word and i < len(words) and not words[i].lstrip("[").startswith("--"):
                i += 1  # its value (a synopsis may list options without one: [--host --port])
            continue
        choices = subparsers(parser)
        if choices is None:
            continue  # a positional argument
        if word in {"COMMAND", "ACTION"} or word.isupper():
            break  # a synopsis of every subcommand
        names = word.split("|")
        unknown = [n for n in names if n not in choices]
        if unknown:
            problems.append(f"{' '.join(path)}: no subcommand {'|'.join(unknown)} (has {', '.join(choices)})")
            break
        path.append(names[0])
        parser = choices[names[0]]
    else:
        if subparsers(parser) is not None and parser.__dict__.get("_subparsers") is not None:
            needed = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            if needed.required:
                problems.append(f"{' '.join(path)}: a subcommand is missing")
    return problems


def documented_commands() -> list[tuple[str, str, str, list[str]]]:
    out = []
    for block in ALL_BLOCKS:
        if block.lang in {"yaml", "json"}:
            continue
        lines = list(block.lines)
        for n, line in enumerate(lines):
            if line.rstrip().endswith("\\"):
                continue  # joined below
            k = n
            while k > 0 and lines[k - 1].rstrip().endswith("\\"):
                k -= 1
            text = " ".join(x.rstrip().rstrip("\\") for x in lines[k : n + 1])
            found = command_words(text)
            if found is not None:
                out.append((f"{block.page}:{block.line + k}", text.strip(), *found))
    return out


COMMANDS = documented_commands()


@pytest.mark.parametrize(("where", "text", "program", "words"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_matches_the_parser(where: str, text: str, program: str, words: list[str]) -> None:
    assert check_command(program, words) == [], f"{where}: {text}"


def test_the_docs_show_commands_of_every_program() -> None:
    programs = {c[2] for c in COMMANDS}
    assert programs == set(PARSERS), programs
    assert len(COMMANDS) > 40


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("agent run --config a.yaml --no-such-option", "agent run: no option --no-such-option"),
        ("agent runn --config a.yaml", "agent: no subcommand runn"),
        (
            "provisioning key create acme [--uses N] [--expires 7d] [--count 3]",
            "provisioning key create: no option --count",
        ),
        ("provisioning device list|remove acme", "provisioning device: no subcommand remove"),
        (".venv/bin/bridge run --confg b.yaml", "bridge run: no option --confg"),
        ("provisioning tenant", "provisioning tenant: a subcommand is missing"),
    ],
)
def test_the_walk_catches_wrong_commands(line: str, problem: str) -> None:
    found = command_words(line)
    assert found is not None
    problems = check_command(*found)
    assert problems and problems[0].startswith(problem), problems


def test_the_walk_accepts_synopses() -> None:
    for line in (
        "provisioning serve [--host 127.0.0.1] [--port 8443] [--tls-cert F --tls-key F] [--tls-name NAME …]",
        "bridge [--log-format text|json] [--log-level LEVEL] run --config FILE [--instance NAME]",
        "provisioning [--log-format text|json] [--log-level …] COMMAND … [--data-dir DIR]",
        "ExecStart=/usr/local/bin/agent run --config /etc/factory-edge/agent.yaml --state-dir /x",
        "FE_PROVISIONING_DIR=/d sudo provisioning device list|revoke acme [GW]",
    ):
        found = command_words(line)
        assert found is not None, line
        assert check_command(*found) == [], line


# -- config examples -------------------------------------------------------------


def fill_placeholders(text: str) -> str:
    """``…`` marks a value the docs leave out on purpose: give it a plausible one."""
    text = re.sub(r"postgresql://…", "postgresql://bridge@db.example.com:5432/factory", text)
    text = re.sub(r"https://…", "https://hooks.example.com/alerts", text)
    return text.replace("…", "placeholder")


def config_examples() -> list[tuple[str, type[pydantic.BaseModel], str]]:
    out: list[tuple[str, type[pydantic.BaseModel], str]] = []
    for block in ALL_BLOCKS:
        if block.lang not in {"yaml", "yml", ""}:
            continue
        first = next((x for x in block.lines if x.strip()), "")
        key = re.match(r"^([a-z_]+):", first)
        if block.lang == "" and (key is None or key.group(1) not in AGENT_KEYS | BRIDGE_KEYS):
            continue
        text = fill_placeholders("\n".join(block.lines))
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        if not isinstance(data, dict):
            if block.lang:
                out.append((block.where, AgentConfig, text))  # fails below, as it should
            continue
        keys = set(data)
        if "devices" in keys or (keys <= AGENT_KEYS and not keys & BRIDGE_KEYS):
            out.append((block.where, AgentConfig, text))
        elif keys <= BRIDGE_KEYS:
            out.append((block.where, BridgeConfig, text))
        elif block.lang:
            out.append((block.where, AgentConfig, text))
    return out


EXAMPLES = config_examples()


@pytest.mark.parametrize(("where", "model", "text"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_documented_config_example_validates(where: str, model: type, text: str) -> None:
    try:
        data = yaml.safe_load(text)
        if model is BridgeConfig and isinstance(data, dict) and not {"tenants", "tenants_from"} & set(data):
            # An excerpt (e.g. only `mappings:`): the rest of the file is one tenant.
            data["tenants"] = [{"name": "acme", "url": "mqtts://mqtt.acme.example.com:8883"}]
        if model is AgentConfig:
            parse_config(data, where)  # profiles and ranges expanded, as the agent reads a file
        else:
            validate(model, data, where)
    except (ConfigError, yaml.YAMLError) as exc:
        pytest.fail(f"{where}: the {model.__name__} example does not validate:\n{exc}")


def test_config_examples_are_found() -> None:
    models = {e[1].__name__ for e in EXAMPLES}
    assert models == {AgentConfig.__name__, BridgeConfig.__name__}, EXAMPLES
    assert any(e[0].startswith("README.md") for e in EXAMPLES)


def test_a_wrong_config_example_fails() -> None:
    with pytest.raises(ConfigError, match="devices"):
        validate(AgentConfig, {"devices": [{"name": "x", "protocol": "profibus"}]}, "example")
