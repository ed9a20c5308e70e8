"""The core's delete: the Delete button on every result, owner or moderator only, the
refusal audited, the rows and files gone, and the message that showed the result
replaced through the delivery layer (``Deleted``)."""

from __future__ import annotations

from typing import Any

from bot.adapters.base import Limits
from bot.types import Actor
from models.moderation_store import ModerationStore
from tests.bot.test_adapter_contract import done, until
from tests.chat_adapter import PLATFORM, FakeChat, FakePlatform

LIMITS = Limits(buttons_per_row=5, rows_per_message=5, action_id_bytes=64)


async def result_of(make_app: Any) -> tuple[Any, FakeChat, FakePlatform, str, str]:
    server = FakePlatform()
    app = await make_app(start=False)
    chat = FakeChat(app, server, limits=LIMITS)
    await chat.start()
    await app.start()
    accepted, *_ = await chat.type("/draw a lighthouse --steps 2")
    (job,) = accepted.data["jobs"]
    await until(lambda: done(server, job))
    await chat.delivery.idle()
    result = next(c.posted for c in server.calls if c.message.generation_id == job)
    return app, chat, server, job, result


async def test_delete_button_by_a_stranger_is_refused_and_audited(make_app) -> None:
    app, chat, server, job, result = await result_of(make_app)
    shown = server.messages[result]
    assert [b.id for row in shown.buttons for b in row][-1] == f"delete:{job}"

    (refused,) = await chat.press(result, "Delete", user="bob")
    assert refused.key == "error.moderators_only" and refused.error
    assert await app.store.get(job) is not None
    assert server.messages[result].kind == "finished"
    (entry,) = await ModerationStore(app.store).audit_log([f"{PLATFORM}:chat:group"])
    assert (entry.actor_key, entry.action, entry.target, entry.allowed) == (
        f"{PLATFORM}:bob",
        "delete",
        job,
        False,
    )
    await chat.stop()


async def test_delete_by_the_owner_removes_rows_files_and_the_message(make_app) -> None:
    app, chat, server, job, result = await result_of(make_app)
    record = await app.store.get(job)
    paths = [await app.images.path(image.id) for image in record.images]
    assert paths and all(p.is_file() for p in paths)

    (deleted,) = await chat.press(result, "Delete")
    assert deleted.key == "moderation.deleted"
    await chat.delivery.idle()
    assert await app.store.get(job) is None and not any(p.exists() for p in paths)
    shown = server.messages[result]  # the fake platform edits; Discord removes it
    assert shown.kind == "deleted" and shown.text == f"[{job}] deleted" and not shown.buttons
    assert (await app.service.run_action(f"delete:{job}", Actor(PLATFORM, "alice", "Alice")))[0].key == (
        "error.not_found"
    )
    await chat.stop()


async def test_a_moderator_deletes_anyones_result_and_is_audited(make_app) -> None:
    app, chat, server, job, result = await result_of(make_app)
    moderator = Actor(PLATFORM, "mod", "Mod", chat_id="group", roles=frozenset({"moderator"}))
    (deleted,) = await app.service.run_action(f"delete:{job}", moderator)
    assert deleted.key == "moderation.deleted" and await app.store.get(job) is None
    await chat.delivery.idle()
    assert server.messages[result].kind == "deleted"
    (entry,) = await ModerationStore(app.store).audit_log([f"{PLATFORM}:chat:group"])
    assert (entry.actor_key, entry.allowed, entry.detail["owner"]) == (
        f"{PLATFORM}:mod",
        True,
        f"{PLATFORM}:alice",
    )
    await chat.stop()
