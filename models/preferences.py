"""Preferences: small named values per scope that users and moderators change at run time.

A scope is ``("user", "discord:123")``, ``("chat", "telegram:-100")``, ``("guild",
"discord:42")`` or ``("global", "")``. Plugins keep their own keys (``"preset.default"``,
``"grid.max_cells"`` ...); values are JSON. ``lookup`` reads the first scope that has a
key, so a user's choice beats the chat's, which beats the guild's.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import String, delete, select, update
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, JSONType, UTCDateTime, utcnow
from models.sql import insert_ignore
from models.store import Store

Scope = tuple[str, str]
GLOBAL: Scope = ("global", "")


class Preference(Base):
    __tablename__ = "preferences"

    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    scope_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSONType)
    updated_by: Mapped[str] = mapped_column(String(96), default="")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


def actor_scopes(actor: Any) -> list[Scope]:
    """An actor's scopes, most specific first: user, chat, guild, global."""
    scopes: list[Scope] = [("user", actor.key)]
    if actor.chat_id:
        scopes.append(("chat", f"{actor.platform}:{actor.chat_id}"))
    if actor.guild_id:
        scopes.append(("guild", f"{actor.platform}:{actor.guild_id}"))
    scopes.append(GLOBAL)
    return scopes


class PreferenceStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, scope: Scope, key: str, default: Any = None) -> Any:
        async with self.store.session() as session:
            row = await session.get(Preference, (scope[0], scope[1], key))
            return default if row is None else row.value

    async def set(self, scope: Scope, key: str, value: Any, *, by: str = "") -> None:
        """Insert or replace (idempotent; safe under concurrent writers on both databases)."""
        async with self.store.session() as session:
            values = {"scope": scope[0], "scope_id": scope[1], "key": key}
            inserted = await session.execute(
                insert_ignore(session, Preference).values(
                    **values, value=value, updated_by=by, updated_at=utcnow()
                )
            )
            if not inserted.rowcount:
                await session.execute(
                    update(Preference)
                    .where(*(getattr(Preference, k) == v for k, v in values.items()))
                    .values(value=value, updated_by=by, updated_at=utcnow())
                )
            await session.commit()

    async def claim(self, scope: Scope, key: str, value: Any, *, by: str = "") -> bool:
        """Store ``value`` only if the key has none yet: exactly one caller gets True, across
        tasks and processes (the first insert of the row wins)."""
        async with self.store.session() as session:
            result = await session.execute(
                insert_ignore(session, Preference).values(
                    scope=scope[0],
                    scope_id=scope[1],
                    key=key,
                    value=value,
                    updated_by=by,
                    updated_at=utcnow(),
                )
            )
            return bool(result.rowcount)

    async def delete(self, scope: Scope, key: str) -> bool:
        async with self.store.session() as session:
            result = await session.execute(
                delete(Preference).where(
                    Preference.scope == scope[0], Preference.scope_id == scope[1], Preference.key == key
                )
            )
            await session.commit()
            return bool(result.rowcount)

    async def lookup(self, scopes: Sequence[Scope], key: str, default: Any = None) -> Any:
        """The value of the first scope (in the given order) that has ``key``."""
        async with self.store.session() as session:
            rows = (
                await session.execute(
                    select(Preference.scope, Preference.scope_id, Preference.value).where(
                        Preference.key == key
                    )
                )
            ).all()
        found = {(scope, scope_id): value for scope, scope_id, value in rows}
        for scope in scopes:
            if scope in found:
                return found[scope]
        return default

    async def values(self, scope: str, key: str) -> dict[str, Any]:
        """``key`` in every scope of one kind, by scope id (a plugin's state of all its runs)."""
        async with self.store.session() as session:
            rows = await session.execute(
                select(Preference.scope_id, Preference.value).where(
                    Preference.scope == scope, Preference.key == key
                )
            )
            return {scope_id: value for scope_id, value in rows}
