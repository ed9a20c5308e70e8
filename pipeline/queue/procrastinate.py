"""The shared queue: jobs wait in PostgreSQL (procrastinate) for ``atelier worker``
processes on any host.

The bot's process only defers: ``put`` adds a procrastinate job naming the stored
generation, ``position`` and ``cancel`` read and change procrastinate's table. Each
worker runs ``ProcrastinateQueue.run_worker`` with a task function that hands the
generation to its own devices (bot/worker.py). The generation row stays the source of
truth: a worker claims the row before it runs it, so a job deferred twice (a restart, a
recovered worker) still runs once.

Fairness as in the local queue: a job's procrastinate priority is its moderator priority
first, then its round (how many jobs its owner had waiting or running when it arrived),
so a user's first job outranks everyone's second; equal ones run in arrival order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from pipeline.queue.base import Job

log = logging.getLogger(__name__)

TASK = "atelier.generate"
QUEUE = "atelier"
ROUNDS = 100_000  # rounds within one priority step
SCHEMA_LOCK_KEY = 0x61746C72  # pg_advisory_lock key for installing procrastinate's schema

_OPEN = """
SELECT id, status, priority FROM procrastinate_jobs
WHERE queue_name = %(queue)s AND task_name = %(task)s AND status IN ('todo', 'doing')
  AND args->>'generation_id' = %(generation_id)s
ORDER BY id DESC
"""
_AHEAD = """
SELECT count(*) AS ahead FROM procrastinate_jobs
WHERE queue_name = %(queue)s AND status = 'todo'
  AND (priority > %(priority)s OR (priority = %(priority)s AND id < %(id)s))
"""
# a new job placed and deferred in one statement: each open job of its owner puts it a
# round further back (fairness; counted through OWNER_INDEX, so however long the queue, a
# submit reads its owner's jobs, not everyone's), and it comes after every waiting job of
# its priority or higher; two submits at the same instant may be told one place. The job is
# made by procrastinate's own defer function, its triggers and all.
_PUT = """
WITH placed AS (
  SELECT %(base)s - LEAST((
    SELECT count(*) FROM procrastinate_jobs
    WHERE queue_name = %(queue)s AND status IN ('todo', 'doing')
      AND task_name = %(task)s AND args->>'owner' = %(owner)s
  ), %(last_round)s) AS priority
), deferred AS (
  SELECT procrastinate_defer_jobs_v1(ARRAY[
    ROW(%(queue)s, %(task)s, placed.priority, NULL, %(queueing_lock)s, %(args)s, NULL)::procrastinate_job_to_defer_v1
  ]) AS ids
  FROM placed
)
SELECT deferred.ids[1] AS id,
       (SELECT count(*) FROM procrastinate_jobs
        WHERE queue_name = %(queue)s AND status = 'todo' AND priority >= placed.priority) AS waiting
