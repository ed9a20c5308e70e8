"""Saved styles through the service, on SQLite and PostgreSQL: scopes and moderators,
resolution order, A1111 styling on /draw, styles.csv import/export, bad input."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from bot.settings import ConfigError
from bot.types import Actor, Attachment
from models.moderation_store import ModerationStore
from models.style_store import StyleStore
from tests.conftest import EventLog
from tests.scenario import ConsoleSession, jobs_of

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c", guild_id="g")
BOB = Actor(platform="console", user_id="bob", name="Bob", locale="zh-CN", chat_id="c", guild_id="g")
MOD = Actor(platform="console", user_id="mod", name="Mod", chat_id="c", guild_id="g")
ELSEWHERE = Actor(platform="console", user_id="carol", name="Carol", chat_id="other", guild_id="g2")
MODERATION = {"moderation": {"moderators": ["console:mod"]}}

# quotes, commas, a multi-line prompt, a leading space, a placeholder and non-ASCII text
TRICKY_CSV = (
    "name,prompt,negative_prompt\r\n"
    'quoted,"a ""quoted"" word, {prompt}","lowres, ""bad"""\r\n'
    'multi,"line one\nline two, {prompt}",\r\n'
    'spaced," leading space"," x"\r\n'
    "水彩,水彩画，{prompt},照片\r\n"
)


async def run(app, line: str, actor: Actor = ALICE, attachments: tuple[Attachment, ...] = ()):
    return await app.service.handle_line(line, actor, attachments=attachments)


async def ok(app, line: str, actor: Actor = ALICE, attachments: tuple[Attachment, ...] = ()):
    (reply,) = await run(app, line, actor, attachments)
    assert not reply.error, (line, app.translator.t("en", reply.key, **reply.params))
    return reply


async def refused(app, line: str, key: str, actor: Actor = ALICE, attachments: tuple[Attachment, ...] = ()):
    (reply,) = await run(app, line, actor, attachments)
    assert reply.error and reply.key == key, (line, reply)
    return reply


def text(app, reply, locale: str = "en") -> str:
    return app.translator.t(locale, reply.key, **reply.params)


async def stored(app) -> list[tuple[str, str, str, str, str]]:
    return [
        (s.scope, s.scope_id, s.name, s.prompt, s.negative_prompt)
        for s in await StyleStore(app.store).styles()
    ]


async def draw(app, line: str, actor: Actor = ALICE):
    reply = await ok(app, line, actor)
    (job_id,) = reply.data["jobs"]
    return (await app.store.get(job_id)).request


async def test_personal_styles_save_list_show_replace_delete(make_app) -> None:
    app = await make_app()
    saved = await ok(app, '/style save anime "anime art, {prompt}" --negative "photo, 3d"')
    assert saved.key == "style.saved" and text(app, saved) == (
        'Saved style "anime" (personal). Use it with /draw ... --style anime'
    )
    await ok(app, '/style save "soft light" soft light --neg harsh')
    listing = await ok(app, "/style list")
    assert listing.data["styles"] == {"user": ["anime", "soft light"], "chat": [], "guild": [], "global": []}
    assert "personal: anime, soft light" in text(app, listing)
    shown = await ok(app, "/style show ANIME")
    assert (
        text(app, shown)
        == 'Style "anime" (personal)\nPrompt: anime art, {prompt}\nNegative prompt: photo, 3d'
    )
    # names are unique without regard to case: saving "Anime" replaces the texts in place
    replaced = await ok(app, '/style save Anime "{prompt}, anime"')
    assert replaced.key == "style.replaced"
    assert await stored(app) == [
        ("user", "console:alice", "Anime", "{prompt}, anime", ""),
        ("user", "console:alice", "soft light", "soft light", "harsh"),
    ]
    assert (await ok(app, "/style")).key == "style.list"  # no subcommand: the list
    assert (await ok(app, "/style delete anime")).key == "style.deleted"
    missing = await refused(app, "/style delete anime", "style.not_found")
    assert text(app, missing) == 'There is no style "anime" (personal). Styles there: soft light'
    # another user has styles of their own
    assert (await ok(app, "/style list", BOB)).data["styles"]["user"] == []
    await refused(app, "/style show soft light", "style.unknown", BOB)
    assert [row[2] for row in await stored(app)] == ["soft light"]


