"""One contract, two queue backends: the same tests run against the local queue (one App
that runs its own jobs, SQLite) and the shared queue (a bot App that only enqueues and a
worker App that runs the jobs, procrastinate on PostgreSQL, events relayed through the
database). Jobs go in as users send them (``/draw``) and are checked where users see them
(the bot's events) and where they are kept (rows, images, quota usage)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.app import App, build_app
from bot.hookspecs import hookimpl
from bot.types import Actor, Admission, Route
from models.quota_store import QuotaStore
from pipeline.errors import GenerationCancelled
from pipeline.request import GeneratedImage, GenerationResult
from plugins.quotas import period_of
from tests.conftest import (
    POSTGRES_URL,
    EventLog,
    _drop_postgres_database,
    _fresh_postgres_database,
    make_settings,
)

BACKENDS = ["local", "procrastinate"]


def user(name: str, *, moderator: bool = False) -> Actor:
    roles = frozenset({"moderator"}) if moderator else frozenset()
    return Actor(platform="console", user_id=name, name=name.title(), chat_id="c", roles=roles)


class GatedRunner:
    """A device that draws one 8x8 image per job when the test opens its gate; records the
    seeds in the order the jobs started."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.gate = threading.Semaphore(0)
        self.device = "gate"

    def generate(self, request, *, on_progress=None, should_stop=None, on_preview=None) -> GenerationResult:
        self.started.append(request.seed)
        self.gate.acquire(timeout=30)  # a failed test never leaves a device thread behind
        for step in (1, 2):
            if should_stop and should_stop():
                raise GenerationCancelled()
            if on_progress:
                on_progress(step, 2)
        image = Image.new("RGB", (8, 8), (request.seed % 256, 0, 0))
        return GenerationResult(
            [GeneratedImage(image, request.seed, 0, f"seed {request.seed}")], "gate", None, 0.5
        )


class Priorities:
    """Moderators' requests go first (an ``Admission`` with a priority)."""

    @hookimpl
    def check_request(self, request: Any, actor: Actor, app: Any) -> Any:
        return Admission(priority=10) if actor.is_moderator else None


class Cluster:
    """A deployment of one backend: ``bot`` takes the commands and shows the events;
    ``runner_app`` runs the jobs (the bot itself with the local queue, a worker with the
    shared one)."""

    def __init__(self, backend: str, tmp_path: Path, database_url: str, tiny_library: Any) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.library = tiny_library
        self.runner = GatedRunner()
        self.apps: list[App] = []
        self.bot: App
        self.runner_app: App
        self.log: EventLog

    def _app(self, name: str, *, worker: bool = False) -> App:
        queue = {"max_batch": 1, "lease_seconds": 3}
        if self.backend == "procrastinate":
            queue["backend"] = "procrastinate"
        settings = make_settings(
            self.tmp_path / name,
            self.database_url,
            queue=queue,
            plugins={"quotas": {"per_scope": False, "max_queued": 0}},
        )
        engines = [self.runner] if worker or self.backend == "local" else []
        app = build_app(
            settings, engines=engines, library=self.library, plugins=(Priorities(),), worker=worker
        )
        self.apps.append(app)
        return app

    async def start(self) -> None:
        self.bot = self._app("bot")
        self.log = EventLog(self.bot)
        await self.bot.start()
        if self.backend == "local":
            self.runner_app = self.bot
        else:
            self.runner_app = self._app("worker-1", worker=True)
            await self.runner_app.start()

    async def restart_runner(self) -> None:
        """The process running the jobs stops at once (its running job at the next step)
        and a new one starts."""
        await self.runner_app.stop(wait=False)
        if self.backend == "local":
            await self.start()
        else:
            self.runner_app = self._app(f"worker-{len(self.apps)}", worker=True)
            await self.runner_app.start()

    async def draw(self, actor: Actor, seed: int) -> str:
        (reply,) = await self.bot.service.handle_line(f"/draw a lantern --seed {seed}", actor)
        assert not reply.error, reply
        return reply.data["jobs"][0]

    async def wait_started(self, count: int) -> None:
        for _ in range(600):
            if len(self.runner.started) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{count} jobs never started: {self.runner.started}")

    async def ended(self, *ids: str, timeout: float = 30) -> None:
        kinds = ("finished", "failed", "cancelled")
        await self.log.wait_for(
            lambda: all(any(self.log.of(kind, i) for kind in kinds) for i in ids), timeout=timeout
        )

    async def stop(self) -> None:
        for app in reversed(self.apps):
            self.runner.gate.release(100)
            if app.started:
                await app.stop(wait=False)
            else:
                await app.store.close()


