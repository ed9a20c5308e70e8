"""A finished job's images stored in the images folder (bot/result_files.py): a file that
cannot be put in place fails the job with a message and leaves no image row."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.app import build_app
from bot.types import Actor
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
