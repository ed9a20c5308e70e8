"""SQL the dialects spell differently."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession


def insert_ignore(session: AsyncSession, table: Any) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` on SQLite and PostgreSQL: an idempotent insert
    whose rowcount tells the caller whether it was the one that inserted."""
    return insert_ignore_for(session.get_bind().dialect.name, table)


def insert_ignore_for(name: str, table: Any) -> Any:
    """``insert_ignore`` for the database named ``name`` (a dialect's name)."""
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only the two supported databases
        raise NotImplementedError(f"insert_ignore: unsupported database {name!r}")
    return insert(table).on_conflict_do_nothing()