async def test_chat_and_guild_styles_are_managed_by_moderators(make_app) -> None:
    app = await make_app(plugins=MODERATION)
    for line in (
        '/style save team "team, {prompt}" --chat',
        "/style delete team --guild",
        "/style import --chat",
    ):
        reply = await refused(app, line, "error.moderators_only", BOB)
        assert text(app, reply, "zh-CN") == "/style 仅限管理员使用。此次尝试已记入审计日志。"
    assert await stored(app) == []
    log = await ModerationStore(app.store).audit_log(["console:guild:g"], limit=10)
    assert [(e.actor_key, e.action, e.allowed) for e in log][-1] == ("console:bob", "style.save", False)

    await ok(app, '/style save team "team, {prompt}" --chat', MOD)
    await ok(app, "/style save house house style --guild", MOD)
    await refused(app, "/style save x y --chat --guild", "saved.one_scope", MOD)
    no_guild = Actor(platform="console", user_id="mod", name="Mod", chat_id="c")
    await refused(app, "/style save x y --guild", "saved.no_guild", no_guild)
    assert await stored(app) == [
        ("chat", "console:c", "team", "team, {prompt}", ""),
        ("guild", "console:g", "house", "house style", ""),
    ]
    # everyone in the chat and guild uses them; another chat and guild does not see them
    assert (await ok(app, "/style list", BOB)).data["styles"] == {
        "user": [],
        "chat": ["team"],
        "guild": ["house"],
        "global": [],
    }
    await app.queue.stop()
    request = await draw(app, "/draw a cat --style team,house", BOB)
    assert request.prompt == "team, a cat, house style" and request.styles == ("team", "house")
    await refused(app, "/draw a cat --style team", "style.unknown", ELSEWHERE)
    actions = [e.action for e in await ModerationStore(app.store).audit_log(["console:guild:g"], limit=10)]
    assert actions[:2] == ["style.save", "style.save"]
    await ok(app, "/style delete TEAM --chat", MOD)
    assert [row[2] for row in await stored(app)] == ["house"]


async def test_resolution_order_personal_chat_guild_global(make_app) -> None:
    tables = {"plugins": {**MODERATION, "styles": {"styles": {"look": {"prompt": "global look"}}}}}
    app = await make_app(**tables)
    await app.queue.stop()
    await ok(app, "/style save look guild look --guild", MOD)
    await ok(app, "/style save look chat look --chat", MOD)
    await ok(app, "/style save look personal look")
    prompts = []
    for remove in ("/style delete look", "/style delete look --chat", "/style delete look --guild", None):
        request = await draw(app, "/draw a cat --style LOOK")
        prompts.append(request.prompt)
        assert request.styles == ("look",)
        if remove:
            await ok(app, remove, MOD if "--" in remove else ALICE)
    assert prompts == ["a cat, personal look", "a cat, chat look", "a cat, guild look", "a cat, global look"]
    assert (await ok(app, "/style show look")).data["style"]["scope"] == "global"


async def test_several_styles_apply_in_order_and_the_final_prompts_are_stored(make_app) -> None:
    app = await make_app()
    events = EventLog(app)
    await ok(app, '/style save first "masterpiece, {prompt}" --negative lowres')
    await ok(app, '/style save second "{prompt}, sharp focus" --negative "{prompt}, blurry"')
    reply = await ok(app, "/draw a cat --negative ugly --style first, second --steps 2")
    (job_id,) = reply.data["jobs"]
    await events.wait_for(lambda: events.of("finished", job_id))
    record = await app.store.get(job_id)
    assert record.request.prompt == "masterpiece, a cat, sharp focus"
    assert record.request.negative_prompt == "ugly, lowres, blurry"
    assert record.request.styles == ("first", "second")
    infotext = record.images[0].infotext
    assert infotext.startswith(
        "masterpiece, a cat, sharp focus\nNegative prompt: ugly, lowres, blurry\nSteps: 2,"
    )
    assert "first" not in infotext.split("\n", 2)[2]  # style names are not an infotext field
    # the other order gives another prompt: each style applies to the previous result
    await app.queue.stop()
    request = await draw(app, "/draw a cat --style second,first")
    assert request.prompt == "masterpiece, a cat, sharp focus"
    assert request.negative_prompt == ", blurry, lowres"  # A1111: a placeholder wraps even an empty prompt
    request = await draw(app, '/draw a cat --style first --hr-prompt "a big cat"')
    assert request.hr_prompt == "masterpiece, a big cat"


