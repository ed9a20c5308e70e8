"""The store on SQLite and PostgreSQL: migrations, guarded status changes, records."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from bot import db
from models import Base
from models.base import utcnow
from models.records import ImageRecord, UserRecord
from models.shared_files import SharedFiles
from models.store import Finishing, Lease, NewJob, Store
from pipeline.request import GenerationRequest
from tests.conftest import terminate_other_connections, wait_for_lock_waiters


@pytest.fixture
async def store(database_url: str):
    await asyncio.to_thread(db.upgrade, database_url)
    store = Store.from_url(database_url)
    yield store
    await store.close()


def _request(**changes) -> GenerationRequest:
    base = GenerationRequest(
        prompt="a cat", seed=5, guidance_scale=7, num_inference_steps=4, width=64, height=64
    )
    return base.replace(**changes)


def lease(owner: str, seconds: float = 30) -> Lease:
    """``owner``'s hold for ``seconds`` from now (negative: it ran out that long ago)."""
    return Lease(owner, utcnow() + timedelta(seconds=seconds))


async def _add(
    store: Store, *ids: str, request: GenerationRequest | None = None, held: Lease | None = None
) -> int:
    user = await store.ensure_user("console", "alice", "Alice", "en")
    jobs = [
        NewJob(id=i, request=request or _request(), group_id="G" + ids[0], group_index=n)
        for n, i in enumerate(ids)
    ]
    await store.add_jobs(
        user.id,
        jobs,
        chat_id="c1",
        guild_id=None,
        route={"platform": "console", "chat_id": "c1"},
        roles=["moderator"],
        lease=held,
    )
    return user.id


async def test_migrations_match_the_models(store: Store) -> None:
    """The initial revision creates exactly the tables and columns the ORM declares."""

    def columns(connection):
        inspector = inspect(connection)
        return {t: {c["name"] for c in inspector.get_columns(t)} for t in inspector.get_table_names()}

    async with store.engine.connect() as connection:
        found = await connection.run_sync(columns)
    for table in Base.metadata.sorted_tables:
        assert found[table.name] == {c.name for c in table.columns}, table.name
    assert "alembic_version" in found


async def test_a_job_keeps_every_parameter_losslessly(store: Store) -> None:
    request = _request(
        guidance_scale=7.0,
        subseed=99,
        subseed_strength=0.25,
        clip_skip=2,
        ensd=31337,
        rng="NV",
        styles=("anime",),
        extra={"Hires upscale": 2},
    )
    await _add(store, "J1", request=request)
    record = await store.get("J1")
    assert record is not None
    assert record.request == request
    assert isinstance(record.request.guidance_scale, float)
    assert record.status == "queued"
    assert record.user.display_name == "Alice"
    assert record.route == {"platform": "console", "chat_id": "c1"}
    assert (record.thread_key, record.forever_run) == (None, None)
    assert record.actor_roles == ("moderator",)


async def test_a_unit_of_work_cancelled_midway_stores_nothing_and_gives_its_connection_back(
    store: Store,
) -> None:
    await _add(store, "J1")
    inside = asyncio.Event()

    async def claim_then_wait() -> None:
        async with store.transaction():
            assert await store.mark_running("J1", lease("A"))
            inside.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(claim_then_wait())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await store.get("J1")).status == "queued"  # rolled back
    held = 0 if store.direct is None else store.direct.held  # a SQLite file's lanes stay checked out
    assert store.engine.pool.checkedout() == held
    assert store.direct is None or store.direct.busy == 0
    for _ in range(3):  # the pool's connections still serve
        assert await store.mark_running("J1", lease("A"))
        assert await store.requeue_interrupted("J1", "A")


async def test_status_changes_happen_once(store: Store) -> None:
    await _add(store, "J1")
    assert await store.mark_running("J1", lease("A"))
    assert not await store.mark_running("J1", lease("A"))
    image = ImageRecord("I1", "J1", 0, "x.png", 64, 64, 5, 0, "a cat\nSteps: 4")
    assert await store.finish("J1", [image], owner="A", model_hash=None, device_seconds=0.5)
    assert not await store.finish("J1", [image], owner="A", model_hash=None, device_seconds=0.5)
    assert not await store.mark_failed("J1", "error.internal", "boom")
    record = await store.get("J1")
    assert record.status == "finished"
    assert record.attempts == 1
    assert [i.id for i in record.images] == ["I1"]
    assert record.device_seconds == 0.5


