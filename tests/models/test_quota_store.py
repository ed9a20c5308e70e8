"""Settling a job's quota: billed once, its reservation released, a new period's row made
when the reservation was in another one; the same on SQLite and on PostgreSQL (where the
settlement is one statement)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from bot import db
from models.governance import QuotaLedger
from models.quota_store import Limits, QuotaStore, Settlement, Usage
from models.store import Store
from tests.conftest import wait_for_lock_waiters


async def _quotas(url: str) -> QuotaStore:
    await asyncio.to_thread(db.upgrade, url)
    return QuotaStore(Store.from_url(url))


async def _ledger(quotas: QuotaStore) -> list[tuple[str, str, int, float]]:
    ledger = QuotaLedger.__table__.c
    async with quotas.store.session() as session:
        rows = await session.execute(
            select(ledger.generation_id, ledger.outcome, ledger.images, ledger.seconds).order_by(
                ledger.generation_id
            )
        )
        return [tuple(row) for row in rows]


async def test_a_settlement_bills_once_and_releases_the_reservation(database_url: str) -> None:
    quotas = await _quotas(database_url)
    try:
        for _ in range(3):
            assert await quotas.reserve("u", "g", "day:1", images=2, jobs=1, limits=Limits(images=10))
        settle = quotas.settle
        assert await settle(
            "J1", "u", "g", "day:1", outcome="finished", images=2, seconds=1.5, reserved_images=2
        )
        assert await quotas.usage("u", "g", "day:1") == Usage(2, 4, 2, 1.5)
        assert not await settle(
            "J1", "u", "g", "day:1", outcome="finished", images=2, seconds=1.5, reserved_images=2
        )
        assert await quotas.usage("u", "g", "day:1") == Usage(2, 4, 2, 1.5)  # billed once
        # a failed job bills nothing and releases what it held
        assert await settle(
            "J2", "u", "g", "day:1", outcome="failed", images=0, seconds=0.7, reserved_images=2
        )
        assert await quotas.usage("u", "g", "day:1") == Usage(2, 2, 1, 1.5)
        # two settlements of one job at once (a worker's end and a recovery): one bills
        both = await asyncio.gather(
            *(
                settle("J3", "u", "g", "day:1", outcome="finished", images=2, seconds=0.5, reserved_images=2)
                for _ in range(2)
            )
        )
        assert sorted(both) == [False, True]
        assert await quotas.usage("u", "g", "day:1") == Usage(4, 0, 0, 2.0)
        assert await _ledger(quotas) == [
            ("J1", "finished", 2, 1.5),
            ("J2", "failed", 0, 0.7),
            ("J3", "finished", 2, 0.5),
        ]
        # reserved yesterday, ended today: today's row is made and billed, nothing held
        assert await settle(
            "J4", "u", "g", "day:2", outcome="finished", images=1, seconds=0.25, reserved_images=1
        )
        assert await quotas.usage("u", "g", "day:2") == Usage(1, 0, 0, 0.25)
        assert await settle(
            "J5", "u", "g", "day:3", outcome="cancelled", images=0, seconds=0, reserved_images=1
        )
        assert await quotas.usage("u", "g", "day:3") == Usage(0, 0, 0, 0.0)
        async with quotas.store.session() as session:
            assert await session.scalar(select(func.count()).select_from(QuotaLedger)) == 5
    finally:
        await quotas.store.close()


async def test_settling_several_at_once_bills_each_as_one_by_one(database_url: str) -> None:
    quotas = await _quotas(database_url)
    try:
        for _ in range(3):
            assert await quotas.reserve("u", "g", "day:1", images=2, jobs=1, limits=Limits(images=10))
        assert await quotas.reserve("v", "g", "day:1", images=1, jobs=1, limits=Limits())
        assert await quotas.settle(
            "J1", "u", "g", "day:1", outcome="finished", images=2, seconds=1.0, reserved_images=2
        )
        await quotas.settle_many(
            [
                Settlement("J1", "u", "g", "day:1", "finished", 2, 1.0, 2),  # settled before: not again
                Settlement("J2", "u", "g", "day:1", "finished", 2, 0.5, 2),
                Settlement("J3", "u", "g", "day:1", "failed", 0, 0.0, 2),
                Settlement("J4", "v", "g", "day:1", "finished", 1, 0.25, 1),
                Settlement("J5", "v", "g", "day:2", "finished", 1, 0.25, 1),  # reserved the day before
            ]
        )
        assert await quotas.usage("u", "g", "day:1") == Usage(4, 0, 0, 1.5)
        assert await quotas.usage("v", "g", "day:1") == Usage(1, 0, 0, 0.25)
        assert await quotas.usage("v", "g", "day:2") == Usage(1, 0, 0, 0.25)
        assert [row[:2] for row in await _ledger(quotas)] == [
            ("J1", "finished"), ("J2", "finished"), ("J3", "failed"), ("J4", "finished"), ("J5", "finished"),
        ]  # fmt: skip
        await quotas.settle_many(
            [Settlement("J2", "u", "g", "day:1", "finished", 2, 0.5, 2)]
        )  # again: nothing
        assert await quotas.usage("u", "g", "day:1") == Usage(4, 0, 0, 1.5)
    finally:
        await quotas.store.close()


async def test_settlements_lock_usage_rows_in_one_order(database_url: str) -> None:
    """A group's settlements take the users' usage rows in key order, as any other writer
    that takes them in that order: they wait for each other, never deadlock (PostgreSQL
    would fail one of them after a second)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time")
    import asyncpg

    quotas = await _quotas(database_url)
    url = database_url.replace("postgresql+asyncpg://", "postgresql://")
    other = await asyncpg.connect(url)
    try:
        for user_key in ("a", "b"):
            assert await quotas.reserve(user_key, "g", "day:1", images=1, jobs=1, limits=Limits())
        touch = "UPDATE quota_usage SET jobs_open = jobs_open WHERE user_key = $1"
        async with other.transaction():
            await other.execute(touch, "a")
            settling = asyncio.create_task(
                quotas.settle_many(
                    [
                        Settlement("J1", "b", "g", "day:1", "finished", 1, 0.5, 1),
                        Settlement("J2", "a", "g", "day:1", "finished", 1, 0.5, 1),
                    ]
                )
            )
            await wait_for_lock_waiters(database_url, 1)
            await other.execute(touch, "b")
        await asyncio.wait_for(settling, 10)
        assert await quotas.usage("a", "g", "day:1") == Usage(1, 0, 0, 0.5)
        assert await quotas.usage("b", "g", "day:1") == Usage(1, 0, 0, 0.5)
    finally:
        await other.close()
        await quotas.store.close()