async def test_unknown_styles_are_refused_with_the_names_available(make_app) -> None:
    tables = {"plugins": {"styles": {"styles": {"cinema": {"prompt": "film grain"}}}}}
    app = await make_app(**tables)
    await ok(app, "/style save mine my look")
    reply = await refused(app, "/draw a cat --style mine,nope", "style.unknown")
    assert text(app, reply) == 'Unknown style "nope". Available: mine, cinema'
    assert text(app, reply, "zh-CN") == "未知风格“nope”。可用：mine, cinema"
    await refused(app, "/style show nope", "style.unknown")
    assert await app.store.count_by_status() == {}


BAD_INPUT = [
    ("/style save a,b x", "saved.bad_name"),
    ('/style save "#note" x', "saved.bad_name"),
    ("/style save -dash x", "error.single_dash"),  # read as a mistyped option, and said so
    ('/style save "a\u201dq" x', "saved.bad_name"),
    (f"/style save {'n' * 65} x", "saved.bad_name"),
    ("/style save empty", "style.empty"),
    ('/style save empty "  " --negative " "', "style.empty"),
    ("/style save", "error.missing_argument"),
    ("/style show", "error.missing_argument"),
    ("/style save x y --steps 3", "error.unknown_option"),
    ("/style remove x", "error.unknown_subcommand"),
    ("/style save x --from 01NOSUCHID", "error.not_found"),
]


async def test_bad_input_is_refused_and_nothing_is_stored(make_app) -> None:
    app = await make_app()
    for line, key in BAD_INPUT:
        reply = await refused(app, line, key)
        for locale in ("en", "zh-CN"):
            assert not text(app, reply, locale).startswith(key)  # a real message in both catalogs
    assert await stored(app) == []


async def test_bad_name_message_names_the_rules(make_app) -> None:
    app = await make_app(plugins={"styles": {"max_name_length": 8}})
    reply = await refused(app, "/style save ninechars x", "saved.bad_name")
    assert "1-8 characters" in text(app, reply) and "1 到 8 个字符" in text(app, reply, "zh-CN")
    long_prompt = "x" * 2001
    reply = await refused(app, f"/style save ok {long_prompt}", "saved.too_long")
    assert text(app, reply) == '"ok": the prompt is 2001 characters long; at most 2000 are allowed.'


async def test_save_a_results_prompts_with_from(make_app) -> None:
    app = await make_app()
    await app.queue.stop()
    reply = await ok(app, '/draw a red fox, snow --negative "blurry, dark"')
    (job_id,) = reply.data["jobs"]
    await refused(app, f"/style save fox more --from {job_id}", "style.from_alone")
    saved = await ok(app, f"/style save fox --from {job_id}", BOB)  # a public result: anyone may
    assert saved.data["style"]["prompt"] == "a red fox, snow"
    assert await stored(app) == [("user", "console:bob", "fox", "a red fox, snow", "blurry, dark")]
    request = await draw(app, "/draw at night --style fox", BOB)
    assert (request.prompt, request.negative_prompt) == ("at night, a red fox, snow", "blurry, dark")


async def test_styles_csv_round_trip_is_byte_identical(make_app) -> None:
    app = await make_app()
    first = await ok(app, "/style import", attachments=(Attachment("styles.csv", TRICKY_CSV.encode()),))
    assert first.data == {"added": 4, "replaced": 0}
    assert text(app, first) == "Imported 4 style(s) from styles.csv (personal): 4 new, 0 replaced."
    assert await stored(app) == [
        ("user", "console:alice", "quoted", 'a "quoted" word, {prompt}', 'lowres, "bad"'),
        ("user", "console:alice", "multi", "line one\nline two, {prompt}", ""),
        ("user", "console:alice", "spaced", " leading space", " x"),
        ("user", "console:alice", "水彩", "水彩画，{prompt}", "照片"),
    ]
    exported = await ok(app, "/style export")
    (file,) = exported.files
    assert (file.name, file.kind) == ("styles.csv", "document")
    data = file.data
    assert data.startswith(b"\xef\xbb\xbfname,prompt,negative_prompt\r\n")  # UTF-8 with BOM, as A1111 writes
    # import into someone else's styles and export again: the same bytes
    second = await ok(app, "/style import", BOB, attachments=(Attachment("styles.csv", data),))
    assert second.data == {"added": 4, "replaced": 0}
    assert (await ok(app, "/style export", BOB)).files[0].data == data
    # importing the same file again replaces every style and keeps their order
    third = await ok(app, "/style import", attachments=(Attachment("styles.csv", data),))
    assert third.data == {"added": 0, "replaced": 4}
    assert (await ok(app, "/style export")).files[0].data == data
    # a style imported from the file applies like any other
    await app.queue.stop()
    request = await draw(app, "/draw a cat --style quoted,multi", BOB)
    assert request.prompt == 'line one\nline two, a "quoted" word, a cat'


