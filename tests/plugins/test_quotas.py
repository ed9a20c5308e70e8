"""Quotas through the service, on SQLite and PostgreSQL: atomic admission, billing once."""

from __future__ import annotations

import asyncio

from bot.plugins import call_collect
from bot.types import Actor
from pipeline.queue import Job
from tests.conftest import EventLog, crash

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
MOD = Actor(platform="console", user_id="mod", name="Mod", chat_id="c")
MODERATORS = {"moderators": ["console:mod"]}


async def draw(app, line: str, actor: Actor = ALICE):
    return await app.service.handle_line(line, actor)


async def quota(app, actor: Actor = ALICE, text: str = ""):
    (reply,) = await app.service.handle_line(f"/quota {text}".strip(), actor)
    assert not reply.error, reply
    return reply


async def test_200_concurrent_requests_admit_exactly_the_budget(make_app) -> None:
    app = await make_app(plugins={"quotas": {"images": 10, "max_queued": 0}})
    await app.queue.stop()  # nothing runs: every admitted job stays reserved
    replies = await asyncio.gather(*(draw(app, "/draw a cat") for _ in range(200)))
    keys = [r[0].key for r in replies]
    assert keys.count("draw.accepted") == 10
    assert keys.count("quota.images_spent") == 190
    assert await app.store.count_by_status() == {"queued": 10}
    status = await quota(app)
    assert status.data["images_left"] == 0 and status.data["images_reserved"] == 10


async def test_a_request_that_is_not_stored_leaves_its_reservation_undone_once(make_app, monkeypatch) -> None:
    """The checks and the jobs are one transaction: the failed request's reservation goes
    with it, and giving it back does not take another request's."""
    app = await make_app(plugins={"quotas": {"images": 10}})
    await app.queue.stop()  # the first request's job stays queued, its image reserved
    assert (await draw(app, "/draw a cat --batch 2"))[0].key == "draw.accepted"

    async def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(app.store, "add_jobs", broken)
    assert (await draw(app, "/draw a cat --batch 3"))[0].key == "error.internal"
    monkeypatch.undo()
    status = await quota(app)
    assert (status.data["images_reserved"], status.data["images_left"]) == (2, 8)
    assert await app.store.count_by_status() == {"queued": 1}


async def test_quota_after_finished_failed_and_cancelled_jobs(make_app) -> None:
    app = await make_app(plugins={"quotas": {"images": 10}})
    log = EventLog(app)
    await app.queue.stop()
    ids = (await draw(app, "/draw a cat --count 3 --batch 2 --steps 2"))[0].data["jobs"]
    status = await quota(app)
    assert (status.data["images_left"], status.data["images_reserved"]) == (4, 6)
    refused = await draw(app, "/draw a cat --batch 5")
    assert refused[0].key == "quota.images_spent" and refused[0].params["left"] == 4

    await app.service.cancel(ids[0], ALICE)
    record = await app.store.get(ids[1])
    job = Job(ids[1], ALICE.key, record.request)
    assert await app.service.job_started(job)
    await app.service.job_failed(job, RuntimeError("device lost"))
    await app.queue.start()
    await log.wait_for(lambda: len(log.of("finished")) == 1)
    await app.idle()

    status = await quota(app)
    assert status.data["images_used"] == 2  # the finished job only
    assert status.data["images_reserved"] == 0
    assert status.data["images_left"] == 8
    assert status.data["seconds_used"] > 0
    text = app.translator.t("en", status.key, **status.params)
    assert "8 of 10 images left (2 used, 0 in progress)" in text and "Refills" in text
    assert "剩余 8 / 10 张图" in app.translator.t("zh-CN", status.key, **status.params)


async def test_a_retried_job_is_billed_once(make_app) -> None:
    tables = {"plugins": {"quotas": {"images": 5}}}
    first = await make_app(**tables)
    await first.queue.stop()
    (job_id,) = (await draw(first, "/draw a cat --batch 2"))[0].data["jobs"]
    await first.store.mark_running(job_id, first.service.lease())  # the process died while it ran
    await crash(first)
    second = await make_app(start=False, **tables)
    log = EventLog(second)
    assert await second.start() == 1
    await log.wait_for(lambda: log.of("finished", job_id))
    await second.idle()
    record = await second.store.get(job_id)
    assert record.attempts == 2
    # a second report of the same job (another worker, a redelivered event) bills nothing
    await call_collect(second.pm.hook.generation_finished, record=record, app=second)
    status = await quota(second)
    assert status.data["images_used"] == 2 and status.data["images_reserved"] == 0
    assert status.data["images_left"] == 3


