from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.request import GenerationRequest, GenerationResult


@dataclass(eq=False)
class Job:
    id: str
    owner: str  # fairness key: one user
    request: GenerationRequest
    priority: int = 0  # higher runs first (moderator-set)
    max_running: int | None = None  # at most this many of the owner's jobs run at once
    seq: int = 0  # arrival order, set by the queue
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None  # "cancel" (user) or "shutdown" (run it again later)
    # the listener's own, carried with the job and never looked at by the queue (the bot: who
    # to tell about it, read from the job's row when it is claimed)
    context: Any = None

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        self.stop.set()


class JobListener(Protocol):
    """What the queue reports; implemented by the bot's service. Called on the event loop.

    ``job_finished``, ``job_failed`` and ``job_stopped`` run off the device's path: the
    device may already run the next job (and ``job_started`` be called for it) while one
    of them saves and stores the last. A device's jobs end one at a time, in order."""

    async def job_started(self, job: Job) -> bool:
        """Claim the job; False means it is no longer runnable (cancelled meanwhile) and is
        skipped. A claim may set ``job.context`` for the calls that follow. Optional, used
        when present: ``jobs_started(jobs) -> list[bool]`` claims a micro-batch's jobs at
        once, as ``job_started`` would one by one."""
        ...

    def job_progress(self, job: Job, step: int, total: int, preview: bytes | None = None) -> None:
        """Step ``step`` of ``total`` is done; ``preview`` is a PNG of the batch so far, when due."""
        ...

    async def job_finished(self, job: Job, result: GenerationResult) -> None:
        """Optional, used when present: ``jobs_finished([(job, result), ...])`` ends several
        finished jobs of one device (those that waited to end), in order, as
        ``job_finished`` would one by one."""
        ...

    async def job_failed(self, job: Job, error: BaseException) -> None: ...

    async def job_stopped(self, job: Job) -> None:
        """The job stopped early: ``job.stop_reason`` says whether it was cancelled or interrupted."""
        ...


class Runner(Protocol):
    """A device's engine. Optional, used when present: ``generate_batch(requests, *,
    on_progress, should_stop, on_preview)`` runs compatible requests as one micro-batch
    (one result per request; ``on_preview(step, pngs)`` gets a PNG per request), and
    ``resident(checkpoint) -> bool`` says whether a checkpoint is loaded on the device."""

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_preview: Callable[[int, bytes], None] | None = None,
    ) -> GenerationResult: ...


class JobQueue(Protocol):
    """Where jobs wait for a device. The calls are async: a queue may answer them from the
    store, so a job put by one process can be cancelled, run and ended by another."""

    async def put(self, job: Job) -> int:
        """Add a job; returns its 1-based position (1 = next to run)."""
        ...

    async def position(self, job_id: str) -> int | None:
        """0 while the job runs (or ends after its run), 1 and up while it waits, None when
        this queue does not have it."""
        ...

    async def cancel(self, job_id: str) -> str:
        """'queued' (removed), 'running' (stops at the next step) or 'unknown'."""
        ...

    async def start(self) -> None: ...

    async def stop(self, *, wait: bool = True) -> None:
        """Stop taking jobs; returns once the jobs that ran have ended (finished, failed or
        stopped, stored). Without ``wait`` running jobs stop at their next step."""
        ...

    async def join(self) -> None:
        """Wait until nothing is queued, running, or ending after its run."""
        ...
