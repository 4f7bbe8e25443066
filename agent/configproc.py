"""``agent run``'s config, checked in a short-lived process: the running agent never loads pydantic.

    config = load_config(path)                  # plain AgentConfig (agent/configtypes.py), or ConfigError
    config = parse_config_text(text, source)    # a pushed configuration, checked the same way

The check itself is ``agent/config.py``'s, with the same one-line errors as
``agent check-config``. It runs in a child Python process (about 0.5 s of
CPU) that sends back the plain copy of the validated models, or the error.
pydantic and the models then take about 12 MB that the running agent would
hold for nothing (docs/performance.md). Blocking: call it from a thread when
an event loop runs (``agent/apply.py`` does).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

from factory_edge.errors import ConfigError, FactoryEdgeError

from .configtypes import AgentConfig

ROOT = Path(__file__).resolve().parent.parent  # where the agent package is imported from
CHECK_TIMEOUT_S = 120.0


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate an agent config file in a child process; ConfigError lists every problem, one per line."""
    return _check({"path": str(path)}, str(path))


def parse_config_text(text: str, source: str) -> AgentConfig:
    """A config given as YAML text (a pushed configuration), validated as a file is."""
    return _check({"text": text, "source": source}, source)


def _check(request: dict[str, str], source: str) -> AgentConfig:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from agent.configproc import main; main()"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            input=pickle.dumps(request),
            capture_output=True,
            timeout=CHECK_TIMEOUT_S,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{source}: the config check did not finish: {exc}") from exc
    try:
        kind, value = pickle.loads(done.stdout)
    except Exception as exc:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise ConfigError(f"{source}: the config check did not finish: {last}") from exc
    if kind == "error":
        raise value
    assert isinstance(value, AgentConfig)
    return value


def main() -> None:
    """The child: a request on stdin, ``("config", plain AgentConfig)`` or ``("error", exception)`` on stdout."""
    from factory_edge.configmodel import thaw

    from . import config

    request = pickle.loads(sys.stdin.buffer.read())
    out: tuple[str, Any]
    try:
        if "path" in request:
            model = config.load_config(request["path"])
        else:
            model = config.parse_config_text(request["text"], request["source"])
        out = ("config", thaw(model))
    except FactoryEdgeError as exc:
        out = ("error", exc if type(exc).__module__ == "factory_edge.errors" else ConfigError(str(exc)))
    sys.stdout.buffer.write(pickle.dumps(out))
    sys.stdout.buffer.flush()
