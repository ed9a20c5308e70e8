"""In-process queue: fair ordering, one worker per device, engine work on device threads.

Ordering: higher priority first; then rounds, then arrival. A job's round is how many
jobs its owner already had waiting or running when it arrived, so a user's first job
outranks everyone's second, and a burst from one user cannot starve a newcomer. Rounds
are fixed at arrival, so the position a user is told stays true as others join. With
several devices, a worker takes, among the jobs of the front's priority and round, one
whose checkpoint its device has loaded (a runner's ``resident``). Each worker is
an asyncio task that hands the engine call to its own single-thread executor, so torch
never runs on the event loop; progress crosses back with ``call_soon_threadsafe``.
The order lives in this process's memory: ``position`` is this queue's answer, and a job
another process queued is not in it (the job's row says where it is).

Micro-batching: with ``max_batch`` above 1, a worker that takes a job also takes the
waiting jobs that can share its UNet batch (equal ``batch_key``; from any user), in queue
order, while their images fit in ``max_batch``; when the batch is not full and nothing
else waits, it waits up to ``batch_window`` seconds for more to arrive, never longer. The
batch runs as one ``Runner.generate_batch`` call and each job gets its own result; if the
batch fails as a whole, each job runs again alone, so one job's error never fails its
neighbours.

The device never waits on bookkeeping: once the engine call returns, the jobs' ends
(``job_finished``, ``job_failed`` or ``job_stopped``: saving images, storing, settling)
run as tasks of their own and the worker takes its next job at once. A worker's ends run
one after another in the order its jobs ran, as they did on the device's path, so hooks
that look at a group of jobs see them end one at a time. When ends pile up (they are
slower than the device), the finished jobs that wait go to the listener's
``jobs_finished`` together, which stores them at once and then tells each end in order,
so a busy worker's bookkeeping is shared among its jobs. A finishing job no longer
counts against its owner's ``max_running`` (it holds no device); ``join`` and ``stop``
wait for the ends too. At most ``max_finishing`` ends per worker are pending: beyond
that the worker waits, so images that are slow to save cannot pile up without bound.

Nor does it wait on the event loop: with one device, while a job runs its worker hands the
next one (with its batch) to the device's thread, which begins it the moment the current
one returns, however busy the loop is. Until the device begins it, that job still waits
here: its position is unchanged, it is claimed (``job_started``) only once it has begun,
and a cancel, a newcomer that ranks before it, or one that can join its batch takes it
back (the batch is formed again). With several devices a job
waits for whichever device frees first, so nothing is handed on ahead.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.queue.base import Job, JobListener, Runner
from pipeline.queue.device_calls import End, Launch, group_of
from pipeline.queue.device_runs import _DeviceRuns
from pipeline.request import GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """A device call in flight: its jobs, the task that runs them, and for prefetched jobs
    their launch."""

    jobs: list[Job]
    task: asyncio.Task[list[End] | None]
    launch: Launch | None = None

    @property
    def withdrawn(self) -> bool:
        return self.launch is not None and self.launch.withdrawn


class LocalQueue(_DeviceRuns):
    holds_jobs = True  # the jobs it has are this process's (stored under its lease)

    def __init__(
        self,
        runners: Sequence[Runner],
        listener: JobListener,
        *,
        max_batch: int = 1,
        batch_window: float = 0.0,
        batch_key: Callable[[GenerationRequest], Hashable | None] | None = None,
        max_finishing: int = 16,
        warm_up: str | None = None,
    ) -> None:
        """``max_batch``: most images in one micro-batch (1: no batching); ``batch_window``:
        seconds a batch that is not full waits for compatible jobs; ``batch_key``: which
        requests may share a batch (default ``pipeline.batching.batch_key``);
        ``max_finishing``: most jobs of one worker ending at once, off the device;
        ``warm_up``: a checkpoint each device loads and warms (``Runner.warm_up``) before
        its first job."""
        if not runners:
            raise ValueError("LocalQueue needs at least one runner (device)")
        self.runners = list(runners)
        self.listener = listener
        self.max_batch = max_batch
        self.batch_window = batch_window
        if batch_key is None:
            from pipeline.batching import batch_key
        self.batch_key = batch_key
        self.warm_up = warm_up
        self._waiting: dict[str, Job] = {}
        # waiting jobs' sort keys (-priority, round, seq, id), kept sorted: O(log n) to place
        self._order: list[tuple[int, int, int, str]] = []
        self._sort_keys: dict[str, tuple[int, int, int, str]] = {}
        self._open: Counter[str] = Counter()  # an owner's waiting and running jobs
        self._rounds: dict[str, int] = {}
        self._keys: dict[str, Hashable | None] = {}  # batch keys, computed once per job
        self._running: dict[str, Job] = {}
        self._prefetched: dict[str, Launch] = {}  # waiting jobs handed to a device's thread ahead
        self._finishing: dict[str, asyncio.Task[None]] = {}  # jobs off the device, still ending
        self.max_finishing = max_finishing
        self._seq = itertools.count()
        self._changed: asyncio.Condition | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._executors: list[ThreadPoolExecutor] = []
        self._stopping = False

    # the JobQueue protocol ------------------------------------------------------------------

    async def put(self, job: Job) -> int:
        job.seq = next(self._seq)
        self._rounds[job.id] = self._open[job.owner]
        self._open[job.owner] += 1
        self._waiting[job.id] = job
        key = (-job.priority, self._rounds[job.id], job.seq, job.id)
        self._sort_keys[job.id] = key
        bisect.insort(self._order, key)
        for launch in set(self._prefetched.values()):
            if self._sort_keys[launch.jobs[0].id] > key or self._joins(job, launch):
                self._withdraw(launch)  # formed again: the newcomer goes first, or joins it
        self._notify()
        return self._position(job.id) or 1

    async def position(self, job_id: str) -> int | None:
        """This process's answer: the order lives in its memory, so a job another process
        queued is None here."""
        return self._position(job_id)

    def _position(self, job_id: str) -> int | None:
        if job_id in self._running or job_id in self._finishing:
            return 0
        key = self._sort_keys.get(job_id)
        if key is None:
            return None
        return bisect.bisect_left(self._order, key) + 1

    async def cancel(self, job_id: str) -> str:
        job = self._waiting.get(job_id)
        launch = self._prefetched.get(job_id)
        if job is not None and launch is not None and not self._withdraw(launch):
            job.request_stop("cancel")  # its device began it: it stops at its first step
            return "running"
        if job is not None:
            self._unwait(job)
            self._open[job.owner] -= 1
            self._rounds.pop(job_id, None)
            self._keys.pop(job_id, None)
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
        self.close()
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

    def close(self) -> None:
        """Take no new job; what a device has not begun stays waiting (at once: no device
        begins another job after this returns)."""
        self._stopping = True
        for launch in set(self._prefetched.values()):
            self._withdraw(launch)
        self._notify()

    async def join(self) -> None:
        assert self._changed is not None, "start() the queue first"
        async with self._changed:
            await self._changed.wait_for(
                lambda: not self._waiting and not self._running and not self._finishing
            )

    async def off_device(self, job_id: str) -> None:
        """Wait until the job neither waits nor runs here: it left the device (or the
        queue), though its end may still be under way."""
        assert self._changed is not None, "start() the queue first"
        async with self._changed:
            await self._changed.wait_for(lambda: job_id not in self._waiting and job_id not in self._running)

    async def ended(self, job_id: str) -> None:
        """Wait until the job is neither waiting, running nor ending here."""
        assert self._changed is not None, "start() the queue first"
        async with self._changed:
            await self._changed.wait_for(
                lambda: (
                    job_id not in self._waiting
                    and job_id not in self._running
                    and job_id not in self._finishing
                )
            )

    def running_jobs(self) -> list[Job]:
        """The jobs on a device (one it began ahead included)."""
        return list(self._running.values()) + [job for job in self._ordered() if self._begun(job.id)]

    def waiting_jobs(self) -> list[Job]:
        """The jobs that wait here, in order."""
        return [job for job in self._ordered() if not self._begun(job.id)]

    def _begun(self, job_id: str) -> bool:
        launch = self._prefetched.get(job_id)
        return launch is not None and launch.begun

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

    def _ordered(self) -> Iterator[Job]:
        return (self._waiting[key[3]] for key in self._order)

    def _runnable(self) -> Iterator[Job]:
        """Waiting jobs in order, less those whose owner is at their ``max_running`` cap."""
        running: Counter[str] = Counter(job.owner for job in self._running.values())
        return (
            job
            for job in self._ordered()
            if job.id not in self._prefetched
            and (job.max_running is None or running[job.owner] < job.max_running)
        )

    def _has_runnable(self) -> bool:
        return next(self._runnable(), None) is not None

    def _unwait(self, job: Job) -> None:
        del self._waiting[job.id]
        key = self._sort_keys.pop(job.id)
        del self._order[bisect.bisect_left(self._order, key)]

    def _notify(self) -> None:
        if self._changed is None:
            return
        asyncio.get_running_loop().create_task(self._notify_async())

    async def _notify_async(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _next(self, runner: Runner, batches: bool) -> list[Job]:
        """The next job for ``runner`` and, with ``batches``, the waiting jobs that join its
        batch; [] when the queue stops."""
        assert self._changed is not None
        async with self._changed:
            await self._changed.wait_for(lambda: self._stopping or self._has_runnable())
            if self._stopping:
                return []
            head = self._pick(runner)
            self._take(head)
        jobs = [head]
        key = self._key(head) if batches and self.max_batch > 1 else None
        if key is None:
            return jobs
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_window
        while True:
            async with self._changed:
                self._join_batch(jobs, key)
                left = deadline - loop.time()
                # other work waiting (it could not join) runs next: the device never idles for it
                full = self._images(jobs) >= self.max_batch
                if full or left <= 0 or self._stopping or self._has_runnable():
                    return jobs
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    pass

    def _pick(self, runner: Runner) -> Job:
        """The first runnable job, or with several devices the first one as near the front
        (same priority and round) whose checkpoint is loaded on ``runner``'s device."""
        runnable = self._runnable()
        head = next(runnable)
        resident = getattr(runner, "resident", None)
        if len(self.runners) < 2 or resident is None or resident(head.request.checkpoint):
            return head
        rank = (head.priority, self._rounds.get(head.id, 0))
        for job in runnable:
            if (job.priority, self._rounds.get(job.id, 0)) != rank:
                break
            if resident(job.request.checkpoint):
                return job
        return head

    def _take(self, job: Job) -> None:
        self._unwait(job)
        self._running[job.id] = job

    @staticmethod
    def _images(jobs: list[Job]) -> int:
        return sum(job.request.num_images_per_prompt for job in jobs)

    def _join_batch(self, jobs: list[Job], key: Hashable, hold: Callable[[Job], None] | None = None) -> None:
        """Waiting jobs with ``key``, in queue order, while their images fit and their
        owner stays within ``max_running``; each is taken (or ``hold`` is called)."""
        running: dict[str, int] = {}
        for job in self._running.values():
            running[job.owner] = running.get(job.owner, 0) + 1
        for job in list(self._ordered()):
            if job.id in self._prefetched:
                continue
            if self._images(jobs) + job.request.num_images_per_prompt > self.max_batch:
                continue
            if job.max_running is not None and running.get(job.owner, 0) >= job.max_running:
                continue
            if self._key(job) != key:
                continue
            (hold or self._take)(job)
            running[job.owner] = running.get(job.owner, 0) + 1
            jobs.append(job)

    def _key(self, job: Job) -> Hashable | None:
        if job.id not in self._keys:
            self._keys[job.id] = self.batch_key(job.request)
        return self._keys[job.id]

    async def _work(self, runner: Runner, executor: ThreadPoolExecutor) -> None:
        batches = callable(getattr(runner, "generate_batch", None))
        warm_up = getattr(runner, "warm_up", None)
        if self.warm_up and warm_up is not None:
            try:  # jobs that come meanwhile wait: the device is busy
                seconds = await asyncio.get_running_loop().run_in_executor(executor, warm_up, self.warm_up)
                log.info("%s loaded and warmed in %.2f s", self.warm_up, seconds)
            except Exception:  # the first job will say what is wrong with it
                log.warning("warming up %s failed", self.warm_up, exc_info=True)
        pending: list[asyncio.Task[None]] = []  # this worker's ends, oldest first
        unbegun: deque[End] = deque()  # the ends of ``pending`` not begun yet, oldest first
        runs: deque[_Run] = deque()  # device calls, oldest first
        while True:
            pending = [task for task in pending if not task.done()]
            live = [run for run in runs if not run.withdrawn]  # a withdrawn one only passes
            busy = len(live) == 1 and not live[0].task.done()
            if busy and len(self.runners) == 1 and not self._stopping:  # hand the device its next job
                if not self._has_runnable():  # one that comes meanwhile goes next
                    await self._first_of(live[0].task)
                elif len(pending) + len(live) >= self.max_finishing:  # each run in flight ends too
                    await asyncio.wait({live[0].task})
                else:
                    jobs = self._prefetch(runner, batches)
                    launch = self._prefetched[jobs[0].id]
                    ahead = self._device_call(jobs, runner, executor, launch=launch)
                    runs.append(_Run(jobs, asyncio.create_task(ahead), launch))
                continue
            if runs:
                jobs, run = runs[0].jobs, runs.popleft().task
                ends = await run
                if ends is None:  # withdrawn before the device began it: the jobs wait again
                    continue
                for end in ends:
                    after = pending[-1] if pending else None
                    unbegun.append(end)
                    task = asyncio.create_task(self._finish(end, after, unbegun), name=f"finish-{end.job.id}")
                    self._finishing[end.job.id] = task
                    pending.append(task)
                for job in jobs:
                    self._running.pop(job.id, None)
                    self._open[job.owner] -= 1
                    self._rounds.pop(job.id, None)
                    self._keys.pop(job.id, None)
                await self._notify_async()
                continue
            if len(pending) >= self.max_finishing:
                await asyncio.wait({pending[0]})
                continue
            jobs = await self._next(runner, batches)
            if not jobs:
                return
            runs.append(_Run(jobs, asyncio.create_task(self._device_call(jobs, runner, executor))))

    def _prefetch(self, runner: Runner, batches: bool) -> list[Job]:
        """Hand the next job (and what joins its batch) to the device's thread while its
        current one runs, so the device goes on without waiting for the event loop. Until
        the device begins them they still wait here: a cancel, a newcomer that ranks before
        them or one that can join their batch withdraws them. With one device only (with
        several, a job waits for whichever device frees first)."""
        head = self._pick(runner)
        jobs = [head]
        key = self._key(head) if batches and self.max_batch > 1 else None
        launch = Launch(jobs, key)
        self._prefetched[head.id] = launch
        if key is not None:
            self._join_batch(jobs, key, hold=lambda job: self._prefetched.__setitem__(job.id, launch))
        return jobs

    def _joins(self, job: Job, launch: Launch) -> bool:
        """Whether ``job`` could share the batch of prefetched ``launch``."""
        if (
            launch.key is None
            or self._images(launch.jobs) + job.request.num_images_per_prompt > self.max_batch
        ):
            return False
        return self._key(job) == launch.key

    def _withdraw(self, launch: Launch) -> bool:
        """Take prefetched jobs back from the device's thread; False when it began them."""
        if not launch.withdraw():
            return False
        for job in launch.jobs:
            self._prefetched.pop(job.id, None)
        return True

    def _began(self, jobs: list[Job]) -> None:
        """The device began prefetched ``jobs``: they run now."""
        for job in jobs:
            self._prefetched.pop(job.id, None)
            if job.id in self._waiting:
                self._take(job)

    async def _first_of(self, run: asyncio.Task[list[End] | None]) -> None:
        """Wait until ``run`` is done or the queue changes."""
        assert self._changed is not None

        async def changed() -> None:
            assert self._changed is not None
            async with self._changed:
                await self._changed.wait()

        waiter = asyncio.create_task(changed())
        try:
            await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    async def _finish(self, end: End, after: asyncio.Task[None] | None, unbegun: deque[End]) -> None:
        """End a job off the device's path, after the worker's previous job has ended; with
        the finished jobs that wait right after it, in one call, when the listener ends
        several at once (``jobs_finished``)."""
        job = end.job
        try:
            if after is not None:
                await asyncio.wait({after})
            if end.grouped:  # ended with an earlier one
                return
            unbegun.remove(end)
            together = getattr(self.listener, "jobs_finished", None)
            group = group_of(end, unbegun, self.max_finishing if together is not None else 1)
            if len(group) > 1:
                await together([(each.job, each.value) for each in group])  # type: ignore[misc]
            else:
                await end.run(self.listener)
        except Exception:  # a listener bug must not lose the other jobs' ends
            log.exception("job %s: unexpected error while ending it", job.id)
        finally:
            if not end.grouped and end in unbegun:  # cancelled before it began
                unbegun.remove(end)
            self._finishing.pop(job.id, None)
            await self._notify_async()
