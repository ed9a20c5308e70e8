"""Negative presets through the service, on SQLite and PostgreSQL: the built-in NAI list,
--preset, personal/chat/guild presets, defaults and their order, bad input."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from bot.hookspecs import hookimpl
from bot.settings import ConfigError
from bot.types import Actor
from models.moderation_store import ModerationStore
from models.preferences import PreferenceStore
from models.style_store import StyleStore
from tests.conftest import EventLog
from tests.scenario import ConsoleSession, jobs_of

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c", guild_id="g")
BOB = Actor(platform="console", user_id="bob", name="Bob", locale="zh-CN", chat_id="c", guild_id="g")
MOD = Actor(platform="console", user_id="mod", name="Mod", chat_id="c", guild_id="g")
MODERATION = {"moderators": ["console:mod"]}
NAI = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry"
)


async def run(app, line: str, actor: Actor = ALICE):
    return await app.service.handle_line(line, actor)


async def ok(app, line: str, actor: Actor = ALICE):
    (reply,) = await run(app, line, actor)
    assert not reply.error, (line, app.translator.t("en", reply.key, **reply.params))
    return reply


async def refused(app, line: str, key: str, actor: Actor = ALICE):
    (reply,) = await run(app, line, actor)
    assert reply.error and reply.key == key, (line, reply)
    return reply


def text(app, reply, locale: str = "en") -> str:
    return app.translator.t(locale, reply.key, **reply.params)


async def draw(app, line: str, actor: Actor = ALICE):
    (job_id,) = (await ok(app, line, actor)).data["jobs"]
    return (await app.store.get(job_id)).request


async def presets(app) -> list[tuple[str, str, str, str]]:
    return [(p.scope, p.scope_id, p.name, p.negative_prompt) for p in await StyleStore(app.store).presets()]


async def test_the_nai_list_is_built_in_and_follows_the_users_negative(make_app) -> None:
    app = await make_app()
    events = EventLog(app)
    shown = await ok(app, "/preset show NAI")
    assert shown.data == {"name": "nai", "scope": "global", "negative_prompt": NAI}
    assert app.presets.owners["nai"] == "negative_presets"
    reply = await ok(app, "/draw a cat --negative ugly --preset nai --steps 2")
    (job_id,) = reply.data["jobs"]
    await events.wait_for(lambda: events.of("finished", job_id))
    record = await app.store.get(job_id)
    assert record.request.negative_prompt == f"ugly, {NAI}"
    assert record.request.negative_presets == ("nai",)
    infotext = record.images[0].infotext
    assert infotext.startswith(f"a cat\nNegative prompt: ugly, {NAI}\nSteps: 2,")
    assert "nai" not in infotext.rsplit("\n", 1)[1]  # the preset's name is no infotext field
    # a style's negative text comes first, then the presets in the order given
    await app.queue.stop()
    await ok(app, '/style save photo "{prompt}, photo" --negative 3d')
    await ok(app, "/preset save hands bad hands, extra fingers")
    request = await draw(app, "/draw a cat --negative ugly --style photo --presets hands,nai")
    assert request.negative_prompt == f"ugly, 3d, bad hands, extra fingers, {NAI}"
    assert (request.negative_presets, request.styles) == (("hands", "nai"), ("photo",))


async def test_personal_presets_save_list_show_replace_delete(make_app) -> None:
    app = await make_app()
    saved = await ok(app, '/preset save clean "text, signature, watermark"')
    assert (
        text(app, saved) == 'Saved negative preset "clean" (personal). Use it with /draw ... --preset clean'
    )
    assert (await ok(app, "/preset save CLEAN text, watermark")).key == "preset.replaced"
    listing = await ok(app, "/preset list")
    assert listing.data == {
        "presets": {"user": ["CLEAN"], "chat": [], "guild": [], "global": ["nai"]},
        "default": [],
    }
    assert "personal: CLEAN" in text(app, listing) and "Default: none" in text(app, listing)
    assert "默认：无" in text(app, listing, "zh-CN")
    assert (
        text(app, await ok(app, "/preset show clean"))
        == 'Negative preset "CLEAN" (personal): text, watermark'
    )
    assert await presets(app) == [("user", "console:alice", "CLEAN", "text, watermark")]
    await refused(app, "/preset show clean", "preset.unknown", BOB)
    assert (await ok(app, "/preset delete clean")).key == "preset.deleted"
    reply = await refused(app, "/preset delete clean", "preset.not_found")
    assert text(app, reply) == 'There is no negative preset "clean" (personal). Presets there: -'
    assert await presets(app) == []


async def test_chat_and_guild_presets_are_for_moderators(make_app) -> None:
    app = await make_app(plugins={"moderation": MODERATION})
    for line in ("/preset save team x --chat", "/preset delete team --guild", "/preset default nai --chat"):
        reply = await refused(app, line, "error.moderators_only", BOB)
        assert text(app, reply, "zh-CN") == "/preset 仅限管理员使用。此次尝试已记入审计日志。"
    assert await presets(app) == []
    assert await PreferenceStore(app.store).get(("chat", "console:c"), "preset.default") is None
    await ok(app, "/preset save team no text --chat", MOD)
    await ok(app, "/preset save house monochrome --guild", MOD)
    assert await presets(app) == [
        ("chat", "console:c", "team", "no text"),
        ("guild", "console:g", "house", "monochrome"),
    ]
    await app.queue.stop()
    request = await draw(app, "/draw a cat --preset team,house", BOB)
    assert (request.negative_prompt, request.negative_presets) == ("no text, monochrome", ("team", "house"))
    log = await ModerationStore(app.store).audit_log(["console:guild:g"], limit=10)
    assert [(e.action, e.allowed) for e in log][:2] == [("preset.save", True), ("preset.save", True)]


async def test_defaults_user_beats_chat_beats_guild_beats_config(make_app) -> None:
    tables = {"moderation": MODERATION, "negative_presets": {"default": "nai"}}
    app = await make_app(plugins=tables)
    await app.queue.stop()
    await ok(app, "/preset save g guild words --guild", MOD)
    await ok(app, "/preset save c chat words --chat", MOD)
    await ok(app, "/preset save u user words")
    await ok(app, "/preset default g --guild", MOD)
    await ok(app, "/preset default c --chat", MOD)
    chosen = await ok(app, "/preset default u")
    assert text(app, chosen) == (
        "The default negative preset (personal) is now u; --preset none skips it for one request."
    )
    seen = []
    for change, actor in (
        ("/preset default reset", ALICE),
        ("/preset default reset --chat", MOD),
        ("/preset default reset --guild", MOD),
        (None, None),
    ):
        request = await draw(app, "/draw a cat --negative ugly")
        seen.append((request.negative_prompt, request.negative_presets))
        if change:
            await ok(app, change, actor)
    assert seen == [
        ("ugly, user words", ("u",)),
        ("ugly, chat words", ("c",)),
        ("ugly, guild words", ("g",)),
        (f"ugly, {NAI}", ("nai",)),
    ]
    # --preset none: no default for this request; a preset named explicitly replaces the default
    request = await draw(app, "/draw a cat --negative ugly --preset NONE")
    assert (request.negative_prompt, request.negative_presets) == ("ugly", ())
    request = await draw(app, "/draw a cat --preset u")
    assert (request.negative_prompt, request.negative_presets) == ("user words", ("u",))
    # /preset default none: no preset for this user even where the chat or config has a default
    await ok(app, "/preset default c --chat", MOD)
    assert (await ok(app, "/preset default none")).key == "preset.default_off"
    assert (await draw(app, "/draw a cat")).negative_presets == ()
    assert (await draw(app, "/draw a cat", BOB)).negative_presets == ("c",)
    shown = await ok(app, "/preset default", BOB)
    assert text(app, shown) == (
        "Default negative preset: c (this chat). Change it with /preset default NAME, none or reset."
    )
    stored = PreferenceStore(app.store)
    assert await stored.get(("user", "console:alice"), "preset.default") == []
    assert await stored.get(("chat", "console:c"), "preset.default") == ["c"]
    assert await stored.get(("guild", "console:g"), "preset.default") is None


async def test_a_chats_default_names_only_presets_everyone_there_has(make_app) -> None:
    app = await make_app(plugins={"moderation": MODERATION})
    await ok(app, "/preset save mine private words", MOD)
    await refused(app, "/preset default mine --chat", "preset.unknown", MOD)
    await ok(app, "/preset default mine", MOD)  # a personal default may name a personal preset
    # deleting a preset removes it from the default of its scope
    await ok(app, "/preset delete mine", MOD)
    assert await PreferenceStore(app.store).get(("user", "console:mod"), "preset.default") == []


async def test_a_reroll_keeps_the_presets_once(make_app) -> None:
    app = await make_app()
    await app.queue.stop()
    await ok(app, "/preset default nai")
    (job_id,) = (await ok(app, "/draw a cat --negative ugly")).data["jobs"]
    (child_id,) = (await ok(app, f"/reroll {job_id}")).data["jobs"]
    parent, child = (await app.store.get(job_id)).request, (await app.store.get(child_id)).request
    assert parent.negative_prompt == child.negative_prompt == f"ugly, {NAI}"
    assert parent.negative_presets == child.negative_presets == ("nai",)


BAD_INPUT = [
    ("/draw a cat --preset nope", "preset.unknown"),
    ("/draw a cat --preset none,nai", "preset.none_mixed"),
    ("/preset default nope", "preset.unknown"),
    ("/preset default none,nai", "preset.none_mixed"),
    ("/preset save none x", "saved.reserved_name"),
    ("/preset save RESET x", "saved.reserved_name"),
    ("/preset save a,b x", "saved.bad_name"),
    ("/preset save empty", "error.missing_argument"),  # the text
    ("/preset save", "error.missing_argument"),
    ("/preset show", "error.missing_argument"),
    ("/preset show nope", "preset.unknown"),
    ("/preset drop x", "error.unknown_subcommand"),
    ("/preset save x y --guild", "saved.no_guild"),
]


async def test_bad_input_is_refused_and_nothing_is_stored(make_app) -> None:
    app = await make_app()
    no_guild = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
    for line, key in BAD_INPUT:
        reply = await refused(app, line, key, no_guild)
        for locale in ("en", "zh-CN"):
            assert not text(app, reply, locale).startswith(key)
    reply = await refused(app, "/draw a cat --preset nope", "preset.unknown")
    assert text(app, reply) == 'Unknown negative preset "nope". Available: nai (or none for no preset).'
    assert text(app, reply, "zh-CN") == "未知反向提示词预设“nope”。可用：nai（或用 none 表示不用预设）。"
    assert await presets(app) == []
    assert await app.store.count_by_status() == {}
    assert await PreferenceStore(app.store).get(("user", "console:alice"), "preset.default") is None


async def test_presets_from_config_and_the_hook(make_app) -> None:
    class Shop:
        @hookimpl
        def register_negative_presets(self, register):
            register("hands", "bad hands")

    config = {"presets": {"clean": "text, watermark"}, "max_per_scope": 1}
    app = await make_app(extra_plugins=(Shop(),), plugins={"negative_presets": config})
    assert (await ok(app, "/preset list")).data["presets"]["global"] == ["hands", "nai", "clean"]
    assert app.presets.owners["clean"] == "config"
    await app.queue.stop()
    request = await draw(app, "/draw a cat --preset clean,hands")
    assert request.negative_prompt == "text, watermark, bad hands"
    await ok(app, "/preset save one x")
    reply = await refused(app, "/preset save two y", "preset.too_many")
    assert text(app, reply) == (
        "There are 1 negative presets (personal) and at most 1 are allowed; delete some first."
    )


BAD_CONFIG = [
    ({"presets": {"a,b": "x"}}, "[plugins.negative_presets] presets: 'a,b' cannot be a preset name"),
    ({"presets": {"none": "x"}}, "[plugins.negative_presets] presets: 'none' cannot be a preset name"),
    ({"default": "nope"}, "[plugins.negative_presets] default: no global preset 'nope'"),
    ({"presetz": {}}, "[plugins.negative_presets] presetz: unknown key"),
]


async def test_bad_preset_config_fails_at_startup_naming_the_key(make_app) -> None:
    for config, message in BAD_CONFIG:
        app = await make_app(start=False, plugins={"negative_presets": config})
        with pytest.raises(ConfigError) as info:
            await app.start()
        assert message in str(info.value)


def test_config_toml_lists_every_negative_presets_setting_with_its_default() -> None:
    import tomllib

    from bot.settings import parse_settings
    from plugins.negative_presets import PresetsConfig

    root = Path(__file__).resolve().parents[2]
    settings = parse_settings(tomllib.loads((root / "config.toml").read_text(encoding="utf-8")))
    assert set(settings.plugins.table("negative_presets")) == set(PresetsConfig.model_fields)
    assert settings.plugin_config("negative_presets", PresetsConfig) == PresetsConfig()


@pytest.mark.slow
def test_console_presets_defaults_and_recorded_names(tmp_path: Path) -> None:
    with ConsoleSession(tmp_path, user="alice") as alice:
        (saved,) = alice.command('/preset save clean "text, watermark"')
        assert (
            saved["text"] == 'Saved negative preset "clean" (personal). Use it with /draw ... --preset clean'
        )
        (default,) = alice.command("/preset default nai")
        assert default["default"] == ["nai"]
        (by_default,) = jobs_of(alice.command("/draw a cat --negative ugly --steps 2"))
        (named,) = jobs_of(alice.command("/draw a dog --preset clean,nai --steps 2"))
        (without,) = jobs_of(alice.command("/draw a fox --negative ugly --preset none --steps 2"))
        infotext = alice.finished(by_default)["images"][0]["infotext"]
        assert infotext.startswith(f"a cat\nNegative prompt: ugly, {NAI}\nSteps: 2,")
        alice.finished(named)
        alice.finished(without)
        (listing,) = alice.command("/preset list")
        assert listing["text"].endswith(
            "personal: clean\nthis chat: -\nthis server: -\nglobal: nai\nDefault: nai (personal)"
        )
        (unknown,) = alice.command("/draw a cat --preset nope")
        assert unknown["event"] == "error"
        assert (
            unknown["text"]
            == 'Unknown negative preset "nope". Available: clean, nai (or none for no preset).'
        )
    with ConsoleSession(tmp_path, user="bob", locale="zh-CN") as bob:
        (unknown,) = bob.command("/draw a cat --preset clean")
        assert unknown["text"] == "未知反向提示词预设“clean”。可用：nai（或用 none 表示不用预设）。"
    with sqlite3.connect(tmp_path / "data" / "atelier.db") as db:
        presets = db.execute("SELECT scope, scope_id, name, negative_prompt FROM negative_presets").fetchall()
        preferences = db.execute("SELECT scope, scope_id, key, value FROM preferences").fetchall()
        rows = db.execute(
            "SELECT prompt, negative_prompt, params FROM generations ORDER BY created_at"
        ).fetchall()
    assert presets == [("user", "console:alice", "clean", "text, watermark")]
    assert [(*row[:3], json.loads(row[3])) for row in preferences] == [
        ("user", "console:alice", "preset.default", ["nai"])
    ]
    assert [
        (prompt, negative, json.loads(params)["negative_presets"]) for prompt, negative, params in rows
    ] == [
        ("a cat", f"ugly, {NAI}", ["nai"]),
        ("a dog", f"text, watermark, {NAI}", ["clean", "nai"]),
        ("a fox", "ugly", []),
    ]