@pytest.fixture(params=BACKENDS)
async def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_library: Any
) -> AsyncIterator[Cluster]:
    if request.param == "local":
        url = f"sqlite+aiosqlite:///{tmp_path / 'atelier.db'}"
    elif not POSTGRES_URL:
        pytest.skip("the shared queue needs PostgreSQL (ATELIER_TEST_POSTGRES_URL)")
    else:
        url = await _fresh_postgres_database()
    cluster = Cluster(request.param, tmp_path, url, tiny_library)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()
        if request.param != "local":
            await _drop_postgres_database(url)


async def test_a_users_first_job_outranks_everyones_second(cluster: Cluster) -> None:
    alice, bob = user("alice"), user("bob")
    first = await cluster.draw(alice, 0)
    await cluster.wait_started(1)
    waiting = [await cluster.draw(alice, seed) for seed in range(1, 10)]
    # each is told its place behind the ones before it (the running one is not counted)
    assert [cluster.log.of("queued", job)[0].position for job in waiting] == list(range(1, 10))
    bobs = await cluster.draw(bob, 100)
    assert cluster.log.of("queued", bobs)[0].position == 1  # ahead of Alice's nine
    cluster.runner.gate.release(11)
    await cluster.bot.idle()
    assert cluster.runner.started == [0, 100, *range(1, 10)]
    assert cluster.log.of("finished", first) and cluster.log.of("finished", bobs)


async def test_a_moderators_job_goes_first_and_the_rest_in_order(cluster: Cluster) -> None:
    await cluster.draw(user("alice"), 1)
    await cluster.wait_started(1)
    await cluster.draw(user("bob"), 2)
    await cluster.draw(user("carol"), 3)
    urgent = await cluster.draw(user("mod", moderator=True), 4)
    assert cluster.log.of("queued", urgent)[0].position == 1
    cluster.runner.gate.release(4)
    await cluster.bot.idle()
    assert cluster.runner.started == [1, 4, 2, 3]


async def test_cancel_a_queued_and_a_running_job(cluster: Cluster) -> None:
    alice = user("alice")
    running = await cluster.draw(alice, 1)
    await cluster.wait_started(1)
    queued = await cluster.draw(alice, 2)
    after = await cluster.draw(alice, 3)
    for job in (queued, running):
        (reply,) = await cluster.bot.service.handle_line(f"/cancel {job}", alice)
        assert reply.key == "cancel.done", reply
    cluster.runner.gate.release(2)
    await cluster.ended(running, queued, after)
    assert cluster.log.of("cancelled", queued) and cluster.log.of("cancelled", running)
    assert cluster.log.of("finished", after)
    assert cluster.runner.started == [1, 3]  # the queued one never reached the device
    statuses = {job: (await cluster.bot.store.get(job)).status for job in (running, queued, after)}
    assert statuses == {running: "cancelled", queued: "cancelled", after: "finished"}


