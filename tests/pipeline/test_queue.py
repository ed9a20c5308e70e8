"""The local queue: fair order, positions, cancel, and never running torch on the loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pipeline.errors import GenerationCancelled
from pipeline.queue import Job, LocalQueue
from pipeline.request import GenerationRequest, GenerationResult


class GatedRunner:
    """Runs one job at a time when the test opens the gate; records the order and thread."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.gate = threading.Semaphore(0)
        self.threads: set[str] = set()

    def generate(self, request, *, on_progress=None, should_stop=None, on_preview=None) -> GenerationResult:
        self.threads.add(threading.current_thread().name)
        self.gate.acquire()
        for step in range(1, 3):
            if should_stop and should_stop():
                raise GenerationCancelled()
            if on_progress:
                on_progress(step, 2)
        self.order.append(request.seed)
        return GenerationResult(images=[], model_name="t", model_hash=None, device_seconds=0.0)


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.refuse: set[str] = set()

    async def job_started(self, job: Job) -> bool:
        self.log.append(("started", job.id))
        return job.id not in self.refuse

    def job_progress(self, job: Job, step: int, total: int, preview: bytes | None = None) -> None:
        self.log.append((f"progress {step}/{total}", job.id))

    async def job_finished(self, job: Job, result) -> None:
        self.log.append(("finished", job.id))

    async def job_failed(self, job: Job, error) -> None:
        self.log.append(("failed", job.id))

    async def job_stopped(self, job: Job) -> None:
        self.log.append((f"stopped:{job.stop_reason}", job.id))


def _job(owner: str, seed: int, priority: int = 0) -> Job:
    return Job(f"{owner}{seed}", owner, GenerationRequest(prompt="x", seed=seed), priority)


@asynccontextmanager
async def _running(queue: LocalQueue) -> AsyncIterator[LocalQueue]:
    """The queue started, and stopped when the test's block ends, however it ends."""
    await queue.start()
    try:
        yield queue
    finally:
        await queue.stop()


async def _drain(runner: GatedRunner, queue: LocalQueue, n: int) -> None:
    for _ in range(n):
        runner.gate.release()
    await asyncio.wait_for(queue.join(), 10)


async def test_a_users_first_job_outranks_everyones_second() -> None:
    runner, recorder = GatedRunner(), Recorder()
    queue = LocalQueue([runner], recorder)
    async with _running(queue):
        await queue.put(_job("a", 1))  # starts at once and waits at the gate
        await asyncio.sleep(0.05)
        positions = [
            await queue.put(_job("a", 2)),
            await queue.put(_job("a", 3)),
            await queue.put(_job("b", 4)),
            await queue.put(_job("c", 5, priority=5)),
        ]
        assert positions == [1, 2, 1, 1]
        assert [await queue.position(i) for i in ("a1", "c5", "b4", "a2", "a3")] == [0, 1, 2, 3, 4]
        await _drain(runner, queue, 5)
        assert runner.order == [1, 5, 4, 2, 3]
        assert all(name.startswith("atelier-device-0") for name in runner.threads)
        assert ("progress 2/2", "a1") in recorder.log


async def test_cancel_queued_and_running() -> None:
    runner, recorder = GatedRunner(), Recorder()
    queue = LocalQueue([runner], recorder)
    async with _running(queue):
        await queue.put(_job("a", 1))
        await queue.put(_job("a", 2))
        await asyncio.sleep(0.05)
        assert await queue.cancel("a2") == "queued"
        assert await queue.cancel("a1") == "running"
        assert await queue.cancel("zz") == "unknown"
        await _drain(runner, queue, 1)
        assert ("stopped:cancel", "a1") in recorder.log
        assert runner.order == []


class Claims(Recorder):
    """A Recorder that says when a job is claimed and keeps what the claim put on it."""

    def __init__(self) -> None:
        super().__init__()
        self.claimed = asyncio.Event()
        self.contexts: dict[str, object] = {}

    async def job_started(self, job: Job) -> bool:
        job.context = f"answer {job.id} here"
        self.claimed.set()
        return await super().job_started(job)

    def job_progress(self, job: Job, step: int, total: int, preview: bytes | None = None) -> None:
        self.contexts[job.id] = job.context
        super().job_progress(job, step, total, preview)


