"""What a local queue's worker keeps for each device call: the claims of its jobs
(``Claims``), jobs handed to the device's thread ahead of time (``Launch``), and how each
job that left the device ends (``End``)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Awaitable, Hashable
from dataclasses import dataclass
from typing import Any

from pipeline.queue.base import Job, JobListener


class Launch:
    """Jobs handed to a device's thread ahead of time. The thread begins them unless the
    loop withdrew them first; the lock makes the two exclusive."""

    def __init__(self, jobs: list[Job], key: Hashable | None = None) -> None:
        self.jobs = jobs
        self.key = key  # the batch key its jobs share; None: not batched
        self._lock = threading.Lock()
        self._state = "handed"

    def begin(self) -> bool:
        """The device's thread: True if the jobs are its to run."""
        return self._turn("begun")

    @property
    def begun(self) -> bool:
        return self._state == "begun"

    @property
    def withdrawn(self) -> bool:
        return self._state == "withdrawn"

    def withdraw(self) -> bool:
        """The loop: True if the device will not run them."""
        return self._turn("withdrawn")

    def _turn(self, state: str) -> bool:
        with self._lock:
            if self._state != "handed":
                return False
            self._state = state
            return True


def resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Claims:
    """Claims jobs (``job_started``) while the device already runs them, so the device
    never waits for the store. A job whose claim is refused (cancelled or taken over
    meanwhile) is stopped at its next step and never ended here; progress reported
    before the claims are settled waits for them, so no one sees a step before the start."""

    def __init__(self, listener: JobListener, jobs: list[Job]) -> None:
        self.listener = listener
        self.pending = list(jobs)
        self.held: list[Job] = []
        self._settled = not jobs
        self._waiting: list[tuple[Job, int, int, bytes | None]] = []

    async def settle(self, running: asyncio.Future[Any]) -> None:
        """Claim every job (all at once when the listener claims batches); if a claim
        raises, the jobs stop and the device's run is awaited (its outcome dropped) before
        the error goes on."""
        try:
            claims = await self._claim()
        except Exception:
            for other in self.pending:
                other.request_stop("unclaimed")
            with contextlib.suppress(Exception):
                await running
            raise
        for job, claimed in zip(self.pending, claims, strict=True):
            if claimed:
                self.held.append(job)
            else:
                job.request_stop("unclaimed")
        self._settled = True
        for job, step, total, preview in self._waiting:
            self.progress(job, step, total, preview)
        self._waiting.clear()

    async def _claim(self) -> list[bool]:
        together = getattr(self.listener, "jobs_started", None)
        if together is not None and len(self.pending) > 1:
            return list(await together(self.pending))
        return [await self.listener.job_started(job) for job in self.pending]

    def progress(self, job: Job, step: int, total: int, preview: bytes | None) -> None:
        if not self._settled:
            self._waiting.append((job, step, total, preview))
        elif job in self.held or job not in self.pending:
            self.listener.job_progress(job, step, total, preview)


@dataclass(eq=False)
class End:
    """A job that left the device, and how it ends: ``finished`` (``value``: its result),
    ``failed`` (``value``: the error) or ``stopped``. ``grouped``: it was ended together
    with an earlier end of its worker (``JobListener.jobs_finished``)."""

    job: Job
    how: str
    value: Any = None
    grouped: bool = False

    def run(self, listener: JobListener) -> Awaitable[None]:
        if self.how == "finished":
            return listener.job_finished(self.job, self.value)
        if self.how == "failed":
            return listener.job_failed(self.job, self.value)
        return listener.job_stopped(self.job)


def group_of(end: End, unbegun: deque[End], most: int) -> list[End]:
    """``end``, beginning now, and the finished ends right after it that wait in
    ``unbegun`` (its worker's ends not begun yet, oldest first), at most ``most`` in all,
    when ``end`` finished too; the others are taken out of ``unbegun``, marked grouped."""
    group = [end]
    if end.how != "finished":
        return group
    while unbegun and unbegun[0].how == "finished" and len(group) < most:
        later = unbegun.popleft()
        later.grouped = True
        group.append(later)
    return group
