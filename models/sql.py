"""SQL the dialects spell differently."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession


def insert_ignore(session: AsyncSession, table: Any) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` on SQLite and PostgreSQL: an idempotent insert
    whose rowcount tells the caller whether it was the one that inserted. Built once per
    database and table (building a statement costs more than running it); ``.values()``
    on it makes a new one."""
    return _insert_ignore(session.get_bind().dialect.name, table)


@functools.cache
def _insert_ignore(name: str, table: Any) -> Any:
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only the two supported databases
        raise NotImplementedError(f"insert_ignore: unsupported database {name!r}")
    return insert(table).on_conflict_do_nothing()
