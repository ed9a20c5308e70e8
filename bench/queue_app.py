"""What the queue benches share: a real App (store, service, LocalQueue, built-in plugins)
over a SQLite file or a fresh PostgreSQL database, with a stand-in runner for the engine,
and a counter of the SQL statements and commits a piece of work sends."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bot.types import Actor

ACTOR = Actor(platform="console", user_id="bench", name="Bench", locale="en", chat_id="c")


class StandInRunner:
    """The device: ``busy_seconds`` of sleep (the GIL released, as torch releases it), then
    one ``size`` x ``size`` image. Records when each call ran. While ``gate`` is closed a
    call waits before it starts (to line jobs up behind a running one)."""

    def __init__(self, busy_seconds: float = 0.0, size: int = 8) -> None:
        self.busy_seconds = busy_seconds
        self.size = size
        self.spans: list[tuple[float, float]] = []
        self.gate = threading.Event()
        self.gate.set()
        self._picture: Any = None
        self._image()

    def generate(self, request: Any, *, on_progress=None, should_stop=None, on_preview=None) -> Any:
        from pipeline.request import GeneratedImage, GenerationResult

        self.gate.wait()
        started = time.perf_counter()
        if self.busy_seconds:
            time.sleep(self.busy_seconds)
        image = self._image()
        if on_progress is not None:
            on_progress(request.num_inference_steps, request.num_inference_steps)
        self.spans.append((started, time.perf_counter()))
        return GenerationResult(
            images=[GeneratedImage(image, request.seed, request.subseed, "bench")],
            model_name="tiny",
            model_hash=None,
            device_seconds=self.busy_seconds,
        )

    def _image(self) -> Any:
        """A gradient with some noise: PNG encoding costs about what it does for a generated
        picture (a flat one compresses unrealistically fast). Made once, off the clock."""
        if self._picture is None:
            from PIL import Image

            gradient = Image.linear_gradient("L").resize((self.size, self.size))
            noise = Image.effect_noise((self.size, self.size), 8)
            self._picture = Image.merge("RGB", (noise, gradient, gradient.rotate(90)))
        return self._picture.copy()


class BatchingStandIn(StandInRunner):
    """The stand-in that runs compatible jobs as one micro-batch, as the engine does: one
    call, one image per request."""

    def generate_batch(
        self, requests: list[Any], *, on_progress=None, should_stop=None, on_preview=None
    ) -> list[Any]:
        return [self.generate(request) for request in requests]


def bench_settings(tmp: Path, name: str, url: str, *, shared: bool) -> Any:
    """The settings of a bench App called ``name`` (its data folder under ``tmp``) on the
    database ``url`` ("" for a SQLite file there); quotas on, but without limits."""
    from bot.settings import parse_settings

    return parse_settings(
        {
            "bot": {"data_dir": str(tmp / name)},
            "database": {"url": url},
            "engine": {"models_dir": str(tmp / "models"), "device": "cpu"},
            "defaults": {"steps": 4, "width": 64, "height": 64},
            "queue": {"backend": "procrastinate" if shared else "local"},
            "plugins": {"quotas": {"images": 0, "max_queued": 0}},
        }
    )


class WorkerProcess:
    """A worker App in a process of its own (``bench/queue_worker.py``), the shared queue's
    other side as a GPU host runs it, with a no-op device. Its ``gate`` holds the whole
    process (SIGSTOP) while closed, so that what is submitted meanwhile waits."""

    def __init__(self, tmp: Path, url: str) -> None:
        import subprocess
        import sys

        script = Path(__file__).resolve().parent / "queue_worker.py"
        self.process = subprocess.Popen(
            [sys.executable, str(script), "--url", url, "--data", str(tmp)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.gate = _ProcessGate(self.process)

    def cpu_seconds(self) -> float | None:
        """The process's CPU time so far (user and system, all threads); None where
        ``/proc`` does not tell."""
        import os

        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_ready(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the worker process did not start: {line!r}")

    def stop(self) -> None:
        import signal

        self.gate.set()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


class _ProcessGate:
    def __init__(self, process: Any) -> None:
        self.process = process

    def clear(self) -> None:
        import signal

        self.process.send_signal(signal.SIGSTOP)

    def set(self) -> None:
        import signal

        self.process.send_signal(signal.SIGCONT)


@asynccontextmanager
async def bench_app(
    tmp: Path,
    runner: StandInRunner | None,
    postgres_url: str | None = None,
    *,
    shared: bool = False,
    worker_process: bool = False,
) -> AsyncIterator[Any]:
    """A started App whose only device is ``runner``. With ``shared`` (PostgreSQL only) the
    App is a bot on the procrastinate queue and a worker App in the same process runs the
    jobs on ``runner``; with ``worker_process`` too, the worker runs in a process of its own
    (``app.worker_process``, a ``WorkerProcess``) and ``runner`` is not used. The bot's App
    is yielded."""
    from bot.app import build_app
    from pipeline.checkpoints import CheckpointLibrary

    url = await _fresh_postgres_database(postgres_url) if postgres_url else ""
    library = CheckpointLibrary(None)
    app = build_app(
        bench_settings(tmp, "data", url, shared=shared), engines=[] if shared else [runner], library=library
    )
    worker = remote = None
    if shared and worker_process:
        remote = WorkerProcess(tmp, url)
        await asyncio.to_thread(remote.wait_ready)
    elif shared:
        worker = build_app(
            bench_settings(tmp, "worker", url, shared=True), engines=[runner], library=library, worker=True
        )
    app.worker_process = remote
    await app.start()
    if worker is not None:
        await worker.start()
    try:
        yield app
    finally:
        if worker is not None:
            await worker.stop()
        if remote is not None:
            await asyncio.to_thread(remote.stop)
        await app.stop()
        if postgres_url:
            await _drop_postgres_database(postgres_url, url)


class Counter:
    """SQL statements and commits on ``app``'s engine while ``counting``."""

    def __init__(self, app: Any) -> None:
        from sqlalchemy import event

        self.statements = 0
        self.commits = 0
        self.counting = False
        engine = app.store.engine.sync_engine
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._commit)

    def _statement(self, *_args: Any) -> None:
        self.statements += self.counting

    def _commit(self, *_args: Any) -> None:
        self.commits += self.counting


