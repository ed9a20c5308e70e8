"""The Telegram adapter end to end: the real python-telegram-bot client against the fake
Bot API on 127.0.0.1 (tests/fakes/telegram_api.py), the tiny offline engine behind it.

One bot serves the whole module, as one serves many chats; each test talks in chats
of its own. The restart test runs ``atelier run`` itself, twice."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.adapters.base import Outgoing
from bot.runner import StartError
from bot.settings import Secrets
from bot.types import MessageRef, OutgoingFile, Route
from models.delivery_store import DeliveryStore
from pipeline.images import read_infotext
from tests.conftest import make_settings
from tests.fakes.telegram_api import BOT_USER, Call, FakeTelegram, user_json

TOKEN = "123456:TEST"


@dataclass
class Bot:
    tg: FakeTelegram
    app: Any
    adapter: Any


def secrets_for(tg: FakeTelegram, token: str = TOKEN) -> Secrets:
    return Secrets(
        telegram_token=token, telegram_base_url=tg.base_url, telegram_base_file_url=tg.base_file_url
    )


@pytest.fixture(scope="module")
async def bot(
    tmp_path_factory: pytest.TempPathFactory, tiny_library: Any, tiny_engine: Any
) -> AsyncIterator[Bot]:
    from bot.adapters.telegram import build
    from bot.app import build_app

    tmp = tmp_path_factory.mktemp("telegram")
    tiny_engine.preview_every = 1  # a preview on every step: the throttling decides what is shown
    async with FakeTelegram(tokens=(TOKEN,)) as tg:
        settings = make_settings(tmp, f"sqlite+aiosqlite:///{tmp / 'atelier.db'}")
        settings = settings.model_copy(update={"secrets": secrets_for(tg)})
        app = build_app(settings, engines=[tiny_engine], library=tiny_library)
        adapter = build(app, settings)
        await adapter.start()
        await app.start()
        try:
            yield Bot(tg, app, adapter)
        finally:
            await adapter.stop()
            await app.stop(wait=False)
            tiny_engine.preview_every = 0


def replies_to(tg: FakeTelegram, chat: int, message_id: int) -> list[dict[str, Any]]:
    return [
        m
        for (c, _), m in tg.messages.items()
        if c == chat and (m.get("reply_to_message") or {}).get("message_id") == message_id
    ]


def text_of(message: dict[str, Any]) -> str:
    return message.get("text") or message.get("caption") or ""


def documents(tg: FakeTelegram, chat: int) -> list[Call]:
    return [c for c in tg.sent("sendDocument", chat) if "document" in c.files and c.status == 200]


async def until(predicate: Any, timeout: float = 60.0) -> Any:
    async def loop() -> Any:
        while not (value := predicate()):
            await asyncio.sleep(0.02)
        return value

    return await asyncio.wait_for(loop(), timeout)


async def result_of(tg: FakeTelegram, chat: int, count: int = 1, timeout: float = 90.0) -> list[Call]:
    """The first ``count`` original PNGs sent to ``chat`` (they come last in a result)."""
    return await until(lambda: documents(tg, chat)[count - 1 :] and documents(tg, chat), timeout)


def keyboard_message(tg: FakeTelegram, chat: int) -> dict[str, Any]:
    (message,) = [m for (c, _), m in tg.messages.items() if c == chat and tg.keyboard(m)][-1:]
    return message


def queued_jobs(tg: FakeTelegram, chat: int, message_id: int) -> list[str]:
    """The jobs whose "queued" message answered ``message_id`` (the messages themselves
    make way for a preview later, so the calls are read)."""
    return [
        job_of(c.params["text"])
        for c in tg.sent("sendMessage", chat)
        if (c.params.get("reply_parameters") or {}).get("message_id") == message_id
        and c.params["text"].startswith("[")
        and "queued" in c.params["text"]
    ]


def job_of(text: str) -> str:
    return text.split("]", 1)[0].lstrip("[")


async def test_draw_answers_queued_then_throttled_previews_then_a_photo_and_the_png(bot: Bot) -> None:
    tg, chat = bot.tg, 101
    alice = user_json(101, "Alice")
    start = time.monotonic()
    command = tg.send_text(chat, alice, "/draw a lighthouse --steps 40 --size 128x128 --seed 3")
    queued = await until(
        lambda: [m for m in replies_to(tg, chat, command["message_id"]) if "queued" in text_of(m)]
    )
    assert time.monotonic() - start < 3
    (sent,) = await result_of(tg, chat)
    job = job_of(text_of(queued[0]))
    record = await bot.app.store.get(job)
    assert record is not None and record.status == "finished"

    # progress: a photo with the step replaced the "queued" text, then edits of it, at most 1 per second
    calls = [c for c in tg.sent(chat_id=chat) if c.at >= tg.sent("sendMessage", chat)[0].at]
    progress = [c for c in calls if c.method in ("sendPhoto", "editMessageMedia", "editMessageCaption")]
    steps = [
        c
        for c in progress
        if "step" in str(c.params.get("caption") or c.params.get("media", {}).get("caption"))
    ]
    # from the first step shown to the original PNG (a busy machine may take seconds to start)
    took = sent.at - (steps[0].at if steps else calls[0].at)
    assert len(steps) >= min(2, int(took - 1)), took  # a machine fast enough may finish first
    assert all(b.at - a.at >= 0.95 for a, b in zip(steps, steps[1:], strict=False))
    if steps:
        first = steps[0]
        assert first.method == "sendPhoto" and Image.open(io.BytesIO(first.files["photo"])).size == (16, 16)
        assert tg.sent("deleteMessage", chat)  # the "queued" text made way for the photo

    # the result: the photo with the parameters and a keyboard, the original PNG answering it
    result = keyboard_message(tg, chat)
    assert result["photo"] and f"[{job}] done (seed 3)" in result["caption"]
    assert "Steps: 40" in result["caption"] and len(result["caption"]) <= 1024
    assert all(len(data.encode()) <= 64 for data in tg.keyboard(result))
    png = sent.files["document"]
    assert png == await bot.app.images.read(record.images[0].id)
    assert read_infotext(png) == record.images[0].infotext
    assert sent.file_names["document"].endswith(".png")
    assert sent.params["reply_parameters"]["message_id"] == result["message_id"]

    # what a later process needs is stored with the job: the message is a photo, the PNG under it
    stored = await DeliveryStore(bot.app.store).message(job)
    assert stored is not None
    ref = MessageRef.from_json(stored)
    (original,) = [m for m in replies_to(tg, chat, result["message_id"]) if "document" in m]
    assert ref.message_id == str(result["message_id"]) and ref.media
    assert ref.attached == (str(original["message_id"]),)
    # so a new adapter (a restarted process) edits the photo in place, as this one would
    from bot.adapters.telegram import build

    fresh = build(bot.app, bot.app.settings)
    await fresh.application.initialize()
    try:
        calls = len(tg.calls)
        step = Outgoing(
            ref.route,
            "progress",
            f"[{job}] step 1/2",
            job,
            (OutgoingFile("p.png", "image", bytes(png)),),
            edit=ref,
        )
        again = await fresh.deliver(step)
    finally:
        await fresh.application.shutdown()
    # (the running bot's own long polls may come in between)
    assert [c.method for c in tg.calls[calls:] if c.method != "getUpdates"] == ["editMessageMedia"]
    assert again == ref


async def test_commands_are_set_in_english_and_chinese_and_a_zh_user_gets_chinese(bot: Bot) -> None:
    tg, chat = bot.tg, 102
    assert {"draw", "help"} <= {c["command"] for c in tg.commands[("default", "")]}
    zh_draw = next(c for c in tg.commands[("default", "zh")] if c["command"] == "draw")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in zh_draw["description"])
    wang = user_json(102, "Wang", language_code="zh-CN")
    command = tg.send_text(chat, wang, "/draw 一只猫 --steps 2")
    queued = await until(
        lambda: [m for m in replies_to(tg, chat, command["message_id"]) if "已排队" in text_of(m)]
    )
    assert queued
    await result_of(tg, chat)


async def test_bad_input_gets_a_translated_error_and_nothing_is_stored(bot: Bot) -> None:
    tg, chat = bot.tg, 103
    li = user_json(103, "Li", language_code="zh-hans")
    before = await bot.app.store.count_for_user((await bot.app.store.ensure_user("telegram", "103", "li")).id)
    for text, expected in (("/draw a cat --steps 0", "steps"), ("/draw a cat --style nope", "nope")):
        command = tg.send_text(chat, li, text)
        (answer,) = await until(lambda command=command: replies_to(tg, chat, command["message_id"]))
        assert expected in answer["text"] and any("\u4e00" <= ch <= "\u9fff" for ch in answer["text"])
    command = tg.send_text(chat, li, "/draw a cat", caption_file=("document", b"not a picture", "notes.txt"))
    (answer,) = await until(lambda: replies_to(tg, chat, command["message_id"]))
    assert "图片" in answer["text"]
    user = await bot.app.store.ensure_user("telegram", "103", "li")
    assert await bot.app.store.count_for_user(user.id) == before == 0


async def test_bad_token_stops_the_start_with_a_clear_message(bot: Bot) -> None:
    from bot.adapters.telegram import build

    settings = bot.app.settings.model_copy(update={"secrets": secrets_for(bot.tg, "999:WRONG")})
    adapter = build(bot.app, settings)
    with pytest.raises(StartError, match="ATELIER_TELEGRAM_TOKEN"):
        await adapter.start()
    assert BOT_USER["username"] == bot.adapter.username


def button(message: dict[str, Any], label: str) -> str:
    rows = message["reply_markup"]["inline_keyboard"]
    (data,) = [b["callback_data"] for row in rows for b in row if b["text"] == label]
    return data


async def drawn(
    tg: FakeTelegram, chat: int, user: dict[str, Any], text: str, **kwargs: Any
) -> dict[str, Any]:
    """Send a /draw and wait for its result: the message with the keyboard."""
    before = len(documents(tg, chat))
    tg.send_text(chat, user, text, **kwargs)
    await result_of(tg, chat, before + 1)
    return keyboard_message(tg, chat)


async def test_presses_are_answered_at_once_and_a_variation_answers_its_result(bot: Bot) -> None:
    tg, chat = bot.tg, -1001
    tg.chat(chat, type="supergroup")
    alice, bob = user_json(11, "Alice"), user_json(12, "Bob")
    result = await drawn(tg, chat, alice, "/draw@atelier_bot a red boat --steps 2 --seed 5")
    assert {"Reroll", "V1", "Forever"} <= {
        b["text"] for row in result["reply_markup"]["inline_keyboard"] for b in row
    }

    # someone else's reroll: answered within 2 s, a new job answering the result
    pressed = time.monotonic()
    query = tg.press(chat, result["message_id"], bob, button(result, "Reroll"))
    await until(
        lambda: [c for c in tg.sent("answerCallbackQuery") if c.params["callback_query_id"] == query], 2
    )
    assert time.monotonic() - pressed < 2
    (reroll,) = await until(lambda: queued_jobs(tg, chat, result["message_id"]))

    # the owner's V1: the variation's messages answer the result it varies
    tg.press(chat, result["message_id"], alice, button(result, "V1"))
    (_, job) = await until(
        lambda: (
            queued_jobs(tg, chat, result["message_id"])[1:] and queued_jobs(tg, chat, result["message_id"])
        )
    )
    await until(lambda: [c for c in documents(tg, chat) if job in str(c.file_names)], 90)
    record = await bot.app.store.get(job)
    assert record is not None and record.parent_id is not None

    # Delete: refused for someone else, done for the owner (the photo and its PNG leave the chat)
    refused_at = len(tg.calls)
    tg.press(chat, result["message_id"], bob, button(result, "Delete"))
    refusal = await until(
        lambda: [
            c for c in tg.calls[refused_at:] if c.method == "sendMessage" and "moderator" in c.params["text"]
        ]
    )
    assert refusal[0].params["reply_parameters"]["message_id"] == result["message_id"]
    assert (chat, result["message_id"]) in tg.messages
    assert [m for m in replies_to(tg, chat, result["message_id"]) if "document" in m]  # the original PNG
    query = tg.press(chat, result["message_id"], alice, button(result, "Delete"))
    await until(lambda: (chat, result["message_id"]) not in tg.messages)
    assert [c for c in tg.sent("answerCallbackQuery") if c.params["callback_query_id"] == query]
    await until(lambda: not [m for m in replies_to(tg, chat, result["message_id"]) if "document" in m])
    assert await bot.app.store.get(job_of(result["caption"])) is None

    # a chat administrator moderates there: they may delete someone else's result
    tg.chat(chat).admins.add(14)
    admin_result = await drawn(tg, chat, alice, "/draw a green boat --steps 2")
    pressed_at = len(tg.calls)
    tg.press(chat, admin_result["message_id"], user_json(14, "Ada"), button(admin_result, "Delete"))
    await until(lambda: (chat, admin_result["message_id"]) not in tg.messages)
    await until(  # the answer to the press comes after the message is gone
        lambda: [
            c for c in tg.calls[pressed_at:] if c.method == "sendMessage" and "Deleted" in c.params["text"]
        ]
    )

    # a command for another bot is not ours
    calls = len(tg.calls)
    tg.send_text(chat, alice, "/draw@other_bot a cat")
    await asyncio.sleep(0.5)
    assert not [c for c in tg.calls[calls:] if c.method.startswith("send")]


async def test_a_429_on_the_upload_is_waited_out_and_a_413_sends_a_smaller_file(bot: Bot) -> None:
    tg, chat = bot.tg, 105
    carol = user_json(105, "Carol")
    await bot.app.idle()  # the failures below are for this chat's uploads
    await bot.adapter.delivery.idle()
    tg.fail_next("sendDocument", 429, retry_after=1)
    await drawn(tg, chat, carol, "/draw a tower --steps 2")
    failed, sent = tg.sent("sendDocument", chat)[-2:]
    assert failed.status == 429 and sent.at - failed.at >= 1.0
    assert sent.file_names["document"].endswith(".png")

    tg.fail_next("sendDocument", 413)
    await drawn(tg, chat, carol, "/draw a bridge --steps 2")
    failed, sent = tg.sent("sendDocument", chat)[-2:]
    assert failed.status == 413 and sent.file_names["document"].endswith("-smaller.jpg")
    assert len(sent.files["document"]) < len(failed.files["document"])


async def test_groups_are_edited_every_3_s_and_forum_topics_keep_their_topic(bot: Bot) -> None:
    tg, chat = bot.tg, -1002
    tg.chat(chat, type="supergroup", is_forum=True)
    dave = user_json(13, "Dave")
    assert bot.adapter.limits(Route("telegram", str(chat))).progress_interval == 3.0
    assert bot.adapter.limits(Route("telegram", "13", is_private=True)).progress_interval == 1.0
    started = time.monotonic()
    result = await drawn(tg, chat, dave, "/draw a slow river --steps 12", thread_id=7)
    took = time.monotonic() - started
    progress = [
        c
        for c in tg.sent(chat_id=chat)
        if c.method in ("sendPhoto", "editMessageMedia", "editMessageCaption")
        and "step" in str(c.params.get("caption") or c.params.get("media", {}).get("caption"))
    ]
    assert all(b.at - a.at >= 2.95 for a, b in zip(progress, progress[1:], strict=False))
    if progress:  # from the first step shown (a busy machine may take seconds to start)
        took -= progress[0].at - started
    assert len(progress) >= min(2, int(took // 3)), took
    assert result["message_thread_id"] == 7
    assert {
        c.params.get("message_thread_id") for c in tg.sent(chat_id=chat) if c.method.startswith("send")
    } == {"7"}


def run_bot(tmp: Path, tg: FakeTelegram) -> subprocess.Popen[bytes]:
    """``atelier run`` with the token and the fake's URLs in its environment."""
    config = tmp / "config.toml"
    (tmp / "data").mkdir(exist_ok=True)
    if not config.exists():
        config.write_text(
            f'[bot]\ndata_dir = "{tmp / "data"}"\n'
            f'[engine]\nmodels_dir = "{tmp / "models"}"\ndevice = "cpu"\n'
            "[defaults]\nsteps = 2\nwidth = 64\nheight = 64\n"
            "[telegram]\npoll_timeout = 1\n",
            encoding="utf-8",
        )
    env = {
        **os.environ,
        "ATELIER_CONFIG": str(config),
        "HF_HUB_OFFLINE": "1",
        "ATELIER_TELEGRAM_TOKEN": TOKEN,
        "ATELIER_TELEGRAM_BASE_URL": tg.base_url,
        "ATELIER_TELEGRAM_BASE_FILE_URL": tg.base_file_url,
    }
    env.pop("ATELIER_DATABASE_URL", None)
    env.pop("ATELIER_DISCORD_TOKEN", None)
    log = open(tmp / "bot.log", "ab")  # noqa: SIM115  (the process writes it; closed with the test's tmp)
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "run"], env=env, cwd=tmp, stdout=log, stderr=log
    )


