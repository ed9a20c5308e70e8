"""Autocomplete sources (bot/autocomplete.py) through a real App: styles and presets read
from the store on SQLite and PostgreSQL, the model lists, and the plugin hook."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.app import build_app
from bot.autocomplete import complete
from bot.hookspecs import hookimpl
from bot.plugins import PluginError
from bot.types import Actor, AutocompleteSource, Choice
from tests.conftest import make_settings

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c", guild_id="g")
BOB = Actor(platform="console", user_id="bob", name="Bob", locale="zh-CN", chat_id="c", guild_id="g")
MOD = Actor(platform="console", user_id="mod", name="Mod", chat_id="c", guild_id="g")
CAROL = Actor(platform="console", user_id="carol", name="Carol", chat_id="other", guild_id="g2")
CONFIG = {
    "moderation": {"moderators": ["console:mod"]},
    "styles": {"styles": {"watercolor": {"prompt": "watercolor, {prompt}"}}},
}


async def ok(app, line: str, actor: Actor) -> None:
    (reply,) = await app.service.handle_line(line, actor)
    assert not reply.error, reply


async def test_style_choices_are_the_users_own_the_chats_the_servers_and_the_global_ones(
    make_app,
) -> None:
    app = await make_app(plugins=CONFIG)
    await ok(app, "/style save anime anime style, {prompt}", ALICE)
    await ok(app, "/style save noir film noir --chat", MOD)
    await ok(app, "/style save neon neon lights --guild", MOD)
    await ok(app, "/style save carols her own style", CAROL)  # another user, another chat
    await ok(app, "/style save Noir my own noir", BOB)  # Bob's own shadows the chat's for him

    choices = await complete(app, "styles", ALICE, "")
    assert choices == [
        Choice("anime · personal", "anime"),
        Choice("noir · this chat", "noir"),
        Choice("neon · this server", "neon"),
        Choice("watercolor · global", "watercolor"),
    ]
    # in the user's language; the one that applies wins a name found in several scopes
    assert [c.name for c in await complete(app, "styles", BOB, "")] == [
        "Noir · 个人",
        "neon · 本服务器",
        "watercolor · 全局",
    ]
    assert await complete(app, "styles", CAROL, "") == [
        Choice("carols · personal", "carols"),
        Choice("watercolor · global", "watercolor"),
    ]
    # prefix matches first, then matches anywhere; a list completes its last name
    assert [c.value for c in await complete(app, "styles", ALICE, "n")] == ["noir", "neon", "anime"]
    assert [c.value for c in await complete(app, "styles", ALICE, "anime, NE")] == ["anime, neon"]


async def test_style_choices_show_what_another_process_stored(make_app) -> None:
    first = await make_app(plugins=CONFIG)
    second = await make_app(plugins=CONFIG)  # the same database
    assert [c.value for c in await complete(first, "styles", ALICE, "")] == ["watercolor"]
    await ok(second, "/style save portrait portrait photo, {prompt}", ALICE)
    assert [c.value for c in await complete(first, "styles", ALICE, "")] == ["portrait", "watercolor"]


async def test_preset_choices(make_app) -> None:
    app = await make_app(plugins=CONFIG)
    await ok(app, "/preset save hands bad hands", ALICE)
    assert await complete(app, "presets", ALICE, "") == [
        Choice("hands · personal", "hands"),
        Choice("nai · global", "nai"),
    ]
    assert await complete(app, "presets", BOB, "H") == []  # Alice's are hers


async def test_sampler_schedule_checkpoint_and_command_choices(make_app) -> None:
    app = await make_app()
    samplers = await complete(app, "samplers", ALICE, "dpm++ 2m")
    assert [c.value for c in samplers][:2] == ["DPM++ 2M", "DPM++ 2M SDE"]
    assert len(await complete(app, "samplers", ALICE, "")) == 20
    assert [c.value for c in await complete(app, "schedules", ALICE, "kar")] == ["Karras"]
    assert await complete(app, "checkpoints", ALICE, "") == [Choice("tiny", "tiny")]
    assert [c.value for c in await complete(app, "commands", ALICE, "style s")] == [
        "style save",
        "style show",
    ]
    with pytest.raises(KeyError):
        await complete(app, "nonsense", ALICE, "")


async def test_vae_and_lora_choices_list_the_models_folder(make_app, tmp_path: Path) -> None:
    models = tmp_path / "library"
    (models / "VAE").mkdir(parents=True)
    (models / "Lora" / "people").mkdir(parents=True)
    (models / "VAE" / "vae-ft-mse.safetensors").write_bytes(b"listed, not read")
    (models / "VAE" / "kl-f8-anime.vae.pt").write_bytes(b"listed, not read")
    (models / "Lora" / "people" / "freckles.safetensors").write_bytes(b"listed, not read")
    app = await make_app(models_dir=models)
    assert [c.value for c in await complete(app, "vaes", ALICE, "")] == ["kl-f8-anime.vae", "vae-ft-mse"]
    assert [c.value for c in await complete(app, "loras", ALICE, "fre")] == ["freckles"]


async def test_hook_register_autocomplete(make_app) -> None:
    class Moods:
        @hookimpl
        def register_autocomplete(self, register):
            async def moods(ctx):
                return [Choice(f"{m} ({ctx.actor.name})", m) for m in ("calm", "wild") if ctx.partial in m]

            register(AutocompleteSource("moods", moods))

    app = await make_app(extra_plugins=(Moods(),))
    assert app.autocomplete.owners["moods"] == app.pm.get_name(next(iter(_plugins(app, Moods))))
    assert await complete(app, "moods", ALICE, "w") == [Choice("wild (Alice)", "wild")]


def test_hook_register_autocomplete_a_name_taken_fails_naming_both(tmp_path: Path) -> None:
    class Samplers:
        @hookimpl
        def register_autocomplete(self, register):
            async def none(ctx):
                return []

            register(AutocompleteSource("samplers", none))

    with pytest.raises(
        PluginError, match="'samplers' is registered twice: by plugin 'core' and by 'Samplers'"
    ):
        build_app(make_settings(tmp_path), plugins=(Samplers(),), engines=[object()], library=object())


async def test_a_failing_source_answers_nothing(make_app, caplog) -> None:
    class Broken:
        @hookimpl
        def register_autocomplete(self, register):
            async def broken(ctx):
                raise RuntimeError("down")

            register(AutocompleteSource("broken", broken))

    app = await make_app(extra_plugins=(Broken(),))
    assert await complete(app, "broken", ALICE, "x") == []
    assert "autocomplete source 'broken' failed" in caplog.text


def _plugins(app, cls):
    return [plugin for plugin in app.pm.get_plugins() if isinstance(plugin, cls)]
