"""The delivery layer (bot/delivery) against the test-only chat adapter: routing, throttling,
message tracking, retries, paging with tokens and upload fitting. Events are published on
the bus by hand (jobs of a stopped queue), so timings are the layer's own."""

from __future__ import annotations

import asyncio
import io
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from PIL import Image

from bot.adapters.base import DeliveryFailed, Limits, RetryAfter
from bot.types import (
    Action,
    Actor,
    Finished,
    MessageRef,
    Notice,
    OutgoingFile,
    Progress,
    Reply,
    Route,
    Started,
)
from models.delivery_store import DeliveryStore
from tests.chat_adapter import PLATFORM, FakeChat, FakePlatform

ALICE = Actor(PLATFORM, "alice", "Alice", chat_id="group")
GROUP = Route(PLATFORM, "group")


def noise_png(size: int = 96) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(1).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def chat_app(make_app: Any, **limits: Any) -> tuple[Any, FakeChat, FakePlatform]:
    """A started App whose queue runs nothing, and a chat adapter with ``limits``."""
    app = await make_app()
    await app.queue.stop()
    server = FakePlatform()
    chat = FakeChat(app, server, limits=Limits(**limits))
    await chat.start()
    return app, chat, server


async def queued_job(app: Any, chat: FakeChat, route: Route = GROUP) -> str:
    """A stored job (the queue is stopped): its Queued event was delivered."""
    (accepted, *_) = await chat.delivery.command("/draw a cat --steps 2", ALICE, route)
    await chat.delivery.idle()
    return accepted.data["jobs"][0]


async def until(predicate: Any, timeout: float = 10) -> None:
    async def loop() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(loop(), timeout)


def kinds(server: FakePlatform, job: str) -> list[str]:
    return [c.message.kind for c in server.calls if c.message.generation_id == job]


async def test_progress_is_throttled_per_chat_coalesced_and_the_end_never_waits(make_app) -> None:
    app, chat, server = await chat_app(make_app, progress_interval=0.5)
    job = await queued_job(app, chat)
    other = await queued_job(app, chat, Route(PLATFORM, "other"))
    for step in range(1, 11):  # ten steps at once: only the newest waits for its turn
        app.bus.publish(Progress(job, ALICE, GROUP, step=step, total=10))
    app.bus.publish(Progress(other, ALICE, Route(PLATFORM, "other"), step=1, total=10))
    await until(lambda: len([c for c in server.calls if c.message.kind == "progress"]) == 2)
    await asyncio.sleep(0.1)  # and nothing more: the other steps were coalesced
    steps = [c.message.source.step for c in server.calls if c.message.kind == "progress"]
    assert steps == [1, 10] or steps == [10, 1]  # one per chat: the other chat did not wait
    mine = next(c for c in server.calls if c.message.generation_id == job and c.message.kind == "progress")
    assert mine.at - server.calls[0].at >= 0.5 - 0.02  # the queued message counts against the interval
    app.bus.publish(Progress(job, ALICE, GROUP, step=11, total=12))
    app.bus.publish(Finished(job, ALICE, GROUP))  # the end goes at once; step 11 is dropped
    published = time.monotonic()
    await chat.delivery.idle()
    assert kinds(server, job) == ["queued", "progress", "finished"]
    finished = server.calls[-1]
    assert finished.message.kind == "finished" and finished.at - published < 0.5
    assert finished.message.edit is not None and finished.posted == server.calls[0].posted
    private = Route(PLATFORM, "dm", is_private=True)
    assert chat.limits(private).progress_interval == pytest.approx(0.5 / 3)


