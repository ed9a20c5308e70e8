"""One person across platforms: which identities are linked, and the one-time codes
that link them.

An identity is a user key (``telegram:42``, ``console:alice``). A linked identity names
its **person**: the key of the identity it was linked to, whose user row holds the
history of both. A code is made by one identity (``/link``) and redeemed by another
(``/link CODE``); nothing is linked without it. Values are plain strings: models never
import bot.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import String, bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime, utcnow
from models.store import Store, _find_user
from models.tables import Generation, User

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O or 1/I to misread
CODE_LENGTH = 8
CODE_LIFETIME = timedelta(minutes=10)


class IdentityLink(Base):
    __tablename__ = "identity_links"

    identity: Mapped[str] = mapped_column(String(96), primary_key=True)  # the linked user key
    person: Mapped[str] = mapped_column(String(96), index=True)  # the user key it is one with
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class LinkCode(Base):
    __tablename__ = "link_codes"

    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    identity: Mapped[str] = mapped_column(String(96))  # who made it
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


@dataclass(frozen=True)
class Linked:
    """A redeemed code: ``identity`` now belongs to ``person``; ``moved`` generations
    joined the person's history."""

    identity: str
    person: str
    moved: int


class LinkRefused(Exception):  # noqa: N818  (a reason, not a failure)
    """Why a code could not be redeemed: "unknown" (or expired), "self", "same_platform",
    "already" (this identity is linked, or others are linked to it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _platform(key: str) -> str:
    return key.partition(":")[0]


# read on every request: built once
_LINK = IdentityLink.__table__.c
LINKS = IdentityLink.__tablename__
_PERSON_OF = select(_LINK.person).where(_LINK.identity == bindparam("identity"))


class IdentityStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def person_of(self, identity: str) -> str | None:
        """The person a linked identity is one with; None when it is not linked."""

        async def read() -> str | None:
            async with self.store.unit() as session:
                return await session.scalar(_PERSON_OF, {"identity": identity})

        return await self.store.recent.get(LINKS, identity, read)

    async def identities(self, person: str) -> list[str]:
        """Every identity linked to ``person`` (not the person's own)."""
        async with self.store.session() as session:
            rows = await session.scalars(select(IdentityLink.identity).where(IdentityLink.person == person))
            return sorted(rows)

    async def new_code(self, identity: str) -> str:
        """A one-time code for ``identity``; its older codes stop working."""
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        async with self.store.session() as session:
            await session.execute(delete(LinkCode).where(LinkCode.identity == identity))
            await session.execute(delete(LinkCode).where(LinkCode.expires_at < utcnow()))
            session.add(LinkCode(code=code, identity=identity, expires_at=utcnow() + CODE_LIFETIME))
        return code

    async def redeem(self, code: str, identity: str) -> Linked:
        """Link ``identity`` to the person of the code's maker and move its generations
        into that person's history; the code is used up. Raises ``LinkRefused``."""
        async with self.store.session() as session:
            row = await session.get(LinkCode, code.strip().upper())
            if row is None or row.expires_at < utcnow():
                raise LinkRefused("unknown")
            maker = row.identity
            link = await session.get(IdentityLink, maker)
            person = link.person if link is not None else maker
            if identity in (maker, person):
                raise LinkRefused("self")
            members = [
                person,
                *(await session.scalars(select(IdentityLink.identity).where(IdentityLink.person == person))),
            ]
            if _platform(identity) in {_platform(m) for m in members}:
                raise LinkRefused("same_platform")
            taken = await session.get(IdentityLink, identity)
            others = await session.scalar(
                select(IdentityLink.identity).where(IdentityLink.person == identity).limit(1)
            )
            if taken is not None or others is not None:
                raise LinkRefused("already")
            await session.delete(row)
            session.add(IdentityLink(identity=identity, person=person))
            moved = await _move(session, identity, person, None)
        self.store.recent.changed(LINKS)
        return Linked(identity, person, moved)

    async def unlink(self, identity: str) -> list[str]:
        """Separate ``identity`` from its person, or, for a person, every identity linked
        to it; the generations each made (by platform) go back to its own history.
        Returns the identities separated."""
        async with self.store.session() as session:
            link = await session.get(IdentityLink, identity)
            if link is not None:
                pairs = [(identity, link.person)]
            else:
                rows = await session.scalars(select(IdentityLink).where(IdentityLink.person == identity))
                pairs = [(row.identity, row.person) for row in rows]
            for linked, person in pairs:
                await session.execute(delete(IdentityLink).where(IdentityLink.identity == linked))
                await _move(session, person, linked, _platform(linked))
        self.store.recent.changed(LINKS)
        return [linked for linked, _ in pairs]


async def _move(session: AsyncSession, source: str, target: str, platform: str | None) -> int:
    """Move ``source``'s generations (those asked on ``platform`` only, when given) to
    ``target``'s user row, made if needed. Returns how many moved."""
    source_platform, _, source_id = source.partition(":")
    from_user = await _find_user(session, source_platform, source_id)
    if from_user is None:
        return 0
    target_platform, _, target_id = target.partition(":")
    to_user = await _find_user(session, target_platform, target_id)
    if to_user is None:
        to_user = User(
            platform=target_platform, platform_user_id=target_id, display_name=from_user.display_name
        )
        session.add(to_user)
        await session.flush()
    rows = (
        await session.execute(
            select(Generation.id, Generation.route).where(Generation.user_id == from_user.id)
        )
    ).all()
    ids = [job for job, route in rows if platform is None or _route_platform(route) == platform]
    if ids:
        await session.execute(update(Generation).where(Generation.id.in_(ids)).values(user_id=to_user.id))
    return len(ids)


def _route_platform(route: object) -> str | None:
    if isinstance(route, str):
        try:
            route = json.loads(route)
        except ValueError:
            return None
    return route.get("platform") if isinstance(route, dict) else None