async def test_the_async_api_answers_positions_and_cancels() -> None:
    runner, listener = GatedRunner(), Claims()
    queue = LocalQueue([runner], listener)
    assert await queue.position("a1") is None
    assert await queue.put(_job("a", 1)) == 1  # queued before the device runs: next in line
    assert await queue.put(_job("a", 2)) == 2
    assert await queue.put(_job("b", 3)) == 2  # b's first job outranks a's second
    async with _running(queue):
        await asyncio.wait_for(listener.claimed.wait(), 10)
        assert [await queue.position(i) for i in ("a1", "b3", "a2")] == [0, 1, 2]
        assert await queue.cancel("b3") == "queued"
        assert await queue.position("b3") is None and await queue.position("a2") == 1
        assert await queue.cancel("b3") == "unknown"  # gone already
        assert await queue.cancel("nobody") == "unknown"
        await _drain(runner, queue, 2)
        assert runner.order == [1, 2]
        assert ("started", "b3") not in listener.log
        # what the claim put on a job is carried to its progress; the queue never reads it
        assert listener.contexts == {"a1": "answer a1 here", "a2": "answer a2 here"}
        assert await queue.position("a1") is None


async def test_a_job_the_listener_refuses_is_skipped() -> None:
    runner, recorder = GatedRunner(), Recorder()
    recorder.refuse.add("a1")
    queue = LocalQueue([runner], recorder)
    async with _running(queue):
        await queue.put(_job("a", 1))
        await queue.put(_job("a", 2))
        # the device starts a job while it is claimed: a refused one stops at its first step
        while ("started", "a1") not in recorder.log:
            await asyncio.sleep(0.01)
        await _drain(runner, queue, 2)
        assert runner.order == [2]
    assert [entry for entry in recorder.log if entry[1] == "a1"] == [("started", "a1")]  # no progress, no end


async def test_stop_without_wait_interrupts_the_running_job() -> None:
    runner, recorder = GatedRunner(), Recorder()
    queue = LocalQueue([runner], recorder)
    await queue.start()
    await queue.put(_job("a", 1))
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(queue.stop(wait=False))
    await asyncio.sleep(0.05)
    runner.gate.release()
    await asyncio.wait_for(stopping, 10)
    assert ("stopped:shutdown", "a1") in recorder.log


async def test_two_devices_run_two_jobs_at_once() -> None:
    first, second, recorder = GatedRunner(), GatedRunner(), Recorder()
    queue = LocalQueue([first, second], recorder)
    async with _running(queue):
        await queue.put(_job("a", 1))
        await queue.put(_job("b", 2))
        await asyncio.sleep(0.05)
        assert queue.running == 2
        first.gate.release()
        second.gate.release()
        await asyncio.wait_for(queue.join(), 10)
        assert sorted(first.order + second.order) == [1, 2]


async def test_max_running_keeps_an_owners_extra_jobs_waiting_for_others() -> None:
    first, second, recorder = GatedRunner(), GatedRunner(), Recorder()
    queue = LocalQueue([first, second], recorder)
    async with _running(queue):
        for seed in (1, 2):
            job = _job("a", seed)
            job.max_running = 1
            await queue.put(job)
        await asyncio.sleep(0.05)
        assert queue.running == 1  # two devices, but a's cap is one
        await queue.put(_job("b", 3))
        await asyncio.sleep(0.05)
        assert queue.running == 2 and await queue.position("a2") == 1
        for runner in (first, second, first, second):
            runner.gate.release()
        await asyncio.wait_for(queue.join(), 10)
        assert sorted(first.order + second.order) == [1, 2, 3]


class SlowEnds(Recorder):
    """Ends (finished, failed) wait until the test opens ``ends``; ``broken`` ones raise."""

    def __init__(self) -> None:
        super().__init__()
        self.ends = asyncio.Event()
        self.broken: set[str] = set()
        self.ended: list[str] = []

    async def job_finished(self, job: Job, result) -> None:
        await self.ends.wait()
        if job.id in self.broken:
            raise RuntimeError("a listener bug")
        self.ended.append(job.id)


