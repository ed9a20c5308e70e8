"""Which process holds which job: leases, claims, and taking jobs over.

Several processes may share one database. An open job is held by one of them: its
``owner`` with a lease (``lease_expires_at``) that the owner's heartbeat renews (``renew``).
Another process takes a job over (``adopt``) only when nobody holds it, its lease ran out,
or its owner is known to be gone; claiming, finishing and failing are guarded by the owner
too, so a process that lost a job (it stalled past its lease) can no longer end it.

These operations are methods of :class:`models.store.Store`, which inherits them from
``_JobLeases``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, String, and_, bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from models.base import UTCDateTime, utcnow
from models.records import GenerationRecord
from models.store_rows import JOB_WITH_USER, JOBS, _in_id_order, _record, _row_user, oldest_first
from models.tables import OPEN_STATUSES, Generation


@dataclass(frozen=True)
class Lease:
    """A process's hold on jobs: who holds them and until when, unless it renews in time."""

    owner: str
    expires_at: datetime


class _JobLeases:
    """The job-ownership operations of :class:`models.store.Store`: claiming and holding
    queued jobs, renewing and releasing leases, adopting jobs nobody holds any more. The
    store gives them its sessions (``session``) and its guarded status update
    (``_transition``)."""

    if TYPE_CHECKING:
        engine: Any

        def session(self) -> AbstractAsyncContextManager[AsyncSession]: ...

        def unit(self) -> AbstractAsyncContextManager[Any]: ...

        async def one(self, statement: Any, params: Mapping[str, Any] | None = None) -> Any: ...

        async def _transition(
            self,
            generation_id: str,
            from_statuses: Sequence[str],
            *guards: ColumnElement[bool],
            **values: Any,
        ) -> bool: ...

    async def mark_running(self, generation_id: str, lease: Lease) -> GenerationRecord | None:
        """Claim a queued job for ``lease.owner``; counts the attempt. Returns the job as
        claimed (read in the same transaction: who asked and where its events go), or None
        when it is no longer queued or another live process holds it."""
        return (await self.mark_running_many([generation_id], lease)).get(generation_id)

    async def mark_running_many(
        self, generation_ids: Sequence[str], lease: Lease
    ) -> dict[str, GenerationRecord]:
        """Claim several queued jobs (a micro-batch's) as ``mark_running`` claims one, in one
        statement: the jobs claimed (with their users), by id; one no longer queued, or
        held by another live process, is not among them."""
        if not generation_ids:
            return {}
        if len(generation_ids) == 1:
            statement = _CLAIM
        else:
            statement = _CLAIM_IN_ORDER if self.engine.dialect.name == "postgresql" else _CLAIM_SOME
        return await self._take_queued(statement, generation_ids, lease)

    async def _take_queued(
        self, statement: Any, generation_ids: Sequence[str], lease: Lease
    ) -> dict[str, GenerationRecord]:
        """Put the queued jobs that ``lease.owner`` may take under its lease with
        ``statement`` (a claim, or ``_HOLD``; of one job, or of several); the jobs taken
        (read in the same transaction), by id."""
        picked = {"id": generation_ids[0]} if len(generation_ids) == 1 else {"ids": list(generation_ids)}
        params = {
            **picked,
            "holder": lease.owner,
            "until": lease.expires_at,
            "now": utcnow(),
        }
        rows = (await self.one(statement, params)).all()  # one statement: atomic on its own
        # a queued job has no images yet
        return {row.id: _record(row, user=_row_user(row), images=()) for row in rows}

    async def requeue_interrupted(self, generation_id: str, owner: str) -> bool:
        """A running job of ``owner`` that stopped without an end (shutdown, a dead process
        taken over) goes back to the queue; its attempt stays counted."""
        return await self._transition(generation_id, ("running",), Generation.owner == owner, status="queued")

    async def renew(self, lease: Lease) -> int:
        """Extend every open job held by ``lease.owner`` (one statement); returns how many."""
        async with self.session() as session:
            result = await session.execute(
                update(Generation)
                .where(_in_id_order(Generation.owner == lease.owner, Generation.status.in_(OPEN_STATUSES)))
                .values(lease_expires_at=lease.expires_at)
            )
            return result.rowcount

    async def hold(self, generation_id: str, lease: Lease) -> GenerationRecord | None:
        """Hold a queued job for ``lease.owner`` without starting it (a worker took it from
        the shared queue): if that worker dies, the job is recovered when its lease runs
        out. None when the job is no longer queued or a live process holds it."""
        return (await self._take_queued(_HOLD, [generation_id], lease)).get(generation_id)

    async def release_job(self, generation_id: str, owner: str) -> bool:
        """Give one queued job of ``owner`` back to the shared queue (nobody holds it)."""
        return await self._transition(
            generation_id, ("queued",), Generation.owner == owner, owner=None, lease_expires_at=None
        )

    async def unowned_queued(self, *, before: datetime, limit: int = 500) -> list[GenerationRecord]:
        """Queued jobs nobody holds (the shared queue's, or released ones) stored before
        ``before``, oldest first, at most ``limit``."""
        async with self.session() as session:
            return await oldest_first(
                session,
                Generation.status == "queued",
                Generation.owner.is_(None),
                Generation.created_at < before,
                limit=limit,
            )

    async def release(self, owner: str) -> int:
        """Give up every open job of ``owner`` (a graceful stop): any process may take them
        at once, without waiting for the lease to run out. Returns how many."""
        async with self.session() as session:
            result = await session.execute(
                update(Generation)
                .where(_in_id_order(Generation.owner == owner, Generation.status.in_(OPEN_STATUSES)))
                .values(owner=None, lease_expires_at=None)
            )
            return result.rowcount

    async def adopt(
        self, lease: Lease, *, gone: Callable[[str], bool] | None = None, unowned: bool = True
    ) -> list[GenerationRecord]:
        """Take over the open jobs nobody holds any more: no owner, a lease that ran out, or
        an owner that ``gone`` says has exited. Jobs of a live holder are never touched.

        Returns the jobs taken, oldest first, with the status they had (a "running" one was
        interrupted). Each job is taken in its own guarded update, so of two processes
        adopting at once exactly one gets it, and the update never waits on a second row
        lock (no deadlock with a holder renewing its leases).

        Without ``unowned``, queued jobs nobody holds are left alone: they wait in a shared
        queue (the procrastinate backend), not in a process that is gone."""
        now = utcnow()
        open_ = Generation.status.in_(OPEN_STATUSES)
        async with self.session() as session:
            expired = or_(
                Generation.owner.is_(None),
                Generation.lease_expires_at.is_(None),
                Generation.lease_expires_at < now,
            )
            if not unowned:
                expired = and_(expired, or_(Generation.owner.is_not(None), Generation.status != "queued"))
            ids = set(await session.scalars(select(Generation.id).where(open_, expired)))
            dead: list[str] = []
            if gone is not None:
                owners = await session.scalars(
                    select(Generation.owner)
                    .where(open_, Generation.owner.is_not(None), Generation.owner != lease.owner)
                    .distinct()
                )
                dead = [owner for owner in owners if owner and gone(owner)]
                if dead:
                    ids.update(
                        await session.scalars(select(Generation.id).where(open_, Generation.owner.in_(dead)))
                    )
        takeable = or_(expired, Generation.owner.in_(dead)) if dead else expired
        won = []
        for generation_id in sorted(ids):
            async with self.session() as session:
                result = await session.execute(
                    update(Generation)
                    .where(Generation.id == generation_id, open_, takeable)
                    .values(owner=lease.owner, lease_expires_at=lease.expires_at)
                )
                if result.rowcount == 1:
                    won.append(generation_id)
        if not won:
            return []
        async with self.session() as session:
            return await oldest_first(session, Generation.id.in_(won))


