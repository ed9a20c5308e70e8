"""The Discord adapter end to end: the real discord.py client against a fake Discord
(gateway, REST and CDN on 127.0.0.1, tests/fakes/discord_api.py), a real App with the
tiny engine. A user's session: /draw with options, the deferred answer, throttled
progress with previews, the result with its PNG, embed and buttons, errors, expired
tokens, rate limits, where and who may draw, autocomplete, registering the slash
commands, the token, /pnginfo, /link and /queue. Presses on the buttons are in
test_discord_buttons.py."""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bot.adapters.discord.adapter import DiscordAdapter
from bot.adapters.discord.tree import HASH_KEY, command_payloads
from bot.runner import StartError
from bot.settings import load_settings
from bot.types import Route
from models.preferences import GLOBAL, PreferenceStore
from pipeline.images import png_bytes, read_infotext
from pipeline.networks import kohya_targets
from tests.bot.discord_helpers import (
    ALICE,
    CHANNEL,
    GUILD,
    bot_process,
    button,
    buttons,
    draw,
    option,
    png_of,
    restore_discord_urls,  # noqa: F401  (autouse)
    result_of,
    running,
    server,
)
from tests.fakes.discord_api import FakeDiscord
from tests.scenario import console_env


@pytest.fixture
def previews(tiny_engine: Any) -> Any:
    tiny_engine.preview_every = 1
    yield
    tiny_engine.preview_every = 0


# the whole session ------------------------------------------------------------------------------


async def test_draw_defers_shows_progress_and_the_result_with_buttons(make_app, previews) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc) as (app, adapter):
            # every step is shown here (how many steps fit 2 s depends on the machine; the
            # throttling itself is the delivery layer's, timed in test_delivery.py)
            assert adapter.limits(Route("discord", CHANNEL)).progress_interval == 2.0
            adapter.progress_interval = 0
            interaction = await draw(
                dc, option("prompt", "a lighthouse"), option("steps", 6), option("seed", "3")
            )
            await dc.wait_for(lambda: dc.commands.get("global"))
            assert [c["name"] for c in dc.commands["global"]] == [c["name"] for c in command_payloads(app)]
            await dc.wait_for(lambda: interaction.responded)
            callback = dc.sent("POST", rf"/interactions/{interaction.id}/.*/callback")[0]
            assert interaction.response["type"] == 5  # deferred within Discord's 3 seconds
            assert callback.at - dc.requests[0].at >= 0 and dc.now() - interaction.created < 60
            result = await result_of(dc)

        # the deferred message became the job's message: queued, progress edits, the result
        assert result.get("original") and result["interaction_token"] == interaction.token
        edits = dc.sent("PATCH", rf"/webhooks/\d+/{interaction.token}/messages/.*")
        progress = [e for e in edits if "step" in (e.body.get("content") or "")]
        assert progress and all(e.files for e in progress[:-1])  # each with the preview image
        preview = Image.open(io.BytesIO(next(iter(progress[0].files.values()))))
        assert preview.size == (8, 8)  # the latents of 64 px
        # the result: the user mentioned, the PNG with its parameters, an embed, buttons
        record = (await app.store.list_open()) or None
        assert record is None
        assert result["content"].startswith(f"<@{ALICE['id']}> [")
        infotext = read_infotext(png_of(dc, result))
        assert infotext.startswith("a lighthouse\n") and "Steps: 6" in infotext and "Seed: 3" in infotext
        assert "Steps: 6" in result["embeds"][0]["description"]
        labels = [b["label"] for b in buttons(result)]
        assert {"Reroll", "V1", "Delete"} <= set(labels) and labels[-1] == "Delete"
        ids = [b["custom_id"] for b in buttons(result)]
        assert all(len(i) <= 100 for i in ids) and any(i.startswith("reroll:") for i in ids)
        assert len(result["components"]) <= 5 and all(len(r["components"]) <= 5 for r in result["components"])


async def test_a_server_not_allowed_gets_an_ephemeral_answer_and_nothing_runs(make_app) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc, discord={"allowed_guilds": ["1"]}) as (app, _):
            interaction = await draw(dc, option("prompt", "a cat"))
            await dc.wait_for(lambda: interaction.responded)
            assert await app.store.count_by_status() == {}
        assert interaction.response["type"] == 4 and interaction.response["data"]["flags"] == 64
        assert "does not answer in this server" in interaction.response["data"]["content"]


# errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "words", "locale"),
    [
        ([option("steps", 0)], "steps", "zh-CN"),
        ([option("checkpoint", "nope")], "nope", "zh-CN"),
        ([option("size", "4096x4096")], "4096", "zh-TW"),  # Discord's other Chinese
    ],
)
async def test_bad_options_get_an_ephemeral_translated_error_and_store_nothing(
    make_app, options, words, locale, tmp_path
) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc) as (app, _):
            await draw(dc, option("prompt", "a cat"), *options, locale=locale)
            error = await dc.wait_for(
                lambda: next((m for m in dc.messages.values() if m["flags"] & 64), None)
            )
            assert words in error["content"] and any("\u4e00" <= ch <= "\u9fff" for ch in error["content"])
            assert not [m for m in dc.messages.values() if m.get("original") and not m["flags"] & 64]
            assert await app.store.count_by_status() == {}
            images = app.images_dir
            assert not images.exists() or not any(p.is_file() for p in images.rglob("*.png"))


async def test_a_429_and_then_a_502_on_the_followup_are_waited_out(make_app) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc):
            dc.fail_next("POST", r"/webhooks/\d+/[^/]+", 429, retry_after=0.3)
            dc.fail_next("POST", r"/webhooks/\d+/[^/]+", 502)  # the same message's next try
            await draw(dc, option("prompt", "a cat"))
            await result_of(dc)
        posts = dc.sent("POST", r"/webhooks/\d+/[^/]+")
        assert len(posts) >= 3 and posts[1].at - posts[0].at >= 0.25
        assert posts[1].body == posts[2].body  # the refused message, sent again


async def test_a_result_after_the_token_expired_is_posted_to_the_channel_with_a_mention(make_app) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc):
            interaction = await draw(dc, option("prompt", "a cat"), option("steps", 10))
            await dc.wait_for(lambda: interaction.responded)
            dc.clock_offset = 16 * 60  # the job ends after the interaction's 15 minutes
            await dc.wait_for(
                lambda: any(m["attachments"] and "interaction_token" not in m for m in dc.messages.values()),
                timeout=120,
            )
        posted = next(m for m in dc.messages.values() if m["attachments"] and "interaction_token" not in m)
        assert posted["channel_id"] == CHANNEL and posted["content"].startswith(f"<@{ALICE['id']}>")
        assert dc.sent("POST", rf"/channels/{CHANNEL}/messages")


# where and who ------------------------------------------------------------------------------------


async def test_a_dm_in_chinese_with_an_attachment_drives_img2img(make_app) -> None:
    picture = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture, "PNG")
    async with FakeDiscord() as dc:
        async with running(make_app, dc) as (app, _):
            attachment = dc.add_attachment(picture.getvalue(), "red.png")
            await dc.slash(
                "draw",
                [option("prompt", "a red cat"), {"name": "file", "type": 11, "value": attachment["id"]}],
                user=ALICE,
                locale="zh-CN",
                attachments={attachment["id"]: attachment},
            )
            result = await result_of(dc)
        assert result["channel_id"] == f"8{ALICE['id']}"  # the DM channel
        assert "重新生成" in [b["label"] for b in buttons(result)]
        infotext = read_infotext(png_of(dc, result))
        assert "Denoising strength" in infotext


async def test_an_attachment_over_the_upload_cap_is_refused_before_it_is_fetched(make_app) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc, limits={"max_upload_bytes": 4096}) as (app, _):
            attachment = dc.add_attachment(b"\x89PNG\r\n\x1a\n" + bytes(10_000), "big.png")
            await dc.slash(
                "draw",
                [option("prompt", "a cat"), {"name": "file", "type": 11, "value": attachment["id"]}],
                user=ALICE,
                guild_id=GUILD,
                channel_id=CHANNEL,
                attachments={attachment["id"]: attachment},
            )
            error = await dc.wait_for(
                lambda: next((m for m in dc.messages.values() if m["flags"] & 64), None)
            )
            assert "big.png" in error["content"] and "4 KiB" in error["content"]
            assert dc.cdn_fetches == []
            assert await app.store.count_by_status() == {}


