"""The gateway's .deb, installed and purged in a fresh Debian 12 root (``-m package``; CI runs it).

``scripts/build-packages`` builds the package (and caches a Debian 12 root
made with debootstrap). This test copies that plain root, installs the
package there with apt, uses what it installed as a technician would
(``agent --version``, ``agent check-config`` on the shipped example, as
root and as the agent's own user, ``systemd-analyze verify`` on the unit),
then purges it and checks that nothing of it is left: no file, no
directory, no user or group. Root only (chroot).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from factory_edge import __version__
from tests.helpers import ROOT

pytestmark = [pytest.mark.package, pytest.mark.timeout(1800)]

ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
CACHE = Path(os.environ.get("FE_CACHE", Path.home() / ".cache" / "factory-edge"))
BASE_ROOT = CACHE / f"debian12-{ARCH}" / "base"
DEB = ROOT / "dist" / f"factory-edge-agent_{__version__}-1_{ARCH}.deb"
# What apt and dpkg keep about any install (their databases, logs, caches), and /run (a tmpfs on a running
# system, where adduser and systemctl leave their locks): not the package's leftovers.
BOOKKEEPING = (
    "var/lib/dpkg",
    "var/lib/apt",
    "var/cache",
    "var/log",
    "var/lib/systemd/deb-systemd-helper-enabled",
    "tmp",
    "proc",
    "run",
    "etc/ld.so.cache",
    "etc/resolv.conf",
    "etc/passwd-",
    "etc/group-",
    "etc/shadow-",
    "etc/gshadow-",
    "etc/subuid-",
    "etc/subgid-",
)


def in_root(root: Path, *argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` chrooted in ``root``, with /proc, in a private mount namespace (nothing stays mounted)."""
    script = 'mount -t proc proc "$1/proc" && exec chroot "$@"'
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(root), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check:
        assert result.returncode == 0, f"{' '.join(argv)}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def tree(root: Path) -> set[str]:
    """Every path in the root, less the package managers' bookkeeping."""
    paths = set()
    for directory, dirs, files in os.walk(root):
        rel = os.path.relpath(directory, root)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel, d)) not in BOOKKEEPING]
        for name in dirs + files:
            path = os.path.normpath(os.path.join(rel, name))
            if path not in BOOKKEEPING:
                paths.add(path)
    return paths


@pytest.fixture(scope="module")
def deb() -> Path:
    if os.geteuid() != 0:
        pytest.skip("building and installing the .deb needs root (debootstrap, chroot)")
    built = subprocess.run(
        [str(ROOT / "scripts" / "build-packages")], capture_output=True, text=True, timeout=1500, cwd=ROOT
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert DEB.exists(), built.stderr
    return DEB


@pytest.fixture
def fresh_root(deb: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy of the plain Debian 12 root, with the package file in its /tmp."""
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(BASE_ROOT), str(root)], check=True, timeout=300)
    shutil.copy(deb, root / "tmp" / deb.name)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_deb_installs_runs_and_purges_cleanly(fresh_root: Path, deb: Path) -> None:
    root = fresh_root
    before = tree(root)
    users = (root / "etc" / "passwd").read_text()

    in_root(root, "apt-get", "install", "-y", f"/tmp/{deb.name}")
    assert in_root(root, "agent", "--version").stdout == f"factory-edge {__version__}\n"
    checked = in_root(root, "agent", "check-config", "/etc/factory-edge/agent.yaml")
    assert checked.stdout.startswith("OK: gateway (from provisioning), 1 device, 3 tags"), checked.stdout
    # The service's user reads its config (group factory-edge, 0640) and owns its state directory.
    as_agent = in_root(
        root,
        "setpriv",
        "--reuid=factory-edge",
        "--regid=factory-edge",
        "--init-groups",
        "agent",
        "check-config",
        "/etc/factory-edge/agent.yaml",
    )
    assert as_agent.stdout.startswith("OK: "), as_agent.stderr
    stat = in_root(root, "stat", "-c", "%U:%G %a %n", "/etc/factory-edge/agent.yaml", "/var/lib/factory-edge/agent")
    assert stat.stdout.splitlines() == [
        "root:factory-edge 640 /etc/factory-edge/agent.yaml",
        "factory-edge:factory-edge 700 /var/lib/factory-edge/agent",
    ]
    # --man=no: the unit names its man page, and a gateway may have no man-db to show it.
    verify = in_root(
        root, "systemd-analyze", "verify", "--man=no", "/lib/systemd/system/factory-edge-agent.service", check=False
    )
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
    unit = (root / "lib" / "systemd" / "system" / "factory-edge-agent.service").read_text()
    assert "ExecStart=/usr/bin/agent run --config /etc/factory-edge/agent.yaml" in unit
    assert in_root(root, "systemctl", "is-enabled", "factory-edge-agent", check=False).stdout.strip() == "disabled"

    in_root(root, "apt-get", "purge", "-y", "factory-edge-agent")
    assert in_root(root, "dpkg-query", "-W", "factory-edge-agent", check=False).returncode != 0
    left = tree(root) - before
    assert left == set(), f"left behind after purge: {sorted(left)[:20]}"
    assert before - tree(root) == set()
    assert (root / "etc" / "passwd").read_text() == users
    assert "factory-edge" not in (root / "etc" / "group").read_text()