async def test_caps_on_open_jobs_and_cost_name_what_is_allowed(make_app) -> None:
    app = await make_app(plugins={"quotas": {"max_queued": 2, "max_cost": 64 * 64 * 4 * 2}})
    await app.queue.stop()
    too_costly = await draw(app, "/draw a cat --batch 3 --steps 4")
    assert too_costly[0].key == "quota.too_costly" and too_costly[0].params["max"] == 32768
    assert not (await draw(app, "/draw a cat --count 2 --steps 2"))[0].error
    too_many = await draw(app, "/draw a cat --steps 2")
    assert too_many[0].key == "quota.too_many_open"
    assert too_many[0].params == {"open": 2, "max": 2, "needed": 1}
    text = app.translator.t("en", too_many[0].key, **too_many[0].params)
    assert "at most 2 are allowed at once" in text
    assert await app.store.count_by_status() == {"queued": 2}


async def test_relaxed_mode_admits_at_the_lowest_priority(make_app) -> None:
    app = await make_app(plugins={"quotas": {"images": 1, "relaxed": True, "relaxed_priority": -50}})
    await app.queue.stop()
    first = await draw(app, "/draw a cat")
    assert [r.key for r in first] == ["draw.accepted"]
    second = await draw(app, "/draw a cat")
    assert [r.key for r in second] == ["draw.accepted", "quota.relaxed"]
    record = await app.store.get(second[0].data["jobs"][0])
    assert record.priority == -50
    assert (await quota(app)).data["images_reserved"] == 1  # relaxed jobs reserve nothing


