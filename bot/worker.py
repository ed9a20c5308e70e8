"""``atelier worker``: this host's devices run the shared queue's jobs.

With ``[queue] backend = "procrastinate"`` the bot's process only stores and defers
jobs; a worker (one per GPU host, any number of hosts) takes them from PostgreSQL and
runs them on its devices through the same in-process queue as a single-process bot: one
``LocalQueue`` worker per device, micro-batching, ends off the device's path. Its App is
a bot's App without adapters: the job lifecycle stores every state change (under this
worker's lease) and publishes the events, which the relay (bot/relay.py) carries to the
bot's process.

A job taken from procrastinate is first held (``Store.hold``): a job cancelled or taken
meanwhile is dropped, and one whose worker dies is recovered when its lease runs out
(by the bot or any worker, ``JobLifecycle.recover``) and deferred again; the row's
guards make it run, and bill, once. SIGTERM drains: the running jobs finish, the jobs
that wait here go back to the shared queue, nothing new is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from bot.access import Audience
from bot.types import Cancelled
from models.shared_files import SharedFiles
from pipeline.queue import Job, LocalQueue
from pipeline.request import GenerationRequest

if TYPE_CHECKING:
    from bot.app import App
    from pipeline.queue.procrastinate import ProcrastinateQueue

log = logging.getLogger(__name__)


class WorkerFeed:
    """Feeds this App's devices from the shared queue."""

    def __init__(self, app: App, shared: ProcrastinateQueue) -> None:
        settings = app.settings
        self.app = app
        self.shared = shared
        self.local = LocalQueue(
            app.engines,
            app.service,
            max_batch=settings.queue.max_batch,
            batch_window=settings.queue.batch_window_ms / 1000,
            warm_up=settings.engine.default_checkpoint if settings.engine.warm_up else None,
        )
        # enough jobs taken at once for each device to form a full micro-batch; a job's
        # place is free again once it leaves the device (``_run``)
        self.concurrency = max(1, len(app.engines)) * settings.queue.max_batch
        self._worker: asyncio.Task[None] | None = None
        self._draining = False

    async def start(self) -> None:
        await self.local.start()
        self._worker = asyncio.create_task(
            self.shared.run_worker(
                self._run,
                name=self.app.owner,
                concurrency=self.concurrency,
                stalled_seconds=self.app.settings.queue.lease_seconds,
            ),
            name="procrastinate-worker",
        )

    async def drain(self, *, wait: bool = True) -> None:
        """Take nothing new and give back what waits here; ``wait``: let the running jobs
        end (SIGTERM), else they stop at their next step and go back to the queue too."""
        self._draining = True
        self.local.close()  # nothing more begins on a device: what waits here is given back
        for job in self.local.waiting_jobs():
            if await self.local.cancel(job.id) == "queued":
                await self._give_back(job)
        running = self.local.running_jobs()
        await self.local.stop(wait=wait)
        for job in running:  # interrupted ones were stored as queued again, under this lease
            await self._give_back(job)
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()  # procrastinate stops fetching and awaits the jobs it runs
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def _run(self, generation_id: str, owner: str, max_running: int | None) -> None:
        """One procrastinate job: hold the generation, run it here, return once it left
        the device. Its end (images kept, the row stored, quotas settled) goes on here
        without holding one of the worker's places, so ends that fall behind never keep
        the next jobs off the device, and they are stored together. Should this process
        die before the end is stored, the row, still running under this worker's lease, is
        recovered as any interrupted job is."""
        service = self.app.service
        if self._draining:  # taken while stopping: offer it again, untouched
            record = await self.app.store.get(generation_id)
            if record is not None and record.status == "queued":
                await self.shared.put(Job(generation_id, owner, record.request, record.priority, max_running))
            return
        record = await self.app.store.hold(generation_id, service.lease())
        if record is None:  # cancelled, ended, or held by a live process: nothing to do
            return
        request = await self._local_inputs(record.request)
        job = Job(record.id, owner, request, record.priority, max_running)
        await self.local.put(job)
        try:
            await self.local.off_device(job.id)
        except asyncio.CancelledError:  # the bot asked to cancel it (procrastinate's abort)
            outcome = await self.local.cancel(job.id)
            if outcome == "queued" and await self.app.store.mark_cancelled(job.id):
                audience = Audience.of(record, self.app.settings.bot.locale)
                self.app.bus.publish(Cancelled(job.id, audience.actor, audience.route, audience.thread_key))
                await service._ended(job.id)
            elif outcome == "running":
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.local.ended(job.id))
            raise

    async def _give_back(self, job: Job) -> None:
        """A job that waited here goes back to the shared queue for another worker."""
        if await self.app.store.release_job(job.id, self.app.owner):
            await self.shared.put(job)

    async def _local_inputs(self, request: GenerationRequest) -> GenerationRequest:
        """An init image uploaded on the bot's host is read from the database into this
        host's inputs folder (same content name), so the engine finds it."""
        path = request.init_image
        if not path or await asyncio.to_thread(os.path.exists, path):
            return request
        name = Path(path).name
        data = await SharedFiles(self.app.store).input(name)
        if data is None:
            return request  # the engine says the image cannot be read
        local = self.app.images_dir / "inputs" / name
        await asyncio.to_thread(_write, local, data)
        return replace(request, init_image=str(local))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        temporary = path.with_suffix(".partial")
        temporary.write_bytes(data)
        os.replace(temporary, path)
