"""The store: one async engine, one session per unit of work, repositories as methods.

Status changes are guarded updates (``WHERE status IN ...``) so that a job can be
claimed, finished or failed only once, whatever races between a restart, a cancel and a
worker; the caller learns from the return value whether it won.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, event, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import selectinload

from models.base import utcnow
from models.records import GenerationRecord, ImageRecord, UserRecord
from models.tables import OPEN_STATUSES, Generation, Image, User
from pipeline.request import GenerationRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewJob:
    """A job to store: the planner's output plus who asked and where to answer."""

    id: str
    request: GenerationRequest
    group_id: str
    group_index: int
    kind: str = "txt2img"
    plan: str = "draw"
    label: str | None = None
    parent_id: str | None = None
    private: bool = False
    priority: int = 0
    spoiler: bool = False


@dataclass(frozen=True)
class NewImage:
    id: str
    index: int
    path: str
    width: int
    height: int
    seed: int
    subseed: int
    infotext: str


def sqlite_pragmas(dbapi_connection: Any, *, foreign_keys: bool = True, busy_timeout_ms: int = 30000) -> None:
    """Per-connection SQLite settings: WAL (readers never block the writer), a busy timeout
    (a writer waits for another process's write instead of failing), foreign keys."""
    cursor = dbapi_connection.cursor()
    # first: switching a fresh database to WAL needs the lock another process may hold
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    sqlite_pragmas(dbapi_connection)


