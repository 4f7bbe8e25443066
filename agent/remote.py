"""Configuration pushed from the cloud: validated, applied in place, kept or rolled back, and remembered.

The cloud publishes ``{"version": N, "config": "<agent YAML>"}`` on
``gw/<gw>/cmd/config`` (only the tenant's bridge and operator identities
may). The agent:

1. checks it as ``agent check-config`` would (the same parser, plus what a
   running agent cannot change in place: ``gateway``, ``state_dir``,
   ``buffer``, ``publish``, ``metrics_port``, ``sparkplug``) and answers on
   ``gw/<gw>/cmd/config/reply``: ``applying``, or ``rejected`` with every
   reason;
2. writes the candidate to ``<state_dir>/config/candidate.json`` (one
   atomic, fsynced file), then swaps the devices and, when ``mqtt:``
   changed, the broker connection, in the same process: the buffer, its
   writer and every reading already taken stay as they are;
3. watches it for ``remote_config.deadline``: it is *applied* once the
   broker is reached and every device that read fine before reads again;
   at the deadline, an unreachable broker or more than
   ``remote_config.max_failed_share`` of those devices failing *rolls
   back* to the previous configuration, saying why;
4. on success writes ``running.json`` (version, hash, YAML: again one
   atomic file, so a power cut leaves the old or the new one, never half)
   and removes the candidate.

On disk, in ``<state_dir>/config/``::

    running.json     the last configuration pushed and applied: version, hash, yaml,
                     local_hash (the local file's hash when it was applied)
    candidate.json   a configuration being applied; found at start, it was interrupted
    outcome.json     the last push's outcome (state, version, reason), for the status

At start (``startup``) a candidate left behind means the agent stopped
while applying (``kill -9``, a power cut): it is discarded and the agent
runs the previous configuration, and says so. The pushed configuration
runs only while the local file is the one it was pushed over: an edited
local file wins (a local override), and the status reports it as drift
until the next push.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from factory_edge.errors import ConfigError
from factory_edge.files import write_atomic

from .configproc import load_config, parse_config_text
from .configtypes import AgentConfig

log = logging.getLogger(__name__)

CONFIG_DIR = "config"
RUNNING = "running.json"
CANDIDATE = "candidate.json"
OUTCOME = "outcome.json"
MAX_CONFIG_BYTES = 4 * 1024 * 1024

# What a running agent cannot change without a restart: a push changing one is refused, not half-applied.
FIXED_KEYS = ("gateway", "state_dir", "buffer", "publish", "metrics_port", "sparkplug")


def text_hash(data: bytes) -> str:
    """The config hash the status carries and the cloud compares: sha256 of the YAML's bytes, 12 hex digits."""
    return hashlib.sha256(data).hexdigest()[:12]


@dataclass(frozen=True)
class Running:
    """The configuration in force: where it came from, its version (pushed) and its hash."""

    source: str  # "local" (the config file) or "pushed"
    hash: str
    version: int | None = None
    yaml: str | None = None

    def doc(self) -> dict[str, Any]:
        return {"source": self.source, "version": self.version, "hash": self.hash}


