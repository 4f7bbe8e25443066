"""Who evaluates a tenant's alerts when several bridge processes share its stream.

With a shared subscription each process sees only part of the messages,
so the alert engine cannot run in all of them. Instead it runs in one:
whichever holds the tenant's alert lock, on its own (not shared)
subscription. The lock is released by the operating system or the
database when its holder dies, and a standby takes over within a few
seconds, continuing from the stored alert states.

- SQLite: ``flock`` on ``<path>/<tenant>.alerts.lock`` (processes on one host).
- PostgreSQL: a session advisory lock, held on its own connection.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from ..config import StorageConfig


class AlertLock:
    """Non-blocking ``acquire()``; ``alive()`` tells whether it is still held."""

    def acquire(self) -> bool:
        raise NotImplementedError

    def alive(self) -> bool:
        return True

    def release(self) -> None:
        raise NotImplementedError


class FileLock(AlertLock):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


class AdvisoryLock(AlertLock):
    def __init__(self, dsn: str, tenant: str) -> None:
        self.dsn = dsn
        self.key = f"factory-edge bridge alerts {tenant}"
        self._conn: Any = None

    def acquire(self) -> bool:
        import psycopg

        try:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        except psycopg.Error:
            return False
        row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (self.key,)).fetchone()
        if not row or not row[0]:
            conn.close()
            return False
        self._conn = conn
        return True

    def alive(self) -> bool:
        if self._conn is None:
            return False
        import psycopg

        try:
            self._conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def release(self) -> None:
        if self._conn is not None:
            self._conn.close()  # ending the session releases the lock
            self._conn = None


def alert_lock(storage: StorageConfig, tenant: str) -> AlertLock:
    if storage.backend == "postgres":
        assert storage.dsn is not None
        return AdvisoryLock(storage.dsn, tenant)
    return FileLock(Path(storage.path) / f"{tenant}.alerts.lock")
