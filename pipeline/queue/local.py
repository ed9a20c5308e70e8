"""In-process queue: fair ordering, one worker per device, engine work on device threads.

Ordering: higher priority first; then rounds, then arrival. A job's round is how many
jobs its owner already had waiting or running when it arrived, so a user's first job
outranks everyone's second, and a burst from one user cannot starve a newcomer. Rounds
are fixed at arrival, so the position a user is told stays true as others join. Each worker is
an asyncio task that hands the engine call to its own single-thread executor, so torch
never runs on the event loop; progress crosses back with ``call_soon_threadsafe``.

The device never waits on bookkeeping: once the engine call returns, the job's end
(``job_finished``, ``job_failed`` or ``job_stopped``: saving images, storing, settling)
runs as a task of its own and the worker takes its next job at once. A worker's ends run
one after another in the order its jobs ran, as they did on the device's path, so hooks
that look at a group of jobs see them end one at a time. A finishing job no longer
counts against its owner's ``max_running`` (it holds no device); ``join`` and ``stop``
wait for the ends too. At most ``max_finishing`` ends per worker are pending: beyond
that the worker waits, so images that are slow to save cannot pile up without bound.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from pipeline.errors import GenerationCancelled
from pipeline.queue.base import Job, JobListener, Runner

log = logging.getLogger(__name__)


class LocalQueue:
    def __init__(self, runners: Sequence[Runner], listener: JobListener, *, max_finishing: int = 8) -> None:
        if not runners:
            raise ValueError("LocalQueue needs at least one runner (device)")
        self.runners = list(runners)
        self.listener = listener
        self._waiting: list[Job] = []
        self._rounds: dict[str, int] = {}
        self._running: dict[str, Job] = {}
        self._finishing: dict[str, asyncio.Task[None]] = {}  # jobs off the device, still ending
        self.max_finishing = max_finishing
        self._seq = itertools.count()
        self._changed: asyncio.Condition | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._executors: list[ThreadPoolExecutor] = []
        self._stopping = False

    # the JobQueue protocol ------------------------------------------------------------------

    def put(self, job: Job) -> int:
        job.seq = next(self._seq)
        open_jobs = [*self._waiting, *self._running.values()]
        self._rounds[job.id] = sum(1 for other in open_jobs if other.owner == job.owner)
        self._waiting.append(job)
        self._notify()
        return self.position(job.id) or 1

    def position(self, job_id: str) -> int | None:
        if job_id in self._running or job_id in self._finishing:
            return 0
        for index, job in enumerate(self._ordered()):
            if job.id == job_id:
                return index + 1
        return None

    def cancel(self, job_id: str) -> str:
        for job in self._waiting:
            if job.id == job_id:
                self._waiting.remove(job)
                self._rounds.pop(job_id, None)
                self._notify()
                return "queued"
        job = self._running.get(job_id)
        if job is not None:
            job.request_stop("cancel")
            return "running"
        return "unknown"

    async def start(self) -> None:
        self._changed = asyncio.Condition()
        self._stopping = False
        for index, runner in enumerate(self.runners):
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"atelier-device-{index}")
            self._executors.append(executor)
            self._workers.append(asyncio.create_task(self._work(runner, executor), name=f"worker-{index}"))

    async def stop(self, *, wait: bool = True) -> None:
        """Stop taking jobs and wait for the ends of those that ran. Without ``wait``, running
        jobs stop at their next step as interrupted."""
        self._stopping = True
        if not wait:
            for job in self._running.values():
                job.request_stop("shutdown")
        self._notify()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        while self._finishing:  # what ran is stored before the queue stops
            await asyncio.gather(*self._finishing.values(), return_exceptions=True)
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)
        self._executors.clear()

    async def join(self) -> None:
        assert self._changed is not None, "start() the queue first"
        async with self._changed:
            await self._changed.wait_for(
                lambda: not self._waiting and not self._running and not self._finishing
            )

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Jobs on a device (not those finishing after it)."""
        return len(self._running)

    @property
    def finishing(self) -> int:
        return len(self._finishing)

    # internals ----------------------------------------------------------------------------------

    def _ordered(self) -> list[Job]:
        return sorted(self._waiting, key=lambda job: (-job.priority, self._rounds.get(job.id, 0), job.seq))

    def _runnable(self) -> list[Job]:
        """Waiting jobs in order, less those whose owner is at their ``max_running`` cap."""
        running: dict[str, int] = {}
        for job in self._running.values():
            running[job.owner] = running.get(job.owner, 0) + 1
        return [
            job
            for job in self._ordered()
            if job.max_running is None or running.get(job.owner, 0) < job.max_running
        ]

    def _notify(self) -> None:
        if self._changed is None:
            return
        asyncio.get_running_loop().create_task(self._notify_async())

    async def _notify_async(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _next(self) -> Job | None:
        assert self._changed is not None
        async with self._changed:
            await self._changed.wait_for(lambda: self._stopping or bool(self._runnable()))
            if self._stopping:
                return None
            job = self._runnable()[0]
            self._waiting.remove(job)
            self._running[job.id] = job
            return job

    async def _work(self, runner: Runner, executor: ThreadPoolExecutor) -> None:
        ends: list[asyncio.Task[None]] = []  # this worker's pending ends, oldest first
        while True:
            ends = [end for end in ends if not end.done()]
            if len(ends) >= self.max_finishing:
                await asyncio.wait({ends[0]})
                continue
            job = await self._next()
            if job is None:
                return
            try:
                end = await self._run(job, runner, executor)
            except Exception:  # a listener bug must not kill the worker
                log.exception("job %s: unexpected error in the queue", job.id)
                end = None
            if end is not None:
                after = ends[-1] if ends else None
                task = asyncio.create_task(self._finish(job, end, after), name=f"finish-{job.id}")
                self._finishing[job.id] = task
                ends.append(task)
            self._running.pop(job.id, None)
            self._rounds.pop(job.id, None)
            await self._notify_async()

    async def _run(
        self, job: Job, runner: Runner, executor: ThreadPoolExecutor
    ) -> Callable[[], Awaitable[None]] | None:
        """Claim and run the job on the device; returns how it ends, for ``_finish``
        (None when the listener refused it)."""
        if not await self.listener.job_started(job):
            return None
        loop = asyncio.get_running_loop()

        preview: list[bytes | None] = [None]  # the engine hands a step's preview just before its progress

        def on_preview(_step: int, png: bytes) -> None:
            preview[0] = png

        def on_progress(step: int, total: int) -> None:
            png, preview[0] = preview[0], None
            loop.call_soon_threadsafe(self.listener.job_progress, job, step, total, png)

        def call() -> object:
            return runner.generate(
                job.request, on_progress=on_progress, should_stop=job.stop.is_set, on_preview=on_preview
            )

        try:
            result = await loop.run_in_executor(executor, call)
        except GenerationCancelled:
            return functools.partial(self.listener.job_stopped, job)
        except Exception as exc:
            return functools.partial(self.listener.job_failed, job, exc)
        return functools.partial(self.listener.job_finished, job, result)  # type: ignore[arg-type]

    async def _finish(
        self, job: Job, end: Callable[[], Awaitable[None]], after: asyncio.Task[None] | None
    ) -> None:
        """End ``job`` off the device's path, after the worker's previous job has ended."""
        try:
            if after is not None:
                await asyncio.wait({after})
            await end()
        except Exception:  # a listener bug must not lose the other jobs' ends
            log.exception("job %s: unexpected error while ending it", job.id)
        finally:
            self._finishing.pop(job.id, None)
            await self._notify_async()
