"""Eclipse Tahu's JavaScript Sparkplug packages (npm, tests only), run with the machine's Node.js.

``tahu_modules`` installs ``sparkplug-payload`` and ``sparkplug-client`` once into
``~/.cache/factory-edge/npm-tahu`` (the npm registry is reachable; no browser
or binary is downloaded) and returns its ``node_modules``; ``CodecPeer`` keeps
one Node process that decodes and encodes payloads the way Tahu does.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TAHU_PACKAGES = ("sparkplug-payload@1.0.3", "sparkplug-client@3.2.4")
HERE = Path(__file__).resolve().parent / "sparkplug"


def install_tahu() -> Path:
    """``node_modules`` with Tahu's packages, installed on first use; pytest.skip if Node.js or npm is missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are needed for the Sparkplug interoperability tests (apt-get install nodejs npm)")
    prefix = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "factory-edge" / "npm-tahu"
    modules = prefix / "node_modules"
    stamp = prefix / "installed"
    if stamp.exists() and stamp.read_text() == " ".join(TAHU_PACKAGES):
        return modules
    prefix.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(prefix), *TAHU_PACKAGES],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"npm install {' '.join(TAHU_PACKAGES)} failed:\n{result.stderr}")
    stamp.write_text(" ".join(TAHU_PACKAGES))
    return modules


@pytest.fixture(scope="session")
def tahu_modules() -> Path:
    return install_tahu()


class CodecPeer:
    """Tahu's ``sparkplug-payload`` in a Node.js process: ``decode(bytes) -> dict``, ``encode(dict) -> bytes``."""

    def __init__(self, modules: Path) -> None:
        self.proc = subprocess.Popen(
            ["node", str(HERE / "codec_peer.js")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "NODE_PATH": str(modules)},
        )

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self.proc.stdout.readline())
        if "error" in answer:
            raise AssertionError(f"Tahu refused it: {answer['error']}")
        return answer

    def decode(self, data: bytes) -> dict[str, Any]:
        payload: dict[str, Any] = self._ask({"decode": base64.b64encode(data).decode()})["payload"]
        return payload

    def encode(self, payload: dict[str, Any]) -> bytes:
        return base64.b64decode(self._ask({"encode": payload})["bytes"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def tahu_codec(tahu_modules: Path) -> Iterator[CodecPeer]:
    peer = CodecPeer(tahu_modules)
    yield peer
    peer.close()
