"""A PostgreSQL server of the test's own: ``initdb`` into a fresh directory, ``postgres`` on a free port, stopped by PID.

For tests that need a second storage server beside the machine's
(``FACTORY_EDGE_PG_DSN``): a tenant moved between two servers, bridges on
two hosts. PostgreSQL refuses to run as root, so when the tests run as root
the server runs as the ``postgres`` user (``Popen(user=…)``, no ``su``
between: the PID is the postmaster's). Its directory comes from
``tempfile`` (a pytest ``tmp_path`` is not reachable by another user) and
is removed at ``stop()``.

    with PgServer() as pg:
        psycopg.connect(pg.dsn)          # postgresql://postgres@127.0.0.1:<port>/test
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg

from tests.helpers import free_port
from tests.infra import _LIVE

BIN_DIRS = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14, 13)]


def pg_bin() -> Path | None:
    """The directory of ``initdb`` and ``postgres`` (Debian puts them out of PATH), or None."""
    return next((d for d in BIN_DIRS if (d / "initdb").is_file() and (d / "postgres").is_file()), None)


class PgServer:
    """One throw-away PostgreSQL cluster with a ``test`` database, trust authentication."""

    def __init__(
        self,
        *,
        listen: str = "127.0.0.1",
        port: int | None = None,
        trust_networks: tuple[str, ...] = (),
        database: str = "test",
    ) -> None:
        found = pg_bin()
        if found is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.bin = found
        self.listen = listen
        self.port = port or free_port()
        self.trust_networks = trust_networks
        self.database = database
        self.dir = Path(tempfile.mkdtemp(prefix="fe-pg-"))
        self.data = self.dir / "data"
        self.log_file = self.dir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    @property
    def dsn(self) -> str:
        host = "127.0.0.1" if self.listen in ("*", "0.0.0.0") else self.listen
        return f"postgresql://postgres@{host}:{self.port}/{self.database}"

    def dsn_at(self, address: str) -> str:
        """The DSN as seen from another network namespace, through ``address``."""
        return f"postgresql://postgres@{address}:{self.port}/{self.database}"

    def start(self, timeout_s: float = 30.0) -> Self:
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(
                [str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"],
                check=True,
                capture_output=True,
                cwd=self.dir,
                **self._as,
            )
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.writelines(f"host all all {net} trust\n" for net in self.trust_networks)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.dir),
                    "-c",
                    f"listen_addresses={self.listen}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=200",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                **self._as,
            )
        _LIVE[self.proc.pid] = self.proc
        deadline = time.monotonic() + timeout_s
        host = "127.0.0.1" if self.listen in ("*", "0.0.0.0") else self.listen
        admin = f"postgresql://postgres@{host}:{self.port}/postgres"
        while True:
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=2) as conn:
                    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone():
                        conn.execute(f'CREATE DATABASE "{self.database}"')
                return self
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"postgres did not start:\n{self.log()[-3000:]}") from None
                time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = 20.0) -> None:
        """Fast shutdown (SIGINT: sessions ended, then a clean checkpoint); SIGKILL if it hangs."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            _LIVE.pop(proc.pid, None)

    def close(self) -> None:
        """Stop and remove the cluster's directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