FROM placed, deferred
"""
# the open jobs of one owner, beside procrastinate's own indexes (made at every start if
# missing: a database from before it gets it too)
OWNER_INDEX = """
CREATE INDEX IF NOT EXISTS atelier_procrastinate_jobs_owner
ON procrastinate_jobs ((args->>'owner')) WHERE status IN ('todo', 'doing')
"""
_MISSING = """
SELECT candidate.generation_id FROM unnest(%(ids)s::text[]) AS candidate(generation_id)
WHERE NOT EXISTS (
  SELECT 1 FROM procrastinate_jobs AS jobs
  WHERE jobs.queue_name = %(queue)s AND jobs.task_name = %(task)s AND jobs.status IN ('todo', 'doing')
    AND jobs.args->>'generation_id' = candidate.generation_id
)
"""
_BUSY = """
SELECT count(*) AS busy FROM procrastinate_jobs
WHERE queue_name = %(queue)s AND status IN ('todo', 'doing')
"""


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+asyncpg://...``) as libpq reads it."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def queue_priority(priority: int, round_: int) -> int:
    return priority * ROUNDS - min(round_, ROUNDS - 1)


def _pool(ping_after_idle: float, **options: Any) -> Any:
    """procrastinate's connection pool, with two round trips fewer per query:

    - its connections run in autocommit (each of procrastinate's queries is one statement,
      and a function call at that: atomic without a BEGIN before and a COMMIT after);
    - a connection is pinged before use only when it may have rested ``ping_after_idle``
      seconds or longer (taken out that long ago), and replaced when the server dropped
      it, instead of before every query."""
    import psycopg_pool

    taken: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    async def configure(connection: Any) -> None:
        await connection.set_autocommit(True)

    async def check(connection: Any) -> None:
        now, before = time.monotonic(), taken.get(connection)
        taken[connection] = now
        if before is None or now - before >= ping_after_idle:
            await psycopg_pool.AsyncConnectionPool.check_connection(connection)

    return psycopg_pool.AsyncConnectionPool(**{**options, "check": check, "configure": configure})


class ProcrastinateQueue:
    """``JobQueue`` on PostgreSQL. Jobs are not held by this process (``holds_jobs`` is
    False): whichever worker takes one holds it."""

    holds_jobs = False

    def __init__(self, url: str, *, ping_after_idle: float = 1.0) -> None:
        import procrastinate

        self.conninfo = libpq_url(url)
        self.app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(
                conninfo=self.conninfo, pool_factory=functools.partial(_pool, ping_after_idle)
            )
        )
        self._open = False

    async def start(self) -> None:
        await self._install_schema()
        await self.app.open_async()
        self._open = True

    async def stop(self, *, wait: bool = True) -> None:
        if self._open:
            self._open = False
            await self.app.close_async()

    async def put(self, job: Job) -> int:
        from procrastinate.exceptions import UniqueViolation
        from procrastinate.manager import QUEUEING_LOCK_CONSTRAINT

        args = {"generation_id": job.id, "owner": job.owner, "max_running": job.max_running}
        try:
            placed = await self._one(
                _PUT,
                owner=job.owner,
                base=queue_priority(job.priority, 0),
                last_round=ROUNDS - 1,
                queueing_lock=job.id,
                args=args,
            )
        except UniqueViolation as exc:  # deferred before (a restart re-offers what waits): one is enough
            if exc.constraint_name != QUEUEING_LOCK_CONSTRAINT:
                raise
            return await self.position(job.id) or 1
        return int(placed["waiting"]) + 1

    async def position(self, job_id: str) -> int | None:
        found = await self._jobs(job_id)
        if not found:
            return None
        if any(row["status"] == "doing" for row in found):
            return 0
        row = found[0]
        ahead = await self._one(_AHEAD, priority=row["priority"], id=row["id"])
        return int(ahead["ahead"]) + 1

    async def cancel(self, job_id: str) -> str:
        """'queued': it left the queue; 'running': a worker has it and stops it (a job a
        worker took but has not started yet is cancelled there); 'unknown'."""
        manager = self.app.job_manager
        for row in await self._jobs(job_id):
            if row["status"] == "todo" and await manager.cancel_job_by_id_async(row["id"], delete_job=True):
                return "queued"
            if row["status"] == "doing":
                await manager.cancel_job_by_id_async(row["id"], abort=True)
                return "running"
        return "unknown"

    async def abandon(self, job_id: str) -> int:
        """Drop the procrastinate jobs of a generation whose worker is gone (the generation
        was taken over and is deferred again). Returns how many."""
        from procrastinate.jobs import Status

        stale = [row["id"] for row in await self._jobs(job_id) if row["status"] == "doing"]
        for procrastinate_id in stale:
            await self.app.job_manager.finish_job_by_id_async(
                procrastinate_id, Status.FAILED, delete_job=True
            )
        return len(stale)

    async def missing(self, job_ids: list[str]) -> list[str]:
        """Of these generations, the ones no procrastinate job waits or runs for."""
        if not job_ids:
            return []
        rows = await self.app.connector.execute_query_all_async(_MISSING, ids=job_ids, queue=QUEUE, task=TASK)
        return [row["generation_id"] for row in rows]

    async def join(self) -> None:
        """Wait until no job waits or runs in the shared queue."""
        while True:  # procrastinate says nothing when its table empties: look
            if not int((await self._one(_BUSY))["busy"]):
                return
            await asyncio.sleep(0.05)

    async def run_worker(
        self,
        run: Callable[..., Awaitable[None]],
        *,
        name: str,
        concurrency: int,
        stalled_seconds: float,
    ) -> None:
        """Take jobs and call ``run(generation_id, owner, max_running)`` for each, at most
        ``concurrency`` at once, until cancelled (then the running ones are awaited)."""

        async def generate(generation_id: str, owner: str, max_running: int | None = None) -> None:
            await run(generation_id, owner, max_running)

        if TASK not in self.app.tasks:
            self.app.task(name=TASK, queue=QUEUE)(generate)
        await self.app.run_worker_async(
            queues=[QUEUE],
            name=name,
            concurrency=concurrency,
            install_signal_handlers=False,
            delete_jobs="always",  # the generation's row keeps how it ended
            update_heartbeat_interval=max(stalled_seconds / 3, 1),
            stalled_worker_timeout=stalled_seconds,
            fetch_job_polling_interval=1,
            abort_job_polling_interval=1,
        )

    # internals ----------------------------------------------------------------------------------

    async def _jobs(self, job_id: str) -> list[dict[str, Any]]:
        return await self.app.connector.execute_query_all_async(
            _OPEN, queue=QUEUE, task=TASK, generation_id=job_id
        )

    async def _one(self, query: str, **params: Any) -> dict[str, Any]:
        return await self.app.connector.execute_query_one_async(query, queue=QUEUE, task=TASK, **params)

    async def _install_schema(self) -> None:
        """Install procrastinate's tables (and ``OWNER_INDEX``) once per database, under a
        lock: processes that start together do not race to create them."""
        import psycopg
        from procrastinate.schema import SchemaManager

        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_KEY,))
            try:
                found = await (
                    await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
                ).fetchone()
                if found is None or not found[0]:
                    await conn.execute(SchemaManager.get_schema())  # type: ignore[arg-type]
                    log.info("installed procrastinate's schema")
                await conn.execute(OWNER_INDEX)  # type: ignore[arg-type]
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK_KEY,))
