"""The quota repository: atomic admission, billing once, grants and overrides.

Admission is one conditional UPDATE after an idempotent upsert of the period row, so it
is atomic on SQLite (one writer at a time) and PostgreSQL (a blocked UPDATE re-checks its
WHERE on the row the winner committed): no interleaving admits more than the budget.
Settling a job inserts its ledger row first; only the transaction that inserted it
touches the usage, so a job is billed (or released) exactly once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Float, Integer, String, bindparam, case, delete, func, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from models.base import utcnow
from models.governance import QuotaLedger, QuotaOverride, QuotaUsage
from models.sql import insert_ignore
from models.store import Store
from models.tables import ENDED_STATUSES, Generation


@dataclass(frozen=True)
class Usage:
    images_used: int = 0
    images_reserved: int = 0
    jobs_open: int = 0
    seconds_used: float = 0.0
    bonus_images: int = 0
    bonus_seconds: float = 0.0


@dataclass(frozen=True)
class Limits:
    """What one admission may not exceed; None means unlimited."""

    images: int | None = None
    gpu_seconds: float | None = None
    open_jobs: int | None = None


@dataclass(frozen=True)
class Override:
    images: int | None
    gpu_seconds: float | None
    set_by: str


@dataclass(frozen=True)
class Settlement:
    """How one job's reservation ends (``QuotaStore.settle``): billed ``images`` and
    ``seconds`` (a finished job), and its ``reserved_images`` released."""

    generation_id: str
    user_key: str
    scope: str
    period: str
    outcome: str  # finished, failed or cancelled
    images: int
    seconds: float
    reserved_images: int

    @property
    def finished(self) -> bool:
        return self.outcome == "finished"

    def params(self) -> dict[str, Any]:
        """The parameters of its statements (``_settled_at_once``, ``_settlement``)."""
        return {
            **_key_params(self.user_key, self.scope, self.period),
            "add_images": self.images,
            "add_seconds": self.seconds,
            "reserved": self.reserved_images,
            "job": self.generation_id,
            "outcome_of_job": self.outcome,
            "images_of_job": self.images,
            "seconds_of_job": self.seconds,
            "at": utcnow(),
        }


class QuotaStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def reserve(
        self, user_key: str, scope: str, period: str, *, images: int, jobs: int, limits: Limits
    ) -> bool:
        """Add ``images``/``jobs`` to the open reservations if every limit still holds.

        Without limits nothing can be refused: inside a ``Store.transaction`` the usage row
        is then updated as the transaction's last statement (``Transaction.at_end``), so
        its lock is held for the commit alone, while one user's other requests and their
        jobs' settlements wait for it."""
        change = _reservation(
            limits.images is not None, limits.gpu_seconds is not None, limits.open_jobs is not None
        )
        params = {
            **_key_params(user_key, scope, period),
            "add_images": images,
            "add_jobs": jobs,
            "limit_images": limits.images,
            "limit_seconds": limits.gpu_seconds,
            "limit_jobs": limits.open_jobs,
        }
        outer = self.store.current_transaction()
        key = (user_key, scope, period)
        if outer is not None and limits == Limits():
            outer.at_end(lambda: self._reserve(change, params, key))
            return True
        return await self._reserve(change, params, key)

    async def _reserve(self, change: Any, params: dict[str, Any], key: tuple[str, str, str]) -> bool:
        async with self.store.unit() as session:
            if (await session.execute(change, params)).rowcount == 1:
                return True
            await _ensure_row(session, *key)  # a new period's first job
            return (await session.execute(change, params)).rowcount == 1

    async def settle(
        self,
        generation_id: str,
        user_key: str,
        scope: str,
        period: str,
        *,
        outcome: str,
        images: int,
        seconds: float,
        reserved_images: int,
    ) -> bool:
        """Bill a finished job's ``images``/``seconds`` and release its reservation (one
        open job and ``reserved_images``); False when this job was already settled."""
        job = Settlement(generation_id, user_key, scope, period, outcome, images, seconds, reserved_images)
        if self.store.engine.dialect.name == "postgresql":
            # one statement, atomic on its own: the usage row is locked only while it runs
            return (await self.store.one(_settled_at_once(job.finished), job.params())).first() is not None
        async with self.store.unit() as session:
            return await _settle_in(session, job)

    async def settle_many(self, jobs: Sequence[Settlement]) -> None:
        """``settle`` each of ``jobs`` (a device's finished jobs, stored together), all or
        none: on PostgreSQL in one round trip (an atomic ``executemany`` of the one-statement
        settlement), on SQLite in one transaction. Usage rows are locked in key order, so
        two workers settling the same users at once wait for each other, never deadlock."""
        if self.store.engine.dialect.name == "postgresql":
            in_order = sorted(jobs, key=lambda job: (job.user_key, job.scope, job.period))
            for finished in (True, False):
                rows = [job.params() for job in in_order if job.finished == finished]
                if rows:
                    await self.store.one(_settled_at_once(finished), rows)
            return
        async with self.store.unit() as session:
            for job in jobs:
                await _settle_in(session, job)

    async def unsettled(self, since: datetime) -> list[str]:
        """The jobs made since ``since`` that ended (finished, failed or cancelled) with no
        ledger row, oldest end first: their settlement was lost (the process stopped
        between storing the end and settling it, or the settlement failed). Only jobs that
        ended after the first settlement ever: before it, jobs ran without quotas. (By
        creation time, which the status index orders.)"""
        first = select(func.min(_LEDGER.created_at)).scalar_subquery()
        settled = select(_LEDGER.generation_id).where(_LEDGER.generation_id == _JOBS.id).exists()
        query = (
            select(_JOBS.id)
            .where(
                _JOBS.status.in_(ENDED_STATUSES),
                _JOBS.created_at >= since,
                _JOBS.finished_at >= first,
                ~settled,
            )
            .order_by(_JOBS.finished_at)
        )
        async with self.store.session() as session:
            return list(await session.scalars(query))

    async def release(self, user_key: str, scope: str, period: str, *, images: int, jobs: int) -> None:
        """Undo a reservation whose request was never stored (no job exists to settle)."""
        params = {**_key_params(user_key, scope, period), "reserved": images, "jobs": jobs}
        async with self.store.unit() as session:
            await session.execute(_RELEASE, params)

    async def usage(self, user_key: str, scope: str, period: str) -> Usage:
        async with self.store.session() as session:
            found = (await session.execute(_READ_USAGE, _key_params(user_key, scope, period))).first()
            if found is None:
                return Usage()
            return Usage(
                found.images_used,
                found.images_reserved,
                found.jobs_open,
                found.seconds_used,
                found.bonus_images,
                found.bonus_seconds,
            )

    async def grant(self, user_key: str, scope: str, period: str, *, images: int, seconds: float) -> None:
        async with self.store.session() as session:
            await _ensure_row(session, user_key, scope, period)
            await session.execute(
                _USAGE_ROW.values(
                    bonus_images=_USAGE.bonus_images + images, bonus_seconds=_USAGE.bonus_seconds + seconds
                ),
                _key_params(user_key, scope, period),
            )

    async def reset(self, user_key: str, scope: str, period: str) -> None:
        """Forget this period's usage and grants; reservations of open jobs stay."""
        async with self.store.session() as session:
            await session.execute(
                _USAGE_ROW.values(images_used=0, seconds_used=0.0, bonus_images=0, bonus_seconds=0.0),
                _key_params(user_key, scope, period),
            )

    async def set_override(
        self, user_key: str, scope: str, *, images: int | None, gpu_seconds: float | None, set_by: str
    ) -> None:
        async with self.store.session() as session:
            await session.execute(
                delete(QuotaOverride).where(QuotaOverride.user_key == user_key, QuotaOverride.scope == scope)
            )
            session.add(
                QuotaOverride(
                    user_key=user_key, scope=scope, images=images, gpu_seconds=gpu_seconds, set_by=set_by
                )
            )
        self.store.recent.changed(OVERRIDES)

    async def override(self, user_key: str, scope: str) -> Override | None:

        async def read() -> Override | None:
            async with self.store.unit() as session:
                found = (await session.execute(_OVERRIDE, {"user_key": user_key, "scope": scope})).first()
                return Override(found.images, found.gpu_seconds, found.set_by) if found else None

        return await self.store.recent.get(OVERRIDES, (user_key, scope), read)