async def test_gpu_seconds_are_billed_on_completion(make_app) -> None:
    app = await make_app(plugins={"quotas": {"images": 0, "gpu_seconds": 0.0001, "period": "hourly"}})
    log = EventLog(app)
    (job_id,) = (await draw(app, "/draw a cat --steps 2"))[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", job_id))
    await app.idle()
    refused = await draw(app, "/draw a cat --steps 2")
    assert refused[0].key == "quota.seconds_spent"
    text = app.translator.t("en", refused[0].key, **refused[0].params)
    assert "GPU time for this hour is spent" in text


async def test_moderators_set_grant_and_reset_budgets(make_app) -> None:
    app = await make_app(
        plugins={"quotas": {"images": 2, "roles": {"patron": {"images": 4}}}, "moderation": MODERATORS}
    )
    await app.queue.stop()
    assert (await quota(app, MOD, "@alice")).data["images_left"] == 2
    patron = Actor(platform="console", user_id="pat", name="Pat", chat_id="c", roles=frozenset({"patron"}))
    assert (await quota(app, patron)).data["images_left"] == 4

    await quota(app, MOD, "set @alice --images 3")
    assert (await quota(app, MOD, "@alice")).data["images_left"] == 3
    assert not (await draw(app, "/draw a cat --count 3"))[0].error
    assert (await draw(app, "/draw a cat"))[0].key == "quota.images_spent"
    await quota(app, MOD, "grant @alice --images 1")
    assert not (await draw(app, "/draw a cat"))[0].error
    await quota(app, MOD, "reset @alice")
    status = await quota(app)
    assert status.data["images_left"] == 0 and status.data["images_reserved"] == 4

    refused = await app.service.handle_line("/quota @mod", ALICE)
    assert refused[0].key == "error.moderators_only"
    audit = (await app.service.handle_line("/audit", MOD))[0].data["entries"]
    assert [(e["action"], e["allowed"]) for e in audit] == [
        ("quota.view", False),
        ("quota.reset", True),
        ("quota.grant", True),
        ("quota.set", True),
    ]


async def test_max_running_caps_how_many_of_a_users_jobs_run_at_once(make_app) -> None:
    app = await make_app(plugins={"quotas": {"max_running": 1, "roles": {"patron": {"max_running": 2}}}})
    await app.queue.stop()  # keep the jobs waiting so their queue entries can be read
    await draw(app, "/draw a cat --count 2")
    patron = Actor(platform="console", user_id="pat", name="Pat", chat_id="c", roles=frozenset({"patron"}))
    await draw(app, "/draw a dog", patron)
    caps = {job.owner: job.max_running for job in app.queue._waiting.values()}
    assert caps == {"console:alice": 1, "console:pat": 2}


async def test_a_request_that_cannot_be_stored_gives_its_reservation_back(make_app, monkeypatch) -> None:
    app = await make_app(plugins={"quotas": {"images": 10}})

    async def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(app.store, "add_jobs", broken)
    assert (await draw(app, "/draw a cat --batch 3"))[0].key == "error.internal"
    status = await quota(app)
    assert status.data["images_left"] == 10 and status.data["images_reserved"] == 0


async def test_the_default_cost_cap_admits_ordinary_requests_and_refuses_the_largest(make_app) -> None:
    from plugins.quotas import QuotasConfig

    app = await make_app()  # [plugins.quotas] as shipped
    assert QuotasConfig().max_cost == 1024 * 1024 * 1024
    await app.queue.stop()  # admission is all this needs; nothing runs
    for line in (
        "/draw a cat --size 512x512 --steps 20",  # A1111's defaults
        "/draw a cat --batch 4 --size 1024x1024 --steps 50",
        "/draw a cat --batch 4 --count 4 --size 1024x1024 --steps 64",
    ):
        assert (await draw(app, line))[0].key == "draw.accepted", line
    (refused,) = await draw(app, "/draw a cat --batch 8 --count 8 --size 1024x1024 --steps 150")
    assert refused.error and refused.key == "quota.too_costly"
    assert "costs 10066329600" in app.translator.t("en", refused.key, **refused.params)
    assert "at most 1073741824 is allowed" in app.translator.t("en", refused.key, **refused.params)
    assert "最多允许 1073741824" in app.translator.t("zh-CN", refused.key, **refused.params)
    assert await app.store.count_by_status() == {"queued": 1 + 1 + 4}


async def test_a_settlement_lost_after_the_end_was_stored_is_made_at_the_next_start(
    make_app, monkeypatch
) -> None:
    """The process stopped between storing a job's end and settling its quota (here each
    settlement fails): the next start bills the finished job and releases the cancelled
    one, once, as the hooks would have."""
    from models.quota_store import QuotaStore

    tables = {"plugins": {"quotas": {"images": 10, "max_queued": 3}}}
    first = await make_app(**tables)
    log = EventLog(first)
    await draw(first, "/draw a cat --steps 2")  # settled as usual
    await log.wait_for(lambda: len(log.of("finished")) == 1)
    await first.idle()

    async def lost(*_args, **_kwargs):
        raise ConnectionError("the database went away")

    monkeypatch.setattr(QuotaStore, "settle", lost)
    monkeypatch.setattr(QuotaStore, "settle_many", lost)
    await first.queue.stop()
    (finished,) = (await draw(first, "/draw a cat --batch 2 --steps 2"))[0].data["jobs"]
    (cancelled,) = (await draw(first, "/draw a dog --steps 2"))[0].data["jobs"]
    assert not (await first.service.cancel(cancelled, ALICE)).error
    await first.queue.start()
    await log.wait_for(lambda: log.of("finished", finished))
    await first.idle()
    status = await quota(first)
    assert (status.data["images_used"], status.data["images_reserved"]) == (1, 3)  # both left open
    assert await open_jobs(first) == 2
    monkeypatch.undo()
    await first.stop()

    second = await make_app(**tables)
    status = await quota(second)
    assert (status.data["images_used"], status.data["images_reserved"]) == (3, 0)
    assert await open_jobs(second) == 0
    await second.stop()
    third = await make_app(**tables)  # nothing is billed twice
    status = await quota(third)
    assert (status.data["images_used"], status.data["images_reserved"]) == (3, 0)


async def open_jobs(app) -> int:
    """Alice's admitted jobs that have not ended, as the usage rows count them."""
    from sqlalchemy import func, select

    from models.governance import QuotaUsage

    async with app.store.session() as session:
        found = await session.scalar(
            select(func.sum(QuotaUsage.jobs_open)).where(QuotaUsage.user_key == ALICE.key)
        )
    return int(found or 0)