async def test_claims_and_finishes_return_each_jobs_own_user(store: Store) -> None:
    """The user comes back with the claimed or finished row (one statement): with several
    users' jobs in one claim, each job has its own."""
    alice = await _add(store, "J1")
    bob = await store.ensure_user("telegram", "77", "Bob", "zh")
    await store.add_jobs(
        bob.id,
        [NewJob(id="J2", request=_request(), group_id="G2", group_index=0)],
        chat_id="c2",
        guild_id=None,
        route={"platform": "telegram", "chat_id": "c2"},
        roles=[],
    )
    claimed = await store.mark_running_many(["J2", "J1"], lease("A"))
    users = {job_id: record.user for job_id, record in claimed.items()}
    assert users["J1"] == UserRecord(alice, "console", "alice", "Alice", "en")
    assert users["J2"] == UserRecord(bob.id, "telegram", "77", "Bob", "zh")
    finished = await store.finish("J2", [], owner="A", model_hash=None, device_seconds=0.1)
    assert finished.user == UserRecord(bob.id, "telegram", "77", "Bob", "zh")
    assert (finished.status, finished.images, finished.route["chat_id"]) == ("finished", (), "c2")


async def test_a_finish_holds_no_write_lock_while_its_files_are_put_in_place(store: Store) -> None:
    """``keep`` (files renamed, or an upload) runs before the finish's first write: other
    writers go on meanwhile (on SQLite they would otherwise wait behind its one write lock)."""
    await _add(store, "J1", "J2")
    assert await store.mark_running("J1", lease("A"))
    keeping, release = asyncio.Event(), asyncio.Event()

    async def keep() -> None:
        keeping.set()
        await release.wait()

    image = ImageRecord("I1", "J1", 0, "x.png", 64, 64, 5, 0, "a cat\nSteps: 4")
    finishing = asyncio.create_task(
        store.finish("J1", [image], owner="A", model_hash=None, device_seconds=0.5, keep=keep)
    )
    await keeping.wait()
    # a claim and a new job are written while the finish is still keeping its files
    assert await asyncio.wait_for(store.mark_running("J2", lease("A")), 5)
    await asyncio.wait_for(_add(store, "J3"), 5)
    release.set()
    record = await finishing
    assert record is not None and record.status == "finished" and [i.id for i in record.images] == ["I1"]
    assert record.user.display_name == "Alice"


async def test_a_job_lost_while_its_files_were_kept_is_not_finished(store: Store) -> None:
    """Cancelled between the finish's look and its write: no row, no image, None (the
    caller then takes its files back)."""
    await _add(store, "J1", "J2")
    assert await store.mark_running("J1", lease("A"))
    kept: list[str] = []

    async def keep() -> None:
        kept.append("J1")
        assert await store.mark_cancelled("J1")

    image = ImageRecord("I1", "J1", 0, "x.png", 64, 64, 5, 0, "a cat\nSteps: 4")
    assert (
        await store.finish("J1", [image], owner="A", model_hash=None, device_seconds=0.5, keep=keep) is None
    )
    assert kept == ["J1"]
    record = await store.get("J1")
    assert record.status == "cancelled" and record.images == ()
    # a job this process does not hold keeps nothing at all
    assert await store.finish("J2", [], owner="A", model_hash=None, device_seconds=0.5, keep=keep) is None
    assert kept == ["J1"]


async def test_several_jobs_finish_at_once_each_as_one_would(store: Store) -> None:
    """``finish_many``: each job's outcome as ``finish`` gives it (its record; None when it
    was lost after its files were kept; the error its ``keep`` raised, nothing stored), and
    the writes of all of them are one transaction."""
    await _add(store, "J1", "J2", "J3", "J4", "J5", "J6")
    for job_id in ("J1", "J2", "J3", "J4", "J5", "J6"):
        assert await store.mark_running(job_id, lease("A"))
    kept: list[str] = []

    async def keep() -> None:
        kept.append("J1")

    async def broken() -> None:
        raise OSError("the disk is full")

    async def lost() -> None:
        kept.append("J3")
        assert await store.mark_cancelled("J3")

    def image(job_id: str, image_id: str | None = None) -> list[ImageRecord]:
        return [ImageRecord(image_id or f"I{job_id}", job_id, 0, f"{job_id}.png", 64, 64, 5, 0, "a cat")]

    outcomes = await store.finish_many(
        [
            Finishing("J1", image("J1"), "h1", 0.5, keep=keep),
            Finishing("J2", image("J2"), None, 0.5, keep=broken),
            Finishing("J3", image("J3"), None, 0.5, keep=lost),
            Finishing("J4", image("J4"), None, 0.75, data={"IJ4": b"png bytes"}),
        ],
        owner="A",
    )
    first, second, third, fourth = outcomes
    assert first.status == "finished" and first.model_hash == "h1" and [i.id for i in first.images] == ["IJ1"]
    assert isinstance(second, OSError) and third is None
    assert fourth.status == "finished" and fourth.device_seconds == 0.75
    assert kept == ["J1", "J3"]
    assert [(r.status, len(r.images)) for r in [await store.get(j) for j in ("J1", "J2", "J3", "J4")]] == [
        ("finished", 1), ("running", 0), ("cancelled", 0), ("finished", 1),
    ]  # fmt: skip
    assert await SharedFiles(store).image("IJ4") == b"png bytes"
    with pytest.raises(IntegrityError):  # J6's image takes an id in use: nothing of the two is stored
        await store.finish_many(
            [Finishing("J5", image("J5"), None, 0.5), Finishing("J6", image("J6", "IJ1"), None, 0.5)],
            owner="A",
        )
    assert [(await store.get(j)).status for j in ("J5", "J6")] == ["running", "running"]