# The statements of every request (a reservation) and every job's end (a settlement) are
# built once (building one costs more than running it), on the tables rather than the
# mapped classes (rows, without the ORM's bookkeeping); the others use the same pieces.
_USAGE = QuotaUsage.__table__.c
_LEDGER = QuotaLedger.__table__.c
_JOBS = Generation.__table__.c
OVERRIDES = QuotaOverride.__tablename__  # its recent answers (models/recent.py)
_OVERRIDES = QuotaOverride.__table__.c
_OVERRIDE = select(*_OVERRIDES).where(
    _OVERRIDES.user_key == bindparam("user_key"), _OVERRIDES.scope == bindparam("scope")
)
_KEY = (
    _USAGE.user_key == bindparam("key_user"),
    _USAGE.scope == bindparam("key_scope"),
    _USAGE.period == bindparam("key_period"),
)
_READ_USAGE = select(*_USAGE).where(*_KEY)
_USAGE_ROW = update(QuotaUsage.__table__).where(*_KEY)  # the period's row; .values() to change it


def _key_params(user_key: str, scope: str, period: str) -> dict[str, str]:
    return {"key_user": user_key, "key_scope": scope, "key_period": period}


@functools.cache
def _reservation(images: bool, seconds: bool, jobs: bool) -> Any:
    """The admission UPDATE with the limits in force (``images``, ``seconds``, ``jobs``)."""
    row = _USAGE
    asked_images, asked_jobs = bindparam("add_images", type_=Integer), bindparam("add_jobs", type_=Integer)
    conditions = []
    if images:
        limit = bindparam("limit_images", type_=Integer)
        conditions.append(row.images_used + row.images_reserved + asked_images <= limit + row.bonus_images)
    if seconds:
        conditions.append(row.seconds_used < bindparam("limit_seconds", type_=Float) + row.bonus_seconds)
    if jobs:
        conditions.append(row.jobs_open + asked_jobs <= bindparam("limit_jobs", type_=Integer))
    return _USAGE_ROW.where(*conditions).values(
        images_reserved=row.images_reserved + asked_images, jobs_open=row.jobs_open + asked_jobs
    )


