"""The local queue's micro-batching: compatible jobs from any user run as one batch in fair
order, a batch waits for its window only until it is full, and one bad request fails alone."""

from __future__ import annotations

import asyncio

from pipeline.errors import GenerationCancelled
from pipeline.queue import Job, LocalQueue
from pipeline.request import GenerationRequest, GenerationResult
from tests.pipeline.test_queue import GatedRunner, Recorder, _drain, _running


class BatchRunner(GatedRunner):
    """Runs a batch when the gate opens; records each call's seeds. A request with seed 13
    breaks any batch it is in (and fails alone); progress carries a preview per request."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[int]] = []

    def generate(self, request, **kwargs) -> GenerationResult:
        if request.seed == 13:
            self.calls.append([13])
            raise ValueError("seed 13 cannot be drawn")
        result = super().generate(request, **kwargs)
        self.calls.append([request.seed])
        return result

    def generate_batch(self, requests, *, on_progress=None, should_stop=None, on_preview=None):
        self.gate.acquire()
        seeds = [request.seed for request in requests]
        self.calls.append(seeds)
        if 13 in seeds:
            raise ValueError("this batch cannot be drawn")
        for step in range(1, 3):
            if should_stop and should_stop():
                raise GenerationCancelled()
            if on_preview:
                on_preview(step, [f"preview {seed}".encode() for seed in seeds])
            if on_progress:
                on_progress(step, 2)
        return [
            GenerationResult(images=[], model_name="t", model_hash=str(seed), device_seconds=0.0)
            for seed in seeds
        ]


class ResultRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.results: dict[str, str | None] = {}
        self.previews: dict[str, list[bytes]] = {}

    def job_progress(self, job: Job, step: int, total: int, preview: bytes | None = None) -> None:
        super().job_progress(job, step, total, preview)
        if preview is not None:
            self.previews.setdefault(job.id, []).append(preview)

    async def job_finished(self, job: Job, result) -> None:
        await super().job_finished(job, result)
        self.results[job.id] = result.model_hash


def _compatible(request: GenerationRequest) -> str | None:
    """Test batch key: the prompt; "alone" never batches."""
    return None if request.prompt == "alone" else request.prompt


def _batch_job(owner: str, seed: int, prompt: str = "x", images: int = 1, priority: int = 0) -> Job:
    request = GenerationRequest(prompt=prompt, seed=seed, num_images_per_prompt=images)
    return Job(f"{owner}{seed}", owner, request, priority)


async def test_jobs_waiting_behind_a_busy_device_run_as_one_batch_in_fair_order() -> None:
    runner, recorder = BatchRunner(), ResultRecorder()
    queue = LocalQueue([runner], recorder, max_batch=4, batch_window=0, batch_key=_compatible)
    async with _running(queue):
        await queue.put(_batch_job("a", 1, "alone"))  # the device is busy with it
        await asyncio.sleep(0.05)
        for job in (
            _batch_job("a", 2),
            _batch_job("a", 3),
            _batch_job("b", 4, images=2),
            _batch_job("c", 5, "other"),
            _batch_job("d", 6),
            _batch_job("e", 7, priority=5),
        ):
            await queue.put(job)
        await _drain(runner, queue, 4)
    # e (priority), then everyone's first job before a's second and third (a1 was running
    # when they came): b's two images count, "other" cannot join, d fills the 4 images;
    # then c's job alone, then a's two together
    assert runner.calls == [[1], [7, 4, 6], [5], [2, 3]]
    assert {k: v for k, v in recorder.results.items() if v} == {
        "e7": "7",
        "b4": "4",
        "d6": "6",
        "a2": "2",
        "a3": "3",
    }
    for job_id in ("e7", "b4", "d6"):
        assert ("progress 2/2", job_id) in recorder.log
        assert recorder.previews[job_id] == [f"preview {job_id[1:]}".encode()] * 2


async def test_a_batch_waits_for_its_window_only_until_it_is_full() -> None:
    runner, recorder = BatchRunner(), ResultRecorder()
    queue = LocalQueue([runner], recorder, max_batch=2, batch_window=30, batch_key=_compatible)
    async with _running(queue):
        await queue.put(_batch_job("a", 1))
        await asyncio.sleep(0.05)  # within the window: the device has not started yet
        assert runner.calls == [] and recorder.log == []
        await queue.put(_batch_job("b", 2))  # fills the batch: it starts at once
        await _drain(runner, queue, 1)
    assert runner.calls == [[1, 2]]


async def test_a_job_that_comes_while_the_next_batch_is_handed_on_still_joins_it() -> None:
    runner, recorder = BatchRunner(), ResultRecorder()
    queue = LocalQueue([runner], recorder, max_batch=4, batch_window=0, batch_key=_compatible)
    await queue.start()
    try:
        await queue.put(_batch_job("a", 1, "alone"))  # the device is busy with it
        await asyncio.sleep(0.05)
        await queue.put(_batch_job("b", 2))  # handed to the device's thread, alone
        await asyncio.sleep(0.05)
        await queue.put(_batch_job("c", 3))  # can share b2's batch: it is formed again
        await queue.put(_batch_job("d", 4, "other"))  # cannot: it waits for the next call
        await _drain(runner, queue, 3)
    finally:
        for _ in range(4):  # a call more than expected ends too, so a failure is not a hang
            runner.gate.release()
        await queue.stop()
    assert runner.calls == [[1], [2, 3], [4]]


async def test_one_bad_request_fails_alone_and_a_cancelled_member_is_stopped() -> None:
    runner, recorder = BatchRunner(), ResultRecorder()
    queue = LocalQueue([runner], recorder, max_batch=8, batch_window=0, batch_key=_compatible)
    async with _running(queue):
        await queue.put(_batch_job("a", 1, "alone"))
        await asyncio.sleep(0.05)
        for owner, seed in (("b", 2), ("c", 13), ("d", 4)):
            await queue.put(_batch_job(owner, seed))
        runner.gate.release()  # a1
        await asyncio.sleep(0.05)
        runner.gate.release()  # the batch, which fails; then each alone
        await _drain(runner, queue, 2)
        await queue.put(_batch_job("e", 5, "alone"))
        await asyncio.sleep(0.05)
        await queue.put(_batch_job("f", 6))
        await queue.put(_batch_job("g", 7))
        runner.gate.release()  # e5
        await asyncio.sleep(0.05)
        assert await queue.cancel("f6") == "running"  # a member of the running batch
        await _drain(runner, queue, 1)
    assert runner.calls[:5] == [[1], [2, 13, 4], [2], [13], [4]]
    assert ("failed", "c13") in recorder.log and ("finished", "b2") in recorder.log
    assert ("finished", "d4") in recorder.log
    assert ("stopped:cancel", "f6") in recorder.log and ("finished", "g7") in recorder.log
    assert ("finished", "f6") not in recorder.log
