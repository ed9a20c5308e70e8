"""The 0002 revision creates exactly what models/governance.py declares, on both databases."""

from __future__ import annotations

import asyncio

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from bot import db
from models import Base
from models.store import Store


async def test_migrations_match_the_models_exactly(database_url: str) -> None:
    """Alembic's own comparison: no table, column, type, index or constraint differs."""
    await asyncio.to_thread(db.upgrade, database_url)
    store = Store.from_url(database_url)

    def diff(connection):
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)

    try:
        async with store.engine.connect() as connection:
            assert await connection.run_sync(diff) == []
    finally:
        await store.close()


async def test_the_revision_downgrades_cleanly(database_url: str) -> None:
    await asyncio.to_thread(db.upgrade, database_url)
    await asyncio.to_thread(_downgrade, database_url, "0001")
    store = Store.from_url(database_url)

    def tables(connection):
        from sqlalchemy import inspect

        return set(inspect(connection).get_table_names())

    try:
        async with store.engine.connect() as connection:
            found = await connection.run_sync(tables)
    finally:
        await store.close()
    assert found == {"alembic_version", "users", "generations", "images"}


def _downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(db.alembic_config(url), revision)
