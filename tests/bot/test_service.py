"""/draw through the core with the real tiny engine, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from bot.types import Actor, Route
from pipeline.images import read_infotext
from pipeline.infotext import parse
from tests.conftest import EventLog, crash, expire_leases, opened, png

ALICE = Actor(platform="console", user_id="alice", name="Alice", locale="en", chat_id="c")
BOB = Actor(platform="console", user_id="bob", name="Bob", locale="zh-CN", chat_id="c")


async def draw(app, line: str, actor: Actor = ALICE):
    return await app.service.handle_line(line, actor)


async def test_draw_queues_progresses_and_finishes_with_infotext(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    replies = await draw(app, "/draw a cat, masterpiece --steps 4 --seed 5 --size 64x64 --cfg 7 --batch 2")
    assert not replies[0].error, replies
    (job_id,) = replies[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", job_id))
    kinds = [e.kind for e in log.events if e.generation_id == job_id]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "finished"
    steps = [(e.step, e.total) for e in log.of("progress", job_id)]
    assert steps[-1] == (4, 4) and all(total == 4 for _, total in steps)
    finished = log.of("finished", job_id)[0]
    assert [i.seed for i in finished.images] == [5, 6]
    assert f"reroll:{job_id}" in [a.id for a in finished.actions]
    for image in finished.images:
        data = await png(app, image)
        assert (await opened(app, image)).size == (64, 64)
        fields = parse(read_infotext(data))
        assert fields["Prompt"] == "a cat, masterpiece"
        assert fields["Seed"] == str(image.seed)
        assert (fields["Steps"], fields["Size-1"], fields["Size-2"], fields["CFG scale"]) == (
            "4",
            "64",
            "64",
            "7",
        )
        assert fields["Sampler"] == "Euler a"
    record = await app.store.get(job_id)
    assert record.status == "finished"
    req = record.request
    assert (req.prompt, req.num_inference_steps, req.seed, req.width, req.height) == (
        "a cat, masterpiece",
        4,
        5,
        64,
        64,
    )
    assert (req.guidance_scale, req.sampler_name, req.scheduler, req.checkpoint) == (
        7,
        "Euler a",
        "Automatic",
        "tiny",
    )
    assert (req.num_images_per_prompt, req.clip_skip, req.rng, req.ensd) == (2, 1, "CPU", 0)
    assert record.device_seconds > 0 and record.started_at and record.finished_at
    assert [i.seed for i in record.images] == [5, 6]
    assert record.images[0].infotext == finished.images[0].infotext


async def test_count_makes_one_job_per_batch_with_a1111_seeds(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    replies = await draw(app, "/draw a cat --seed 100 --batch 2 --count 3")
    jobs = replies[0].data["jobs"]
    assert len(jobs) == 3
    await log.wait_for(lambda: len(log.of("finished")) == 3)
    seeds = {e.generation_id: [i.seed for i in e.images] for e in log.of("finished")}
    assert [seeds[j] for j in jobs] == [[100, 101], [102, 103], [104, 105]]


async def test_a_random_seed_is_resolved_and_stored(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    (job_id,) = (await draw(app, "/draw a cat"))[0].data["jobs"]
    record = await app.store.get(job_id)
    assert 0 <= record.request.seed < 4294967294
    await log.wait_for(lambda: log.of("finished", job_id))


async def test_reroll_is_a_child_with_a_new_seed(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    (first,) = (await draw(app, "/draw a cat --seed 3 --cfg 7.5"))[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", first))
    replies = await app.service.run_action(f"reroll:{first}", ALICE)
    (second,) = replies[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", second))
    child = await app.store.get(second)
    assert child.parent_id == first
    assert child.request.guidance_scale == 7.5 and child.request.prompt == "a cat"


async def test_cancel_a_queued_job_and_refuse_others_jobs(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    ids = (await draw(app, "/draw a cat --count 3"))[0].data["jobs"]
    refused = await app.service.handle_line(f"/cancel {ids[2]}", BOB)
    assert refused[0].error and refused[0].key == "error.not_found"
    done = await app.service.handle_line(f"/cancel {ids[2]}", ALICE)
    assert done[0].key == "cancel.done"
    await log.wait_for(lambda: len(log.of("finished")) == 2)
    await app.idle()
    assert (await app.store.get(ids[2])).status == "cancelled"
    assert log.of("cancelled", ids[2])
    again = await app.service.handle_line(f"/cancel {ids[2]}", ALICE)
    assert again[0].key == "cancel.too_late"


async def test_cancel_a_running_job_stops_at_the_next_step(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    (job_id,) = (await draw(app, "/draw a cat --steps 150 --size 128x128"))[0].data["jobs"]
    await log.wait_for(lambda: log.of("progress", job_id))
    await app.service.cancel(job_id, ALICE)
    await log.wait_for(lambda: log.of("cancelled", job_id))
    assert len(log.of("progress", job_id)) < 150
    assert (await app.store.get(job_id)).status == "cancelled"


async def test_restart_runs_queued_and_interrupted_jobs_once(make_app) -> None:
    first = await make_app()
    await first.queue.stop()  # nothing runs: jobs stay queued, as after a crash
    ids = (await draw(first, "/draw a cat --count 3"))[0].data["jobs"]
    await first.store.mark_running(ids[0], first.service.lease())  # running when the process died
    await crash(first)
    second = await make_app(start=False)
    log = EventLog(second)
    assert await second.start() == 3
    await log.wait_for(lambda: len(log.of("finished")) == 3)
    await second.idle()
    assert sorted(e.generation_id for e in log.of("finished")) == sorted(ids)
    for job_id in ids:
        record = await second.store.get(job_id)
        assert record.status == "finished" and len(record.images) == 1
    assert (await second.store.get(ids[0])).attempts == 2


@pytest.mark.parametrize("running", [False, True], ids=["queued", "interrupted"])
async def test_an_adopted_job_answers_whom_its_row_names(make_app, running: bool) -> None:
    """A job stored and queued by one App, whose process died before it ended, is run by
    another App that never saw the submit: every event goes to the actor, route and
    thread the row names."""
    carol = Actor(
        platform="console",
        user_id="carol",
        name="Carol",
        locale="zh-CN",
        chat_id="room-7",
        guild_id="guild-3",
        roles=frozenset({"gold"}),
    )
    route = Route("console", chat_id="room-7", thread_id="topic-2", reply_to_message_id="m-41")
    first = await make_app()
    await first.queue.stop()  # nothing runs in the first App
    first_log = EventLog(first)
    replies = await first.service.draw(carol, "a cat", {"steps": 3}, route, thread_key="chain-9")
    (job_id,) = replies[0].data["jobs"]
    if running:
        await first.store.mark_running(job_id, first.service.lease())  # running when it died
    await crash(first)
    second = await make_app(start=False)
    log = EventLog(second)
    assert await second.start() == 1
    await log.wait_for(lambda: log.of("finished", job_id))
    assert [e.kind for e in first_log.events] == ["queued"]  # the first App ran nothing
    kinds = [e.kind for e in log.events]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "finished" and "progress" in kinds
    for event in log.events:
        assert (event.generation_id, event.route, event.thread_key) == (job_id, route, "chain-9")
        actor = event.actor
        assert (actor.key, actor.name, actor.locale, actor.chat_id, actor.guild_id) == (
            "console:carol",
            "Carol",
            "zh-CN",
            "room-7",
            "guild-3",
        )
        assert "gold" in actor.roles
    record = await second.store.get(job_id)
    assert (record.status, record.owner, record.attempts) == ("finished", second.owner, 1 + running)


async def test_a_job_queued_elsewhere_is_cancelled_where_its_row_says(make_app) -> None:
    """A queued job this App took over is cancelled with its event routed from the row."""
    route = Route("console", chat_id="c", thread_id="topic-5")
    first = await make_app()
    await first.queue.stop()
    replies = await first.service.draw(BOB, "a cat", {}, route, thread_key="chain-5")
    (job_id,) = replies[0].data["jobs"]
    await crash(first)
    second = await make_app(start=False)
    await second.start(recover=False)
    await second.queue.stop()  # adopted, but not run: it waits in the second App's queue
    log = EventLog(second)
    assert await second.service.recover() == 1
    assert await second.queue.position(job_id) == 1
    done = await second.service.cancel(job_id, BOB)
    assert done.key == "cancel.done"
    (cancelled,) = log.of("cancelled", job_id)
    assert (cancelled.route, cancelled.thread_key, cancelled.actor.key) == (route, "chain-5", BOB.key)
    assert cancelled.actor.locale == "zh-CN"
    assert await second.queue.position(job_id) is None
    assert (await second.store.get(job_id)).status == "cancelled"


async def test_a_job_interrupted_too_often_fails_with_a_message(make_app) -> None:
    first = await make_app()
    await first.queue.stop()
    (job_id,) = (await draw(first, "/draw a cat"))[0].data["jobs"]
    for _ in range(3):
        await first.store.mark_running(job_id, first.service.lease())
        await first.store.requeue_interrupted(job_id, first.owner)
    await first.store.mark_running(job_id, first.service.lease())
    await crash(first)
    second = await make_app(start=False)
    log = EventLog(second)
    assert await second.start() == 0
    failed = log.of("failed", job_id)
    assert failed and failed[0].key == "error.interrupted"
    assert (await second.store.get(job_id)).status == "failed"


async def test_a_second_app_takes_none_of_a_live_ones_jobs(make_app) -> None:
    first = await make_app()
    await first.queue.stop()  # its jobs wait while the second one starts
    ids = (await draw(first, "/draw a cat --count 2"))[0].data["jobs"]
    first_log = EventLog(first)
    second = await make_app(start=False)
    second_log = EventLog(second)
    assert await second.start() == 0
    assert await second.service.recover() == 0  # nor on a later heartbeat
    await first.queue.start()
    await first_log.wait_for(lambda: len(first_log.of("finished")) == 2)
    assert not second_log.events
    for job_id in ids:
        record = await first.store.get(job_id)
        assert (record.status, record.attempts, record.owner) == ("finished", 1, first.owner)


async def test_a_running_app_takes_over_the_jobs_of_one_that_stopped_renewing(make_app) -> None:
    short = {"queue": {"lease_seconds": 1.0}}
    first = await make_app(**short)
    await first.queue.stop()
    ids = (await draw(first, "/draw a cat --count 2"))[0].data["jobs"]
    second = await make_app(**short)
    log = EventLog(second)
    await asyncio.sleep(2.5)  # over two leases: first's heartbeat keeps its jobs
    assert not log.events
    await first.heartbeat.stop()  # first hangs: it still holds the jobs but renews nothing
    await log.wait_for(lambda: len(log.of("finished")) == 2)
    assert sorted(e.generation_id for e in log.of("finished")) == sorted(ids)
    for job_id in ids:
        record = await second.store.get(job_id)
        assert (record.status, record.attempts, record.owner) == ("finished", 1, second.owner)


async def test_a_graceful_stop_hands_queued_jobs_to_the_next_start(make_app) -> None:
    first = await make_app()
    await first.queue.stop()
    ids = (await draw(first, "/draw a cat --count 2"))[0].data["jobs"]
    await first.stop()  # no lease to wait for: the jobs are released
    second = await make_app(start=False)
    log = EventLog(second)
    assert await second.start() == 2
    await log.wait_for(lambda: len(log.of("finished")) == 2)
    assert sorted(e.generation_id for e in log.of("finished")) == sorted(ids)
    assert [(await second.store.get(i)).attempts for i in ids] == [1, 1]


async def test_a_process_that_lost_its_running_job_saves_nothing(make_app) -> None:
    first = await make_app()
    second = await make_app(start=False)  # takes the job over; runs nothing itself
    log = EventLog(first)
    (job_id,) = (await draw(first, "/draw a cat --steps 60 --batch 2"))[0].data["jobs"]
    await log.wait_for(lambda: log.of("progress", job_id))
    await expire_leases(first)  # first stalls past its lease while the job runs ...
    (taken,) = await second.store.adopt(second.service.lease())  # ... and second takes it
    assert (taken.id, taken.status) == (job_id, "running")
    await first.idle()
    assert log.of("progress", job_id)[-1].step == 60  # first ran it to the end ...
    assert not log.of("finished") and not log.of("failed")  # ... but reports no result
    assert [p for p in first.images_dir.rglob("*") if p.is_file()] == []
    record = await second.store.get(job_id)
    assert (record.status, record.owner, record.images) == ("running", second.owner, ())


@pytest.mark.parametrize(
    ("line", "key", "english", "chinese"),
    [
        (
            "/draw a cat --steps 0",
            "error.out_of_range",
            "--steps must be from 1 to 150, got 0",
            "--steps 必须在 1 到 150 之间",
        ),
        (
            "/draw a cat --size 10x10",
            "error.bad_size",
            "each from 64 to 2048 in multiples of 8",
            "每边 64 到 2048",
        ),
        (
            "/draw a cat --cfg abc",
            "error.not_a_number",
            '--cfg must be a number from 1.0 to 30.0, got "abc"',
            "--cfg 必须是 1.0 到 30.0 之间的数字",
        ),
        (
            "/draw a cat --stesp 4",
            "error.unknown_option",
            "Unknown option --stesp (did you mean --steps?)",
            "未知选项 --stesp（是否想用 --steps？）",
        ),
        ('/draw a cat --negative "lowres', "error.unclosed_quote", "Unclosed quote", "引号"),
        (
            "/draw " + "a" * 10_000,
            "error.prompt_too_long",
            "10000 characters long; at most 2000",
            "最多允许 2000 个",
        ),
        (
            "/draw a cat --checkpoint nope",
            "error.unknown_checkpoint",
            'Unknown checkpoint "nope". Available: tiny',
            "未知模型“nope”。可用模型：tiny",
        ),
        (
            "/draw a cat --sampler Eulr",
            "error.unknown_sampler",
            "Available: DPM++ 2M,",
            "可用采样器：DPM++ 2M",
        ),
        (
            "/draw a cat --size 2048x2048",
            "error.too_many_pixels",
            "at most 1048576 pixels",
            "最多 1048576 像素",
        ),
        (
            "/draw a cat --seed -5",
            "error.seed_range",
            "-1 (random) or a whole number from 0 to",
            "-1（随机）",
        ),
        (
            "/draw a cat --steps " + "9" * 100_000,
            "error.out_of_range",
            "--steps must be from 1 to 150, got 9999",
            "--steps 必须在 1 到 150 之间",
        ),
        (
            "/draw a cat --seed " + "9" * 5_000,
            "error.seed_range",
            "-1 (random) or a whole number from 0 to 9223372036854775807",
            "-1（随机）",
        ),
        ("/draw (a:1.2.3)", "error.prompt_syntax", "could not be read", "无法解析"),
        (
            "/paint a cat",
            "error.unknown_command",
            "Unknown command /paint. Commands: /audit, /ban, /bans, /cancel, /delete, /draw",
            "未知命令 /paint",
        ),
    ],
)
async def test_bad_input_is_refused_in_both_languages_and_nothing_is_stored(
    make_app, line: str, key: str, english: str, chinese: str
) -> None:
    app = await make_app()
    for actor, expected in ((ALICE, english), (BOB, chinese)):
        replies = await draw(app, line, actor)
        assert len(replies) == 1 and replies[0].error
        assert replies[0].key == key
        text = app.translator.t(actor.locale, replies[0].key, **replies[0].params)
        assert expected in text, text
    assert await app.store.count_by_status() == {}


async def test_legacy_sampler_names_and_schedulers(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    (job_id,) = (await draw(app, '/draw a cat --sampler "DPM++ 2M Karras"'))[0].data["jobs"]
    record = await app.store.get(job_id)
    assert (record.request.sampler_name, record.request.scheduler) == ("DPM++ 2M", "Karras")
    (other,) = (await draw(app, "/draw a cat --sampler euler --scheduler karras"))[0].data["jobs"]
    record = await app.store.get(other)
    assert (record.request.sampler_name, record.request.scheduler) == ("Euler", "Karras")
    await log.wait_for(lambda: len(log.of("finished")) == 2)


async def test_a_sampler_alias_is_resolved_once_at_draw_and_stored_canonical(make_app, monkeypatch) -> None:
    """/draw reads ``k_euler_a`` once; the job row holds "Euler a", which the engine looks
    up exactly (it never calls the lenient reader), and the infotext shows it."""
    from pipeline import samplers

    app = await make_app()  # its start checks the default sampler of the config
    log = EventLog(app)
    calls: list[str] = []
    original = samplers.select_sampler
    monkeypatch.setattr(samplers, "select_sampler", lambda *a: calls.append(a[0]) or original(*a))
    (job_id,) = (await draw(app, "/draw a cat --sampler k_euler_a --steps 2"))[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", job_id))
    assert calls == ["k_euler_a"]
    record = await app.store.get(job_id)
    assert (record.request.sampler_name, record.request.scheduler) == ("Euler a", "Automatic")
    finished = log.of("finished", job_id)[0]
    assert parse(finished.images[0].infotext)["Sampler"] == "Euler a"


async def test_an_older_row_with_a_sampler_alias_still_loads_and_runs(make_app) -> None:
    """Rows stored before names were canonical keep theirs in the params JSON; they load
    with the canonical names and run after a restart."""
    from sqlalchemy import select, update

    from models.tables import Generation

    first = await make_app()
    await first.queue.stop()  # nothing runs: the job stays queued, as after a crash
    (job_id,) = (await draw(first, "/draw a cat --steps 2 --sampler euler"))[0].data["jobs"]
    async with first.store.session() as session:
        params = dict(await session.scalar(select(Generation.params).where(Generation.id == job_id)))
        params.update(sampler_name="k_euler_a", scheduler="karras")
        await session.execute(update(Generation).where(Generation.id == job_id).values(params=params))
    await crash(first)
    second = await make_app(start=False)
    log = EventLog(second)
    assert await second.start() == 1
    await log.wait_for(lambda: log.of("finished", job_id))
    fields = parse(log.of("finished", job_id)[0].images[0].infotext)
    assert (fields["Sampler"], fields["Schedule type"]) == ("Euler a", "Karras")
    record = await second.store.get(job_id)
    assert (record.request.sampler_name, record.request.scheduler) == ("Euler a", "Karras")


async def test_progress_never_blocks_the_event_loop(make_app) -> None:
    """While a job runs on the device thread, the loop keeps answering within a few ms."""
    app = await make_app()
    log = EventLog(app)
    (job_id,) = (await draw(app, "/draw a cat --steps 20 --size 128x128"))[0].data["jobs"]
    await log.wait_for(lambda: log.of("started", job_id))
    loop = asyncio.get_running_loop()
    worst = 0.0
    while not log.of("finished", job_id):
        before = loop.time()
        await asyncio.sleep(0.01)
        worst = max(worst, loop.time() - before - 0.01)
    assert worst < 0.5, worst


async def test_progress_events_carry_live_previews_when_due(make_app, tiny_engine) -> None:
    app = await make_app()
    log = EventLog(app)
    tiny_engine.preview_every = 2
    try:
        replies = await draw(app, "/draw a cat --steps 5 --seed 5 --size 64x72 --batch 2")
        assert not replies[0].error, replies
        (job_id,) = replies[0].data["jobs"]
        await log.wait_for(lambda: log.of("finished", job_id))
    finally:
        tiny_engine.preview_every = 0
    progress = log.of("progress", job_id)
    assert [(e.step, e.preview is not None) for e in progress] == [
        (1, False), (2, True), (3, False), (4, True), (5, False),
    ]  # fmt: skip
    preview = Image.open(io.BytesIO(progress[1].preview))
    assert preview.size == (2 * 64 // 8, 72 // 8)  # the batch side by side, one pixel per latent
