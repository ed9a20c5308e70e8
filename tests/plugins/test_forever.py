"""Generate forever: runs that stop on Stop, on the cap and on quota, each with its notice;
restarts that neither lose nor repeat a run (SQLite and PostgreSQL); a console session."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.plugins import call_collect
from bot.types import Actor, Route
from tests.conftest import EventLog, crash
from tests.scenario import ConsoleSession, jobs_of

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
BOB = Actor(platform="console", user_id="bob", name="Bob", chat_id="c")
ROUTE = Route("console", "c")


async def draw(app, line: str, actor: Actor = ALICE):
    return await app.service.handle_line(line, actor, ROUTE)


async def ended(app, log: EventLog) -> object:
    """The run's one notice, after everything it started has ended."""
    await log.wait_for(lambda: log.of("notice"))
    await app.idle()
    (notice,) = log.of("notice")
    return notice


async def test_a_run_draws_new_seeds_one_job_at_a_time_until_the_cap(make_app) -> None:
    app = await make_app(plugins={"forever": {"max_images": 3}})
    log = EventLog(app)
    replies = await draw(app, "/draw a comet --forever --steps 2 --seed 9")
    assert [r.key for r in replies] == ["draw.accepted", "forever.note"]
    assert "at most 3 images" in app.translator.t("en", replies[1].key, **replies[1].params)
    (run_id,) = replies[0].data["jobs"]
    notice = await ended(app, log)
    assert notice.reply.key == "forever.capped"
    assert notice.reply.params == {"id": run_id, "images": 3, "max": 3}
    assert app.translator.t("en", notice.reply.key, **notice.reply.params) == (
        f"The forever run {run_id} stopped at its limit: 3 image(s), at most 3."
    )
    assert "已达上限" in app.translator.t("zh-CN", notice.reply.key, **notice.reply.params)

    finished = log.of("finished")
    records = [await app.store.get(e.generation_id) for e in finished]
    assert records[0].id == run_id and notice.generation_id == records[-1].id
    assert [r.parent_id for r in records] == [None, run_id, run_id]
    assert [r.forever_run for r in records] == [None, run_id, run_id]
    assert all(Route.from_json(r.route) == ROUTE for r in records)
    assert {r.plan for r in records} == {"forever"}
    assert records[0].request.seed == 9 and len({r.request.seed for r in records}) == 3
    assert len({r.request.subseed for r in records}) == 3
    order = [(e.kind, e.generation_id) for e in log.events if e.kind in ("started", "finished")]
    assert order == [(kind, r.id) for r in records for kind in ("started", "finished")]  # one at a time
    assert all([a.id for a in e.actions].count(f"stop:{run_id}") == 1 for e in finished)
    assert not any(a.id.startswith("forever:") for e in finished for a in e.actions)

    # a finished job reported again (a redelivered event) draws nothing twice
    await call_collect(app.pm.hook.generation_finished, record=records[1], app=app)
    await app.idle()
    assert await app.store.count_by_status() == {"finished": 3}
    assert len(log.of("notice")) == 1


async def test_stop_ends_a_run_after_the_image_in_progress(make_app) -> None:
    app = await make_app(plugins={"forever": {"max_images": 50}})
    log = EventLog(app)
    (run_id,) = (await draw(app, "/draw a comet --forever --steps 2"))[0].data["jobs"]
    await log.wait_for(lambda: len(log.of("finished")) >= 2)
    (reply,) = await app.service.run_action(f"stop:{run_id}", ALICE, ROUTE)
    assert reply.key == "forever.stopping" and not reply.error
    notice = await ended(app, log)
    images = len(log.of("finished"))
    assert notice.reply.key == "forever.stopped"
    assert notice.reply.params == {"id": run_id, "images": images, "by": "Alice"}
    assert 2 <= images < 50
    text = app.translator.t("en", notice.reply.key, **notice.reply.params)
    assert text == f"The forever run {run_id} was stopped by Alice after {images} image(s)."
    assert "已被 Alice 停止" in app.translator.t("zh-CN", notice.reply.key, **notice.reply.params)
    statuses = await app.store.count_by_status()
    assert statuses.get("finished") == images and set(statuses) <= {"finished", "cancelled"}
    (again,) = await draw(app, f"/stop {run_id}")
    assert again.error and again.key == "forever.not_running"


