"""The repository of saved styles and negative presets (``models.styles``).

Writes take a list of entries and run in one transaction, so an import is stored whole
or not at all. A new name is an idempotent insert and an existing one (any case) an
update of its texts, so two writers racing on one name never fail on the unique key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, or_, select, update

from models.base import utcnow
from models.preferences import Preference
from models.sql import insert_ignore
from models.store import Store
from models.styles import SavedPreset, SavedStyle

Scope = tuple[str, str]


def name_key(name: str) -> str:
    """What makes two names the same in one scope: their case is ignored."""
    return name.casefold()


@dataclass(frozen=True)
class SavedText:
    """A saved style (``prompt`` and ``negative_prompt``) or preset (``negative_prompt`` only)."""

    scope: str
    scope_id: str
    name: str
    prompt: str
    negative_prompt: str

    @property
    def where(self) -> Scope:
        return (self.scope, self.scope_id)


class ScopeFull(Exception):
    """Saving would put more than ``limit`` names in the scope (which holds ``count``)."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"{count} saved, limit {limit}")
        self.count = count
        self.limit = limit


def _in_scopes(model: Any, scopes: Sequence[Scope]) -> Any:
    return or_(*(and_(model.scope == kind, model.scope_id == ident) for kind, ident in scopes))


def _record(row: Any) -> SavedText:
    return SavedText(row.scope, row.scope_id, row.name, getattr(row, "prompt", ""), row.negative_prompt)


class StyleStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def styles(self, scopes: Sequence[Scope] | None = None) -> list[SavedText]:
        """Every saved style (of ``scopes`` only, when given), in the order they were first saved."""
        return await self._list(SavedStyle, scopes)

    async def presets(self, scopes: Sequence[Scope] | None = None) -> list[SavedText]:
        return await self._list(SavedPreset, scopes)

    async def save_styles(
        self, scope: Scope, entries: Sequence[tuple[str, str, str]], *, by: str, limit: int
    ) -> tuple[int, int]:
        """Save ``(name, prompt, negative_prompt)`` entries; returns (added, replaced).

        Raises ``ScopeFull`` (and saves nothing) when the new names would pass ``limit``.
        """
        rows = [{"name": n, "prompt": p, "negative_prompt": neg} for n, p, neg in entries]
        return await self._save(SavedStyle, scope, rows, by=by, limit=limit)

    async def save_presets(
        self, scope: Scope, entries: Sequence[tuple[str, str]], *, by: str, limit: int
    ) -> tuple[int, int]:
        rows = [{"name": name, "negative_prompt": text} for name, text in entries]
        return await self._save(SavedPreset, scope, rows, by=by, limit=limit)

    async def delete_style(self, scope: Scope, name: str) -> SavedText | None:
        """Delete by name (any case); returns what was deleted, or None."""
        return await self._delete(SavedStyle, scope, name)

    async def delete_preset(self, scope: Scope, name: str) -> SavedText | None:
        return await self._delete(SavedPreset, scope, name)

    async def preference_values(self, key: str, scopes: Sequence[Scope] | None = None) -> dict[Scope, Any]:
        """One preference's value in every scope that has it (``models.preferences``)."""
        query = select(Preference.scope, Preference.scope_id, Preference.value).where(Preference.key == key)
        if scopes is not None:
            if not scopes:
                return {}
            query = query.where(_in_scopes(Preference, scopes))
        async with self.store.session() as session:
            rows = (await session.execute(query)).all()
        return {(scope, scope_id): value for scope, scope_id, value in rows}

    async def _list(self, model: Any, scopes: Sequence[Scope] | None) -> list[SavedText]:
        query = select(model).order_by(model.id)
        if scopes is not None:
            if not scopes:
                return []
            query = query.where(_in_scopes(model, scopes))
        async with self.store.session() as session:
            return [_record(row) for row in await session.scalars(query)]

    async def _save(
        self, model: Any, scope: Scope, rows: list[dict[str, str]], *, by: str, limit: int
    ) -> tuple[int, int]:
        where_scope = (model.scope == scope[0], model.scope_id == scope[1])
        async with self.store.session() as session:
            existing = set(await session.scalars(select(model.name_key).where(*where_scope)))
            new = {name_key(row["name"]) for row in rows} - existing
            if len(existing) + len(new) > limit:
                raise ScopeFull(len(existing), limit)
            added = replaced = 0
            now = utcnow()
            for row in rows:
                key = name_key(row["name"])
                inserted = await session.execute(
                    insert_ignore(session, model).values(
                        scope=scope[0], scope_id=scope[1], name_key=key, created_by=by,
                        created_at=now, updated_at=now, **row,
                    )
                )  # fmt: skip
                if inserted.rowcount:
                    added += 1
                    continue
                await session.execute(
                    update(model).where(*where_scope, model.name_key == key).values(updated_at=now, **row)
                )
                replaced += 1
        return added, replaced

    async def _delete(self, model: Any, scope: Scope, name: str) -> SavedText | None:
        async with self.store.session() as session:
            row = await session.scalar(
                select(model).where(
                    model.scope == scope[0], model.scope_id == scope[1], model.name_key == name_key(name)
                )
            )
            if row is None:
                return None
            await session.delete(row)
            return _record(row)