async def test_bad_imports_are_refused_whole(make_app) -> None:
    app = await make_app(plugins={"styles": {"max_import_bytes": 200}})
    png = Attachment("cat.png", b"\x89PNG\r\n\x1a\n" + bytes(64))
    reply = await refused(app, "/style import", "style.import_not_csv", attachments=(png,))
    assert text(app, reply).startswith("cat.png is not an A1111 styles.csv")
    assert text(app, reply, "zh-CN").startswith("cat.png 不是 A1111 的 styles.csv")
    no_header = Attachment("notes.csv", b"just some words\nand more\n")
    await refused(app, "/style import", "style.import_not_csv", attachments=(no_header,))
    header_only = Attachment("styles.csv", b"name,prompt,negative_prompt\r\n")
    await refused(app, "/style import", "style.import_empty", attachments=(header_only,))
    big = Attachment("styles.csv", b"name,prompt\r\n" + b"a,b\r\n" * 60)
    reply = await refused(app, "/style import", "style.import_too_large", attachments=(big,))
    assert "at most 200 bytes" in text(app, reply)
    await refused(app, "/style import", "style.import_no_file")
    # one bad name anywhere in the file: nothing of it is stored
    bad = Attachment("styles.csv", b'name,prompt\r\ngood,fine\r\n"a, b",x\r\n')
    reply = await refused(app, "/style import", "saved.bad_name", attachments=(bad,))
    assert text(app, reply).startswith('"a, b" cannot be a name')
    assert await stored(app) == []
    empty = await ok(app, "/style export")
    assert empty.key == "style.export_empty" and not empty.files


async def test_a_scope_holds_at_most_max_per_scope_styles(make_app) -> None:
    app = await make_app(plugins={"styles": {"max_per_scope": 2}})
    await ok(app, "/style save a x")
    await ok(app, "/style save b y")
    await ok(app, "/style save B z")  # replacing is not adding
    reply = await refused(app, "/style save c x", "style.too_many")
    assert text(app, reply) == "There are 2 styles (personal) and at most 2 are allowed; delete some first."
    three = Attachment("styles.csv", b"name,prompt\r\na,1\r\nc,2\r\nd,3\r\n")
    await refused(app, "/style import", "style.too_many", attachments=(three,))
    assert [row[2:4] for row in await stored(app)] == [("a", "x"), ("B", "z")]


async def test_global_styles_from_the_csv_file_inline_config_and_the_hook(make_app, tmp_path: Path) -> None:
    from bot.hookspecs import hookimpl

    class Library:
        @hookimpl
        def register_styles(self, register):
            register("pixel", "pixel art, {prompt}", "")

    csv_file = tmp_path / "a1111-styles.csv"
    csv_file.write_text('\ufeffname,prompt,negative_prompt\n"oil","oil painting, {prompt}",photo\n', "utf-8")
    config = {"csv": str(csv_file), "styles": {"noir": {"negative_prompt": "color"}}}
    app = await make_app(extra_plugins=(Library(),), plugins={"styles": config})
    assert (await ok(app, "/style list")).data["styles"]["global"] == ["pixel", "oil", "noir"]
    assert app.styles.owners["oil"] == "config" and app.styles.owners["pixel"] == "Library"
    await app.queue.stop()
    request = await draw(app, "/draw a cat --style oil,pixel,noir --negative ugly")
    assert request.prompt == "pixel art, oil painting, a cat"
    assert request.negative_prompt == "ugly, photo, color"


BAD_CONFIG = [
    ({"csv": "missing.csv"}, "[plugins.styles] csv: cannot read"),
    ({"styles": {"a,b": {"prompt": "x"}}}, "[plugins.styles] styles: 'a,b' cannot be a style name"),
    ({"max_name_length": 65}, "[plugins.styles] max_name_length"),
]