async def _until(predicate) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), 10)


async def test_the_device_runs_the_next_job_while_the_last_one_ends() -> None:
    runner, listener = GatedRunner(), SlowEnds()
    queue = LocalQueue([runner], listener)
    await queue.start()
    try:
        for seed in (1, 2, 3):
            await queue.put(_job("a", seed))
        runner.gate.release()
        runner.gate.release()
        await _until(lambda: runner.order == [1, 2] and queue.finishing == 2)
        assert listener.ended == [] and await queue.position("a1") == 0  # a1's end waits on the listener
        joined = asyncio.create_task(queue.join())
        runner.gate.release()
        await _until(lambda: runner.order == [1, 2, 3])
        await asyncio.sleep(0.05)
        assert not joined.done()  # join waits for the ends too
        listener.ends.set()
        await asyncio.wait_for(joined, 10)
        assert listener.ended == ["a1", "a2", "a3"]  # one device's jobs end in the order they ran
        assert queue.finishing == 0 and await queue.position("a1") is None
    finally:
        listener.ends.set()
        await queue.stop()


class TimedRunner(GatedRunner):
    """A GatedRunner that records when each job began and returned on the device."""

    def __init__(self) -> None:
        super().__init__()
        self.began: dict[int, float] = {}
        self.returned: dict[int, float] = {}

    def generate(self, request, **kwargs) -> GenerationResult:
        self.began[request.seed] = time.perf_counter()
        try:
            return super().generate(request, **kwargs)
        finally:
            self.returned[request.seed] = time.perf_counter()


async def test_the_device_goes_on_to_the_next_job_without_the_event_loop() -> None:
    # The next job is handed to the device's thread while the current one runs: the device
    # begins it even while the event loop is busy (here: blocked outright).
    runner, recorder = TimedRunner(), Recorder()
    queue = LocalQueue([runner], recorder)
    async with _running(queue):
        await queue.put(_job("a", 1))
        await _until(lambda: 1 in runner.began)
        await queue.put(_job("b", 2))
        await asyncio.sleep(0.05)
        assert await queue.position("b2") == 1  # handed on, but still waiting: not running
        assert ("started", "b2") not in recorder.log
        runner.gate.release()
        runner.gate.release()
        time.sleep(0.3)  # the loop is blocked: nothing it would do can start b2
        unblocked = time.perf_counter()
        await asyncio.wait_for(queue.join(), 10)
        assert runner.order == [1, 2]
        assert runner.began[2] < unblocked
        # b2 is claimed (and announced) only once the device has begun it
        assert recorder.log.index(("started", "b2")) > recorder.log.index(("started", "a1"))
        assert runner.began[2] >= runner.returned[1]


async def test_a_job_handed_on_ahead_still_yields_to_a_newcomer_and_to_a_cancel() -> None:
    runner, recorder = GatedRunner(), Recorder()
    queue = LocalQueue([runner], recorder)
    async with _running(queue):
        await queue.put(_job("a", 1))
        await _until(lambda: ("started", "a1") in recorder.log)
        await queue.put(_job("a", 2))  # handed to the device's thread behind a1
        await queue.put(_job("a", 3))
        await asyncio.sleep(0.05)
        assert await queue.put(_job("b", 4)) == 1  # b's first job outranks a's second
        assert await queue.cancel("a3") == "queued"
        assert [await queue.position(i) for i in ("a1", "b4", "a2", "a3")] == [0, 1, 2, None]
        await _drain(runner, queue, 3)
        assert runner.order == [1, 4, 2]
        assert ("started", "a3") not in recorder.log


