"""Tenant storage: a SQLite file per tenant (default) or a PostgreSQL schema per tenant."""

from __future__ import annotations

from ..config import StorageConfig
from .base import DataRejected, Store, Table, Tx


def make_store(config: StorageConfig, tenant: str) -> Store:
    """The (unopened) store of one tenant."""
    if config.backend == "postgres":
        from .postgres import PostgresStore

        assert config.dsn is not None
        return PostgresStore(config.dsn, tenant)
    from .sqlite import SqliteStore

    return SqliteStore(config.path, tenant, fsync=config.fsync)


__all__ = ["DataRejected", "Store", "Table", "Tx", "make_store"]
