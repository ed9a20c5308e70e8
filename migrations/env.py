"""Alembic environment: async engines, batch mode on SQLite (ALTER TABLE is limited there).

An upgrade is one transaction taken under a lock, on both databases. Several processes
starting at once on a fresh database therefore migrate it once (the others wait, then find
the head), and an upgrade killed half-way leaves the schema it started from.

- PostgreSQL has transactional DDL; ``pg_advisory_xact_lock`` makes a second upgrade wait
  until the first commits, before it reads the current revision.
- SQLite has transactional DDL too, but pysqlite commits DDL statement by statement under
  its own transaction handling. The migration connection is put in autocommit mode and
  emits ``BEGIN IMMEDIATE`` itself: the write lock is taken before the current revision is
  read, and a second process waits for it (busy timeout).
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from models.base import Base
from models.store import sqlite_pragmas

config = context.config
target_metadata = Base.metadata

# pg_advisory_xact_lock key of schema upgrades (any constant; advisory locks are per database)
UPGRADE_LOCK_KEY = 0x6174656C696572  # "atelier"

# A process waiting for another's upgrade waits as long as a large table copy may take.
UPGRADE_BUSY_TIMEOUT_MS = 600_000


def _migration_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # the driver opens no transaction; _sqlite_begin does
    # Batch mode copies a table and drops the old one; with foreign keys on, that DROP would
    # delete or null the rows that refer to it (ON DELETE actions). They are checked instead
    # before the commit (_check_foreign_keys).
    sqlite_pragmas(dbapi_connection, foreign_keys=False, busy_timeout_ms=UPGRADE_BUSY_TIMEOUT_MS)


def _sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _lock(connection: Connection) -> None:
    """Wait until no other upgrade runs (SQLite: BEGIN IMMEDIATE has done so already)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK_KEY})


def _check_foreign_keys(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"upgrade left rows that break foreign keys: {broken[:5]}")


def _migrate(connection: Connection) -> None:
    _lock(connection)
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        transactional_ddl=True,
    )
    # Inside the caller's transaction this adds none of its own: all revisions commit together.
    with context.begin_transaction():
        context.run_migrations()
    _check_foreign_keys(connection)


async def _run_async() -> None:
    engine = _migration_engine(config.get_main_option("sqlalchemy.url"))
    try:
        async with engine.connect() as connection, connection.begin():
            await connection.run_sync(_migrate)
    finally:
        await engine.dispose()


def run_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url, target_metadata=target_metadata, literal_binds=True, render_as_batch=url.startswith("sqlite")
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    asyncio.run(_run_async())