async def serving(tg: FakeTelegram, starts: int) -> None:
    """Until the ``starts``-th process polls for updates."""

    def polling() -> bool:
        started, polls = tg.sent("getMe"), tg.sent("getUpdates")
        return len(started) >= starts and bool(polls) and polls[-1].at > started[-1].at

    await until(polling, 120)


async def stopped(process: subprocess.Popen[bytes], tmp: Path) -> None:
    process.send_signal(signal.SIGTERM)
    code = await until(lambda: process.poll() is not None, 60) and process.returncode
    assert code == 0, (tmp / "bot.log").read_text(errors="replace")[-3000:]


async def test_a_press_after_sigterm_and_a_restart_still_works(tmp_path: Path) -> None:
    """Buttons, and what was sent for a result (its photos and PNGs), outlive the process
    that sent them: after a restart a press still runs, and Delete removes them all."""
    async with FakeTelegram(tokens=(TOKEN,)) as tg:
        chat, erin = 106, user_json(106, "Erin")
        batch_chat, hana = 109, user_json(109, "Hana")
        process = run_bot(tmp_path, tg)
        try:
            await serving(tg, 1)
            tg.send_text(chat, erin, "/draw a quiet harbour --seed 9")
            tg.send_text(batch_chat, hana, "/draw two lanterns --batch 2 --seed 2")
            await result_of(tg, chat, 1, 120)
            result = keyboard_message(tg, chat)
            await until(
                lambda: len([c for c in tg.sent("sendMediaGroup", batch_chat) if c.status == 200]) == 2
            )
            batch = keyboard_message(tg, batch_chat)
        finally:
            await stopped(process, tmp_path)
        # the batch: its message with the keyboard, two photos, two PNGs
        parts = [
            m for (c, m), body in tg.messages.items() if c == batch_chat and {"photo", "document"} & set(body)
        ]
        assert len(parts) == 4 and batch["message_id"] not in parts

        process = run_bot(tmp_path, tg)
        try:
            await serving(tg, 2)
            pressed = time.monotonic()
            query = tg.press(chat, result["message_id"], erin, button(result, "Reroll"))
            await until(
                lambda: [c for c in tg.sent("answerCallbackQuery") if c.params["callback_query_id"] == query]
            )
            assert time.monotonic() - pressed < 2
            (job,) = await until(lambda: queued_jobs(tg, chat, result["message_id"]))
            await result_of(tg, chat, 2, 120)
            assert job in str(documents(tg, chat)[-1].file_names)

            # Delete, pressed in the new process: the photo and the PNG the old one sent leave
            (original,) = [m for m in replies_to(tg, chat, result["message_id"]) if "document" in m]
            tg.press(chat, result["message_id"], erin, button(result, "Delete"))
            await until(lambda: (chat, original["message_id"]) not in tg.messages, 30)
            assert (chat, result["message_id"]) not in tg.messages
            tg.press(batch_chat, batch["message_id"], hana, button(batch, "Delete"))
            gone = [batch["message_id"], *parts]
            await until(lambda: not [m for m in gone if (batch_chat, m) in tg.messages], 30)
        finally:
            await stopped(process, tmp_path)


