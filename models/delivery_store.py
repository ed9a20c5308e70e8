"""What the delivery layer (bot/delivery.py) keeps across restarts.

- the message that shows a job (``generations.message_ref``): a restarted process edits
  the same message, and a notice after a restart still answers it;
- short tokens for action ids too long for a platform (Telegram allows 64 bytes of
  callback data): the button carries the token, a press resolves it here, so buttons
  keep working after a restart;
- the thread a chain of variations was posted in, per platform, so every later
  variation of the chain joins it;
- whether a job's end was shown (``generations.end_delivered_at``), so an end that a
  restart or a lost connection kept from its conversation is shown at the next start.

Values are JSON (``Route.to_json()``, ``MessageRef.to_json()``): models never import bot.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime
from typing import Any

from sqlalchemy import String, Text, select, update
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, JSONType, UTCDateTime, utcnow
from models.records import GenerationRecord
from models.sql import insert_ignore
from models.store import Store
from models.store_rows import _LOAD, _record
from models.tables import ENDED_STATUSES, Generation

TOKEN_PREFIX = "~"  # no command name starts with it, so a token is never taken for an action id
TOKEN_BYTES = 17  # the prefix and 16 base32 characters (80 bits of a SHA-256)


class ActionToken(Base):
    __tablename__ = "action_tokens"

    token: Mapped[str] = mapped_column(String(32), primary_key=True)
    action: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ThreadRoute(Base):
    __tablename__ = "thread_routes"

    platform: Mapped[str] = mapped_column(String(16), primary_key=True)
    thread_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    route: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def token_of(action: str) -> str:
    """The same action always gets the same token: storing it twice is harmless."""
    digest = hashlib.sha256(action.encode("utf-8")).digest()[:10]
    return TOKEN_PREFIX + base64.b32encode(digest).decode("ascii").lower()


class DeliveryStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def token(self, action: str) -> str:
        token = token_of(action)
        async with self.store.session() as session:
            await session.execute(insert_ignore(session, ActionToken).values(token=token, action=action))
        return token

    async def action(self, token: str) -> str | None:
        async with self.store.session() as session:
            return await session.scalar(select(ActionToken.action).where(ActionToken.token == token))

    async def thread_route(self, platform: str, thread_key: str) -> dict[str, Any] | None:
        async with self.store.session() as session:
            row = await session.get(ThreadRoute, (platform, thread_key))
            return dict(row.route) if row else None

    async def keep_thread_route(
        self, platform: str, thread_key: str, route: dict[str, Any]
    ) -> dict[str, Any]:
        """Remember the chain's thread; the first one stored wins (two presses at once)."""
        async with self.store.session() as session:
            await session.execute(
                insert_ignore(session, ThreadRoute).values(
                    platform=platform, thread_key=thread_key, route=route
                )
            )
            row = await session.get(ThreadRoute, (platform, thread_key))
            return dict(row.route) if row else route

    async def message(self, generation_id: str) -> dict[str, Any] | None:
        async with self.store.session() as session:
            found = await session.scalar(select(Generation.message_ref).where(Generation.id == generation_id))
            return dict(found) if found else None

    async def keep_message(self, generation_id: str, ref: dict[str, Any]) -> None:
        async with self.store.session() as session:
            await session.execute(
                update(Generation).where(Generation.id == generation_id).values(message_ref=ref)
            )

    async def end_delivered(self, generation_id: str) -> None:
        """The job's end reached its conversation (or was given up on): never shown again."""
        async with self.store.session() as session:
            await session.execute(
                update(Generation)
                .where(Generation.id == generation_id, Generation.end_delivered_at.is_(None))
                .values(end_delivered_at=utcnow())
            )

    async def undelivered_ends(self, since: datetime) -> list[GenerationRecord]:
        """Jobs that ended (finished, failed, cancelled) since ``since`` and whose end no
        conversation was shown, oldest first."""
        async with self.store.session() as session:
            rows = await session.scalars(
                select(Generation)
                .where(
                    Generation.status.in_(ENDED_STATUSES),
                    Generation.end_delivered_at.is_(None),
                    Generation.finished_at >= since,
                )
                .order_by(Generation.finished_at, Generation.id)
                .options(*_LOAD)
            )
            return [_record(row) for row in rows]