async def test_a_run_ends_when_the_quota_refuses_the_next_request(make_app) -> None:
    app = await make_app(plugins={"quotas": {"images": 3}, "forever": {"max_images": 50}})
    log = EventLog(app)
    (run_id,) = (await draw(app, "/draw a comet --forever --steps 2"))[0].data["jobs"]
    notice = await ended(app, log)
    assert notice.reply.key == "forever.denied" and notice.reply.error
    assert notice.reply.params["images"] == 3
    text = app.translator.t("en", notice.reply.key, **notice.reply.params)
    assert text.startswith(f"The forever run {run_id} stopped after 3 image(s): Your budget of 3 images")
    zh = app.translator.t("zh-CN", notice.reply.key, **notice.reply.params)
    assert zh.startswith(f"无限生成 {run_id} 在生成 3 张图后停止：") and "3" in zh
    assert await app.store.count_by_status() == {"finished": 3}


async def test_the_forever_button_stop_rules_and_refusals(make_app) -> None:
    app = await make_app(plugins={"forever": {"max_images": 2}})
    log = EventLog(app)
    (plain,) = (await draw(app, "/draw a moon --steps 2"))[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", plain))
    actions = [a.id for a in log.of("finished", plain)[0].actions]
    assert f"forever:{plain}" in actions and not any(a.startswith("stop:") for a in actions)

    replies = await app.service.run_action(f"forever:{plain}", ALICE, ROUTE)
    assert [r.key for r in replies] == ["draw.accepted", "forever.note"]
    (run_id,) = replies[0].data["jobs"]
    notice = await ended(app, log)
    assert notice.reply.key == "forever.capped" and notice.reply.params["images"] == 2
    run = [await app.store.get(e.generation_id) for e in log.of("finished")[1:]]
    assert [r.parent_id for r in run] == [plain, run_id]  # the run is a child of the result

    cases = [
        ("/draw a moon --forever --count 2", ALICE, "forever.one_batch"),
        (f"/stop {plain}", ALICE, "forever.not_a_run"),
        (f"/stop {run_id}", BOB, "forever.not_yours"),
        ("/stop", ALICE, "error.missing_argument"),
        ("/stop 01AAAAAAAAAAAAAAAAAAAAAAAA", ALICE, "error.not_found"),
        (f"/stop {run[-1].id}", ALICE, "forever.not_running"),  # any job of the run names it
        ("/forever", ALICE, "error.missing_argument"),
    ]
    for line, actor, key in cases:
        (reply,) = await draw(app, line, actor)
        assert reply.error and reply.key == key, (line, reply)
    (one_batch,) = await draw(app, "/draw a moon --forever --count 2")
    assert "leave out --count (got 2)" in app.translator.t("en", one_batch.key, **one_batch.params)
    assert await app.store.count_by_status() == {"finished": 3}
    # stopping someone else's run is for moderators: the refusal is in the audit log
    from bot.governance import scope_of
    from models.moderation_store import ModerationStore

    entries = await ModerationStore(app.store).audit_log([scope_of(BOB)])
    assert [(e.actor_key, e.action, e.target, e.allowed) for e in entries] == [
        ("console:bob", "stop", run_id, False)
    ]


async def test_stopping_or_cancelling_a_queued_job_ends_its_run(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    await app.queue.stop()  # nothing runs: the runs' first jobs stay queued
    (stopped,) = (await draw(app, "/draw a comet --forever"))[0].data["jobs"]
    (reply,) = await draw(app, f"/stop {stopped}")
    assert reply.key == "forever.stopping"
    (cancelled,) = (await draw(app, "/draw a comet --forever"))[0].data["jobs"]
    await draw(app, f"/cancel {cancelled}")
    notices = {e.reply.params["id"]: e.reply for e in log.of("notice")}
    assert notices[stopped].key == "forever.stopped" and notices[stopped].params["images"] == 0
    assert notices[cancelled].key == "forever.cancelled" and notices[cancelled].params["job"] == cancelled
    assert await app.store.count_by_status() == {"cancelled": 2}


async def test_a_stop_survives_a_restart(make_app) -> None:
    tables = {"plugins": {"forever": {"max_images": 50}}}
    first = await make_app(**tables)
    await first.queue.stop()
    (run_id,) = (await draw(first, "/draw a comet --forever --steps 2"))[0].data["jobs"]
    await first.store.mark_running(run_id, first.service.lease())  # being drawn when the process went down
    (reply,) = await draw(first, f"/stop {run_id}")
    assert reply.key == "forever.stopping"
    await crash(first)

    second = await make_app(start=False, **tables)
    log = EventLog(second)
    assert await second.start() == 1
    notice = await ended(second, log)
    assert notice.reply.key == "forever.stopped" and notice.reply.params["images"] == 1
    assert await second.store.count_by_status() == {"finished": 1}


async def test_a_recovered_run_goes_on_without_losing_or_repeating_images(make_app) -> None:
    tables = {"plugins": {"forever": {"max_images": 4}}}
    first = await make_app(**tables)
    going_down: list[asyncio.Task] = []

    queued: list[str] = []

    def on_event(event) -> None:  # the process goes down as soon as the run's second job is queued
        if event.kind == "queued":
            queued.append(event.generation_id)
        if len(queued) == 2 and not going_down:
            going_down.append(asyncio.get_running_loop().create_task(first.queue.stop(wait=False)))

    first.bus.subscribe(on_event)
    (run_id,) = (await draw(first, "/draw a comet --forever --steps 2"))[0].data["jobs"]
    await EventLog(first).wait_for(lambda: bool(going_down))
    await going_down[0]
    assert await first.store.count_by_status() == {"finished": 1, "queued": 1}
    await crash(first)

    second = await make_app(start=False, **tables)
    log = EventLog(second)
    assert await second.start() == 1
    notice = await ended(second, log)
    assert notice.reply.key == "forever.capped" and notice.reply.params["images"] == 4
    assert len(log.of("finished")) == 3
    assert await second.store.count_by_status() == {"finished": 4}
    later = [await second.store.get(e.generation_id) for e in log.of("finished")]
    assert {r.parent_id for r in later} == {run_id}


async def test_a_run_left_without_a_job_is_ended_at_startup(make_app) -> None:
    first = await make_app()
    await first.queue.stop()
    (run_id,) = (await draw(first, "/draw a comet --forever"))[0].data["jobs"]
    # the process died right after the job was stored as finished, before its hooks ran
    await first.store.mark_running(run_id, first.service.lease())
    assert await first.store.finish(run_id, [], owner=first.owner, model_hash=None, device_seconds=0.1)
    await crash(first)

    second = await make_app(start=False)
    log = EventLog(second)
    assert await second.start() == 0
    (notice,) = log.of("notice")
    assert notice.reply.key == "forever.interrupted" and notice.reply.params == {"id": run_id, "images": 1}
    assert "restarted" in second.translator.t("en", notice.reply.key, **notice.reply.params)
    third = await make_app(start=False)
    again = EventLog(third)
    await third.start()
    assert not again.of("notice")  # told once
    assert await third.store.count_by_status() == {"finished": 1}


@pytest.mark.slow
def test_console_session_stops_on_the_cap_on_stop_and_on_quota(tmp_path: Path) -> None:
    # the stopped run makes one or two images (its next job may be queued before the stop lands),
    # so a budget of 6 leaves the third run one or two: fewer than its cap either way
    config = "[plugins.forever]\nmax_images = 3\n[plugins.quotas]\nimages = 6\n"
    with ConsoleSession(tmp_path, config=config) as session:
        replies = session.command("/draw a paper lantern --forever")
        assert [r["key"] for r in replies] == ["draw.accepted", "forever.note"]
        (first,) = jobs_of(replies)
        capped = session.wait_for(lambda e: e["event"] == "notice")
        assert (
            capped["key"] == "forever.capped"
            and f"{first} stopped at its limit: 3 image(s)" in capped["text"]
        )
        results = [e for e in session.events if e["event"] == "finished"]
        assert len(results) == 3 and all(f"stop:{first}" in [a["id"] for a in e["actions"]] for e in results)

        start = len(session.events)
        (second,) = jobs_of(session.command("/draw a paper lantern --forever"))
        (stopping,) = session.command(f"/stop {second}")  # pressing Stop is typing its action
        assert stopping["key"] == "forever.stopping"
        stopped = session.wait_for(lambda e: e["event"] == "notice", start=start)
        assert stopped["key"] == "forever.stopped" and "was stopped by alice" in stopped["text"]

        start = len(session.events)
        (third,) = jobs_of(session.command("/draw a paper lantern --forever"))
        denied = session.wait_for(lambda e: e["event"] == "notice", start=start)
        assert denied["key"] == "forever.denied" and denied["error"] is True
        assert "Your budget of 6 images" in denied["text"]
    assert len([e for e in session.events if e["event"] == "notice"]) == 3