def lora_file(path: Path, library: Any) -> None:
    """A LoRA the tiny model takes (zero weights: it changes nothing, but is loaded and hashed)."""
    pipe = library.load("tiny")
    key = next(k for k, (m, part) in kohya_targets(pipe).items() if m.weight.shape[1] == 32 and part)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{key}.lora_down.weight": torch.zeros(2, 32), f"{key}.lora_up.weight": torch.zeros(32, 2)}
    save_file(tensors, str(path))


async def test_autocomplete_suggests_every_kind_and_a_lora_option_tags_the_prompt(
    make_app, tmp_path, tiny_library
) -> None:
    models = tmp_path / "library"
    (models / "VAE").mkdir(parents=True)
    (models / "VAE" / "vae-ft-mse.safetensors").write_bytes(b"listed, not read")
    lora_file(models / "Lora" / "freckles.safetensors", tiny_library)
    styles = {"styles": {"styles": {"watercolor": {"prompt": "watercolor, {prompt}"}}}}
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc, models_dir=models, plugins=styles):

            async def suggested(field: str, typed: str) -> list[str]:
                options = [
                    option("prompt", "a cat"),
                    {"name": field, "type": 3, "value": typed, "focused": True},
                ]
                asked = await dc.slash("draw", options, user=ALICE, guild_id=GUILD, command_type=4)
                await dc.wait_for(lambda: asked.responded)
                return [c["value"] for c in asked.response["data"]["choices"]]

            samplers = await suggested("sampler", "eul")
            assert samplers and all("eul" in s.lower() for s in samplers)
            assert await suggested("scheduler", "kar") == ["Karras"]
            assert await suggested("checkpoint", "ti") == ["tiny"]
            assert await suggested("vae", "") == ["vae-ft-mse"]
            assert await suggested("lora", "fre") == ["freckles"]
            assert await suggested("style", "water") == ["watercolor"]
            assert await suggested("preset", "") == ["nai"]
            # the suggested LoRA, typed with a weight, is drawn with and named in the infotext
            await draw(dc, option("prompt", "a cat"), option("lora", "freckles:0.5"), option("steps", 2))
            result = await result_of(dc)
        infotext = read_infotext(png_of(dc, result))
        assert infotext.startswith("a cat, <lora:freckles:0.5>\n") and 'Lora hashes: "freckles: ' in infotext


async def test_the_tree_is_registered_only_when_it_changed(make_app) -> None:
    async with FakeDiscord() as dc:
        async with running(make_app, dc) as (app, adapter):
            await dc.wait_for(lambda: dc.sent("PUT", r"/applications/\d+/commands"))
            await asyncio.sleep(0.2)  # the hash is stored after Discord answered
            assert await PreferenceStore(app.store).get(GLOBAL, HASH_KEY)
            draw_command = next(c for c in dc.commands["global"] if c["name"] == "draw")
            assert draw_command["name_localizations"] == {"zh-CN": "画图", "zh-TW": "画图"}
            assert draw_command["description_localizations"]["zh-CN"] == app.translator.t("zh-CN", "cmd.draw")
            steps = next(o for o in draw_command["options"] if o["name"] == "steps")
            assert (steps["type"], steps["min_value"], steps["max_value"]) == (4, 1, 150)
            assert next(o for o in draw_command["options"] if o["name"] == "sampler")["autocomplete"] is True
            assert await adapter.sync() is False
            assert await adapter.sync(force=True) is True
            assert await adapter.sync(guild=GUILD) is True
        assert len(dc.sent("PUT", r"/applications/\d+/commands")) == 2
        assert dc.sent("PUT", rf"/applications/\d+/guilds/{GUILD}/commands")


async def test_a_rejected_token_stops_the_start(make_app) -> None:
    async with FakeDiscord(tokens=("other",)) as dc:
        app = await make_app(start=False, discord={"api_base": dc.api_base, "gateway_url": dc.gateway_url})
        with pytest.raises(StartError, match="refused the token"):
            await DiscordAdapter(app, app.settings, "fake-token").start()


async def test_a_rejected_or_missing_token_stops_the_process_with_a_message(tmp_path) -> None:
    for folder in ("run", "sync"):
        (tmp_path / folder).mkdir()
    async with FakeDiscord(tokens=("other",)) as dc:
        run = await bot_process(tmp_path / "run", dc)
        env = console_env(tmp_path / "sync")
        env.pop("ATELIER_DISCORD_TOKEN", None)
        sync = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "discord", "sync",
            cwd=tmp_path / "sync", env=env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        (_, refused), (_, missing) = await asyncio.wait_for(
            asyncio.gather(run.communicate(), sync.communicate()), 180
        )
    assert run.returncode == 1
    assert "atelier: Discord refused the token in ATELIER_DISCORD_TOKEN" in refused.decode()
    assert sync.returncode == 2 and "set ATELIER_DISCORD_TOKEN" in missing.decode()