def create_engine(url: str, *, echo: bool = False) -> AsyncEngine:
    engine = create_async_engine(url, echo=echo, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
    return engine


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str, *, echo: bool = False) -> Store:
        return cls(create_engine(url, echo=echo))

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session, session.begin():
            yield session

    # users -------------------------------------------------------------------------------

    async def ensure_user(
        self, platform: str, platform_user_id: str, display_name: str, locale: str | None = None
    ) -> UserRecord:
        """Get or create; concurrent first calls for one identity are resolved by the unique key."""
        async with self.session() as session:
            user = await _find_user(session, platform, platform_user_id)
            if user is None:
                user = User(
                    platform=platform,
                    platform_user_id=platform_user_id,
                    display_name=display_name,
                    locale=locale,
                )
                try:
                    async with session.begin_nested():
                        session.add(user)
                except Exception:  # lost a race on the unique key: the other insert won
                    user = await _find_user(session, platform, platform_user_id)
                    assert user is not None
            elif display_name and user.display_name != display_name:
                user.display_name = display_name
            return _user_record(user)

    # generations ---------------------------------------------------------------------------

    async def add_jobs(
        self,
        user_id: int,
        jobs: Sequence[NewJob],
        *,
        chat_id: str | None,
        guild_id: str | None,
        reply_to: dict[str, Any],
        roles: Sequence[str],
    ) -> None:
        """Store every job of one request in one transaction: all are queued, or none."""
        async with self.session() as session:
            for job in jobs:
                req = job.request
                session.add(
                    Generation(
                        id=job.id,
                        user_id=user_id,
                        parent_id=job.parent_id,
                        group_id=job.group_id,
                        group_index=job.group_index,
                        kind=job.kind,
                        plan=job.plan,
                        label=job.label,
                        status="queued",
                        params=req.to_dict(),
                        prompt=req.prompt,
                        negative_prompt=req.negative_prompt,
                        checkpoint=req.checkpoint,
                        sampler_name=req.sampler_name,
                        seed=req.seed,
                        steps=req.num_inference_steps,
                        width=req.width,
                        height=req.height,
                        batch_size=req.num_images_per_prompt,
                        chat_id=chat_id,
                        guild_id=guild_id,
                        reply_to=reply_to,
                        actor_roles=list(roles),
                        private=job.private,
                        priority=job.priority,
                        spoiler=job.spoiler,
                    )
                )

    async def get(self, generation_id: str) -> GenerationRecord | None:
        async with self.session() as session:
            row = await session.get(Generation, generation_id, options=_LOAD)
            return _record(row) if row else None

    async def list_open(self) -> list[GenerationRecord]:
        """Queued and interrupted (running) jobs, oldest first: what a restart must run again."""
        async with self.session() as session:
            rows = await session.scalars(
                select(Generation)
                .where(Generation.status.in_(OPEN_STATUSES))
                .order_by(Generation.created_at, Generation.group_index)
                .options(*_LOAD)
            )
            return [_record(row) for row in rows]

    async def list_for_user(
        self, user_id: int, *, limit: int = 20, offset: int = 0
    ) -> list[GenerationRecord]:
        async with self.session() as session:
            rows = await session.scalars(
                select(Generation)
                .where(Generation.user_id == user_id)
                .order_by(Generation.created_at.desc(), Generation.group_index.desc())
                .limit(limit)
                .offset(offset)
                .options(*_LOAD)
            )
            return [_record(row) for row in rows]

    async def mark_running(self, generation_id: str) -> bool:
        """Claim a queued job; counts the attempt. False when it is no longer queued."""
        return await self._transition(
            generation_id,
            ("queued",),
            status="running",
            started_at=utcnow(),
            attempts=Generation.attempts + 1,
        )

    async def requeue_interrupted(self, generation_id: str) -> bool:
        """After a restart: a job left running by a dead process goes back to the queue."""
        return await self._transition(generation_id, ("running",), status="queued")

    async def mark_failed(
        self, generation_id: str, error_key: str, error: str, device_seconds: float | None = None
    ) -> bool:
        return await self._transition(
            generation_id,
            OPEN_STATUSES,
            status="failed",
            error_key=error_key,
            error=error,
            finished_at=utcnow(),
            device_seconds=device_seconds,
        )

    async def mark_cancelled(self, generation_id: str) -> bool:
        return await self._transition(generation_id, OPEN_STATUSES, status="cancelled", finished_at=utcnow())

    async def finish(
        self, generation_id: str, images: Sequence[NewImage], *, model_hash: str | None, device_seconds: float
    ) -> bool:
        """Images and the finished status in one transaction: a job finishes exactly once."""
        async with self.session() as session:
            result = await session.execute(
                update(Generation)
                .where(Generation.id == generation_id, Generation.status == "running")
                .values(
                    status="finished",
                    finished_at=utcnow(),
                    model_hash=model_hash,
                    device_seconds=device_seconds,
                )
            )
            if result.rowcount != 1:
                return False
            for image in images:
                session.add(Image(generation_id=generation_id, **image.__dict__))
            return True

    async def delete(self, generation_id: str) -> list[str] | None:
        """Delete an ended job and its image rows; returns the image paths (to remove the
        files), or None when there is no such job or it is still queued or running."""
        async with self.session() as session:
            row = await session.get(Generation, generation_id, options=_LOAD)
            if row is None or row.status in OPEN_STATUSES:
                return None
            paths = [image.path for image in row.images]
            result = await session.execute(  # images go with it (ON DELETE CASCADE)
                delete(Generation).where(
                    Generation.id == generation_id, Generation.status.not_in(OPEN_STATUSES)
                )
            )
            return paths if result.rowcount == 1 else None

    async def count_by_status(self) -> dict[str, int]:
        async with self.session() as session:
            rows = await session.execute(select(Generation.status, func.count()).group_by(Generation.status))
            return {status: count for status, count in rows}

    async def _transition(self, generation_id: str, from_statuses: Sequence[str], **values: Any) -> bool:
        async with self.session() as session:
            result = await session.execute(
                update(Generation)
                .where(Generation.id == generation_id, Generation.status.in_(from_statuses))
                .values(**values)
            )
            return result.rowcount == 1

    # history -------------------------------------------------------------------------------

    async def find_user(self, platform: str, platform_user_id: str) -> UserRecord | None:
        """A known user, or None (unlike ``ensure_user``, nothing is created)."""
        async with self.session() as session:
            user = await _find_user(session, platform, platform_user_id)
            return _user_record(user) if user else None

    async def count_for_user(self, user_id: int) -> int:
        async with self.session() as session:
            count = await session.scalar(
                select(func.count()).select_from(Generation).where(Generation.user_id == user_id)
            )
            return int(count or 0)

    async def children(self, generation_id: str) -> list[GenerationRecord]:
        """The jobs made from this one (rerolls, variations), oldest first."""
        async with self.session() as session:
            rows = await session.scalars(
                select(Generation)
                .where(Generation.parent_id == generation_id)
                .order_by(Generation.created_at, Generation.group_index)
                .options(*_LOAD)
            )
            return [_record(row) for row in rows]

    async def list_group(
        self, group_id: str, *, statuses: Sequence[str] | None = None, limit: int | None = None
    ) -> list[GenerationRecord]:
        """The jobs of one request (a grid's cells) in plan order, optionally only those
        with one of ``statuses`` and at most ``limit`` of them."""
        query = select(Generation).where(Generation.group_id == group_id)
        if statuses is not None:
            query = query.where(Generation.status.in_(statuses))
        async with self.session() as session:
            rows = await session.scalars(query.order_by(Generation.group_index).limit(limit).options(*_LOAD))
            return [_record(row) for row in rows]


_LOAD = (selectinload(Generation.user), selectinload(Generation.images))


async def _find_user(session: AsyncSession, platform: str, platform_user_id: str) -> User | None:
    return await session.scalar(
        select(User).where(User.platform == platform, User.platform_user_id == platform_user_id)
    )


def _user_record(user: User) -> UserRecord:
    return UserRecord(user.id, user.platform, user.platform_user_id, user.display_name, user.locale)


def _record(row: Generation) -> GenerationRecord:
    return GenerationRecord(
        id=row.id,
        user=_user_record(row.user),
        request=GenerationRequest.from_dict(row.params),
        status=row.status,
        group_id=row.group_id,
        group_index=row.group_index,
        kind=row.kind,
        plan=row.plan,
        label=row.label,
        parent_id=row.parent_id,
        chat_id=row.chat_id,
        guild_id=row.guild_id,
        reply_to=dict(row.reply_to or {}),
        actor_roles=tuple(row.actor_roles or ()),
        private=row.private,
        spoiler=row.spoiler,
        priority=row.priority,
        attempts=row.attempts,
        error_key=row.error_key,
        error=row.error,
        model_hash=row.model_hash,
        device_seconds=row.device_seconds,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        images=tuple(
            ImageRecord(
                i.id, i.generation_id, i.index, i.path, i.width, i.height, i.seed, i.subseed, i.infotext
            )
            for i in row.images
        ),
    )
