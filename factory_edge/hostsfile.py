"""A marked block of names in ``/etc/hosts``, added and removed again (used by the demo).

The demo's brokers are ``mqtt.<tenant>.demo.localhost``. Systems with
nss-myhostname or systemd-resolved already send every ``*.localhost`` name
to the loopback address (RFC 6761); elsewhere the names go into a block of
``/etc/hosts`` between two marker lines, which ``remove`` takes out again.
The file is rewritten in place (same inode), so a bind-mounted hosts file,
as in containers, is edited too. Not root: the edit runs through ``sudo``.

    python -m factory_edge.hostsfile add 127.0.0.1 mqtt.acme.demo.localhost
    python -m factory_edge.hostsfile remove
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from .errors import FactoryEdgeError

HOSTS = Path("/etc/hosts")
BEGIN = "# BEGIN factory-edge demo (removed when the demo stops)"
END = "# END factory-edge demo"


def resolves_to_loopback(name: str) -> bool:
    """True when every address ``name`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def without_block(text: str) -> str:
    """``text`` with the demo's block (if any) taken out."""
    kept, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == BEGIN:
            inside = True
        elif inside and line.rstrip("\n") == END:
            inside = False
        elif not inside:
            kept.append(line)
    return "".join(kept)


def with_block(text: str, address: str, names: Iterable[str]) -> str:
    """``text`` with a fresh block mapping ``names`` to ``address`` at the end."""
    text = without_block(text)
    if text and not text.endswith("\n"):
        text += "\n"
    return text + f"{BEGIN}\n{address} {' '.join(names)}\n{END}\n"


def _rewrite(path: Path, text: str) -> None:
    with open(path, "r+", encoding="utf-8") as f:  # in place: works on a bind-mounted file
        f.write(text)
        f.truncate()


def edit(action: str, address: str = "127.0.0.1", names: Iterable[str] = (), *, path: Path = HOSTS) -> None:
    """``add`` (replacing an old block) or ``remove`` the block; through ``sudo`` when the file is not writable."""
    names = list(names)
    if os.access(path, os.W_OK):
        current = path.read_text(encoding="utf-8")
        _rewrite(path, with_block(current, address, names) if action == "add" else without_block(current))
        return
    if shutil.which("sudo") is None:
        line = f"{address} {' '.join(names)}"
        raise FactoryEdgeError(f"{path}: not writable and no sudo; add the line '{line}' to it yourself"
                               if action == "add" else f"{path}: not writable and no sudo")
    argv = ["sudo", sys.executable, "-m", __name__, action, "--file", str(path)]
    if action == "add":
        argv += [address, *names]
    if subprocess.run(argv, stdin=None).returncode != 0:
        raise FactoryEdgeError(f"{path}: sudo could not {action} the factory-edge demo lines")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m factory_edge.hostsfile",
                                     description="Add or remove the factory-edge demo's block of /etc/hosts.")
    parser.add_argument("action", choices=["add", "remove"])
    parser.add_argument("address", nargs="?", default="127.0.0.1")
    parser.add_argument("names", nargs="*")
    parser.add_argument("--file", type=Path, default=HOSTS)
    args = parser.parse_args(argv)
    try:
        edit(args.action, args.address, args.names, path=args.file)
    except (OSError, FactoryEdgeError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