async def test_atelier_discord_sync_registers_in_one_guild(tmp_path) -> None:
    async with FakeDiscord() as dc:
        env = console_env(tmp_path)
        env.update(
            ATELIER_DISCORD_TOKEN="fake-token",
            ATELIER_DISCORD_API_BASE=dc.api_base,
            ATELIER_DISCORD_GATEWAY_URL=dc.gateway_url,
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "discord", "sync", "--guild", GUILD,
            cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == f"registered the slash commands in guild {GUILD}"
    assert "draw" in [c["name"] for c in dc.commands[GUILD]] and "global" not in dc.commands


def test_discord_settings_come_from_the_file_and_the_environment(tmp_path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[discord]\nallowed_guilds = [700]\nmoderator_roles = ['42']\n", encoding="utf-8")
    env = {"ATELIER_DISCORD_API_BASE": "http://proxy/api/v10", "ATELIER_DISCORD_GATEWAY_URL": "ws://proxy/gw"}
    settings = load_settings(path, env).discord
    assert (settings.allowed_guilds, settings.moderator_roles) == (("700",), ("42",))
    assert (settings.api_base, settings.gateway_url) == ("http://proxy/api/v10", "ws://proxy/gw")


async def test_pnginfo_reads_an_attached_png_and_offers_to_draw_it(make_app) -> None:
    infotext = "a red fox\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, Model: tiny"
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc):
            png = png_bytes(Image.new("RGB", (64, 64), (200, 90, 30)), infotext)
            attachment = dc.add_attachment(png, "fox.png")
            await dc.slash(
                "pnginfo",
                [{"name": "file", "type": 11, "value": attachment["id"]}],
                user=ALICE,
                guild_id=GUILD,
                channel_id=CHANNEL,
                attachments={attachment["id"]: attachment},
            )
            answer = await dc.wait_for(
                lambda: next((m for m in dc.messages.values() if "Parameters:" in m["content"]), None)
            )
            assert "a red fox" in answer["content"] and "Seed: 5" in answer["content"]
            assert "To run them: /draw" in answer["content"]
            await dc.click(answer["id"], button(answer, "Draw this"), user=ALICE)
            result = await result_of(dc)
        drawn = read_infotext(png_of(dc, result))
        assert drawn.startswith("a red fox\n") and "Seed: 5" in drawn and "Steps: 2" in drawn


async def test_a_png_over_the_servers_upload_limit_becomes_a_preview_and_a_note(make_app) -> None:
    async with FakeDiscord() as dc:
        dc.guild(GUILD, owner_id="1", upload_limit=3000)  # under a 64 px noise PNG
        dc.channel(GUILD, CHANNEL)
        async with running(make_app, dc):
            await draw(dc, option("prompt", "a cat"))
            result = await result_of(dc)
        (preview,) = result["attachments"]
        assert preview["filename"].endswith(".jpg") and len(dc.files[preview["id"]]) <= 3000
        assert "over this chat's upload limit" in result["content"] and "/show " in result["content"]


async def test_a_fault_of_the_bot_answers_with_a_reference_and_logs_the_trace(
    make_app, monkeypatch, caplog
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr("bot.adapters.discord.interactions.command_line", broken)
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc):
            await draw(dc, option("prompt", "a cat"))
            error = await dc.wait_for(
                lambda: next((m for m in dc.messages.values() if m["flags"] & 64), None)
            )
    ref = error["content"].rsplit("ref ", 1)[1].rstrip(").")
    assert len(ref) == 8 and f"(ref {ref})" in caplog.text and "a bug" in caplog.text


async def test_an_nsfw_prompt_runs_only_in_a_channel_marked_nsfw(make_app) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        dc.channel(GUILD, "700000000000000011", name="after-dark", nsfw=True)
        async with running(make_app, dc) as (app, _):
            await draw(dc, option("prompt", "a nude statue"))
            error = await dc.wait_for(
                lambda: next((m for m in dc.messages.values() if m["flags"] & 64), None)
            )
            assert "only allowed in channels marked NSFW" in error["content"]
            assert await app.store.count_by_status() == {}
            await draw(dc, option("prompt", "a nude statue"), channel_id="700000000000000011")
            result = await result_of(dc)
        assert result["channel_id"] == "700000000000000011"


async def test_link_from_telegram_and_discord_joins_the_histories(make_app) -> None:
    """One process, both adapters: a code made on Telegram, sent from Discord, makes the two
    accounts one person with one history."""
    from bot.adapters.telegram import build as build_telegram
    from tests.bot.test_telegram import TOKEN, drawn, replies_to, secrets_for, until
    from tests.fakes.telegram_api import FakeTelegram
    from tests.fakes.telegram_api import user_json as telegram_user

    async with FakeDiscord() as dc, FakeTelegram(tokens=(TOKEN,)) as tg:
        server(dc)
        async with running(make_app, dc) as (app, _):
            telegram = build_telegram(app, app.settings.model_copy(update={"secrets": secrets_for(tg)}))
            await telegram.start()
            try:
                store, frank = app.store, telegram_user(107, "Frank")
                await drawn(tg, 107, frank, "/draw a telegram cat --steps 2")
                await draw(dc, option("prompt", "a discord cat"), option("steps", 2))
                await result_of(dc)
                on_telegram = await store.ensure_user("telegram", "107", "frank")
                on_discord = await store.ensure_user("discord", ALICE["id"], ALICE["username"])
                assert await store.count_for_user(on_telegram.id) == 1
                assert await store.count_for_user(on_discord.id) == 1

                command = tg.send_text(107, frank, "/link")
                (answer,) = await until(lambda: replies_to(tg, 107, command["message_id"]))
                code = answer["text"].split("\n")[0].rsplit(" ", 1)[-1]
                linked = await dc.slash(
                    "link", [option("code", code)], user=ALICE, guild_id=GUILD, channel_id=CHANNEL
                )
                await dc.wait_for(lambda: linked.responded)
                shown = await dc.wait_for(
                    lambda: (
                        next((m for m in dc.messages.values() if "Linked:" in (m["content"] or "")), None)
                        or (linked.response.get("data") or {}).get("content")
                    )
                )
                assert "telegram:107" in str(shown) and "1 earlier generation" in str(shown)
                # one history, seen from Telegram: both cats
                assert await store.count_for_user(on_telegram.id) == 2
                assert await store.count_for_user(on_discord.id) == 0
                command = tg.send_text(107, frank, "/history")
                (history,) = await until(lambda: replies_to(tg, 107, command["message_id"]))
                assert "a telegram cat" in history["text"] and "a discord cat" in history["text"]
            finally:
                await telegram.stop()


async def test_queue_shows_places_and_a_cancel_button_for_each_job(make_app) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc) as (app, _):
            await app.queue.stop()  # nothing runs: the jobs wait
            for prompt in ("a kite", "a boat"):
                await draw(dc, option("prompt", prompt))
            for _ in range(3000):
                if (await app.store.count_by_status()).get("queued") == 2:
                    break
                await asyncio.sleep(0.01)
            await dc.slash("queue", [{"name": "show", "type": 1, "options": []}], user=ALICE, guild_id=GUILD, channel_id=CHANNEL, locale="zh-CN")  # fmt: skip
            shown = await dc.wait_for(
                lambda: next((m for m in dc.messages.values() if "队列中的 2 个任务" in m["content"]), None)
            )
            first, second = await app.store.list_open()  # the two interactions may race
            lines = shown["content"].splitlines()
            assert lines[1].startswith(f"{first.id} · 队列第 1 位 · {first.request.prompt} · 64x64 · 已等待 ")
            assert lines[2].startswith(
                f"{second.id} · 队列第 2 位 · {second.request.prompt} · 64x64 · 已等待 "
            )
            assert [b["label"] for b in buttons(shown)] == ["取消 1", "取消 2"]
            await dc.click(shown["id"], button(shown, "取消 2"), user=ALICE, locale="zh-CN")
            for _ in range(3000):
                if (await app.store.get(second.id)).status == "cancelled":
                    break
                await asyncio.sleep(0.01)
            assert (await app.store.get(second.id)).status == "cancelled"
            assert (await app.store.get(first.id)).status == "queued"
