"""The store's rows as records: how a job row is loaded, and the plain records
(:mod:`models.records`) that the repositories hand out instead of ORM rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from models.records import GenerationRecord, ImageRecord, UserRecord
from models.tables import Generation, Image, User
from pipeline.request import GenerationRequest

_LOAD = (selectinload(Generation.user), selectinload(Generation.images))


async def oldest_first(
    session: AsyncSession, *where: ColumnElement[bool], limit: int | None = None
) -> list[GenerationRecord]:
    """The jobs matching ``where`` as records, oldest first (a group's in its order), at
    most ``limit``."""
    query = (
        select(Generation)
        .where(*where)
        .order_by(Generation.created_at, Generation.group_index)
        .options(*_LOAD)
    )
    rows = await session.scalars(query if limit is None else query.limit(limit))
    return [_record(row) for row in rows]


# the hot paths' statements are built once: building one costs more than running it;
# those that write a job and read it back work on the table (``JOBS``), whose rows
# ``_record`` reads as it reads a loaded ``Generation``, without the ORM's bookkeeping
JOBS = Generation.__table__
_USER = select(User).where(
    User.platform == bindparam("platform"), User.platform_user_id == bindparam("platform_user_id")
)
_USERS = User.__table__.c
# a job row with its user's columns (``user_<name>``), for statements that write jobs and
# return them: the user comes back in the same statement (``_row_user``)
JOB_WITH_USER = (
    *JOBS.c,
    *(
        select(column).where(_USERS.id == JOBS.c.user_id).scalar_subquery().label(f"user_{column.name}")
        for column in (_USERS.platform, _USERS.platform_user_id, _USERS.display_name, _USERS.locale)
    ),
)


async def _find_user(session: AsyncSession, platform: str, platform_user_id: str) -> User | None:
    return await session.scalar(_USER, {"platform": platform, "platform_user_id": platform_user_id})


def _user_record(user: Any) -> UserRecord:
    """The record of a ``User`` or of a row of its table."""
    return UserRecord(user.id, user.platform, user.platform_user_id, user.display_name, user.locale)


def _row_user(row: Any) -> UserRecord:
    """The user of a row returned with ``JOB_WITH_USER``."""
    return UserRecord(
        row.user_id, row.user_platform, row.user_platform_user_id, row.user_display_name, row.user_locale
    )


def stored_request(params: dict[str, Any]) -> GenerationRequest:
    """A row's request. Sampler names are canonical in every row /draw stores (the engine
    takes them exactly); an older row's alias or legacy name is read here, once, as /draw
    reads it now, so it still runs."""
    from pipeline.samplers import with_canonical_names

    return with_canonical_names(GenerationRequest.from_dict(params))


def _record(row: Any, *, user: Any = None, images: Sequence[ImageRecord] | None = None) -> GenerationRecord:
    """The record of a row loaded with ``_LOAD``, or of one (a ``Generation`` or a row of
    ``JOBS``) whose ``user`` and ``images`` the caller has at hand."""
    return GenerationRecord(
        id=row.id,
        user=_user_record(user or row.user),
        request=stored_request(row.params),
        status=row.status,
        group_id=row.group_id,
        group_index=row.group_index,
        kind=row.kind,
        plan=row.plan,
        label=row.label,
        parent_id=row.parent_id,
        chat_id=row.chat_id,
        guild_id=row.guild_id,
        route=dict(row.route or {}),
        thread_key=row.thread_key,
        forever_run=row.forever_run,
        actor_roles=tuple(row.actor_roles or ()),
        private=row.private,
        spoiler=row.spoiler,
        owner=row.owner,
        lease_expires_at=row.lease_expires_at,
        priority=row.priority,
        attempts=row.attempts,
        error_key=row.error_key,
        error=row.error,
        error_params=dict(row.error_params) if row.error_params else None,
        model_hash=row.model_hash,
        device_seconds=row.device_seconds,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        images=tuple(images) if images is not None else tuple(_image_record(i) for i in row.images),
    )


def _image_record(i: Image) -> ImageRecord:
    return ImageRecord(
        i.id, i.generation_id, i.index, i.path, i.width, i.height, i.seed, i.subseed, i.infotext
    )


def _in_id_order(*conditions: ColumnElement[bool]) -> ColumnElement[bool]:
    """The rows ``conditions`` pick, locked in id order before a statement changes them
    (on PostgreSQL; SQLite has one writer at a time). Every statement or transaction that
    writes several jobs takes their rows in that order (claims of several, renewals,
    releases, ``finish_many``), so two of them never wait for each other's rows: that
    would be a deadlock, which PostgreSQL breaks after a second by failing one of them (a
    worker's group of ends, its claim or its lease's heartbeat)."""
    locked = select(JOBS.c.id).where(*conditions).order_by(JOBS.c.id).with_for_update()
    return JOBS.c.id.in_(locked.scalar_subquery())
