"""A marked block of names in ``/etc/hosts``, added and removed again (used by the demo).

The demo's brokers are ``mqtt.<tenant>.demo.localhost``. Systems with
nss-myhostname or systemd-resolved already send every ``*.localhost`` name
to the loopback address (RFC 6761); elsewhere the names go into a block of
``/etc/hosts`` between two marker lines, which ``remove`` takes out again.
Each demo has a block of its own, marked with its directory (the owner):
a second demo finding the names already in another demo's block adds its
own all the same, so either can stop first and the other's names still
resolve. The file is rewritten in place (same inode), so a bind-mounted
hosts file, as in containers, is edited too. Not root: the edit runs
through ``sudo``.

    python -m factory_edge.hostsfile add --owner /srv/demo 127.0.0.1 mqtt.acme.demo.localhost
    python -m factory_edge.hostsfile remove --owner /srv/demo
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
BEGIN = "# BEGIN factory-edge demo"
END = "# END factory-edge demo"


def _markers(owner: str) -> tuple[str, str]:
    return f"{BEGIN} {owner} (removed when that demo stops)", f"{END} {owner}"


def resolves_to_loopback(name: str) -> bool:
    """True when every address ``name`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def without_block(text: str, owner: str) -> str:
    """``text`` with ``owner``'s block (if any) taken out; other demos' blocks stay."""
    begin, end = _markers(owner)
    kept, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == begin:
            inside = True
        elif inside and line.rstrip("\n") == end:
            inside = False
        elif not inside:
            kept.append(line)
    return "".join(kept)


def with_block(text: str, address: str, names: Iterable[str], owner: str) -> str:
    """``text`` with a fresh block of ``owner`` mapping ``names`` to ``address`` at the end."""
    begin, end = _markers(owner)
    text = without_block(text, owner)
    if text and not text.endswith("\n"):
        text += "\n"
    return text + f"{begin}\n{address} {' '.join(names)}\n{end}\n"


def demo_names(text: str) -> set[str]:
    """Every name that some demo's block in ``text`` maps (it resolves only as long as that demo runs)."""
    names: set[str] = set()
    inside = False
    for line in text.splitlines():
        if line.startswith(BEGIN + " "):
            inside = True
        elif line.startswith(END + " "):
            inside = False
        elif inside and line.strip() and not line.lstrip().startswith("#"):
            names.update(line.split()[1:])
    return names


def borrowed(names: Iterable[str], *, path: Path = HOSTS) -> list[str]:
    """Those of ``names`` that resolve only through another demo's block of ``path``."""
    try:
        listed = demo_names(path.read_text(encoding="utf-8"))
    except OSError:
        return []
    return [name for name in names if name in listed]


def _rewrite(path: Path, text: str) -> None:
    with open(path, "r+", encoding="utf-8") as f:  # in place: works on a bind-mounted file
        f.write(text)
        f.truncate()


def edit(action: str, address: str = "127.0.0.1", names: Iterable[str] = (), *, owner: str, path: Path = HOSTS) -> None:
    """``add`` (replacing an old block of ``owner``) or ``remove`` ``owner``'s block; through ``sudo`` when needed."""
    names = list(names)
    if os.access(path, os.W_OK):
        current = path.read_text(encoding="utf-8")
        _rewrite(path, with_block(current, address, names, owner) if action == "add" else without_block(current, owner))
        return
    if shutil.which("sudo") is None:
        line = f"{address} {' '.join(names)}"
        raise FactoryEdgeError(
            f"{path}: not writable and no sudo; add the line '{line}' to it yourself"
            if action == "add"
            else f"{path}: not writable and no sudo"
        )
    argv = ["sudo", sys.executable, "-m", __name__, action, "--file", str(path), "--owner", owner]
    if action == "add":
        argv += [address, *names]
    if subprocess.run(argv, stdin=None).returncode != 0:
        raise FactoryEdgeError(f"{path}: sudo could not {action} the factory-edge demo lines")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m factory_edge.hostsfile",
        description="Add or remove the factory-edge demo's block of /etc/hosts.",
    )
    parser.add_argument("action", choices=["add", "remove"])
    parser.add_argument("address", nargs="?", default="127.0.0.1")
    parser.add_argument("names", nargs="*")
    parser.add_argument("--file", type=Path, default=HOSTS)
    parser.add_argument("--owner", required=True, help="the demo's directory: its block is marked with it")
    args = parser.parse_args(argv)
    try:
        edit(args.action, args.address, args.names, owner=args.owner, path=args.file)
    except (OSError, FactoryEdgeError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