async def test_writers_of_several_jobs_take_their_rows_in_one_order(store: Store, database_url: str) -> None:
    """A worker's group of ends (given in any order), its lease's heartbeat and another
    transaction that takes the same rows in id order wait for each other, never deadlock
    (PostgreSQL would fail one of them after a second: the ends, or the heartbeat)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time")
    import asyncpg

    await _add(store, "J2", "J1")
    for job_id in ("J2", "J1"):  # J2's row first: a scan meets it before J1's
        assert await store.mark_running(job_id, lease("A"))
    url = database_url.replace("postgresql+asyncpg://", "postgresql://")
    other = await asyncpg.connect(url)
    try:
        async with other.transaction():
            await other.execute("UPDATE generations SET attempts = attempts WHERE id = 'J1'")
            ending = asyncio.create_task(
                store.finish_many([Finishing("J2", [], None, 0.5), Finishing("J1", [], None, 0.5)], owner="A")
            )
            renewing = asyncio.create_task(store.renew(lease("A", 60)))
            await wait_for_lock_waiters(database_url, 2)
            await other.execute("UPDATE generations SET attempts = attempts WHERE id = 'J2'")
        outcomes = await asyncio.wait_for(ending, 10)
        assert [record.status for record in outcomes] == ["finished", "finished"]
        assert await asyncio.wait_for(renewing, 10) in (0, 2)  # before the ends, or after them
    finally:
        await other.close()


async def test_open_jobs_are_listed_for_recovery(store: Store) -> None:
    await _add(store, "J1", "J2", "J3")
    await store.mark_running("J2", lease("A"))
    await store.mark_cancelled("J3")
    assert [r.id for r in await store.list_open()] == ["J1", "J2"]
    assert not await store.requeue_interrupted("J2", "B")
    assert await store.requeue_interrupted("J2", "A")
    assert (await store.get("J2")).status == "queued"
    assert await store.count_by_status() == {"queued": 2, "cancelled": 1}


async def test_concurrent_first_contact_creates_one_user(store: Store) -> None:
    users = await asyncio.gather(*(store.ensure_user("telegram", "42", "bob") for _ in range(10)))
    assert len({u.id for u in users}) == 1


async def test_adding_jobs_is_all_or_nothing(store: Store) -> None:
    await _add(store, "J1")
    with pytest.raises(Exception):  # noqa: B017 - the duplicate key error differs per backend
        await _add(store, "J2", "J1")
    assert await store.get("J2") is None


async def test_history_is_newest_first(store: Store) -> None:
    user_id = await _add(store, "J1", "J2")
    assert [r.id for r in await store.list_for_user(user_id)] == ["J2", "J1"]


async def test_a_held_job_is_claimed_and_ended_only_by_its_holder(store: Store) -> None:
    await _add(store, "J1", "J2", held=lease("A"))
    assert not await store.mark_running("J1", lease("B"))
    assert await store.mark_running("J1", lease("A"))
    image = ImageRecord("I1", "J1", 0, "x.png", 64, 64, 5, 0, "a cat\nSteps: 4")
    assert not await store.finish("J1", [image], owner="B", model_hash=None, device_seconds=0.5)
    assert not await store.mark_failed("J1", "error.internal", "boom", owner="B")
    assert not await store.requeue_interrupted("J1", "B")
    assert await store.finish("J1", [image], owner="A", model_hash=None, device_seconds=0.5)
    assert [i.id for i in (await store.get("J1")).images] == ["I1"]
    # once A stops renewing and its lease runs out, the queued job is free to claim
    assert await store.renew(lease("A", -1)) == 1
    assert await store.mark_running("J2", lease("B"))
    record = await store.get("J2")
    assert (record.status, record.owner, record.attempts) == ("running", "B", 1)


async def test_adopting_takes_only_jobs_nobody_holds_any_more(store: Store) -> None:
    await _add(store, "J1", held=lease("A"))  # a live holder
    await _add(store, "J2", held=lease("B"))
    await store.mark_running("J2", lease("B", -1))  # B died running it; its lease ran out
    await _add(store, "J3")  # stored before leases existed: nobody's
    await _add(store, "J4", held=lease("C"))  # C exited, its lease still runs
    await _add(store, "J5", held=lease("B", -1))
    await store.mark_cancelled("J5")  # ended jobs are nobody's business

    def gone(owner: str) -> bool:
        return owner == "C"

    taken = await store.adopt(lease("D"), gone=gone)
    assert [(r.id, r.status, r.owner) for r in taken] == [
        ("J2", "running", "D"),
        ("J3", "queued", "D"),
        ("J4", "queued", "D"),
    ]
    assert await store.adopt(lease("E"), gone=gone) == []
    assert (await store.get("J1")).owner == "A"
    assert (await store.get("J5")).owner == "B"


async def test_adopters_racing_take_each_job_once(store: Store) -> None:
    ids = [f"J{n:02}" for n in range(12)]
    await _add(store, *ids)
    taken = await asyncio.gather(*(store.adopt(lease(f"P{n}")) for n in range(4)))
    assert sorted(r.id for batch in taken for r in batch) == ids
    for n, batch in enumerate(taken):
        assert all(r.owner == f"P{n}" for r in batch)


async def test_renewing_keeps_jobs_and_releasing_frees_them(store: Store) -> None:
    await _add(store, "J1", "J2", held=lease("A", -1))  # A's lease has just run out ...
    await store.mark_cancelled("J2")
    assert await store.renew(lease("A")) == 1  # ... but A renews in time (J2 has ended)
    assert await store.adopt(lease("B")) == []
    assert await store.release("A") == 1  # a graceful stop: no need to wait for the lease
    assert [r.id for r in await store.adopt(lease("B"))] == ["J1"]


async def test_a_user_keeps_the_language_used_last(store: Store) -> None:
    """Later notices (a finished grid, a stopped run) are written in the user's language:
    the one of their latest command, not of their first."""
    first = await store.ensure_user("console", "li", "Li", "en")
    again = await store.ensure_user("console", "li", "Li", "zh-CN")
    assert (first.locale, again.locale) == ("en", "zh-CN")
    assert (await store.ensure_user("console", "li", "Li")).locale == "zh-CN"
    renamed = await store.ensure_user("console", "li", "Li Wei")  # a name changes; an empty one does not
    assert (renamed.id, renamed.display_name, renamed.locale) == (first.id, "Li Wei", "zh-CN")
    assert (await store.ensure_user("console", "li", "")).display_name == "Li Wei"
    other = await store.ensure_user("telegram", "li", "", None)  # another platform: another user
    assert other.id != first.id and (other.display_name, other.locale) == ("", None)


async def test_a_pooled_connection_the_server_dropped_while_idle_is_replaced(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database restart while the bot is quiet costs no command: a connection that
    rested is pinged before use and replaced when it is dead. One used a moment ago is
    handed out without a ping."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("server connections: PostgreSQL")
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection

    import models.direct

    pings: list[object] = []
    real_ping = AsyncAdapt_asyncpg_connection._async_ping

    async def counted(connection: object) -> None:  # the pool's pings and the lanes'
        pings.append(connection)
        await real_ping(connection)

    monkeypatch.setattr(AsyncAdapt_asyncpg_connection, "_async_ping", counted)
    monkeypatch.setattr(models.direct, "PING_AFTER_IDLE", 0.3)
    await _add(store, "J1")
    for _ in range(5):  # back to back: no pings
        assert (await store.get("J1")).status == "queued"
    assert pings == []
    killed = await terminate_other_connections(store.engine.url.render_as_string(hide_password=False))
    assert killed >= 1
    await asyncio.sleep(0.5)
    assert await store.mark_running("J1", lease("A"))  # on a fresh connection
    assert len(pings) == 2  # the lane's connection, then the pooled one that replaced it
    assert (await store.get("J1")).status == "running"


async def test_a_sqlite_file_runs_in_wal_with_normal_sync(tmp_path) -> None:
    """Commits append to the write-ahead log without waiting for the disk each time."""
    from sqlalchemy import text

    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'atelier.db'}")
    try:
        async with store.engine.connect() as connection:
            assert (await connection.scalar(text("PRAGMA journal_mode"))).lower() == "wal"
            assert await connection.scalar(text("PRAGMA synchronous")) == 1  # NORMAL
    finally:
        await store.close()
