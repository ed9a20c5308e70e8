"""How a local queue's worker runs its jobs on the device: one job, or a micro-batch, each
started on the device's thread at once while its jobs are claimed, with progress and
previews handed to each job, and how each job ends collected for the ends that follow off
the device's path.

These operations are methods of :class:`pipeline.queue.local.LocalQueue`, which inherits
them from ``_DeviceRuns``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pipeline.errors import GenerationCancelled
from pipeline.queue.base import Job, JobListener, Runner
from pipeline.queue.device_calls import Claims, End, Launch, resolve

log = logging.getLogger("pipeline.queue.local")


class _DeviceRuns:
    """The device calls of :class:`pipeline.queue.local.LocalQueue`. The queue gives them
    its listener and ``_began`` (prefetched jobs the device began now run)."""

    if TYPE_CHECKING:
        listener: JobListener

        def _began(self, jobs: list[Job]) -> None: ...

    async def _device_call(
        self, jobs: list[Job], runner: Runner, executor: ThreadPoolExecutor, *, launch: Launch | None = None
    ) -> list[End] | None:
        """Run ``jobs`` on the device (one job, or a micro-batch); how each one ends, or
        None when prefetched ones (``launch``) were withdrawn before the device began them."""
        ends: list[End] = []
        try:
            if len(jobs) == 1:
                began = await self._run(jobs[0], runner, executor, ends, launch=launch)
            else:
                began = await self._run_batch(jobs, runner, executor, ends, launch=launch)
        except Exception:  # a listener bug must not kill the worker
            log.exception("jobs %s: unexpected error in the queue", ", ".join(job.id for job in jobs))
            return ends
        return ends if began else None

    async def _run_batch(
        self,
        jobs: list[Job],
        runner: Runner,
        executor: ThreadPoolExecutor,
        ends: list[End],
        *,
        launch: Launch | None = None,
    ) -> bool:
        """Run ``jobs`` as one micro-batch: progress and previews go to each job; a job
        cancelled meanwhile is reported stopped (the batch stops only when all are). How
        each job ends is added to ``ends``. False when ``launch`` (prefetched jobs) was
        withdrawn before the device began it."""
        loop = asyncio.get_running_loop()
        claims = Claims(self.listener, jobs)
        previews: list[list[bytes] | None] = [None]

        def on_preview(_step: int, pngs: list[bytes]) -> None:
            previews[0] = pngs

        def on_progress(step: int, total: int) -> None:
            pngs, previews[0] = previews[0], None
            for index, job in enumerate(jobs):
                png = pngs[index] if pngs is not None else None
                loop.call_soon_threadsafe(claims.progress, job, step, total, png)

        def generate() -> object:
            return runner.generate_batch(  # type: ignore[attr-defined]
                [job.request for job in jobs],
                on_progress=on_progress,
                should_stop=lambda: all(job.stop.is_set() for job in jobs),
                on_preview=on_preview,
            )

        running = await self._start(generate, executor, claims, launch)
        if running is None:
            return False
        try:
            results = await running
        except GenerationCancelled:
            ends.extend(End(job, "stopped") for job in claims.held)
        except Exception:
            log.warning("a batch of %d jobs failed; running each alone", len(jobs), exc_info=True)
            for job in claims.held:
                await self._run(job, runner, executor, ends, claimed=True)
        else:
            for job, result in zip(jobs, results, strict=True):  # type: ignore[call-overload]
                if job not in claims.held:
                    continue
                if job.stop.is_set():
                    ends.append(End(job, "stopped"))
                else:
                    ends.append(End(job, "finished", result))
        return True

    async def _run(
        self,
        job: Job,
        runner: Runner,
        executor: ThreadPoolExecutor,
        ends: list[End],
        *,
        claimed: bool = False,
        launch: Launch | None = None,
    ) -> bool:
        """Run one job on the device and add how it ends to ``ends``; ``claimed``:
        ``job_started`` already said yes (a batch run alone). False when ``launch`` (the
        prefetched job) was withdrawn before the device began it."""
        loop = asyncio.get_running_loop()
        claims = Claims(self.listener, [] if claimed else [job])
        preview: list[bytes | None] = [None]  # the engine hands a step's preview just before its progress

        def on_preview(_step: int, png: bytes) -> None:
            preview[0] = png

        def on_progress(step: int, total: int) -> None:
            png, preview[0] = preview[0], None
            loop.call_soon_threadsafe(claims.progress, job, step, total, png)

        def generate() -> object:
            return runner.generate(
                job.request, on_progress=on_progress, should_stop=job.stop.is_set, on_preview=on_preview
            )

        running = await self._start(generate, executor, claims, launch)
        if running is None:
            return False
        try:
            result = await running
        except GenerationCancelled:
            end = End(job, "stopped")
        except Exception as exc:
            end = End(job, "failed", exc)
        else:
            end = End(job, "finished", result)
        if claimed or job in claims.held:
            ends.append(end)
        return True

    async def _start(
        self,
        generate: Callable[[], object],
        executor: ThreadPoolExecutor,
        claims: Claims,
        launch: Launch | None,
    ) -> asyncio.Future[Any] | None:
        """Start ``generate`` on the device's thread and claim its jobs while it runs (the
        device never waits for the claim); the running call, or None when ``launch`` (jobs
        handed to the thread ahead) was withdrawn before the device began it."""
        loop = asyncio.get_running_loop()
        begun: asyncio.Future[None] = loop.create_future()

        def call() -> object:
            if launch is not None and not launch.begin():
                return None
            loop.call_soon_threadsafe(resolve, begun)
            return generate()

        running = loop.run_in_executor(executor, call)
        await asyncio.wait({begun, running}, return_when=asyncio.FIRST_COMPLETED)  # not before
        if not begun.done():  # withdrawn (its begin would have come first)
            return None
        if launch is not None:
            self._began(launch.jobs)
        await claims.settle(running)
        return running
