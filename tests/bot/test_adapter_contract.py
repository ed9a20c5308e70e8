"""The adapter contract end to end, on SQLite and PostgreSQL: a test-only chat adapter
(tests/chat_adapter.py) drives /draw -> queued -> throttled progress with previews ->
the result with paged buttons and fitted files -> a restart -> a button press -> the
variation in the chain's thread, and a second variation in the same thread."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from bot.adapters.base import Limits
from bot.types import Actor, Route
from models.delivery_store import DeliveryStore
from pipeline.images import read_infotext
from tests.chat_adapter import PLATFORM, Call, FakeChat, FakePlatform

INTERVAL = 0.3
LIMITS = Limits(
    progress_interval=INTERVAL,
    buttons_per_row=2,
    rows_per_message=2,
    action_id_bytes=40,  # "vary:<id>.1 --strong" is 42 bytes: it travels as a token
    image_bytes=3000,  # under a 128x128 noise PNG: the chat gets a preview and the PNG as a document
    document_bytes=1 << 20,
    threads=True,
)


@pytest.fixture
def previews(tiny_engine: Any) -> Any:
    """The engine's live previews on every step (the default is every 5th)."""
    tiny_engine.preview_every = 1
    yield
    tiny_engine.preview_every = 0


async def start_bot(make_app: Callable[..., Any], server: FakePlatform) -> tuple[Any, FakeChat]:
    app = await make_app(start=False)
    chat = FakeChat(app, server, limits=LIMITS)
    await chat.start()  # before the App: recovered jobs' events reach the chat too
    await app.start()
    return app, chat


async def until(predicate: Callable[[], Any], timeout: float = 120) -> None:
    async def loop() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(loop(), timeout)


def calls_of(server: FakePlatform, job: str) -> list[Call]:
    return [call for call in server.calls if call.message.generation_id == job]


def done(server: FakePlatform, job: str) -> bool:
    return any(call.message.kind == "finished" for call in calls_of(server, job))


def holder(server: FakePlatform, label: str, near: str) -> str:
    """The message with the button ``label``: the result ``near`` or a page answering it."""
    for message in server.messages.values():
        if message.id == near or message.reply_to == near:
            if any(b.label == label for row in message.buttons for b in row):
                return message.id
    raise AssertionError(f"no button {label!r} near {near}")


async def test_draw_to_result_then_a_press_after_a_restart_lands_in_the_chains_thread(
    make_app, previews
) -> None:
    server = FakePlatform()
    app, chat = await start_bot(make_app, server)
    accepted, *_ = await chat.type("/draw a lighthouse --steps 40 --size 128x128 --seed 3")
    (job,) = accepted.data["jobs"]
    await until(lambda: done(server, job))
    await chat.delivery.idle()

    # the answer and the job's message both answer the command, in order, in its chat
    command = next(m for m in server.messages.values() if m.kind == "user")
    answer = next(c for c in server.calls if c.message.kind == "reply")
    calls = calls_of(server, job)
    assert calls[0].message.kind == "queued" and server.calls.index(calls[0]) < server.calls.index(answer)
    assert server.messages[answer.posted].reply_to == command.id
    # one tracked message: queued, started, every progress and the result edit it
    result = calls[0].posted
    assert server.messages[result].reply_to == command.id
    tracked = [c for c in calls if c.message.kind != "actions"]
    assert {c.posted for c in tracked} == {result}
    assert [c.message.edit.message_id for c in tracked[1:]] == [result] * (len(tracked) - 1)
    # progress: throttled (how many steps fit an interval depends on the machine; the
    # coalescing itself is timed in test_delivery.py), in order, each with its preview
    progress = [c for c in calls if c.message.kind == "progress"]
    steps = [c.message.source.step for c in progress]
    assert steps and steps == sorted(set(steps)) and steps[-1] <= 40
    shown_previews = [Image.open(io.BytesIO(c.message.files[0].data)) for c in progress if c.message.files]
    assert shown_previews and {p.size for p in shown_previews} == {(16, 16)}  # 128 px / 8: the latents
    assert all(c.message.files for c in progress if c.message.source.step < 40)  # the last has none
    for earlier, later in zip(tracked, tracked[1:], strict=False):
        if later.message.kind == "progress":
            assert later.at - earlier.at >= INTERVAL - 0.02
    # the result: a preview within the image limit, the original PNG as a document
    shown = server.messages[result]
    assert shown.kind == "finished" and shown.text == f"[{job}] done (seed 3)"
    preview, original = shown.files
    assert preview.kind == "image" and len(preview.data) <= 3000 and preview.name.endswith(".jpg")
    record = await app.store.get(job)
    stored = await app.images.read(record.images[0].id)
    assert original.kind == "document" and original.data == stored
    assert read_infotext(original.data) == record.images[0].infotext
    # buttons: at most 2 per row and 2 rows per message, the rest on a page answering it
    pages = [m for m in server.messages.values() if m.id == result or m.reply_to == result]
    assert all(len(m.buttons) <= 2 and all(len(row) <= 2 for row in m.buttons) for m in pages)
    buttons = [b for m in pages for row in m.buttons for b in row]
    alice = Actor(PLATFORM, "alice", "Alice", chat_id="group")
    assert len(buttons) == len(app.service.result_actions(record, alice)) >= 5
    assert all(len(b.id.encode()) <= 40 for b in buttons)
    assert any(b.id.startswith("~") for b in buttons)  # a token for the long id
    assert any(m.text == "More actions (2/2)" for m in pages)
    assert (await DeliveryStore(app.store).message(job))["message_id"] == result

    # a restart between the result and the press: a new App on the same database
    await chat.stop()
    await app.stop()
    app, chat = await start_bot(make_app, server)
    (pressed,) = await chat.press(holder(server, "V1 strong", result), "V1 strong")
    (variation,) = pressed.data["jobs"]
    await until(lambda: done(server, variation))
    first = server.messages[calls_of(server, variation)[0].posted]
    thread = first.route.thread_id
    assert thread is not None and server.threads == {thread: result}  # a thread under the result
    assert {server.messages[c.posted].route.thread_id for c in calls_of(server, variation)} == {thread}
    row = await app.store.get(variation)
    assert row.parent_id == job and row.thread_key == job and "0.5" in row.images[0].infotext
    assert Route.from_json(row.route).reply_to_message_id in {result, *(m.id for m in pages)}
    stored_thread = await DeliveryStore(app.store).thread_route(PLATFORM, job)
    assert stored_thread == {"platform": PLATFORM, "chat_id": "group", "thread_id": thread}

    # the next variation of the chain joins the same thread
    (again,) = await chat.press(result, "V1")
    (second,) = again.data["jobs"]
    await until(lambda: done(server, second))
    assert {server.messages[c.posted].route.thread_id for c in calls_of(server, second)} == {thread}
    assert len(server.threads) == 1
    await chat.stop()