async def test_link_from_the_console_and_telegram_joins_the_histories_and_unlink_separates(bot: Bot) -> None:
    from bot.adapters.console import ConsoleAdapter
    from bot.types import Actor

    tg, chat, store = bot.tg, 107, bot.app.store
    frank = user_json(107, "Frank")
    console = ConsoleAdapter(
        bot.app, Actor("console", "frank", "frank", chat_id="console"), out=io.StringIO()
    )
    (accepted, *_) = await console.handle("/draw a console cat --steps 2")
    await drawn(tg, chat, frank, "/draw a telegram cat --steps 2")
    own = await store.ensure_user("telegram", "107", "frank")
    assert await store.count_for_user(own.id) == 1

    # a code is shown only in a private chat: in a group anyone could read and use it
    tg.chat(-1003, type="supergroup")
    in_group = tg.send_text(-1003, frank, "/link")
    (refused,) = await until(lambda: replies_to(tg, -1003, in_group["message_id"]))
    assert "private chat" in refused["text"]

    # a code from Telegram, sent from the console: one person (nothing is joined before)
    command = tg.send_text(chat, frank, "/link")
    (answer,) = await until(lambda: replies_to(tg, chat, command["message_id"]))
    code = answer["text"].split("\n")[0].rsplit(" ", 1)[-1]
    (wrong,) = await console.handle("/link NOTACODE")
    assert wrong.error and wrong.key == "link.refused.unknown"
    (done,) = await console.handle(f"/link {code}")
    assert done.key == "link.done" and done.data["person"] == "telegram:107" and done.data["moved"] == 1
    (again,) = await console.handle(f"/link {code}")  # a code works once
    assert again.key == "link.refused.unknown"
    assert await store.count_for_user(own.id) == 2
    console_user = await store.ensure_user("console", "frank", "frank")
    assert await store.count_for_user(console_user.id) == 0

    # from either side: one history; a job asked from the console joins it too
    (history,) = await console.handle("/history")
    assert history.data["total"] == 2 and accepted.data["jobs"][0] in history.data["ids"]
    command = tg.send_text(chat, frank, "/history")
    (shown_history,) = await until(lambda: replies_to(tg, chat, command["message_id"]))
    assert accepted.data["jobs"][0] in shown_history["text"]

    # /unlink: each account takes back what it asked for
    (separated,) = await console.handle("/unlink")
    assert separated.key == "link.unlinked"
    assert await store.count_for_user(own.id) == 1 and await store.count_for_user(console_user.id) == 1
    (none,) = await console.handle("/unlink")
    assert none.key == "link.none"