async def test_stop_leaves_a_job_handed_on_ahead_waiting() -> None:
    runner, recorder = GatedRunner(), Recorder()
    queue = LocalQueue([runner], recorder)
    await queue.start()
    await queue.put(_job("a", 1))
    await _until(lambda: ("started", "a1") in recorder.log)
    await queue.put(_job("a", 2))
    await asyncio.sleep(0.05)
    queue.close()  # a draining worker's first step: what waits here can be given back
    assert [job.id for job in queue.waiting_jobs()] == ["a2"]
    assert [job.id for job in queue.running_jobs()] == ["a1"]
    stopping = asyncio.create_task(queue.stop())
    await asyncio.sleep(0.05)
    runner.gate.release()
    runner.gate.release()
    await asyncio.wait_for(stopping, 10)
    assert runner.order == [1] and queue.waiting == 1
    assert ("started", "a2") not in recorder.log


async def test_stop_waits_for_the_ends_of_the_jobs_that_ran() -> None:
    runner, listener = GatedRunner(), SlowEnds()
    queue = LocalQueue([runner], listener)
    await queue.start()
    await queue.put(_job("a", 1))
    runner.gate.release()
    await _until(lambda: runner.order == [1])
    stopping = asyncio.create_task(queue.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()
    listener.ends.set()
    await asyncio.wait_for(stopping, 10)
    assert listener.ended == ["a1"]


async def test_a_listener_error_at_the_end_keeps_the_worker_and_the_other_ends() -> None:
    runner, listener = GatedRunner(), SlowEnds()
    listener.broken.add("a1")
    queue = LocalQueue([runner], listener)
    async with _running(queue):
        await queue.put(_job("a", 1))
        await queue.put(_job("a", 2))
        listener.ends.set()
        await _drain(runner, queue, 2)
        assert listener.ended == ["a2"] and runner.order == [1, 2]


async def test_a_job_that_is_ending_does_not_hold_its_owners_running_cap() -> None:
    runner, listener = GatedRunner(), SlowEnds()
    queue = LocalQueue([runner], listener)
    await queue.start()
    try:
        for seed in (1, 2):
            job = _job("a", seed)
            job.max_running = 1
            await queue.put(job)
        runner.gate.release()
        await _until(lambda: runner.order == [1])
        await _until(lambda: queue.running == 1 and queue.waiting == 0)  # a2 is on the device
        assert queue.finishing == 1
        runner.gate.release()
        listener.ends.set()
        await asyncio.wait_for(queue.join(), 10)
        assert listener.ended == ["a1", "a2"]
    finally:
        listener.ends.set()
        await queue.stop()


class GroupedEnds(SlowEnds):
    """Ends several finished jobs at once when they wait to end (``jobs_finished``)."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[list[str]] = []

    async def jobs_finished(self, finished) -> None:
        self.groups.append([job.id for job, _ in finished])
        await self.ends.wait()
        self.ended.extend(job.id for job, _ in finished)


async def test_finished_jobs_that_wait_to_end_end_together_in_order() -> None:
    runner, listener = GatedRunner(), GroupedEnds()
    queue = LocalQueue([runner], listener)
    await queue.start()
    try:
        for seed in (1, 2, 3, 4, 5):
            await queue.put(_job("a", seed))
        runner.gate.release()
        await _until(lambda: runner.order == [1] and queue.finishing == 1)  # a1 ends alone: held
        runner.gate.release()
        runner.gate.release()
        await _until(lambda: runner.order == [1, 2, 3] and "a4" in [j.id for j in queue.running_jobs()])
        assert await queue.cancel("a4") == "running"
        runner.gate.release()  # a4 stops
        runner.gate.release()  # a5 runs
        await _until(lambda: runner.order == [1, 2, 3, 5] and queue.finishing == 5)
        listener.ends.set()
        await asyncio.wait_for(queue.ended("a3"), 10)
        await asyncio.wait_for(queue.join(), 10)
        # a2 and a3 waited behind a1's end: one call; a4's stop ends the group; a5 alone
        assert listener.groups == [["a2", "a3"]]
        assert listener.ended == ["a1", "a2", "a3", "a5"]
        assert ("stopped:cancel", "a4") in listener.log
        assert queue.finishing == 0 and await queue.position("a3") is None
    finally:
        listener.ends.set()
        await queue.stop()


async def test_pending_ends_beyond_the_limit_hold_the_device() -> None:
    runner, listener = GatedRunner(), SlowEnds()
    queue = LocalQueue([runner], listener, max_finishing=2)
    await queue.start()
    try:
        for seed in (1, 2, 3, 4):
            await queue.put(_job("a", seed))
            runner.gate.release()
        await _until(lambda: runner.order == [1, 2])
        await asyncio.sleep(0.05)
        assert runner.order == [1, 2] and queue.waiting == 2  # two ends pending: the worker waits
        listener.ends.set()
        await asyncio.wait_for(queue.join(), 10)
        assert listener.ended == ["a1", "a2", "a3", "a4"]
    finally:
        listener.ends.set()
        await queue.stop()


class ResidentRunner(GatedRunner):
    """A device with some checkpoints loaded."""

    def __init__(self, loaded: set[str]) -> None:
        super().__init__()
        self.loaded = loaded

    def resident(self, checkpoint: str) -> bool:
        return checkpoint in self.loaded


def _on(owner: str, seed: int, checkpoint: str) -> Job:
    return Job(f"{owner}{seed}", owner, GenerationRequest(prompt="x", seed=seed, checkpoint=checkpoint))


async def test_a_device_takes_a_job_whose_checkpoint_it_has_loaded_within_the_fair_order() -> None:
    holds_x, holds_y = ResidentRunner({"x"}), ResidentRunner({"y"})
    recorder = Recorder()
    queue = LocalQueue([holds_x, holds_y], recorder)
    async with _running(queue):
        await queue.put(_on("a", 1, "z"))  # both devices busy
        await queue.put(_on("b", 2, "z"))
        await asyncio.sleep(0.05)
        await queue.put(_on("c", 3, "y"))  # first in line, loaded on the other device
        await queue.put(_on("d", 4, "x"))
        await queue.put(_on("a", 5, "x"))  # a's second job: a later round, not taken before c's
        holds_x.gate.release()
        await asyncio.sleep(0.05)
        assert holds_x.order[-1] in (1, 2) and await queue.position("d4") == 0  # d4 runs on the x device
        holds_x.gate.release()
        await asyncio.sleep(0.05)
        # the x device, free again, takes c3 (the front) before a's second job, loaded or not
        assert await queue.position("c3") == 0 and await queue.position("a5") == 1
        holds_y.gate.release()  # b2 ends; the y device takes a5, the only job left
        while await queue.position("a5") != 0:
            await asyncio.sleep(0.01)
        holds_y.gate.release()
        holds_x.gate.release()
        await asyncio.wait_for(queue.join(), 10)
    assert holds_x.order[1:] == [4, 3]
    assert sorted(holds_x.order[:1] + holds_y.order) == [1, 2, 5]


async def test_positions_follow_the_fair_order_through_puts_and_cancels() -> None:
    """Many jobs of many owners and priorities, some cancelled: every position is the job's
    place in (priority, round, arrival) order, the round being the owner's open jobs at arrival."""
    import random

    chance = random.Random(7)
    queue = LocalQueue([GatedRunner()], Recorder())  # not started: everything waits
    open_jobs: dict[str, list[str]] = {}
    expected: dict[str, tuple[int, int, int]] = {}
    for seq in range(600):
        owner, priority = f"u{chance.randrange(40)}", chance.choice((0, 0, 0, 1, 5))
        job = Job(f"j{seq}", owner, GenerationRequest(prompt="x", seed=seq), priority)
        expected[job.id] = (-priority, len(open_jobs.setdefault(owner, [])), seq)
        open_jobs[owner].append(job.id)
        await queue.put(job)
        if chance.random() < 0.2:
            victim = chance.choice(sorted(expected))
            assert await queue.cancel(victim) == "queued"
            del expected[victim]
            for ids in open_jobs.values():
                if victim in ids:
                    ids.remove(victim)
    order = sorted(expected, key=expected.__getitem__)
    assert [await queue.position(job_id) for job_id in order] == list(range(1, len(order) + 1))
    assert await queue.position("j-unknown") is None and queue.waiting == len(order)