async def test_bad_style_config_fails_at_startup_naming_the_key(make_app) -> None:
    for config, message in BAD_CONFIG:
        app = await make_app(start=False, plugins={"styles": config})
        with pytest.raises(ConfigError) as info:
            await app.start()
        assert message in str(info.value)


def test_config_toml_lists_every_styles_setting_with_its_default() -> None:
    import tomllib

    from bot.settings import parse_settings
    from plugins.styles import StylesConfig

    root = Path(__file__).resolve().parents[2]
    settings = parse_settings(tomllib.loads((root / "config.toml").read_text(encoding="utf-8")))
    assert set(settings.plugins.table("styles")) == set(StylesConfig.model_fields)
    assert settings.plugin_config("styles", StylesConfig) == StylesConfig()


@pytest.mark.slow
def test_console_styles_save_import_draw_export_and_round_trip(tmp_path: Path) -> None:
    upload = tmp_path / "a1111-styles.csv"
    upload.write_bytes(TRICKY_CSV.encode())
    config = '[plugins.moderation]\nmoderators = ["console:mod"]\n'
    with ConsoleSession(tmp_path, user="alice", config=config) as alice:
        (saved,) = alice.command('/style save anime "anime art, {prompt}" --negative "photo, 3d"')
        assert saved["text"] == 'Saved style "anime" (personal). Use it with /draw ... --style anime'
        (imported,) = alice.command(f"/style import --attach {upload}")
        assert imported["text"] == "Imported 4 style(s) from a1111-styles.csv (personal): 4 new, 0 replaced."
        (listing,) = alice.command("/style list")
        assert "personal: anime, quoted, multi, spaced, 水彩" in listing["text"]
        (job,) = jobs_of(alice.command("/draw a cat --style quoted,anime --negative ugly --steps 2"))
        finished = alice.finished(job)
        assert finished["images"][0]["infotext"].startswith(
            'anime art, a "quoted" word, a cat\nNegative prompt: ugly, lowres, "bad", photo, 3d\nSteps: 2,'
        )
        (unknown,) = alice.command("/draw a cat --style nope")
        assert unknown["event"] == "error" and unknown["text"] == (
            'Unknown style "nope". Available: anime, quoted, multi, spaced, 水彩'
        )
        (exported,) = alice.command("/style export")
        export = Path(exported["files"][0])
        assert (
            exported["text"]
            == "Exported 5 style(s) (personal) as styles.csv; A1111 reads it as its styles.csv."
        )
    with ConsoleSession(tmp_path, user="bob", locale="zh-CN") as bob:
        (refusal,) = bob.command("/style save team x --chat")
        assert (
            refusal["event"] == "error"
            and refusal["text"] == "/style 仅限管理员使用。此次尝试已记入审计日志。"
        )
        (imported,) = bob.command(f"/style import --attach {export}")
        assert imported["text"] == "已从 styles.csv 导入 5 个风格（个人）：新增 5 个，替换 0 个。"
        (again,) = bob.command("/style export")
        assert Path(again["files"][0]).read_bytes() == export.read_bytes()
        (bad,) = bob.command(f"/style import --attach {finished['images'][0]['path']}")
        assert bad["text"].endswith(
            "不是 A1111 的 styles.csv：它必须是 UTF-8 文本，且首行为 name,prompt,negative_prompt。"
        )
    with sqlite3.connect(tmp_path / "data" / "atelier.db") as db:
        rows = db.execute("SELECT scope_id, name, prompt, negative_prompt FROM styles ORDER BY id").fetchall()
        (params,) = db.execute("SELECT params FROM generations").fetchone()
    assert rows[:2] == [
        ("console:alice", "anime", "anime art, {prompt}", "photo, 3d"),
        ("console:alice", "quoted", 'a "quoted" word, {prompt}', 'lowres, "bad"'),
    ]
    assert [row[1] for row in rows] == ["anime", "quoted", "multi", "spaced", "水彩"] * 2
    assert {row[0] for row in rows[5:]} == {"console:bob"}
    request = json.loads(params)
    assert request["styles"] == ["quoted", "anime"]
    assert request["prompt"] == 'anime art, a "quoted" word, a cat'
    assert request["negative_prompt"] == 'ugly, lowres, "bad", photo, 3d'