async def test_queue_shows_each_users_places_and_moderators_everyone(cluster: Cluster) -> None:
    alice, bob, mod = user("alice"), user("bob"), user("mod", moderator=True)
    running = await cluster.draw(alice, 1)
    await cluster.wait_started(1)
    second, third = await cluster.draw(alice, 2), await cluster.draw(alice, 3)
    bobs = await cluster.draw(bob, 4)

    (mine,) = await cluster.bot.service.handle_line("/queue", alice)
    assert mine.key == "queue.mine" and (mine.params["waiting"], mine.params["running"]) == (3, 1)
    places = [(job["id"], job["status"], job["position"]) for job in mine.data["jobs"]]
    # Bob's first job comes before Alice's second: she is told places 2 and 3
    assert places == [(running, "running", 0), (second, "queued", 2), (third, "queued", 3)]
    lines = mine.params["list"].splitlines()
    assert lines[0].startswith(f"{running} · running · a lantern · ")
    assert lines[1].startswith(f"{second} · #2 in the queue · a lantern · ")
    assert [action.id for action in mine.actions] == [f"cancel:{job}" for job in (running, second, third)]
    (theirs,) = await cluster.bot.service.handle_line("/queue show", bob)
    assert [(job["id"], job["position"]) for job in theirs.data["jobs"]] == [(bobs, 1)]

    (everyone,) = await cluster.bot.service.handle_line("/queue all", mod)
    assert everyone.key == "queue.everyone"
    counts = [(u["user"], u["queued"], u["running"]) for u in everyone.data["users"]]
    assert counts == [("console:alice", 2, 1), ("console:bob", 1, 0)]
    (refused,) = await cluster.bot.service.handle_line("/queue all", bob)
    assert refused.key == "error.moderators_only" and "users" not in refused.data
    translator = cluster.bot.translator
    assert translator.t("en", refused.key, **refused.params).startswith("/queue all is for moderators only.")
    assert translator.t("en", everyone.key, **everyone.params).splitlines() == [
        "3 job(s) waiting and 1 running, of 2 user(s):",
        "Alice (console:alice): 2 waiting, 1 running",
        "Bob (console:bob): 1 waiting, 0 running",
    ]
    (in_chinese,) = await cluster.bot.service.handle_line("/queue", replace(alice, locale="zh-CN"))
    chinese = translator.t("zh-CN", in_chinese.key, **in_chinese.params).splitlines()
    assert chinese[0] == "你在队列中的 3 个任务（全部：3 个排队中，1 个运行中）："
    assert chinese[1].startswith(f"{running} · 运行中 · a lantern · 64x64 · 已等待 ")
    assert chinese[2].startswith(f"{second} · 队列第 2 位 · a lantern · 64x64 · 已等待 ")

    (cancelled,) = await cluster.bot.service.run_action(mine.actions[1].id, alice)  # its Cancel button
    assert cancelled.key == "cancel.done"
    (after,) = await cluster.bot.service.handle_line("/queue", alice)
    assert [(job["id"], job["position"]) for job in after.data["jobs"]] == [(running, 0), (third, 2)]
    cluster.runner.gate.release(3)
    await cluster.ended(running, second, third, bobs)
    (empty,) = await cluster.bot.service.handle_line("/queue", alice)
    assert empty.key == "queue.none" and (empty.params["waiting"], empty.params["running"]) == (0, 0)
    (nothing,) = await cluster.bot.service.handle_line("/queue all", mod)
    assert nothing.key == "queue.empty"


async def test_jobs_survive_a_restart_and_run_and_bill_once(cluster: Cluster) -> None:
    alice, bob = user("alice"), user("bob")
    interrupted = await cluster.draw(alice, 1)
    await cluster.wait_started(1)
    waiting = [await cluster.draw(alice, 2), await cluster.draw(bob, 3)]
    cluster.runner.gate.release(1)  # the running job sees the stop at its next step
    await cluster.restart_runner()
    cluster.runner.gate.release(3)
    await cluster.ended(interrupted, *waiting)
    jobs = [interrupted, *waiting]
    for job in jobs:
        assert len(cluster.log.of("finished", job)) == 1, job
        record = await cluster.bot.store.get(job)
        assert record.status == "finished" and len(record.images) == 1
        assert await cluster.bot.images.read(record.images[0].id)  # readable where the bot runs
    assert (await cluster.bot.store.get(interrupted)).attempts == 2
    assert sorted(cluster.runner.started) == [1, 1, 2, 3]  # the interrupted one ran twice
    period = period_of("daily", datetime.now(UTC))[0]
    quotas = QuotaStore(cluster.bot.store)
    used = {who: await quotas.usage(f"console:{who}", "global", period) for who in ("alice", "bob")}
    assert (used["alice"].images_used, used["alice"].images_reserved, used["alice"].jobs_open) == (2, 0, 0)
    assert (used["bob"].images_used, used["bob"].images_reserved, used["bob"].jobs_open) == (1, 0, 0)


async def test_results_reach_the_bot_with_progress_in_order(cluster: Cluster) -> None:
    job = await cluster.draw(user("alice"), 7)
    cluster.runner.gate.release(1)
    await cluster.ended(job)
    kinds = [event.kind for event in cluster.log.events if event.generation_id == job]
    assert kinds == ["queued", "started", "progress", "progress", "finished"]
    (finished,) = cluster.log.of("finished", job)
    assert finished.actor.user_id == "alice" and finished.images[0].infotext == "seed 7"
    assert any(action.id.startswith("delete:") for action in finished.actions)


