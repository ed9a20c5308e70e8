"""Micro-batching through the bot: two users' compatible /draws run as one UNet batch and
each user gets their own result, progress and preview; an incompatible one runs apart."""

from __future__ import annotations

import numpy as np

from bot.types import Actor
from pipeline.images import read_infotext
from pipeline.infotext import parse
from tests.conftest import EventLog, opened, png

ALICE = Actor(platform="console", user_id="alice", name="Alice", locale="en", chat_id="c")
BOB = Actor(platform="telegram", user_id="42", name="Bob", locale="zh-CN", chat_id="7")


def _recorded_batches(engine, monkeypatch, field: str) -> list[list]:
    """The micro-batches the engine runs from now on, each as its requests' ``field``."""
    batches: list[list] = []
    generate_batch = engine.generate_batch

    def recording(requests, **kwargs):
        batches.append([getattr(request, field) for request in requests])
        return generate_batch(requests, **kwargs)

    monkeypatch.setattr(engine, "generate_batch", recording)
    return batches


async def test_two_users_draws_share_a_batch_and_each_gets_their_own_image(make_app, monkeypatch) -> None:
    app = await make_app()
    engine = app.engines[0]
    batches = _recorded_batches(engine, monkeypatch, "prompt")
    await app.queue.stop()  # the device is busy: the jobs wait together
    log = EventLog(app)
    common = "--steps 3 --size 64x64 --sampler Euler"
    lines = [
        (ALICE, f"/draw a red fox {common} --seed 5 --cfg 6"),
        (BOB, f"/draw a blue owl {common} --negative blurry --seed 9 --cfg 8.5 --batch 2"),
        (ALICE, "/draw a green frog --steps 4 --size 64x64 --sampler Euler --seed 3"),  # 4 steps: apart
    ]
    jobs = []
    for actor, line in lines:
        (accepted,) = await app.service.handle_line(line, actor)
        assert not accepted.error, accepted
        jobs.extend(accepted.data["jobs"])
    await app.queue.start()
    await log.wait_for(lambda: all(log.of("finished", job) for job in jobs))
    # the fox and the owl as one batch (in queue order); the frog alone (generate runs a batch of one)
    assert batches == [["a red fox", "a blue owl"], ["a green frog"]]

    for job, prompt, negative, seeds, cfg in (
        (jobs[0], "a red fox", "", [5], "6"),
        (jobs[1], "a blue owl", "blurry", [9, 10], "8.5"),
        (jobs[2], "a green frog", "", [3], "7"),
    ):
        (finished,) = log.of("finished", job)
        assert [image.seed for image in finished.images] == seeds
        assert log.of("progress", job)[-1].step == log.of("progress", job)[-1].total
        record = await app.store.get(job)
        solo = engine.generate(record.request)
        for image, alone in zip(finished.images, solo.images, strict=True):
            fields = parse(read_infotext(await png(app, image)))
            assert (fields["Prompt"], fields.get("Negative prompt"), fields["CFG scale"]) == (
                prompt,
                negative,
                cfg,
            )
            assert fields["Seed"] == str(image.seed)
            pixels = np.asarray(await opened(app, image), dtype=np.int16)
            assert np.abs(pixels - np.asarray(alone.image, dtype=np.int16)).max() <= 1
    # billing: a batch's device time is shared by its jobs' images (1 and 2 of 3)
    fox, owl = await app.store.get(jobs[0]), await app.store.get(jobs[1])
    assert abs(owl.device_seconds - 2 * fox.device_seconds) < 1e-6


async def test_a_batch_is_claimed_in_one_transaction_without_the_job_cancelled_meanwhile(
    make_app, monkeypatch
) -> None:
    from sqlalchemy import event

    app = await make_app()
    batches = _recorded_batches(app.engines[0], monkeypatch, "seed")
    await app.queue.stop()  # the device is busy: the jobs wait together
    log = EventLog(app)
    jobs = []
    for actor, seed in ((ALICE, 1), (BOB, 2), (ALICE, 3), (BOB, 4)):
        (accepted,) = await app.service.handle_line(f"/draw a lantern --steps 2 --seed {seed}", actor)
        jobs.extend(accepted.data["jobs"])
    (cancelled,) = await app.service.handle_line(f"/cancel {jobs[2]}", ALICE)
    assert not cancelled.error
    claims: list[str] = []

    def statement(_conn, _cursor, sql: str, *_args) -> None:
        if sql.startswith("UPDATE generations SET status=?") or "status=$1" in sql:
            claims.append(sql)

    event.listen(app.store.engine.sync_engine, "before_cursor_execute", statement)
    try:
        await app.queue.start()
        await log.wait_for(lambda: all(log.of("finished", job) for job in (jobs[0], jobs[1], jobs[3])))
    finally:
        event.remove(app.store.engine.sync_engine, "before_cursor_execute", statement)
    assert batches == [[1, 2, 4]]
    running = [sql for sql in claims if "attempts=(" in sql]  # the claim counts an attempt
    assert len(running) == 1, running  # one statement for the batch of three
    started = [e.generation_id for e in log.events if e.kind == "started"]
    assert started == [jobs[0], jobs[1], jobs[3]]  # announced in the batch's order
    assert not log.of("started", jobs[2]) and (await app.store.get(jobs[2])).status == "cancelled"
    for job in (jobs[0], jobs[1], jobs[3]):
        record = await app.store.get(job)
        assert (record.status, record.attempts, len(record.images)) == ("finished", 1, 1)
