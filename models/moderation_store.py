"""The moderation repository: bans, runtime word rules and the audit log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, or_, select

from models.base import utcnow
from models.governance import AuditEntry, Ban, WordRule
from models.sql import insert_ignore
from models.store import Store


@dataclass(frozen=True)
class BanRecord:
    user_key: str
    scope: str
    reason: str
    expires_at: datetime | None
    banned_by: str


@dataclass(frozen=True)
class WordRuleRecord:
    scope: str
    kind: str
    pattern: str


@dataclass(frozen=True)
class AuditRecord:
    actor_key: str
    action: str
    target: str | None
    scope: str
    allowed: bool
    detail: dict[str, Any]
    created_at: datetime


# read on every request: built once (building a statement costs more than running it)
# (on the tables, not the mapped classes: rows, without the ORM's bookkeeping)
BANS, RULES = Ban.__tablename__, WordRule.__tablename__  # their recent answers (models/recent.py)
_BAN = Ban.__table__.c
_RULE = WordRule.__table__.c
_BANS = (
    select(*_BAN)
    .where(
        _BAN.scope.in_(bindparam("scopes", expanding=True)),
        or_(_BAN.expires_at.is_(None), _BAN.expires_at > bindparam("now")),
    )
    .order_by(_BAN.created_at)
)
_USER_BANS = _BANS.where(_BAN.user_key == bindparam("user_key"))
_RULES = select(*_RULE).where(_RULE.scope.in_(bindparam("scopes", expanding=True))).order_by(_RULE.id)


class ModerationStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    # bans -------------------------------------------------------------------------------------

    async def ban(
        self, user_key: str, scope: str, *, reason: str, expires_at: datetime | None, banned_by: str
    ) -> None:
        """Ban, or replace the ban in that scope (a new expiry or reason)."""
        async with self.store.session() as session:
            await session.execute(delete(Ban).where(Ban.user_key == user_key, Ban.scope == scope))
            session.add(
                Ban(user_key=user_key, scope=scope, reason=reason, expires_at=expires_at, banned_by=banned_by)
            )
        self.store.recent.changed(BANS)

    async def unban(self, user_key: str, scope: str) -> bool:
        async with self.store.session() as session:
            result = await session.execute(delete(Ban).where(Ban.user_key == user_key, Ban.scope == scope))
        self.store.recent.changed(BANS)
        return result.rowcount > 0

    async def bans(self, scopes: Sequence[str], user_key: str | None = None) -> list[BanRecord]:
        """Bans in force now in these scopes, the longest first (permanent ones lead)."""

        async def read() -> tuple[BanRecord, ...]:
            params: dict[str, Any] = {"scopes": list(scopes), "now": utcnow()}
            if user_key is not None:
                params["user_key"] = user_key
            async with self.store.unit() as session:
                rows = (await session.execute(_BANS if user_key is None else _USER_BANS, params)).all()
            rows.sort(key=lambda b: (b.expires_at is not None, -(b.expires_at or utcnow()).timestamp()))
            return tuple(BanRecord(b.user_key, b.scope, b.reason, b.expires_at, b.banned_by) for b in rows)

        now = utcnow()  # one read a moment ago may hold a ban that has run out since
        found = await self.store.recent.get(BANS, (tuple(scopes), user_key), read)
        return [ban for ban in found if ban.expires_at is None or ban.expires_at > now]

    # word rules -------------------------------------------------------------------------------

    async def add_rule(self, scope: str, kind: str, pattern: str, added_by: str) -> bool:
        async with self.store.session() as session:
            result = await session.execute(
                insert_ignore(session, WordRule).values(
                    scope=scope, kind=kind, pattern=pattern, added_by=added_by, created_at=utcnow()
                )
            )
        self.store.recent.changed(RULES)
        return result.rowcount == 1

    async def remove_rule(self, scope: str, kind: str, pattern: str) -> bool:
        async with self.store.session() as session:
            result = await session.execute(
                delete(WordRule).where(
                    WordRule.scope == scope, WordRule.kind == kind, WordRule.pattern == pattern
                )
            )
        self.store.recent.changed(RULES)
        return result.rowcount > 0

    async def rules(self, scopes: Sequence[str]) -> list[WordRuleRecord]:

        async def read() -> tuple[WordRuleRecord, ...]:
            async with self.store.unit() as session:
                rows = (await session.execute(_RULES, {"scopes": list(scopes)})).all()
                return tuple(WordRuleRecord(r.scope, r.kind, r.pattern) for r in rows)

        return list(await self.store.recent.get(RULES, tuple(scopes), read))

    # audit log --------------------------------------------------------------------------------

    async def audit(
        self,
        actor_key: str,
        action: str,
        *,
        scope: str,
        allowed: bool,
        target: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        async with self.store.session() as session:
            session.add(
                AuditEntry(
                    actor_key=actor_key,
                    action=action,
                    target=target,
                    scope=scope,
                    allowed=allowed,
                    detail=detail or {},
                )
            )

    async def audit_log(self, scopes: Sequence[str], *, limit: int = 20) -> list[AuditRecord]:
        """Newest first."""
        async with self.store.session() as session:
            rows = await session.scalars(
                select(AuditEntry)
                .where(AuditEntry.scope.in_(scopes))
                .order_by(AuditEntry.id.desc())
                .limit(limit)
            )
            return [
                AuditRecord(r.actor_key, r.action, r.target, r.scope, r.allowed, dict(r.detail), r.created_at)
                for r in rows
            ]