async def test_the_threads_of_one_chat_share_its_progress_interval_when_the_adapter_says_so(
    make_app,
) -> None:
    """Telegram limits a group, not each of its forum topics: with ``progress_per_chat``
    two jobs in two threads of one chat are edited no more often, together, than the
    interval allows one conversation."""
    interval = 0.4
    app, chat, server = await chat_app(make_app, progress_interval=interval, progress_per_chat=True)
    topics = [Route(PLATFORM, "forum", "t1"), Route(PLATFORM, "forum", "t2")]
    jobs = [await queued_job(app, chat, topic) for topic in topics]
    elsewhere = Route(PLATFORM, "other")
    other = await queued_job(app, chat, elsewhere)
    await asyncio.sleep(interval)  # the "queued" messages' turns are over: each topic could send
    for step in (1, 2, 3):  # both jobs keep stepping while the chat's turns come
        for job, topic in zip(jobs, topics, strict=True):
            app.bus.publish(Progress(job, ALICE, topic, step=step, total=3))
        await asyncio.sleep(interval / 2)
    app.bus.publish(Progress(other, ALICE, elsewhere, step=1, total=3))

    def sent(where: str) -> list[Any]:
        return [c for c in server.calls if c.message.kind == "progress" and c.message.route.chat_id == where]

    await until(lambda: {c.message.generation_id for c in sent("forum")} == set(jobs))
    await until(lambda: len(sent("other")) == 1)  # another chat's throttle is its own
    await chat.delivery.idle()
    forum = [c for c in server.calls if c.message.route.chat_id == "forum"]
    progress = sent("forum")
    assert len(progress) >= 2 and {c.message.route.thread_id for c in progress} == {"t1", "t2"}
    # every send in the chat, either topic, counts: no step follows another message in sooner
    for before, step in zip(forum, forum[1:], strict=False):
        if step.message.kind == "progress":
            assert step.at - before.at >= interval - 0.02, [(c.message.kind, c.at) for c in forum]


async def test_only_the_adapters_platform_in_the_actors_language(make_app) -> None:
    app, chat, server = await chat_app(make_app)
    job = await queued_job(app, chat)
    elsewhere = Route("discord", "c1")
    app.bus.publish(Started(job, ALICE, elsewhere))
    zh = Actor(PLATFORM, "bob", "Bob", locale="zh-CN", chat_id="group")
    app.bus.publish(Started(job, zh, GROUP))
    await chat.delivery.idle()
    assert kinds(server, job) == ["queued", "started"]
    assert server.calls[-1].message.text == f"[{job}] 开始生成"


async def test_retry_after_is_waited_and_a_failed_edit_becomes_the_tracked_message(make_app) -> None:
    app, chat, server = await chat_app(make_app)
    job = await queued_job(app, chat)
    first = server.calls[0].posted
    server.failures += [RetryAfter(0.2), DeliveryFailed("message deleted")]
    started = time.monotonic()
    app.bus.publish(Started(job, ALICE, GROUP))
    await chat.delivery.idle()
    moved = server.calls[-1]
    assert time.monotonic() - started >= 0.2
    assert moved.message.edit is None and moved.posted != first  # sent anew after the failed edit
    assert (await DeliveryStore(app.store).message(job))["message_id"] == moved.posted
    app.bus.publish(Finished(job, ALICE, GROUP))
    await chat.delivery.idle()
    assert server.calls[-1].message.edit.message_id == moved.posted  # later events edit the new one
    server.failures += [RetryAfter(0.01)] * 3  # a platform that never lets it through: given up, logged
    await chat.delivery.send([Reply("cancel.done", {"id": job})], ALICE, GROUP)
    assert server.calls[-1].message.kind == "finished"


async def test_buttons_are_paged_and_long_ids_are_tokens_that_a_new_app_resolves(make_app) -> None:
    app, chat, server = await chat_app(make_app, buttons_per_row=2, rows_per_message=1, action_id_bytes=20)
    actions = [Action(f"reroll:{n}", "action.reroll") for n in range(3)]
    actions.append(Action("cancel:" + "x" * 30, "action.cancel"))
    await chat.delivery.send([Reply("help.header", actions=actions)], ALICE, GROUP)
    main, more = server.calls
    assert [[b.label for b in row] for row in main.message.buttons] == [["Reroll", "Reroll"]]
    assert more.message.text == "More actions (2/2)" and more.message.reply_to.message_id == main.posted
    token = more.message.buttons[0][1].id
    assert token.startswith("~") and len(token.encode()) <= 20
    await chat.stop()
    again = await make_app()
    pressed = await FakeChat(again, server).delivery.press(token, ALICE, GROUP)
    assert pressed[0].key == "error.not_found"  # "cancel:xxx..." ran: the token was resolved
    unknown = await FakeChat(again, server).delivery.press("~nope", ALICE, GROUP)
    assert unknown[0].key == "error.unknown_action"