async def hold_device(app: Any, runner: Any) -> None:
    """Close the runner's gate and put one job on the device, so that what is submitted
    next waits in the queue until ``runner.gate.set()``. A worker process is held whole:
    the job waits in the queue with the rest."""
    runner.gate.clear()
    replies = await app.service.handle_line("/draw the plug", ACTOR)
    if isinstance(runner, WorkerProcess):
        return
    (job_id,) = replies[0].data["jobs"]
    deadline = time.perf_counter() + 120
    while await app.queue.position(job_id) != 0:
        if time.perf_counter() > deadline:
            raise TimeoutError("the job did not reach the device in time")
        await asyncio.sleep(0.001)


async def wait_until(predicate: Callable[[], bool], seconds: float = 120) -> None:
    deadline = time.perf_counter() + seconds
    while not predicate():
        if time.perf_counter() > deadline:
            raise TimeoutError("the jobs did not finish in time")
        await asyncio.sleep(0.001)


async def _fresh_postgres_database(base_url: str) -> str:
    import asyncpg
    from sqlalchemy.engine import make_url

    from pipeline.queue.procrastinate import libpq_url

    name = f"atelier_bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(libpq_url(base_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return make_url(base_url).set(database=name).render_as_string(hide_password=False)


async def _drop_postgres_database(base_url: str, url: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    from pipeline.queue.procrastinate import libpq_url

    conn = await asyncpg.connect(libpq_url(base_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
    finally:
        await conn.close()
