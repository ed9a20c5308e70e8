"""The quota repository: atomic admission, billing once, grants and overrides.

Admission is one conditional UPDATE after an idempotent upsert of the period row, so it
is atomic on SQLite (one writer at a time) and PostgreSQL (a blocked UPDATE re-checks its
WHERE on the row the winner committed): no interleaving admits more than the budget.
Settling a job inserts its ledger row first; only the transaction that inserted it
touches the usage, so a job is billed (or released) exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from models.governance import QuotaLedger, QuotaOverride, QuotaUsage
from models.sql import insert_ignore
from models.store import Store


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


class QuotaStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def reserve(
        self, user_key: str, scope: str, period: str, *, images: int, jobs: int, limits: Limits
    ) -> bool:
        """Add ``images``/``jobs`` to the open reservations if every limit still holds."""
        row = QuotaUsage
        conditions = [row.user_key == user_key, row.scope == scope, row.period == period]
        if limits.images is not None:
            conditions.append(
                row.images_used + row.images_reserved + images <= limits.images + row.bonus_images
            )
        if limits.gpu_seconds is not None:
            conditions.append(row.seconds_used < limits.gpu_seconds + row.bonus_seconds)
        if limits.open_jobs is not None:
            conditions.append(row.jobs_open + jobs <= limits.open_jobs)
        change = (
            update(row)
            .where(*conditions)
            .values(images_reserved=row.images_reserved + images, jobs_open=row.jobs_open + jobs)
        )
        async with self.store.session() as session:
            if (await session.execute(change)).rowcount == 1:
                return True
            await _ensure_row(session, user_key, scope, period)  # a new period's first job
            return (await session.execute(change)).rowcount == 1

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
        async with self.store.session() as session:
            inserted = await session.execute(
                insert_ignore(session, QuotaLedger).values(
                    generation_id=generation_id,
                    user_key=user_key,
                    scope=scope,
                    period=period,
                    outcome=outcome,
                    images=images,
                    seconds=seconds,
                )
            )
            if inserted.rowcount != 1:
                return False
            row = QuotaUsage
            values: dict[str, object] = {}
            if outcome == "finished":
                values.update(images_used=row.images_used + images, seconds_used=row.seconds_used + seconds)
            values.update(
                images_reserved=_floor_zero(row.images_reserved, reserved_images),
                jobs_open=_floor_zero(row.jobs_open, 1),
            )
            change = update(row).where(*_key(user_key, scope, period)).values(**values)
            if (await session.execute(change)).rowcount != 1:  # its reservation was in another period
                await _ensure_row(session, user_key, scope, period)
                await session.execute(change)
            return True

    async def release(self, user_key: str, scope: str, period: str, *, images: int, jobs: int) -> None:
        """Undo a reservation whose request was never stored (no job exists to settle)."""
        row = QuotaUsage
        async with self.store.session() as session:
            await session.execute(
                update(row)
                .where(*_key(user_key, scope, period))
                .values(
                    images_reserved=_floor_zero(row.images_reserved, images),
                    jobs_open=_floor_zero(row.jobs_open, jobs),
                )
            )

    async def usage(self, user_key: str, scope: str, period: str) -> Usage:
        async with self.store.session() as session:
            found = await session.scalar(select(QuotaUsage).where(*_key(user_key, scope, period)))
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
            row = QuotaUsage
            await session.execute(
                update(row)
                .where(*_key(user_key, scope, period))
                .values(bonus_images=row.bonus_images + images, bonus_seconds=row.bonus_seconds + seconds)
            )

    async def reset(self, user_key: str, scope: str, period: str) -> None:
        """Forget this period's usage and grants; reservations of open jobs stay."""
        async with self.store.session() as session:
            await session.execute(
                update(QuotaUsage)
                .where(*_key(user_key, scope, period))
                .values(images_used=0, seconds_used=0.0, bonus_images=0, bonus_seconds=0.0)
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

    async def override(self, user_key: str, scope: str) -> Override | None:
        async with self.store.session() as session:
            found = await session.scalar(
                select(QuotaOverride).where(QuotaOverride.user_key == user_key, QuotaOverride.scope == scope)
            )
            return Override(found.images, found.gpu_seconds, found.set_by) if found else None


def _key(user_key: str, scope: str, period: str) -> tuple:
    return (QuotaUsage.user_key == user_key, QuotaUsage.scope == scope, QuotaUsage.period == period)


def _floor_zero(column: object, amount: int) -> object:
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