def _takeable(owner: Any, now: Any) -> ColumnElement[bool]:
    """The job is free for ``owner``: held by nobody, by ``owner`` itself, or by a process
    whose lease ran out."""
    return or_(
        JOBS.c.owner.is_(None),
        JOBS.c.owner == owner,
        JOBS.c.lease_expires_at.is_(None),
        JOBS.c.lease_expires_at < now,
    )


def _taking(picked: ColumnElement[bool], **values: Any) -> Any:
    """The UPDATE that puts the queued jobs ``picked`` (the one job ``id``, or the jobs
    ``ids``) that ``holder`` may take under its lease (``until``), with ``values``,
    returning them; built once (building a statement costs more than running it)."""
    return (
        update(JOBS)
        .where(
            picked,
            JOBS.c.status == "queued",
            _takeable(bindparam("holder", type_=String), bindparam("now", type_=UTCDateTime())),
        )
        .values(owner=bindparam("holder"), lease_expires_at=bindparam("until"), **values)
        .returning(*JOB_WITH_USER)
    )


# one job by its id: the common case, with no list for the statement to be expanded by
_ONE = JOBS.c.id == bindparam("id", type_=String)
_SOME = JOBS.c.id.in_(bindparam("ids", expanding=True))
_CLAIMED = {"status": "running", "started_at": bindparam("now"), "attempts": JOBS.c.attempts + 1}
_CLAIM = _taking(_ONE, **_CLAIMED)
# several jobs: on PostgreSQL their rows locked in id order first; SQLite has one writer at
# a time, and the ordering subquery would cost it a tenth of its claims
_CLAIM_IN_ORDER = _taking(_in_id_order(_SOME), **_CLAIMED)
_CLAIM_SOME = _taking(_SOME, **_CLAIMED)
_HOLD = _taking(_ONE)