async def test_the_further_pages_of_a_result_are_attached_to_its_stored_message(make_app) -> None:
    app, chat, server = await chat_app(make_app, buttons_per_row=2, rows_per_message=1)
    job = await queued_job(app, chat)
    actions = tuple(Action(f"reroll:{n}", "action.reroll") for n in range(5))
    app.bus.publish(Finished(job, ALICE, GROUP, actions=actions))
    await chat.delivery.idle()
    shown = server.calls[0].posted  # the "queued" message, edited into the result
    pages = [c.posted for c in server.calls if c.message.kind == "actions"]
    assert len(pages) == 2 and all(server.messages[p].reply_to == shown for p in pages)
    # the stored reference names them: a deletion, in this process or a later one, removes them too
    stored = MessageRef.from_json(await DeliveryStore(app.store).message(job))
    assert (stored.message_id, stored.attached) == (shown, tuple(pages))


async def test_files_fit_the_upload_limits_and_what_cannot_be_sent_is_said(make_app) -> None:
    app, chat, server = await chat_app(make_app, image_bytes=4000, document_bytes=20 * 1024)
    big = noise_png(96)  # about 28 KB: over both limits
    small = noise_png(40)  # about 5 KB: over the image limit only
    reply = Reply(
        "denied",
        files=[
            OutgoingFile("small.png", "image", data=small),
            OutgoingFile("big.png", "image", data=big),
            OutgoingFile("export.zip", "document", data=b"z" * 30_000),
        ],
    )
    job = await queued_job(app, chat)
    app.bus.publish(Notice(job, ALICE, GROUP, reply=reply))
    await chat.delivery.idle()
    notice = server.calls[-1].message
    names = [(f.name, f.kind) for f in notice.files]
    assert names == [
        ("small-preview.jpg", "image"),
        ("small.png", "document"),
        ("big-preview.jpg", "image"),
    ]
    assert all(len(f.data) <= 4000 for f in notice.files if f.kind == "image")
    assert notice.files[1].data == small
    lines = notice.text.splitlines()
    assert lines[1].startswith("big.png (") and f"/show {job}" in lines[1]
    assert lines[2].startswith("export.zip (") and "upload limit (20 KiB)" in lines[2]
    assert notice.reply_to.message_id == server.calls[0].posted  # a notice answers the job's message
    zh = Actor(PLATFORM, "bob", "Bob", locale="zh-CN", chat_id="group")
    gone = Reply("denied", files=[OutgoingFile("x.png", "image", image_id="01NOPE")])
    app.bus.publish(Notice(job, zh, GROUP, reply=gone))
    await chat.delivery.idle()
    assert server.calls[-1].message.text.endswith("x.png 已不再保存，无法发送。")


async def test_an_expired_interaction_token_is_dropped_and_notices_find_the_message_after_a_restart(
    make_app,
) -> None:
    app, chat, server = await chat_app(make_app)
    now = datetime.now(UTC)
    live = Route(PLATFORM, "group", interaction_token="tok", token_expires_at=now + timedelta(minutes=15))
    job = await queued_job(app, chat, live)
    assert server.calls[0].message.route.interaction_token == "tok"
    stale = Route(PLATFORM, "group", interaction_token="old", token_expires_at=now - timedelta(seconds=1))
    app.bus.publish(Started(job, ALICE, stale))
    await chat.delivery.idle()
    assert server.calls[-1].message.route.interaction_token is None
    await chat.stop()
    again = await make_app()
    later = FakeChat(again, server)
    await later.start()
    record = await again.store.get(job)
    again.service.post(record, Reply("cancel.done", {"id": job}))
    await later.delivery.idle()
    notice = server.calls[-1].message
    assert notice.kind == "notice" and notice.reply_to.message_id == server.calls[0].posted
    assert Route.from_json(record.route) == live
    await later.stop()


def test_a_route_round_trips_through_json_and_refuses_a_naive_expiry() -> None:
    route = Route("discord", "c1", "t9", "m5", "tok", datetime(2026, 1, 1, 12, tzinfo=UTC), is_private=True)
    assert Route.from_json(route.to_json()) == route
    ref = MessageRef(route, "m7", media=True, attached=("m8", "m9"))
    assert MessageRef.from_json(ref.to_json()) == ref
    plain = {"route": route.to_json(), "message_id": 7}  # as stored before media and attached
    assert MessageRef.from_json(plain) == MessageRef(route, "7")
    assert Route.from_json({"platform": "telegram", "chat_id": -100}) == Route("telegram", "-100")
    with pytest.raises(ValueError, match="timezone-aware"):
        Route("discord", token_expires_at=datetime(2026, 1, 1))