def _settlement(finished: bool) -> Any:
    """Bill a finished job's images and seconds (``finished``) and release its reservation."""
    return _USAGE_ROW.values(**_settlement_values(finished))


def _settlement_values(finished: bool) -> dict[str, object]:
    """What a settlement changes in the usage row (``_settlement``)."""
    row = _USAGE
    values: dict[str, object] = {}
    if finished:
        values.update(
            images_used=row.images_used + bindparam("add_images", type_=Integer),
            seconds_used=row.seconds_used + bindparam("add_seconds", type_=Float),
        )
    values.update(
        images_reserved=_floor_zero(row.images_reserved, bindparam("reserved", type_=Integer)),
        jobs_open=_floor_zero(row.jobs_open, 1),
    )
    return values


def _floor_zero(column: object, amount: object) -> object:
    return case((column >= amount, column - amount), else_=0)  # type: ignore[operator]


async def _ensure_row(session: AsyncSession, user_key: str, scope: str, period: str) -> None:
    """Make the usage row if it is missing."""
    await session.execute(
        insert_ignore(session, QuotaUsage).values(
            user_key=user_key,
            scope=scope,
            period=period,
            images_used=0,
            images_reserved=0,
            jobs_open=0,
            seconds_used=0.0,
            bonus_images=0,
            bonus_seconds=0.0,
        )
    )


async def _settle_in(session: Any, job: Settlement) -> bool:
    """Settle ``job`` in ``session``'s unit of work (SQLite): its ledger row first, then its
    usage row (made when its reservation was in another period); False when it was settled."""
    ledger = {
        "generation_id": job.generation_id,
        "user_key": job.user_key,
        "scope": job.scope,
        "period": job.period,
        "outcome": job.outcome,
        "images": job.images,
        "seconds": job.seconds,
    }
    if (await session.execute(insert_ignore(session, QuotaLedger.__table__), ledger)).rowcount != 1:
        return False
    change, params = _SETTLE_FINISHED if job.finished else _SETTLE_ENDED, job.params()
    if (await session.execute(change, params)).rowcount != 1:  # its reservation was in another period
        await _ensure_row(session, job.user_key, job.scope, job.period)
        await session.execute(change, params)
    return True


@functools.cache
def _settled_at_once(finished: bool) -> Any:
    """PostgreSQL's settlement in one statement: the ledger row is inserted unless the job
    was settled before, and only then is the usage row changed as ``_settlement`` changes
    it, or made (the reservation was in another period). Returns the usage row's id when
    this statement settled the job; no row when it had been settled."""
    from sqlalchemy.dialects.postgresql import insert

    billed = (
        insert(QuotaLedger.__table__)
        .values(
            generation_id=bindparam("job"),
            user_key=bindparam("key_user"),
            scope=bindparam("key_scope"),
            period=bindparam("key_period"),
            outcome=bindparam("outcome_of_job"),
            images=bindparam("images_of_job", type_=Integer),
            seconds=bindparam("seconds_of_job", type_=Float),
            created_at=bindparam("at"),
        )
        .on_conflict_do_nothing()
        .returning(_LEDGER.generation_id)
        .cte("billed")
    )
    zero, none = literal(0, Integer), literal(0.0, Float)
    fresh = select(  # the period's row as the settlement leaves a new one
        bindparam("key_user", type_=String),
        bindparam("key_scope", type_=String),
        bindparam("key_period", type_=String),
        bindparam("add_images", type_=Integer) if finished else zero,
        bindparam("add_seconds", type_=Float) if finished else none,
        zero,
        zero,
        zero,
        none,
    ).where(select(billed.c.generation_id).exists())
    columns = ("user_key", "scope", "period", "images_used", "seconds_used", "images_reserved", "jobs_open",
               "bonus_images", "bonus_seconds")  # fmt: skip
    return (
        insert(QuotaUsage.__table__)
        .from_select(list(columns), fresh)
        .on_conflict_do_update(
            index_elements=[_USAGE.user_key, _USAGE.scope, _USAGE.period],
            set_=_settlement_values(finished),
        )
        .returning(_USAGE.id)
        .add_cte(billed)
    )


_SETTLE_FINISHED = _settlement(True)
_SETTLE_ENDED = _settlement(False)
_RELEASE = _USAGE_ROW.values(
    images_reserved=_floor_zero(_USAGE.images_reserved, bindparam("reserved", type_=Integer)),
    jobs_open=_floor_zero(_USAGE.jobs_open, bindparam("jobs", type_=Integer)),
)