async def test_a_batch_is_a_media_group_and_a_png_with_pnginfo_in_its_caption_is_read(bot: Bot) -> None:
    tg, chat = bot.tg, 108
    grace = user_json(108, "Grace")
    tg.send_text(chat, grace, "/draw two moons --steps 2 --batch 2 --seed 4")

    def sent_groups() -> list[Call]:
        return [c for c in tg.sent("sendMediaGroup", chat) if c.status == 200]

    groups = await until(lambda: sent_groups()[1:] and sent_groups(), 90)
    photos, originals = (c.params["media"] for c in groups[:2])
    assert [m["type"] for m in photos] == ["photo", "photo"]
    assert [m["type"] for m in originals] == ["document", "document"]
    png = groups[1].files[originals[0]["media"].removeprefix("attach://")]
    assert "Seed: 4" in read_infotext(png)
    result = await until(lambda: [m for (c, _), m in tg.messages.items() if c == chat and tg.keyboard(m)])
    assert "done (seed 4, 5)" in text_of(result[0])

    command = tg.send_text(chat, grace, "/pnginfo", caption_file=("document", png, "moons.png"))
    (answer,) = await until(lambda: replies_to(tg, chat, command["message_id"]))
    assert "Seed: 4" in answer["text"] and "two moons" in answer["text"]

    # a photo with /draw in its caption is the init image (img2img)
    before = len(documents(tg, chat))
    tg.send_text(chat, grace, "/draw the moons redrawn --steps 2", caption_file=("photo", png, "moons.png"))
    (*_, redrawn) = await result_of(tg, chat, before + 1)
    assert "Denoising strength" in read_infotext(redrawn.files["document"])


