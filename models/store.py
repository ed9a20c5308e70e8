"""The store: one async engine, one session per unit of work, repositories as methods.

Status changes are guarded updates (``WHERE status IN ...``) so that a job can be
claimed, finished or failed only once, whatever races between a restart, a cancel and a
worker; the caller learns from the return value whether it won.

Several processes may share one database. An open job is held by one of them, under a
lease: claiming, finishing and failing are guarded by the owner too, so a process that lost
a job can no longer end it. The job-ownership operations (leases, claims, taking jobs over)
are in :mod:`models.store_leases`; how rows become records, in :mod:`models.store_rows`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, bindparam, delete, event, func, insert, select, update
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from models import direct, sqlite_inline
from models.base import utcnow
from models.direct import Lane, direct_for
from models.recent import Recent
from models.records import GenerationRecord, ImageRecord, JobSummary, OpenJobs, UserRecord
from models.sql import insert_ignore
from models.store_ends import Finishing, _JobEnds  # noqa: F401  (re-exported: models.store.Finishing)
from models.store_leases import Lease, _JobLeases
from models.store_rows import (
    _LOAD,
    JOBS,
    _find_user,
    _image_record,
    _record,
    _user_record,
    oldest_first,
    stored_request,  # noqa: F401  (re-exported: a stored row's request, models.store.stored_request)
)
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
    thread_key: str | None = None  # the root id of the chain of variations it joins
    forever_run: str | None = None  # the forever run it continues


def sqlite_pragmas(dbapi_connection: Any, *, foreign_keys: bool = True, busy_timeout_ms: int = 30000) -> None:
    """Per-connection SQLite settings: WAL (readers never block the writer) with
    ``synchronous=NORMAL`` (a commit appends to the log without waiting for the disk; a
    power cut may lose the last commits but never corrupts the database), a busy timeout
    (a writer waits for another process's write instead of failing), foreign keys. An
    in-memory database keeps its own journal, and its durability setting means nothing."""
    cursor = dbapi_connection.cursor()
    # first: switching a fresh database to WAL needs the lock another process may hold
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    sqlite_pragmas(dbapi_connection)


def _note_idle(_dbapi_connection: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """A pooled connection that rested ``direct.PING_AFTER_IDLE`` or longer is pinged before it
    is handed out, and replaced when the server dropped it (a restart): the first command
    after a quiet spell never fails on a dead connection. One used a moment ago is not
    pinged: under load a ping would add a round trip to every unit of work."""
    idle_since = record.info.get("idle_since")
    if idle_since is None or time.monotonic() - idle_since < direct.PING_AFTER_IDLE:
        return
    try:
        dbapi_connection.ping()
    except Exception as exc:  # the pool takes a fresh connection instead
        raise DisconnectionError(f"a pooled connection was dropped: {exc}") from exc


def create_engine(url: str, *, echo: bool = False) -> AsyncEngine:
    if url.startswith("sqlite+aiosqlite:"):
        engine = create_async_engine(url, echo=echo, module=sqlite_inline.dbapi())
    else:
        engine = create_async_engine(url, echo=echo)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
    else:
        event.listen(engine.sync_engine, "checkin", _note_idle)
        event.listen(engine.sync_engine, "checkout", _ping_if_idle)
    return engine


class Transaction:
    """A unit of work opened by ``Store.transaction``; ``committed`` once it has been.

    Where the store has direct lanes (a SQLite file, PostgreSQL) its statements run on one
    (``models.direct``); a ``session()`` opened inside gets a session on that lane's
    connection, made when first asked for, so the transaction stays one."""

    def __init__(
        self, task: asyncio.Task[Any] | None, *, session: AsyncSession | None = None, lane: Lane | None = None
    ) -> None:
        self.task = task
        self.committed = False
        self.lane = lane
        self._session = session
        self._joined: Any = None  # the lane connection's transaction, once a session joined it
        self._last: list[Callable[[], Awaitable[Any]]] = []

    def at_end(self, step: Callable[[], Awaitable[Any]]) -> None:
        """Run ``step`` (its statements part of this transaction) once the block that
        opened it is done, just before it commits; never if it rolls back. An update of a
        row that many transactions write (a usage counter) made there holds the row's lock
        for the commit alone, not for the rest of the transaction."""
        self._last.append(step)

    async def run_last(self) -> None:
        while self._last:
            await self._last.pop(0)()

    async def session(self) -> AsyncSession:
        if self._session is None:
            assert self.lane is not None
            self._joined = await self.lane.connection.begin()
            self._session = AsyncSession(bind=self.lane.connection, expire_on_commit=False)
        return self._session

    async def unit(self) -> Any:
        """Where the hot path's statements run: the lane (after what the session holds
        is written, so statements keep their order), or the session."""
        if self.lane is None:
            assert self._session is not None
            return self._session
        if self._session is not None:
            await self._session.flush()
        return self.lane

    async def end(self, *, commit: bool) -> None:
        """End the session that joined the lane's transaction, if one did: written and
        committed, or rolled back."""
        session, joined = self._session, self._joined
        if joined is None:
            return
        self._session = self._joined = None
        try:
            if commit:
                await session.flush()  # type: ignore[union-attr]
        finally:
            await session.close()  # type: ignore[union-attr]
        if commit:
            await joined.commit()
        else:
            await joined.rollback()


# the statements of every request, built once: building a statement costs more than
# running it
USERS = User.__table__
_USER_ROW = select(*USERS.c).where(
    USERS.c.platform == bindparam("platform"), USERS.c.platform_user_id == bindparam("platform_user_id")
)
_ADD_JOBS = insert(JOBS)


class Store(_JobLeases, _JobEnds):
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._closes_at_once = sqlite_inline.runs_inline(engine)
        self.direct = direct_for(engine)  # the hot statements' lanes (None: sessions only)
        self._current: ContextVar[Transaction | None] = ContextVar(f"store-{id(self)}", default=None)
        self.recent = Recent()  # the small reads of every request (models/recent.py)

    @classmethod
    def from_url(cls, url: str, *, echo: bool = False) -> Store:
        return cls(create_engine(url, echo=echo))

    async def close(self) -> None:
        if self.direct is not None:
            await self.direct.close()
        await self.engine.dispose()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """One unit of work; inside ``transaction()`` (in the task that opened it) it is a
        part of that one, committed or rolled back with it."""
        outer = self.current_transaction()
        if outer is not None:
            yield await outer.session()
            return
        async with self._opened() as session, session.begin():
            yield session

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[Any]:
        """One unit of work for the hot path's prebuilt statements (``execute``,
        ``scalar``, ``get_bind``, as on a session): a direct lane (``models.direct``), or a
        session where the store has none; inside ``transaction()``, a part of it."""
        outer = self.current_transaction()
        if outer is not None:
            yield await outer.unit()
            return
        if self.direct is None:
            async with self.session() as session:
                yield session
            return
        async with self.direct.unit() as lane:
            yield lane

    async def one(self, statement: Any, params: Mapping[str, Any] | None = None) -> Any:
        """Run one prebuilt statement as a unit of work of its own and return its result
        (``all``, ``first``, ``one``, ``scalar``, ``rowcount``): on PostgreSQL's lanes
        without BEGIN and COMMIT around it (one statement is atomic on its own); inside
        ``transaction()``, a part of it."""
        if self.direct is not None and self.current_transaction() is None:
            return await self.direct.one(statement, params)
        async with self.unit() as unit:
            result = await unit.execute(statement, params)
            if isinstance(result, direct.Result):
                return result
            rows = result.all() if getattr(result, "returns_rows", True) else []  # a DML's may not
            # an ORM result with rows has no rowcount: as many rows as it returned
            return direct.Result(rows, getattr(result, "rowcount", len(rows)))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Make every ``session()`` and ``unit()`` this task opens inside one transaction:
        all of it is stored, or none. Tasks started inside get sessions of their own (one
        session is never used by two tasks at once). Within an open one, joins it."""
        outer = self.current_transaction()
        if outer is not None:
            yield outer
            return
        async with self._begun() as unit:
            token = self._current.set(unit)
            try:
                yield unit
                await unit.run_last()
            finally:
                self._current.reset(token)
        unit.committed = True

    @asynccontextmanager
    async def _begun(self) -> AsyncIterator[Transaction]:
        """A transaction on a direct lane, or on a session where the store has none:
        committed when the block ends, rolled back when it raises."""
        task = asyncio.current_task()
        if self.direct is None:
            async with self._opened() as session, session.begin():
                yield Transaction(task, session=session)
            return
        async with self.direct.unit() as lane:
            unit = Transaction(task, lane=lane)
            try:
                yield unit
            except BaseException:
                await unit.end(commit=False)
                raise
            await unit.end(commit=True)

    @asynccontextmanager
    async def _opened(self) -> AsyncIterator[AsyncSession]:
        """A new session, closed on the way out. SQLAlchemy closes one in a task of its own,
        shielded from cancellation, which costs the event loop two turns; with SQLite in the
        loop's thread a close never waits, so nothing can interrupt it, and it is closed
        here at once."""
        if not self._closes_at_once:
            async with self.sessions() as session:
                yield session
            return
        session = self.sessions()
        try:
            yield session
        finally:
            await session.close()

    def current_transaction(self) -> Transaction | None:
        """The ``transaction()`` this task is in, if any."""
        unit = self._current.get()
        return unit if unit is not None and unit.task is asyncio.current_task() else None

    # users -------------------------------------------------------------------------------

    async def ensure_user(
        self, platform: str, platform_user_id: str, display_name: str, locale: str | None = None
    ) -> UserRecord:
        """Get or create; concurrent first calls for one identity are resolved by the unique key."""
        key = (platform, platform_user_id)
        kept: UserRecord | None = self.recent.kept(USERS.name, key)
        if kept is not None and display_name in ("", kept.display_name) and locale in (None, "", kept.locale):
            return kept  # as read a moment ago, and nothing to change

        async def read() -> UserRecord:
            identity = {"platform": platform, "platform_user_id": platform_user_id}
            async with self.unit() as session:
                user = (await session.execute(_USER_ROW, identity)).first()
                if user is None:
                    # a first contact; of two at once, the unique key keeps one and both read it
                    add = insert_ignore(session, USERS)
                    await session.execute(add, {**identity, "display_name": display_name, "locale": locale})
                    self.recent.changed(USERS.name)  # not kept: it may yet be rolled back
                    return _user_record((await session.execute(_USER_ROW, identity)).one())
                changes: dict[str, str] = {}
                if display_name and user.display_name != display_name:
                    changes["display_name"] = display_name
                if locale and user.locale != locale:
                    # later notices (a grid, a stopped run) answer in the language used last
                    changes["locale"] = locale
                if changes:
                    self.recent.changed(USERS.name)  # not kept, and the old answer is gone
                    await session.execute(update(USERS).where(USERS.c.id == user.id).values(**changes))
                return dataclasses.replace(_user_record(user), **changes)

        return await self.recent.read(USERS.name, key, read)

    # generations ---------------------------------------------------------------------------

    async def add_jobs(
        self,
        user_id: int,
        jobs: Sequence[NewJob],
        *,
        chat_id: str | None,
        guild_id: str | None,
        route: dict[str, Any],
        roles: Sequence[str],
        lease: Lease | None = None,
    ) -> None:
        """Store every job of one request in one transaction: all are queued, or none.
        With a ``lease`` the jobs are held by that process; without, any process may take them."""
        rows = []
        for job in jobs:
            req = job.request
            rows.append(
                {
                    "id": job.id,
                    "user_id": user_id,
                    "parent_id": job.parent_id,
                    "group_id": job.group_id,
                    "group_index": job.group_index,
                    "kind": job.kind,
                    "plan": job.plan,
                    "label": job.label,
                    "status": "queued",
                    "params": req.to_dict(),
                    "prompt": req.prompt,
                    "negative_prompt": req.negative_prompt,
                    "checkpoint": req.checkpoint,
                    "sampler_name": req.sampler_name,
                    "seed": req.seed,
                    "steps": req.num_inference_steps,
                    "width": req.width,
                    "height": req.height,
                    "batch_size": req.num_images_per_prompt,
                    "chat_id": chat_id,
                    "guild_id": guild_id,
                    "route": route,
                    "thread_key": job.thread_key,
                    "forever_run": job.forever_run,
                    "actor_roles": list(roles),
                    "private": job.private,
                    "priority": job.priority,
                    "spoiler": job.spoiler,
                    "owner": lease.owner if lease else None,
                    "lease_expires_at": lease.expires_at if lease else None,
                }
            )
        if rows:
            async with self.unit() as session:
                await session.execute(_ADD_JOBS, rows)

    async def get(self, generation_id: str) -> GenerationRecord | None:
        async with self.session() as session:
            row = await session.get(Generation, generation_id, options=_LOAD)
            return _record(row) if row else None

    async def list_open(
        self, *, user_id: int | None = None, limit: int | None = None
    ) -> list[GenerationRecord]:
        """Queued and running jobs, oldest first, whichever process holds them; with
        ``user_id``, that user's only; at most ``limit``."""
        where = [Generation.status.in_(OPEN_STATUSES)]
        if user_id is not None:
            where.append(Generation.user_id == user_id)
        async with self.session() as session:
            return await oldest_first(session, *where, limit=limit)

    async def open_by_user(self) -> list[OpenJobs]:
        """Who has jobs queued or running, and how many of each: most open jobs first."""
        open_ = Generation.status.in_(OPEN_STATUSES)
        running = func.count().filter(Generation.status == "running")
        query = (
            select(User.platform, User.platform_user_id, User.display_name, func.count() - running, running)
            .join(Generation, Generation.user_id == User.id)
            .where(open_)
            .group_by(User.id, User.platform, User.platform_user_id, User.display_name)
            .order_by(func.count().desc(), func.min(Generation.created_at))
        )
        async with self.session() as session:
            return [
                OpenJobs(f"{platform}:{uid}", name, queued, busy)
                for platform, uid, name, queued, busy in await session.execute(query)
            ]

    async def image(self, image_id: str) -> ImageRecord | None:
        async with self.session() as session:
            row = await session.get(Image, image_id)
            return _image_record(row) if row else None

    async def summaries(self, *, plan: str) -> list[JobSummary]:
        """Every job of one plan kind, oldest first, by a few columns (no images loaded)."""
        async with self.session() as session:
            rows = await session.execute(
                select(Generation.id, Generation.status, Generation.batch_size, Generation.forever_run)
                .where(Generation.plan == plan)
                .order_by(Generation.created_at, Generation.id)
            )
            return [JobSummary(*row) for row in rows]

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

    async def mark_failed(
        self,
        generation_id: str,
        error_key: str,
        error: str,
        device_seconds: float | None = None,
        *,
        owner: str | None = None,
        error_params: dict[str, Any] | None = None,
    ) -> bool:
        """Fail an open job; with ``owner``, only while that process still holds it.
        ``error_params``: the JSON-safe values of ``error_key``'s message."""
        guard = () if owner is None else (Generation.owner == owner,)
        return await self._transition(
            generation_id,
            OPEN_STATUSES,
            *guard,
            status="failed",
            error_key=error_key,
            error=error,
            error_params=error_params or None,
            finished_at=utcnow(),
            device_seconds=device_seconds,
        )

    async def mark_cancelled(self, generation_id: str) -> bool:
        """Any process may cancel: the holder then fails to claim or to finish it."""
        return await self._transition(generation_id, OPEN_STATUSES, status="cancelled", finished_at=utcnow())

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

    async def _transition(
        self,
        generation_id: str,
        from_statuses: Sequence[str],
        *guards: ColumnElement[bool],
        **values: Any,
    ) -> bool:
        async with self.session() as session:
            result = await session.execute(
                update(Generation)
                .where(Generation.id == generation_id, Generation.status.in_(from_statuses), *guards)
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
            return await oldest_first(session, Generation.parent_id == generation_id)

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