@dataclass(frozen=True)
class Outcome:
    """The last push's outcome, as the status and the events show it."""

    state: str  # applying | applied | rejected | rolled_back
    version: int | None
    hash: str | None = None
    reason: str | None = None
    ts: int = 0

    def doc(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Push:
    """A pushed configuration that parsed and passed every check."""

    version: int
    hash: str
    yaml: str
    config: AgentConfig


class ConfigStore:
    """The files of ``<state_dir>/config/``; every write is atomic and fsynced."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / CONFIG_DIR

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            doc = json.loads((self.dir / name).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning(
                "ignored an unreadable config state file", extra={"path": str(self.dir / name), "err": str(exc)}
            )
            return None
        return doc if isinstance(doc, dict) else None

    def _write(self, name: str, doc: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.dir / name, json.dumps(doc).encode(), mode=0o600)

    def running(self) -> dict[str, Any] | None:
        return self._read(RUNNING)

    def candidate(self) -> dict[str, Any] | None:
        return self._read(CANDIDATE)

    def outcome(self) -> Outcome | None:
        doc = self._read(OUTCOME)
        if doc is None:
            return None
        try:
            return Outcome(**doc)
        except TypeError:
            return None

    def begin(self, push: Push, local_hash: str) -> None:
        """Before the switch: the candidate, so that a crash from here on is recognised at start."""
        self._write(
            CANDIDATE, {"version": push.version, "hash": push.hash, "yaml": push.yaml, "local_hash": local_hash}
        )

    def commit(self, push: Push, local_hash: str) -> None:
        """Applied: the new configuration is the last good one (one atomic write), the candidate goes."""
        self._write(RUNNING, {"version": push.version, "hash": push.hash, "yaml": push.yaml, "local_hash": local_hash})
        (self.dir / CANDIDATE).unlink(missing_ok=True)

    def abort(self) -> None:
        (self.dir / CANDIDATE).unlink(missing_ok=True)

    def forget(self) -> None:
        """The local file is in force again (``reload``): a restart must not bring the pushed one back."""
        (self.dir / RUNNING).unlink(missing_ok=True)

    def record(self, outcome: Outcome) -> None:
        try:
            self._write(OUTCOME, outcome.doc())
        except OSError as exc:  # the outcome is also in the status and the events; a full disk must not stop us
            log.warning("cannot record the configuration outcome", extra={"err": str(exc)})


@dataclass(frozen=True)
class Startup:
    config: AgentConfig
    running: Running
    outcome: Outcome | None
    notes: list[str]


def startup(config_path: Path, state_dir: Path) -> Startup:
    """The configuration to start with: the local file, or the pushed one it was pushed over (module docstring)."""
    local = load_config(config_path)
    local_hash = text_hash(config_path.read_bytes())
    local_running = Running(source="local", hash=local_hash)
    store = ConfigStore(state_dir)
    outcome = store.outcome()
    notes: list[str] = []
    candidate = store.candidate()
    running = store.running()
    if candidate is not None:
        if running is not None and running.get("hash") == candidate.get("hash"):
            store.abort()  # it was committed; only the candidate's removal was lost
        else:
            store.abort()
            before = f"version {running.get('version')}" if running else "the local file"
            outcome = Outcome(
                "rolled_back",
                candidate.get("version"),
                candidate.get("hash"),
                f"the agent stopped while applying version {candidate.get('version')}; running {before}",
                int(time.time() * 1000),
            )
            store.record(outcome)
            notes.append(outcome.reason or "")
    if running is None:
        return Startup(local, local_running, outcome, notes)
    version = running.get("version")
    if running.get("local_hash") != local_hash:
        notes.append(
            f"{config_path} changed since version {version} was pushed: running the local file "
            "(a local override; the cloud sees it as drift until the next push)"
        )
        return Startup(local, local_running, outcome, notes)
    try:
        config = parse_config_text(str(running.get("yaml", "")), f"pushed config version {version}")
    except ConfigError as exc:
        notes.append(f"the pushed config version {version} no longer validates, running the local file: {exc}")
        return Startup(local, local_running, outcome, notes)
    pushed = Running(source="pushed", hash=str(running.get("hash")), version=version, yaml=str(running.get("yaml")))
    return Startup(config, pushed, outcome, notes)


def parse_push(payload: Any, running: AgentConfig, gateway: str) -> Push:
    """The payload of ``cmd/config``, checked as check-config checks a file; ConfigError lists every reason."""
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), str):
        raise ConfigError('expected {"version": N, "config": "<agent config YAML>"}')
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"version: must be a whole number, at least 1 (got {version!r})")
    text: str = payload["config"]
    try:
        data = text.encode()
    except UnicodeEncodeError as exc:  # JSON carries lone surrogates ("\ud800"), which no file can hold
        raise ConfigError(
            f"config version {version}: config: not UTF-8 text ({exc.reason} at character {exc.start})"
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config: {len(data)} bytes, more than the {MAX_CONFIG_BYTES} this agent takes")
    source = f"config version {version}"
    config = parse_config_text(text, source)
    problems = []
    if not config.devices:
        problems.append(f"{source}: devices: none configured, so the agent would poll nothing")
    if config.gateway is not None and config.gateway != gateway:
        problems.append(f"{source}: gateway: {config.gateway!r} is not this gateway ({gateway!r})")
    for key in FIXED_KEYS[1:]:
        if key in ("state_dir",) and key not in _top_keys(text):
            continue
        if getattr(config, key) != getattr(running, key):
            problems.append(
                f"{source}: {key}: cannot change while the agent runs (restart needed): change it in the local file"
            )
    if not config.remote_config.enabled:
        problems.append(
            f"{source}: remote_config.enabled: false would refuse every later push, this one's repair included: "
            "turn pushes off in the local file"
        )
    if problems:
        raise ConfigError("\n".join(problems))
    return Push(version=version, hash=text_hash(data), yaml=text, config=config)


def _top_keys(text: str) -> set[str]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        return set()
    return set(data) if isinstance(data, dict) else set()
