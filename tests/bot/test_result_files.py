"""A finished job's images stored in the images folder (bot/result_files.py): written only
once the job is won, taken back when it is not stored; a file that cannot be written fails
the job with a message and leaves no image row and no file."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from bot.app import build_app
from bot.errors import ImageStoreError
from bot.hookspecs import hookimpl
from bot.result_files import files_on_keep
from bot.types import Actor
from models.governance import QuotaLedger, QuotaUsage
from pipeline.request import GeneratedImage, GenerationResult
from tests.conftest import EventLog, make_settings
from tests.queue.test_contract import GatedRunner


async def test_an_image_that_cannot_be_put_in_place_fails_the_job_saying_so(
    tmp_path: Path, tiny_library: Any
) -> None:
    runner = GatedRunner()
    settings = make_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'atelier.db'}")
    app = build_app(settings, engines=[runner], library=tiny_library)
    log = EventLog(app)
    await app.start()
    try:
        actor = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
        (reply,) = await app.service.handle_line("/draw a lantern --seed 7", actor)
        job = reply.data["jobs"][0]
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        blocker = app.images_dir / day / f"{job}-0-7.png"  # a folder where the file must go
        (blocker / "taken").mkdir(parents=True)
        runner.gate.release()
        await log.wait_for(lambda: bool(log.of("failed", job) or log.of("finished", job)))
        (failed,) = log.of("failed", job)
        assert failed.key == "error.image_store_write"
        record = await app.store.get(job)
        assert record is not None and record.status == "failed" and record.images == ()
        assert sorted(p.name for p in (app.images_dir / day).iterdir()) == [blocker.name]  # no file left
    finally:
        runner.gate.release(10)
        await app.stop()


def _result(*seeds: int) -> GenerationResult:
    from PIL import Image

    images = []
    for seed in seeds:
        picture = Image.new("RGB", (16, 8), (seed % 255, 40, 90))
        images.append(GeneratedImage(picture, seed, 0, f"a lantern\nSteps: 4, Seed: {seed}"))
    return GenerationResult(images, "tiny", None, 0.1)


async def test_files_are_written_only_once_the_job_is_won_and_taken_back_by_undo(tmp_path: Path) -> None:
    from PIL import Image

    pending = await files_on_keep(tmp_path, "J1", _result(7, 8))
    assert not list(tmp_path.rglob("*"))  # nothing before the job is won
    assert [(r.index, r.seed, r.width, r.height) for r in pending.records] == [(0, 7, 16, 8), (1, 8, 16, 8)]
    await pending.keep()
    paths = [tmp_path / r.path for r in pending.records]
    assert [p.name for p in paths] == ["J1-0-7.png", "J1-1-8.png"]
    with Image.open(paths[1]) as png:
        assert png.info["parameters"] == "a lantern\nSteps: 4, Seed: 8" and png.size == (16, 8)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["J1-0-7.png", "J1-1-8.png"]
    await pending.undo()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


async def test_a_file_that_cannot_be_written_leaves_none_of_the_jobs_files(tmp_path: Path) -> None:
    pending = await files_on_keep(tmp_path, "J2", _result(3, 4))
    (tmp_path / pending.records[1].path / "taken").mkdir(parents=True)  # a folder where the file must go
    with pytest.raises(ImageStoreError) as raised:
        await pending.keep()
    assert raised.value.key == "error.image_store_write"
    await pending.undo()  # as the job's end does on this error
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()] == []


class _HeldEnd:
    """Holds the first finished job's ``generation_finished`` until the test opens it, and
    records the jobs it is told of, in order."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.told: list[str] = []
        self.together: list[list[str]] = []

    @hookimpl
    def generations_finished(self, records: list[Any], app: Any) -> None:
        self.together.append([record.id for record in records])

    @hookimpl
    async def generation_finished(self, record: Any, app: Any) -> None:
        self.told.append(record.id)
        await self.open.wait()


async def test_finished_jobs_that_waited_to_end_are_stored_at_once_and_told_in_order(
    tmp_path: Path, tiny_library: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, held = GatedRunner(), _HeldEnd()
    settings = make_settings(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'atelier.db'}", plugins={"quotas": {"images": 10}}
    )
    app = build_app(settings, engines=[runner], library=tiny_library, plugins=(held,))
    log = EventLog(app)
    groups: list[list[str]] = []
    finish_many = app.store.finish_many

    async def spied(jobs: Any, *, owner: str) -> Any:
        groups.append([job.generation_id for job in jobs])
        return await finish_many(jobs, owner=owner)

    monkeypatch.setattr(app.store, "finish_many", spied)
    await app.start()
    try:
        actor = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
        jobs = []
        for seed in (1, 2, 3, 4):
            (reply,) = await app.service.handle_line(f"/draw a lantern --seed {seed}", actor)
            jobs.extend(reply.data["jobs"])
        runner.gate.release()
        await log.wait_for(lambda: held.told == jobs[:1])  # the first job's end is held
        runner.gate.release(3)  # the others run, and wait to end
        for _ in range(2000):  # at most 20 s
            if app.queue.finishing == 4:
                break
            await asyncio.sleep(0.01)
        assert app.queue.finishing == 4 and groups == [jobs[:1]]
        held.open.set()
        await log.wait_for(lambda: len(log.of("finished")) == 4)
        await app.idle()
        assert groups == [jobs[:1], jobs[1:]]  # the three that waited: one transaction
        assert [event.generation_id for event in log.of("finished")] == jobs  # told in order
        assert held.told == jobs
        assert held.together == [jobs[:1], jobs[1:]]  # each stored group, before its jobs' own hooks
        async with app.store.session() as session:  # billed once each, nothing left reserved
            billed = (await session.execute(select(QuotaLedger.generation_id, QuotaLedger.images))).all()
            usage = (await session.execute(select(func.sum(QuotaUsage.images_used),
                     func.sum(QuotaUsage.images_reserved), func.sum(QuotaUsage.jobs_open)))).one()  # fmt: skip
        assert sorted(billed) == sorted((job_id, 1) for job_id in jobs) and tuple(usage) == (4, 0, 0)
        for job_id, seed in zip(jobs, (1, 2, 3, 4), strict=True):
            record = await app.store.get(job_id)
            assert record.status == "finished" and [i.seed for i in record.images] == [seed]
            assert (app.images_dir / record.images[0].path).is_file()
    finally:
        held.open.set()
        runner.gate.release(10)
        await app.stop()