async def test_queue_lists_places_with_a_cancel_button_for_each_job(
    bot: Bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    tg, chat = bot.tg, 109
    for _ in range(6000):  # what earlier tests queued has ended: the device is free
        counts = await bot.app.store.count_by_status()
        if not counts.get("queued") and not counts.get("running"):
            break
        await asyncio.sleep(0.01)
    gate = threading.Event()  # the device holds its first job until the test ends
    engine = bot.app.engines[0]
    for name in ("generate", "generate_batch"):

        def held(*args: Any, _run: Any = getattr(engine, name), **kwargs: Any) -> Any:
            gate.wait(60)
            return _run(*args, **kwargs)

        monkeypatch.setattr(engine, name, held)
    zhao = user_json(109, "Zhao")
    try:
        jobs = []
        for prompt, steps in (("a kite", 2), ("a boat", 3)):  # not one batch: their steps differ
            command = tg.send_text(chat, zhao, f"/draw {prompt} --steps {steps}")
            jobs += await until(lambda command=command: queued_jobs(tg, chat, command["message_id"]))
        for _ in range(3000):  # until the kite is on the device
            if await bot.app.queue.position(jobs[0]) == 0:
                break
            await asyncio.sleep(0.01)
        command = tg.send_text(chat, zhao, "/queue")
        (answer,) = await until(lambda: replies_to(tg, chat, command["message_id"]))
        lines = answer["text"].splitlines()
        assert lines[0] == "Your 2 job(s) in the queue (in all: 1 waiting, 1 running):"
        assert lines[1].startswith(f"{jobs[0]} · running · a kite · 64x64 · waited ")
        assert lines[2].startswith(f"{jobs[1]} · #1 in the queue · a boat · 64x64 · waited ")
        tg.press(chat, answer["message_id"], zhao, button(answer, "Cancel 2"))
        done = await until(lambda: [m for m in tg.messages.values() if text_of(m) == f"Cancelled {jobs[1]}."])
        assert done[0]["chat"]["id"] == chat
        assert (await bot.app.store.get(jobs[1])).status == "cancelled"
    finally:
        gate.set()
    await result_of(tg, chat)  # the kite ends as drawn
    assert (await bot.app.store.get(jobs[0])).status == "finished"
