"""How many jobs per second does the queue carry when the engine costs nothing?

Runs a real App (store, service, built-in plugins, LocalQueue) whose device is a no-op
runner that returns one 8x8 image at once, on a SQLite file and, when
``ATELIER_TEST_POSTGRES_URL`` is set, on a fresh PostgreSQL database, with the local queue
and with the shared one (procrastinate: a bot App that enqueues and a worker App that runs
the jobs, here in one process; the events travel through the database), and, as
``procrastinate-worker``, with that worker in a process of its own, as a GPU host runs it
(bench/queue_worker.py). ``--clients`` clients submit ``/draw`` lines back to back,
``--jobs`` in all, as one user (every submit and settlement updates one quota row) or, with
``--users``, as that many; the figure is jobs per
second from the first submit to the last job finished (target 300/s or more), with the
p50/p99 from a submit to its ``Queued`` event (target p99 under 50 ms), and the process's
CPU time per job (all threads: steadier than the rate on a busy machine). ``sqlite-batched``
is the SQLite run with a stand-in that runs compatible jobs as one micro-batch, as the
engine does (``[queue] max_batch`` 8): these jobs all are. It also prints
the SQL statements and commits of one submit (counted while the device is held, so
nothing else runs) and of one job from submit to finish.

Usage: ``python bench/queue_throughput.py [--jobs 500] [--clients 4] [--users 1]
[--backend sqlite|sqlite-batched|postgres|procrastinate|procrastinate-worker|all]``
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BACKENDS = ("sqlite", "sqlite-batched", "postgres", "procrastinate", "procrastinate-worker")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--users", type=int, default=1, help="client i submits as user i %% users")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--backend", choices=(*BACKENDS, "all"), default="all")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    postgres = os.environ.get("ATELIER_TEST_POSTGRES_URL", "")
    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    print(f"jobs={args.jobs} clients={args.clients} users={args.users} (a no-op engine)")
    for backend in backends:
        on_postgres = not backend.startswith("sqlite")
        if on_postgres and not postgres:
            print(f"{backend}: skipped (ATELIER_TEST_POSTGRES_URL is not set)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(_bench(backend, Path(tmp), postgres if on_postgres else None, args))
    return 0


async def _bench(backend: str, tmp: Path, postgres: str | None, args: argparse.Namespace) -> None:
    from queue_app import ACTOR, BatchingStandIn, Counter, StandInRunner, bench_app, hold_device, wait_until

    remote = backend == "procrastinate-worker"
    runner = None if remote else BatchingStandIn() if backend.endswith("-batched") else StandInRunner()
    shared = backend.startswith("procrastinate")
    async with bench_app(tmp, runner, postgres, shared=shared, worker_process=remote) as app:
        device = app.worker_process or runner
        queued_at: dict[str, float] = {}
        finished: set[str] = set()

        def on_event(event: object) -> None:
            kind, job_id = getattr(event, "kind", ""), getattr(event, "generation_id", "")
            if kind == "queued":
                queued_at[job_id] = time.perf_counter()
            elif kind == "finished":
                finished.add(job_id)

        app.bus.subscribe(on_event)
        counter = Counter(app)

        async def submit(seed: int, user: int = 0) -> tuple[float, str]:
            started = time.perf_counter()
            actor = dataclasses.replace(ACTOR, user_id=f"{ACTOR.user_id}-{user}") if user else ACTOR
            replies = await app.service.handle_line(f"/draw a lighthouse --seed {seed}", actor)
            (job_id,) = replies[0].data["jobs"]
            return started, job_id

        for seed in range(args.warmup):
            await submit(seed)
        await wait_until(lambda: len(finished) == args.warmup)
        await app.idle()

        await hold_device(app, device)
        counter.counting = True
        held = [await submit(seed) for seed in range(10)]
        counter.counting = False
        per_submit = (counter.statements / len(held), counter.commits / len(held))
        device.gate.set()
        await wait_until(lambda: len(finished) == args.warmup + 1 + len(held))
        await app.idle()

        counter.statements = counter.commits = 0
        counter.counting = True
        before = len(finished)
        per_client = args.jobs // args.clients
        submitted: list[tuple[float, str]] = []

        async def client(index: int) -> None:
            for k in range(per_client):
                submitted.append(await submit(10_000 * (index + 1) + k, index % args.users))

        worker = app.worker_process
        began, began_cpu = time.perf_counter(), time.process_time()
        began_worker = worker.cpu_seconds() if worker is not None else None
        await asyncio.gather(*(client(i) for i in range(args.clients)))
        total = per_client * args.clients
        await wait_until(lambda: len(finished) == before + total)
        elapsed, cpu = time.perf_counter() - began, time.process_time() - began_cpu
        ended_worker = worker.cpu_seconds() if worker is not None else None
        await app.idle()
        counter.counting = False
        latencies = sorted(queued_at[job_id] - started for started, job_id in submitted)
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"{backend}:")
    print(
        f"  throughput            {total / elapsed:.0f} jobs/s ({total} jobs in {elapsed:.2f} s; target >= 300)"
    )
    print(
        f"  CPU per job           {cpu / total * 1000:.2f} ms (this process, all threads; {cpu / elapsed:.2f} cores busy)"
    )
    if began_worker is not None and ended_worker is not None:
        worker_cpu = ended_worker - began_worker
        print(
            f"  worker CPU per job    {worker_cpu / total * 1000:.2f} ms "
            f"(its process; {worker_cpu / elapsed:.2f} cores busy)"
        )
    print(f"  submit -> queued      p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms (target p99 < 50 ms)")
    print(f"  one submit            {per_submit[0]:.1f} statements, {per_submit[1]:.1f} commits")
    print(
        f"  one job, end to end   {counter.statements / total:.1f} statements, "
        f"{counter.commits / total:.1f} commits"
    )
    from report import result

    result(
        f"queue_{backend.replace('-', '_')}",
        {"jobs_per_s": total / elapsed, "cpu_ms_per_job": cpu / total * 1000, "queued_p50_ms": p50 * 1000, "queued_p99_ms": p99 * 1000,
         "submit_statements": per_submit[0], "submit_commits": per_submit[1]},
    )  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
