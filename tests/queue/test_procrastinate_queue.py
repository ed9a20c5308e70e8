"""The shared queue's own calls on PostgreSQL: a job's place as ``put`` tells it (fairness
rounds, priorities) and procrastinate's connections (autocommit; pinged only after a rest,
so a restarted database costs no command)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import psycopg_pool
import pytest

from pipeline.queue.base import Job
from pipeline.queue.procrastinate import ProcrastinateQueue
from pipeline.request import GenerationRequest
from tests.conftest import (
    POSTGRES_URL,
    _drop_postgres_database,
    _fresh_postgres_database,
    terminate_other_connections,
)

REST = 0.3  # seconds a connection rests before it is pinged, in these tests


@pytest.fixture
async def queue() -> AsyncIterator[ProcrastinateQueue]:
    if not POSTGRES_URL:
        if os.environ.get("CI") == "true":
            pytest.fail("ATELIER_TEST_POSTGRES_URL is not set under CI")
        pytest.skip("PostgreSQL not configured (ATELIER_TEST_POSTGRES_URL)")
    url = await _fresh_postgres_database()
    shared = ProcrastinateQueue(url, ping_after_idle=REST)
    await shared.start()
    try:
        yield shared
    finally:
        await shared.stop()
        await _drop_postgres_database(url)


def _job(job_id: str, owner: str, priority: int = 0) -> Job:
    return Job(job_id, owner, GenerationRequest(prompt="x", seed=1), priority)


async def test_put_tells_each_job_its_place_by_rounds_and_priority(queue: ProcrastinateQueue) -> None:
    assert [await queue.put(_job(f"A{i}", "ann")) for i in range(3)] == [1, 2, 3]
    assert await queue.put(_job("B0", "bob")) == 2  # bob's first job comes before ann's second
    assert await queue.put(_job("B1", "bob")) == 4  # his second after ann's second (and B0)
    assert await queue.put(_job("M0", "mod", priority=1)) == 1  # a moderator's priority: first
    assert await queue.put(_job("A0", "ann")) == 2  # deferred before: its place now
    places = {job_id: await queue.position(job_id) for job_id in ("M0", "A0", "B0", "A1", "B1", "A2")}
    assert places == {"M0": 1, "A0": 2, "B0": 3, "A1": 4, "B1": 5, "A2": 6}


async def test_its_connections_skip_the_ping_under_load_and_survive_a_restart(
    queue: ProcrastinateQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[object] = []
    check = psycopg_pool.AsyncConnectionPool.check_connection

    async def counted(connection: object) -> None:
        checks.append(connection)
        await check(connection)  # type: ignore[arg-type]

    monkeypatch.setattr(psycopg_pool.AsyncConnectionPool, "check_connection", staticmethod(counted))
    await queue.put(_job("J0", "ann"))
    for _ in range(8):  # each pooled connection has been used once (and pinged then)
        await queue.position("J0")
    checks.clear()
    for _ in range(5):  # back to back: no pings
        assert await queue.position("J0") == 1
    assert checks == []
    async with queue.app.connector.pool.connection() as connection:
        assert connection.autocommit  # each query is its own transaction: no BEGIN, no COMMIT

    killed = await terminate_other_connections(queue.conninfo)
    assert killed >= 1
    await asyncio.sleep(REST + 0.2)
    assert await queue.put(_job("J1", "ann")) == 2  # on a fresh connection
    assert checks  # the rested connections were pinged, and the dead ones replaced
    assert await queue.position("J1") == 2


async def test_a_submit_counts_its_owners_jobs_through_their_own_index(queue: ProcrastinateQueue) -> None:
    """The fairness round reads the owner's open jobs through ``OWNER_INDEX``, not every
    open job; a database whose procrastinate tables predate the index gets it at start."""
    from pipeline.queue.procrastinate import QUEUE, TASK

    for i in range(300):  # a long queue of many owners
        await queue.put(_job(f"J{i}", f"user{i % 30}"))
    plan_of = """EXPLAIN (FORMAT JSON) SELECT count(*) FROM procrastinate_jobs
        WHERE queue_name = %(queue)s AND status IN ('todo', 'doing')
          AND task_name = %(task)s AND args->>'owner' = %(owner)s"""
    await queue.app.connector.execute_query_async("ANALYZE procrastinate_jobs")
    (row,) = await queue.app.connector.execute_query_all_async(plan_of, queue=QUEUE, task=TASK, owner="user7")
    assert "atelier_procrastinate_jobs_owner" in str(row)
    assert await queue.put(_job("late", "user7")) == 301 and await queue.position("late") == 301

    await queue.app.connector.execute_query_async("DROP INDEX atelier_procrastinate_jobs_owner")
    again = ProcrastinateQueue(queue.conninfo.replace("postgresql://", "postgresql+asyncpg://", 1))
    await again.start()
    try:
        found = await again.app.connector.execute_query_all_async(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'atelier_procrastinate_jobs_owner'"
        )
        assert len(found) == 1 and "status = ANY" in found[0]["indexdef"]
    finally:
        await again.stop()