class SlowEnds:
    """A plugin whose ``generation_finished`` waits until the test lets it go: ends that
    fall behind the device (slow saving or bookkeeping)."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.finishing: list[str] = []

    @hookimpl
    async def generation_finished(self, record: Any, app: Any) -> None:
        self.finishing.append(record.id)
        await self.go.wait()


async def test_ends_that_fall_behind_never_keep_the_next_job_off_the_device(cluster: Cluster) -> None:
    """While a finished job's end is under way, the next jobs run (a worker takes one job
    at a time here: a job's place is free once it leaves the device); their ends follow,
    in order, once the first lets go."""
    slow = SlowEnds()
    cluster.runner_app.pm.register(slow)
    try:
        first = await cluster.draw(user("alice"), 1)
        cluster.runner.gate.release(1)
        for _ in range(3000):
            if slow.finishing:
                break
            await asyncio.sleep(0.01)
        assert slow.finishing == [first]
        later = [await cluster.draw(user("bob"), 2), await cluster.draw(user("carol"), 3)]
        cluster.runner.gate.release(2)
        await cluster.wait_started(3)
        assert cluster.runner.started == [1, 2, 3]
        assert not any(cluster.log.of("finished", job) for job in later)  # their ends wait for the first's
        slow.go.set()
        await cluster.ended(first, *later)
        assert slow.finishing == [first, *later]
        assert all(cluster.log.of("finished", job) for job in (first, *later))
    finally:
        slow.go.set()  # a failed test leaves no end waiting


async def test_a_stored_job_the_shared_queue_lost_is_offered_again(cluster: Cluster) -> None:
    if cluster.backend != "procrastinate":
        pytest.skip("the local queue is rebuilt from the rows at start (tests/bot/test_service.py)")
    from sqlalchemy import update

    from models.tables import Generation

    alice = user("alice")
    await cluster.draw(alice, 1)
    await cluster.wait_started(1)
    lost = await cluster.draw(alice, 2)
    assert await cluster.bot.queue.cancel(lost) == "queued"  # as if deferring it never happened
    assert await cluster.bot.queue.position(lost) is None
    assert await cluster.bot.service.recover() == 0  # too new: it may be being deferred now
    async with cluster.bot.store.session() as session:
        await session.execute(
            update(Generation)
            .where(Generation.id == lost)
            .values(created_at=datetime(2026, 1, 1, tzinfo=UTC))
        )
    assert await cluster.bot.service.recover() == 1
    cluster.runner.gate.release(2)
    await cluster.ended(lost)
    assert len(cluster.log.of("finished", lost)) == 1


async def test_a_worker_reads_an_upload_made_on_another_host_from_the_database(cluster: Cluster) -> None:
    if cluster.backend != "procrastinate":
        pytest.skip("one process reads its own uploads from its disk")
    from models.shared_files import SharedFiles
    from pipeline.request import GenerationRequest

    await SharedFiles(cluster.bot.store).put_input("feed.png", b"\x89PNG bytes")
    await SharedFiles(cluster.bot.store).put_input("feed.png", b"\x89PNG bytes")  # the same upload again
    elsewhere = GenerationRequest(prompt="x", seed=1, init_image="/on/the/bot/host/inputs/feed.png")
    local = await cluster.runner_app.feed._local_inputs(elsewhere)
    assert Path(local.init_image).parent == cluster.runner_app.images_dir / "inputs"
    assert Path(local.init_image).read_bytes() == b"\x89PNG bytes"

    # an upload to the bot, drawn from: kept in the database before the job is queued, read
    # from there by the worker (the bot's copy is gone by the time the busy worker takes it)
    busy = await cluster.draw(user("bob"), 1)
    await cluster.wait_started(1)
    upload = cluster.bot.images_dir / "inputs" / "lamp.png"
    upload.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (200, 120, 0)).save(upload)
    data = upload.read_bytes()
    replies = await cluster.bot.service.draw(
        user("alice"), "a lamp", {"init-image": str(upload), "seed": 7}, Route("console", chat_id="c")
    )
    assert not replies[0].error, replies
    (job,) = replies[0].data["jobs"]
    upload.unlink()
    assert await SharedFiles(cluster.bot.store).input("lamp.png") == data
    cluster.runner.gate.release(2)
    await cluster.ended(busy, job)
    assert cluster.log.of("finished", job), cluster.log.of("failed", job)
    assert (cluster.runner_app.images_dir / "inputs" / "lamp.png").read_bytes() == data
