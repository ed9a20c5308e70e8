"""The fake Discord and Telegram servers speak what the real client libraries expect.

The adapters' end-to-end tests stand on these fakes; here each is driven by its library
alone, so a fake that drifts from the library fails here first.
"""

from __future__ import annotations

import asyncio
import io

import discord
import yarl
from discord.ext import commands
from PIL import Image
from telegram import InlineKeyboardButton, InlineKeyboardMarkup, InputMediaPhoto
from telegram.error import RetryAfter
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, MessageHandler, filters

from tests.fakes.discord_api import FakeDiscord
from tests.fakes.discord_api import user_json as discord_user
from tests.fakes.telegram_api import FakeTelegram
from tests.fakes.telegram_api import user_json as telegram_user


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    return buffer.getvalue()


async def test_python_telegram_bot_talks_to_the_fake_bot_api() -> None:
    async with FakeTelegram() as tg:
        app = (
            Application.builder()
            .token("123456:TEST")
            .base_url(tg.base_url)
            .base_file_url(tg.base_file_url)
            .build()
        )

        async def photo(update, context) -> None:
            data = await (await update.message.photo[-1].get_file()).download_as_bytearray()
            await update.message.reply_text(f"{update.message.caption} {len(data)}")

        async def draw(update, context) -> None:
            keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("again", callback_data="reroll:1")]])
            sent = await update.message.reply_text(f"queued {' '.join(context.args)}", reply_markup=keyboard)
            await sent.edit_text("step 1")
            await update.message.reply_document(_png(), filename="x.png")
            await update.effective_chat.send_media_group([InputMediaPhoto(_png()), InputMediaPhoto(_png())])

        async def press(update, context) -> None:
            await update.callback_query.answer()

        app.add_handler(CommandHandler("draw", draw))
        app.add_handler(MessageHandler(filters.PHOTO, photo))
        app.add_handler(CallbackQueryHandler(press))
        async with app:
            await app.start()
            await app.updater.start_polling(poll_interval=0.0, timeout=1)
            await app.bot.set_my_commands([("draw", "画一幅画")], language_code="zh")
            user = telegram_user(7, language_code="zh-hans")
            tg.send_text(7, user, "/draw a cat")
            await tg.wait_for(lambda: tg.sent("sendMediaGroup"))
            tg.send_text(7, user, "/pnginfo", caption_file=("photo", _png(), "in.png"))
            await tg.wait_for(lambda: len(tg.sent("sendMessage")) == 2)
            queued = tg.sent("sendMessage")[0]
            tg.press(
                7, next(k[1] for k, m in tg.messages.items() if m.get("text") == "step 1"), user, "reroll:1"
            )
            await tg.wait_for(lambda: tg.sent("answerCallbackQuery"))
            await app.updater.stop()
            await app.stop()
    assert queued.params["text"] == "queued a cat"
    assert tg.sent("sendMessage")[1].params["text"] == f"/pnginfo {len(_png())}"
    assert tg.sent("sendDocument")[0].file_names == {"document": "x.png"}
    assert tg.sent("sendDocument")[0].files["document"] == _png()
    assert tg.commands[("default", "zh")] == [{"command": "draw", "description": "画一幅画"}]


async def test_a_failure_is_served_once_as_telegram_words_it() -> None:
    async with FakeTelegram() as tg:
        app = Application.builder().token("123456:TEST").base_url(tg.base_url).build()
        tg.fail_next("sendMessage", 429, retry_after=1)
        async with app:
            try:
                await app.bot.send_message(5, "hello")
            except RetryAfter as exc:
                error = exc
            await app.bot.send_message(5, "hello")
    assert isinstance(error, RetryAfter) and str(error) == "Flood control exceeded. Retry in 1 seconds"
    assert [c.params["text"] for c in tg.sent("sendMessage")] == ["hello", "hello"]


class _Buttons(discord.ui.View):
    def __init__(self) -> None:
        super().__init__(timeout=None)

    @discord.ui.button(label="again", custom_id="reroll:1")
    async def again(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.defer()
        await interaction.followup.send("rerolled")


async def test_discord_py_talks_to_the_fake_gateway_rest_and_cdn(monkeypatch) -> None:
    async with FakeDiscord() as dc:
        dc.guild("7", owner_id="1")
        dc.channel("7", "70")
        monkeypatch.setattr(discord.http.Route, "BASE", dc.api_base)
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(dc.gateway_url))
        bot = commands.Bot(command_prefix="!", intents=discord.Intents(guilds=True), guild_ready_timeout=0.05)
        seen: dict[str, object] = {}

        @bot.tree.command(name="draw", description="draw")
        async def draw(interaction: discord.Interaction, prompt: str, image: discord.Attachment) -> None:
            await interaction.response.defer(thinking=True)
            seen.update(prompt=prompt, image=await image.read(), locale=str(interaction.locale))
            message = await interaction.followup.send(
                "done", file=discord.File(io.BytesIO(_png()), "a.png"), view=_Buttons(), wait=True
            )
            thread = await interaction.channel.get_partial_message(message.id).create_thread(
                name="variations"
            )
            await thread.send("in the thread")

        async def setup_hook() -> None:
            bot.add_view(_Buttons())
            await bot.tree.sync()

        bot.setup_hook = setup_hook
        ready = asyncio.Event()

        async def on_ready() -> None:
            ready.set()

        bot.add_listener(on_ready, "on_ready")
        task = asyncio.create_task(bot.start("fake-token"))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            attachment = dc.add_attachment(_png(), "in.png")
            options = [{"name": "prompt", "type": 3, "value": "a cat"},
                       {"name": "image", "type": 11, "value": attachment["id"]}]  # fmt: skip
            await dc.slash("draw", options, user=discord_user("5", "alice"), guild_id="7", channel_id="70",
                           locale="zh-CN", attachments={attachment["id"]: attachment})  # fmt: skip
            await dc.wait_for(lambda: any(m["content"] == "in the thread" for m in dc.messages.values()))
            done = next(m for m in dc.messages.values() if m["content"] == "done")
            await dc.click(done["id"], "reroll:1", user=discord_user("6", "bob"))
            await dc.wait_for(lambda: any(m["content"] == "rerolled" for m in dc.messages.values()))
        finally:
            await bot.close()
            await task
    assert seen == {"prompt": "a cat", "image": _png(), "locale": "zh-CN"}
    assert [c["name"] for c in dc.commands["global"]] == ["draw"]
    assert len(done["attachments"]) == 1 and dc.files[done["attachments"][0]["id"]] == _png()
    assert done["components"][0]["components"][0]["custom_id"] == "reroll:1"
    thread_message = next(m for m in dc.messages.values() if m["content"] == "in the thread")
    assert thread_message["channel_id"] == done["thread"]["id"]