async def test_an_unlimited_reservation_in_a_transaction_is_written_as_it_commits(database_url: str) -> None:
    """Nothing can refuse a reservation without limits, so inside a transaction it is the
    last statement before the commit: until then the usage row is neither written nor
    locked (another writer of it goes on at once), and a rollback leaves no trace. One with
    a limit decides, and so writes, at once."""
    quotas = await _quotas(database_url)
    store = quotas.store
    other = None
    try:
        assert await quotas.reserve("u", "g", "day:1", images=1, jobs=1, limits=Limits())  # the row exists
        assert await quotas.usage("u", "g", "day:1") == Usage(0, 1, 1, 0.0)
        if database_url.startswith("postgresql"):
            import asyncpg

            other = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
            await other.execute("SET lock_timeout = '2s'")
        async with store.transaction():
            assert await quotas.reserve("u", "g", "day:1", images=2, jobs=1, limits=Limits())
            assert await quotas.usage("u", "g", "day:1") == Usage(0, 1, 1, 0.0)  # not yet
            if other is not None:  # the row is not locked: this does not wait for the commit
                await other.execute("UPDATE quota_usage SET bonus_images = 5 WHERE user_key = 'u'")
        assert await quotas.usage("u", "g", "day:1") == Usage(0, 3, 2, 0.0, 5 if other else 0)

        with pytest.raises(RuntimeError):
            async with store.transaction():
                assert await quotas.reserve("u", "g", "day:1", images=4, jobs=1, limits=Limits())
                raise RuntimeError("not stored")
        assert (await quotas.usage("u", "g", "day:1")).images_reserved == 3

        async with store.transaction():
            assert await quotas.reserve("u", "g", "day:1", images=1, jobs=1, limits=Limits(images=10))
            assert (await quotas.usage("u", "g", "day:1")).images_reserved == 4  # at once
        assert (await quotas.usage("u", "g", "day:1")).images_reserved == 4
    finally:
        if other is not None:
            await other.close()
        await store.close()
