"""The hot path's statements on direct lanes (a SQLite file, PostgreSQL) give what a
session gives, keep their transactions whole, raise what a session raises, wait for a busy
SQLite database without blocking the loop, and give their connections back."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError

from bot import db
from models.base import utcnow
from models.direct import IDLE_LANES
from models.governance import QuotaOverride
from models.moderation_store import ModerationStore
from models.quota_store import Limits, QuotaStore
from models.records import ImageRecord
from models.store import Lease, NewJob, Store
from models.tables import User
from pipeline.request import GenerationRequest
from tests.conftest import _drop_postgres_database, _fresh_postgres_database

_USERS = select(func.count()).select_from(User)


async def _store(url: str, *, direct: bool = True) -> Store:
    await asyncio.to_thread(db.upgrade, url)
    store = Store.from_url(url)
    assert store.direct is not None  # a SQLite file, or PostgreSQL
    if not direct:
        await store.direct.close()
        store.direct = None  # every unit of work through a session
    return store


@pytest.fixture
async def second_url(database_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """Another empty database on the same backend as ``database_url``."""
    if database_url.startswith("sqlite"):
        yield f"sqlite+aiosqlite:///{tmp_path / 'second.db'}"
        return
    url = await _fresh_postgres_database()
    try:
        yield url
    finally:
        await _drop_postgres_database(url)


async def _day_of_work(store: Store, lease: Lease) -> dict[str, object]:
    """One user's request stored with its reservation, claimed, finished with an image,
    settled; every record and figure the store hands back on the way."""
    quotas = QuotaStore(store)
    user = await store.ensure_user("discord", "42", "Ann", "zh-CN")
    request = GenerationRequest(
        prompt="a lighthouse, (storm:1.2)", negative_prompt="blur", seed=7, width=64, height=64
    )
    async with store.transaction():
        assert await quotas.reserve("discord:42", "g", "d:1", images=1, jobs=1, limits=Limits(images=5))
        await store.add_jobs(
            user.id,
            [NewJob(id="J1", request=request, group_id="G1", group_index=0, label="①")],
            chat_id="c1",
            guild_id="g1",
            route={"platform": "discord", "channel": "c1", "nested": {"a": [1, 2]}},
            roles=["moderator"],
            lease=lease,
        )
    claimed = (await store.mark_running_many(["J1", "missing"], lease))["J1"]
    image = ImageRecord("I1", "J1", 0, "2026/J1-0.png", 64, 64, 7, 3, "a lighthouse\nSteps: 20")
    finished = await store.finish("J1", [image], owner="proc-A", model_hash="abc123", device_seconds=1.5)
    settled = await quotas.settle(
        "J1", "discord:42", "g", "d:1", outcome="finished", images=1, seconds=1.5, reserved_images=1
    )
    again = await quotas.settle(
        "J1", "discord:42", "g", "d:1", outcome="finished", images=1, seconds=1.5, reserved_images=1
    )
    return {
        "user": user,
        "claimed": claimed,
        "finished": finished,
        "stored": await store.get("J1"),
        "settled": (settled, again),
        "usage": await quotas.usage("discord:42", "g", "d:1"),
    }


def _timeless(record: object) -> object:
    return dataclasses.replace(record, created_at=None, started_at=None, finished_at=None)  # type: ignore[type-var]


async def test_lanes_store_and_read_back_what_sessions_do(database_url: str, second_url: str) -> None:
    lanes = await _store(database_url)
    sessions = await _store(second_url, direct=False)
    try:
        lease = Lease("proc-A", utcnow().replace(microsecond=123456) + timedelta(seconds=30))
        fast, slow = await _day_of_work(lanes, lease), await _day_of_work(sessions, lease)
        assert lanes.direct is not None and lanes.direct.held >= 1  # the lanes did the work
    finally:
        await lanes.close()
        await sessions.close()
    assert fast["user"] == slow["user"]
    assert fast["settled"] == slow["settled"] == (True, False)
    assert fast["usage"] == slow["usage"]
    assert fast["usage"].images_used == 1 and fast["usage"].images_reserved == 0  # type: ignore[attr-defined]
    for name in ("claimed", "finished", "stored"):
        a, b = fast[name], slow[name]
        assert _timeless(a) == _timeless(b), name
        for field in ("created_at", "started_at", "finished_at", "lease_expires_at"):
            value, other = getattr(a, field), getattr(b, field)
            assert (value is None) == (other is None), (name, field)
            assert value is None or value.tzinfo == UTC, (name, field)  # aware, as a session reads it
    stored = fast["stored"]
    assert stored.route == {"platform": "discord", "channel": "c1", "nested": {"a": [1, 2]}}  # JSON
    assert stored.request.prompt == "a lighthouse, (storm:1.2)" and stored.label == "①"
    assert stored.lease_expires_at.microsecond == 123456  # the datetime went in and out whole
    assert stored.created_at is not None  # the column's Python-side default ran
    assert [i.path for i in stored.images] == ["2026/J1-0.png"]


async def test_a_lane_raises_what_a_session_raises(database_url: str, second_url: str) -> None:
    for url, direct in ((database_url, True), (second_url, False)):
        store = await _store(url, direct=direct)
        user = await store.ensure_user("console", "a", "A", "en")
        job = NewJob(id="J1", request=GenerationRequest(prompt="x", seed=1), group_id="G", group_index=0)
        other = dataclasses.replace(job, id="J2")
        try:
            await store.add_jobs(user.id, [job], chat_id=None, guild_id=None, route={}, roles=[])
            with pytest.raises(IntegrityError):  # the same id twice
                await store.add_jobs(user.id, [job], chat_id=None, guild_id=None, route={}, roles=[])
            with pytest.raises(IntegrityError):  # the same id twice, in one executemany
                await store.add_jobs(user.id, [other, job], chat_id=None, guild_id=None, route={}, roles=[])
            assert [j.id for j in await store.list_for_user(user.id)] == ["J1"]
        finally:
            await store.close()


async def test_a_transaction_that_needs_a_session_midway_stays_one(database_url: str) -> None:
    store = await _store(database_url)
    quotas = QuotaStore(store)
    try:

        async def reserve_then_orm(fail: bool) -> None:
            async with store.transaction():
                assert await quotas.reserve("u", "s", "p", images=2, jobs=1, limits=Limits())
                async with store.session() as session:  # ORM work joins the lane's transaction
                    session.add(
                        QuotaOverride(user_key="u", scope="s", images=9, gpu_seconds=None, set_by="m")
                    )
                assert await quotas.reserve("u", "s", "p", images=1, jobs=1, limits=Limits())
                if fail:
                    raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await reserve_then_orm(fail=True)
        assert (await quotas.usage("u", "s", "p")).images_reserved == 0
        async with store.session() as session:
            assert await session.scalar(select(func.count()).select_from(QuotaOverride)) == 0

        await reserve_then_orm(fail=False)
        assert (await quotas.usage("u", "s", "p")).images_reserved == 3
        async with store.session() as session:
            assert await session.scalar(select(func.count()).select_from(QuotaOverride)) == 1
        assert store.direct is not None and store.direct.busy == 0
    finally:
        await store.close()


async def test_one_statement_runs_as_a_unit_of_its_own(
    database_url: str, second_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Store.one``: its rows and rowcount, one commit heard by the engine's listeners,
    nothing kept when it raises, a part of an open transaction (undone with it); on
    PostgreSQL no transaction is opened around it (its statement is the transaction)."""
    from sqlalchemy import event, insert, update
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection

    begun: list[object] = []
    start = AsyncAdapt_asyncpg_connection._start_transaction

    async def counted(adapter: object) -> None:
        begun.append(adapter)
        await start(adapter)

    monkeypatch.setattr(AsyncAdapt_asyncpg_connection, "_start_transaction", counted)
    rename = update(User).where(User.id == bindparam("who")).values(display_name=bindparam("new"))
    for url, direct in ((database_url, True), (second_url, False)):
        store = await _store(url, direct=direct)
        commits: list[object] = []
        event.listen(store.engine.sync_engine, "commit", commits.append)
        try:
            user = await store.ensure_user("console", "a", "A", "en")
            commits.clear()
            renamed = await store.one(rename.returning(User.display_name), {"who": user.id, "new": "B"})
            assert renamed.all() == [("B",)] and renamed.rowcount == 1
            assert len(commits) == 1
            assert (await store.one(_USERS)).scalar() == 1
            twin = insert(User).values(platform="console", platform_user_id="a", display_name="C")
            with pytest.raises(IntegrityError):  # the same platform user twice
                await store.one(twin)
            assert (await store.one(_USERS)).scalar() == 1
            with pytest.raises(RuntimeError):
                async with store.transaction():
                    await store.one(rename, {"who": user.id, "new": "D"})
                    raise RuntimeError("undo it")
            assert (await store.find_user("console", "a")).display_name == "B"
            if direct and url.startswith("postgresql"):
                begun.clear()
                assert (await store.one(_USERS)).scalar() == 1
                assert begun == []  # no BEGIN (nor COMMIT): the statement is its transaction
                async with store.unit() as unit:
                    await unit.execute(_USERS)
                assert len(begun) == 1  # a unit of work opens one
            if store.direct is not None:
                assert store.direct.busy == 0
        finally:
            await store.close()


