"""``[queue] image_store = "s3"``: finished images go to an S3-compatible bucket (a fake
one on 127.0.0.1 that checks every signature, tests/fakes/s3_api.py). With the shared
queue on PostgreSQL a worker App runs the jobs and uploads the PNGs; the bot App reads
them back by id, as adapters do, and /delete removes them from the bucket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.app import App, build_app
from bot.errors import NotFound
from bot.settings import ConfigError, Secrets
from bot.types import Actor
from models.shared_files import SharedFiles
from pipeline.images import read_infotext
from tests.conftest import (
    POSTGRES_URL,
    EventLog,
    _drop_postgres_database,
    _fresh_postgres_database,
    make_settings,
)
from tests.fakes.s3_api import ACCESS_KEY_ID, SECRET_ACCESS_KEY, FakeS3
from tests.queue.test_contract import GatedRunner

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")


class S3Deployment:
    """A bot App and worker Apps on one PostgreSQL database and one fake bucket."""

    def __init__(self, tmp_path: Path, url: str, s3: FakeS3, library: Any, engine: Any) -> None:
        self.tmp_path, self.url, self.s3 = tmp_path, url, s3
        self.library, self.engine = library, engine
        self.apps: list[App] = []

    def app(
        self, name: str, *, worker: bool = False, secret: str = SECRET_ACCESS_KEY, engine: Any = None
    ) -> App:
        settings = make_settings(
            self.tmp_path / name,
            self.url,
            queue={"backend": "procrastinate", "image_store": "s3", "max_batch": 1, "lease_seconds": 3},
            s3={"endpoint_url": self.s3.endpoint_url, "bucket": "atelier", "prefix": "atelier/images/"},
        )
        secrets = Secrets(s3_access_key_id=ACCESS_KEY_ID, s3_secret_access_key=secret)
        settings = settings.model_copy(update={"secrets": secrets})
        engines = [engine or self.engine] if worker else []
        app = build_app(settings, engines=engines, library=self.library, worker=worker)
        self.apps.append(app)
        return app

    async def start(self) -> tuple[App, App, EventLog]:
        bot, worker = self.app("bot"), self.app("worker", worker=True)
        log = EventLog(bot)
        await bot.start()
        await worker.start()
        return bot, worker, log


@pytest.fixture
async def deployment(tmp_path: Path, tiny_library: Any, tiny_engine: Any) -> AsyncIterator[S3Deployment]:
    if not POSTGRES_URL:
        pytest.skip("the shared queue needs PostgreSQL (ATELIER_TEST_POSTGRES_URL)")
    url = await _fresh_postgres_database()
    try:
        async with FakeS3() as s3:
            found = S3Deployment(tmp_path, url, s3, tiny_library, tiny_engine)
            try:
                yield found
            finally:
                for app in reversed(found.apps):
                    for runner in app.engines:
                        if isinstance(runner, GatedRunner):  # a failed test leaves no device thread
                            runner.gate.release(100)
                    await app.stop(wait=False)
    finally:
        await _drop_postgres_database(url)


async def draw(bot: App, log: EventLog, text: str = "/draw a lantern --seed 5") -> tuple[str, Any]:
    (reply,) = await bot.service.handle_line(text, ALICE)
    assert not reply.error, reply
    job = reply.data["jobs"][0]
    await log.wait_for(lambda: bool(log.of("finished", job) or log.of("failed", job)))
    return job, (log.of("finished", job) or log.of("failed", job))[0]


async def test_a_worker_uploads_the_pngs_and_the_bot_reads_them_back_then_delete_removes_them(
    deployment: S3Deployment,
) -> None:
    bot, worker, log = await deployment.start()
    s3 = deployment.s3
    job, finished = await draw(bot, log, "/draw a lantern --seed 5 --batch 2")
    assert finished.kind == "finished", finished
    record = await bot.store.get(job)
    assert record is not None and len(record.images) == 2
    puts = s3.of("PUT")
    assert [r.status for r in puts] == [200, 200] and {r.content_type for r in puts} == {"image/png"}
    for image, shown in zip(record.images, finished.images, strict=True):
        key = "atelier/images/" + image.path
        stored = s3.objects[("atelier", key)]
        assert await bot.images.read(image.id) == stored  # the bot reads the worker's bytes
        assert read_infotext(stored) == image.infotext == shown.infotext  # infotext intact
        assert "Seed: " in image.infotext
        assert await SharedFiles(bot.store).image(image.id) is None  # not in the database too

    (deleted,) = await bot.service.handle_line(f"/delete {job}", ALICE)
    assert deleted.key == "moderation.deleted", deleted
    assert s3.objects == {} and [r.status for r in s3.of("DELETE")] == [204, 204]
    with pytest.raises(NotFound):
        await bot.images.read(record.images[0].id)


async def test_an_upload_that_keeps_failing_fails_the_job_saying_so_and_stores_nothing(
    deployment: S3Deployment,
) -> None:
    bot, worker, log = await deployment.start()
    s3 = deployment.s3
    s3.fail_next(4, 500)  # every try of the one upload
    job, failed = await draw(bot, log)
    assert failed.kind == "failed" and failed.key == "error.image_store_write"
    assert "could not be stored" in bot.translator.t("en", failed.key, **failed.params)
    assert "未能保存" in bot.translator.t("zh-CN", failed.key, **failed.params)
    record = await bot.store.get(job)
    assert record is not None and record.status == "failed" and record.images == ()
    assert [r.status for r in s3.of("PUT")] == [500, 500, 500, 500] and s3.objects == {}


async def test_a_slow_down_is_tried_again_and_the_job_finishes(deployment: S3Deployment) -> None:
    bot, worker, log = await deployment.start()
    deployment.s3.fail_next(1, 503)
    job, finished = await draw(bot, log)
    assert finished.kind == "finished", finished
    assert [r.status for r in deployment.s3.of("PUT")] == [503, 200]
    (image,) = (await bot.store.get(job)).images
    assert read_infotext(await bot.images.read(image.id)) == image.infotext


async def test_a_commit_that_fails_after_the_upload_takes_the_objects_out_again(
    deployment: S3Deployment,
) -> None:
    bot, worker, log = await deployment.start()
    async with bot.store.engine.begin() as conn:  # the images' insert fails inside the finish
        await conn.exec_driver_sql(
            "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$ "
            "LANGUAGE plpgsql"
        )
        await conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE INSERT ON images FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    (reply,) = await bot.service.handle_line("/draw a lantern --seed 5", ALICE)
    job = reply.data["jobs"][0]
    s3 = deployment.s3
    for _ in range(600):
        if s3.of("DELETE"):
            break
        await asyncio.sleep(0.05)
    (put,), (removed,) = s3.of("PUT"), s3.of("DELETE")
    assert put.key == removed.key and s3.objects == {}
    assert not log.of("finished", job) and (await bot.store.get(job)).images == ()


async def test_a_job_cancelled_while_it_runs_uploads_nothing(deployment: S3Deployment) -> None:
    runner = GatedRunner()
    bot = deployment.app("bot")
    worker = deployment.app("worker", worker=True, engine=runner)
    log = EventLog(bot)
    await bot.start()
    await worker.start()
    (reply,) = await bot.service.handle_line("/draw a lantern --seed 5", ALICE)
    job = reply.data["jobs"][0]
    for _ in range(600):
        if runner.started:
            break
        await asyncio.sleep(0.01)
    (cancelled,) = await bot.service.handle_line(f"/cancel {job}", ALICE)
    assert cancelled.key == "cancel.done", cancelled
    runner.gate.release()  # it draws its image all the same
    await log.wait_for(lambda: bool(log.of("cancelled", job)))
    await asyncio.wait_for(worker.feed.local.join(), 30)
    assert deployment.s3.of("PUT") == [] and deployment.s3.objects == {}
    assert (await bot.store.get(job)).status == "cancelled"


async def test_a_wrong_secret_stops_the_start_naming_the_bucket(deployment: S3Deployment) -> None:
    worker = deployment.app("worker", worker=True, secret="not the secret")
    with pytest.raises(ConfigError) as info:
        await worker.start()
    message = str(info.value)
    assert f'[s3] bucket "atelier" at {deployment.s3.endpoint_url} cannot be used' in message
    assert "403 SignatureDoesNotMatch" in message and "ATELIER_S3_SECRET_ACCESS_KEY" in message


async def test_the_local_queue_keeps_its_images_in_the_bucket_too(
    tmp_path: Path, tiny_library: Any, tiny_engine: Any
) -> None:
    async with FakeS3() as s3:
        settings = make_settings(
            tmp_path,
            f"sqlite+aiosqlite:///{tmp_path / 'atelier.db'}",
            queue={"image_store": "s3"},
            s3={"endpoint_url": s3.endpoint_url, "bucket": "atelier"},
        )
        secrets = Secrets(s3_access_key_id=ACCESS_KEY_ID, s3_secret_access_key=SECRET_ACCESS_KEY)
        app = build_app(
            settings.model_copy(update={"secrets": secrets}), engines=[tiny_engine], library=tiny_library
        )
        log = EventLog(app)
        await app.start()
        try:
            job, finished = await draw(app, log)
            assert finished.kind == "finished", finished
            (image,) = (await app.store.get(job)).images
            assert s3.objects[("atelier", "images/" + image.path)] == await app.images.read(image.id)
            assert not (settings.bot.images_path / image.path).exists()  # no local file
        finally:
            await app.stop()
