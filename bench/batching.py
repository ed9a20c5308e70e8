"""What does micro-batching gain? 8 compatible requests from 8 users through the queue.

Builds the ``tiny`` engine once and interleaves, in one process, rounds of
(a) the 8 requests put on a ``LocalQueue`` that batches (``max_batch`` 8) and
(b) the same 8 on a queue that runs one job at a time (``max_batch`` 1),
each round timed from the first ``put`` to the last result. Each user has their own
prompt, seed and CFG scale. Prints the median per-round ratio one-at-a-time / batched
(the target is 2x or better) and compares every batched image with its solo image:
how many are byte for byte equal, and the largest difference in any channel (a larger
UNet batch may round differently, at most one level; more is an error and fails).

Usage: ``python bench/batching.py [--rounds N] [--users 8] [--steps 8] [--size 128] [--device cpu]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time


def _say(text: str, *args: object) -> None:
    print(text % args, flush=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser.parse_args(argv)


class Collector:
    """The queue's listener: keeps each job's result and says when all are in."""

    def __init__(self) -> None:
        self.results: dict[str, object] = {}
        self.failures: dict[str, BaseException] = {}
        self.done = asyncio.Event()
        self.expected = 0

    def expect(self, count: int) -> None:
        self.results.clear()
        self.failures.clear()
        self.done.clear()
        self.expected = count

    async def job_started(self, job) -> bool:
        return True

    def job_progress(self, job, step, total, preview=None) -> None:
        pass

    async def job_finished(self, job, result) -> None:
        self.results[job.id] = result
        self._check()

    async def job_failed(self, job, error) -> None:
        self.failures[job.id] = error
        self._check()

    async def job_stopped(self, job) -> None:
        self.failures[job.id] = RuntimeError("stopped")
        self._check()

    def _check(self) -> None:
        if len(self.results) + len(self.failures) >= self.expected:
            self.done.set()


async def timed_round(queue, collector: Collector, jobs: list) -> float:
    collector.expect(len(jobs))
    started = time.perf_counter()
    for job in jobs:
        await queue.put(job)
    await collector.done.wait()
    elapsed = time.perf_counter() - started
    if collector.failures:
        raise RuntimeError(f"jobs failed: {collector.failures}")
    return elapsed


async def _main(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from pipeline.checkpoints import CheckpointLibrary
    from pipeline.engine import Engine
    from pipeline.queue import Job, LocalQueue
    from pipeline.request import GenerationRequest

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(CheckpointLibrary(None), device=args.device)
    requests = [
        GenerationRequest(
            prompt=f"user {user}: a watercolour of a lighthouse number {user}, soft light",
            negative_prompt="blurry" if user % 2 else "",
            seed=1000 + user,
            guidance_scale=5 + user % 4,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            sampler_name="Euler a",
        )
        for user in range(args.users)
    ]
    engine.generate(requests[0])  # warm up at this shape
    engine.generate_batch(requests)
    batched_collector, solo_collector = Collector(), Collector()
    batched = LocalQueue([engine], batched_collector, max_batch=args.users, batch_window=0.5)
    solo = LocalQueue([engine], solo_collector, max_batch=1)
    await batched.start()
    await solo.start()
    ratios, batched_times, solo_times = [], [], []
    try:
        for number in range(args.rounds):
            jobs = [Job(f"b{number}-{i}", f"user{i}", r) for i, r in enumerate(requests)]
            solo_jobs = [Job(f"s{number}-{i}", f"user{i}", r) for i, r in enumerate(requests)]
            if number % 2:  # alternate which goes first
                t_solo = await timed_round(solo, solo_collector, solo_jobs)
                t_batched = await timed_round(batched, batched_collector, jobs)
            else:
                t_batched = await timed_round(batched, batched_collector, jobs)
                t_solo = await timed_round(solo, solo_collector, solo_jobs)
            batched_times.append(t_batched)
            solo_times.append(t_solo)
            ratios.append(t_solo / t_batched)
            _say(
                "round %d: batched %.3f s, one at a time %.3f s, ratio %.2f",
                number,
                t_batched,
                t_solo,
                ratios[-1],
            )
        identical, worst = 0, 0
        for i in range(args.users):
            a = np.asarray(
                batched_collector.results[f"b{args.rounds - 1}-{i}"].images[0].image, dtype=np.int16
            )
            b = np.asarray(solo_collector.results[f"s{args.rounds - 1}-{i}"].images[0].image, dtype=np.int16)
            difference = int(np.abs(a - b).max())
            identical += difference == 0
            worst = max(worst, difference)
    finally:
        await batched.stop()
        await solo.stop()
    ratio = statistics.median(ratios)
    _say(
        "%d users, %dx%d, %d steps, Euler a, %s: batched %.3f s, one at a time %.3f s (medians)",
        args.users, args.size, args.size, args.steps, args.device,
        statistics.median(batched_times), statistics.median(solo_times),
    )  # fmt: skip
    _say("speed-up (one at a time / batched, median of per-round ratios): %.2fx (target >= 2x)", ratio)
    _say(
        "images byte for byte equal to their solo run: %d of %d; largest channel difference: %d level(s)",
        identical, args.users, worst,
    )  # fmt: skip
    from report import result

    result(
        "batching",
        {"speedup": ratio, "batched_s": statistics.median(batched_times), "solo_s": statistics.median(solo_times),
         "users": args.users, "size": args.size, "steps": args.steps, "identical": identical,
         "max_difference": worst},
    )  # fmt: skip
    return 0 if worst <= 1 else 1


def main(argv: list[str] | None = None) -> int:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import pin_threads

    pin_threads()
    return asyncio.run(_main(_parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