async def test_a_lane_waits_for_a_busy_database_without_blocking_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    store = await _store(f"sqlite+aiosqlite:///{path}")
    quotas = QuotaStore(store)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await quotas.reserve("u", "s", "p", images=1, jobs=1, limits=Limits())  # the row exists
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        reserving = asyncio.create_task(quotas.reserve("u", "s", "p", images=1, jobs=1, limits=Limits()))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.005)
            ticks += 1
        assert not reserving.done() and ticks == 20  # it waits; the loop goes on
        other.execute("COMMIT")
        assert await asyncio.wait_for(reserving, 10)
        assert (await quotas.usage("u", "s", "p")).images_reserved == 2
    finally:
        other.close()
        await store.close()


async def test_lanes_are_given_back_and_kept_few(database_url: str) -> None:
    store = await _store(database_url)
    moderation = ModerationStore(store)
    assert store.direct is not None
    try:
        await store.ensure_user("console", "x", "X", "en")
        gate = asyncio.Event()

        async def unit() -> int:
            async with store.unit() as lane:
                await gate.wait()  # every unit open at once
                return (await lane.execute(_USERS)).scalar()

        tasks = [asyncio.create_task(unit()) for _ in range(IDLE_LANES + 3)]
        for _ in range(1000):  # a server's connections take a moment to open
            if store.direct.busy == IDLE_LANES + 3:
                break
            await asyncio.sleep(0.005)
        assert store.direct.busy == IDLE_LANES + 3
        gate.set()
        assert await asyncio.gather(*tasks) == [1] * (IDLE_LANES + 3)
        assert store.direct.busy == 0 and store.direct.held == IDLE_LANES  # the rest went back to the pool
        assert store.engine.pool.checkedout() == IDLE_LANES
        assert await moderation.bans(["s"], "u") == []  # a read on a lane (an IN list)
    finally:
        await store.close()
    assert store.engine.pool.checkedout() == 0


async def test_an_in_memory_database_has_no_lanes() -> None:
    store = Store.from_url("sqlite+aiosqlite:///:memory:")
    try:
        assert store.direct is None  # its one connection is shared by the whole pool
    finally:
        await store.close()
