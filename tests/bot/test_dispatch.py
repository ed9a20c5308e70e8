"""Dispatch by the command schema (bot/dispatch.py): subcommands, defaults, typed options,
the moderator gate, and translated errors that list what is allowed."""

from __future__ import annotations

from bot.hookspecs import hookimpl
from bot.options import OptionSpec
from bot.types import Actor, Argument, Command, Reply

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
BOB = Actor(platform="console", user_id="bob", name="Bob", locale="zh-CN", chat_id="c")
MOD = Actor(platform="console", user_id="mod", name="Mod", chat_id="c")
MODERATION = {"moderation": {"moderators": ["console:mod"]}}


def _t(en: str, zh: str) -> dict[str, str]:
    return {"en": en, "zh-CN": zh}


class Notes:
    """A plugin's command declared with the schema only: no handler reads its own words."""

    @hookimpl
    def register_commands(self, register):
        async def echo(ctx):
            return Reply("note", data={"path": list(ctx.path), "text": ctx.text, "options": ctx.options})

        title = Argument("title", "word", _t("The note's title", "笔记标题"))
        body = Argument("body", "text", _t("What it says", "内容"), required=False)
        options = (
            OptionSpec("pin", "flag", description=_t("Pin it", "置顶")),
            OptionSpec("stars", "int", bounds=lambda _: (1, 5), description=_t("How good", "评分")),
        )
        subcommands = (
            Command("list", echo, _t("List the notes", "列出笔记")),
            Command("add", echo, _t("Add a note", "添加笔记"), (title, body), options),
            Command("purge", echo, _t("Remove every note", "删除所有笔记"), moderator=True),
        )
        register(Command("note", description=_t("Notes", "笔记"), subcommands=subcommands, default="list"))


async def one(app, line: str, actor: Actor = ALICE) -> Reply:
    (reply,) = await app.service.handle_line(line, actor)
    return reply


def text(app, reply: Reply, locale: str = "en") -> str:
    return app.translator.t(locale, reply.key, **reply.params)


async def test_subcommands_defaults_and_typed_options(make_app) -> None:
    app = await make_app(extra_plugins=(Notes(),), plugins=MODERATION)
    assert (await one(app, "/note")).data == {"path": ["note", "list"], "text": "", "options": {}}
    added = await one(app, '/note ADD "shopping list" eggs, milk --stars 4 --pin')
    assert added.data == {
        "path": ["note", "add"],
        "text": '"shopping list" eggs, milk',
        "options": {"stars": 4, "pin": True},
    }
    assert (await one(app, "/note purge", MOD)).data["path"] == ["note", "purge"]


async def test_errors_list_what_is_allowed_in_the_users_language(make_app) -> None:
    app = await make_app(extra_plugins=(Notes(),), plugins=MODERATION)
    unknown = await one(app, "/note edit x")
    assert unknown.key == "error.unknown_subcommand"
    assert text(app, unknown) == '/note has no subcommand "edit". Allowed: list, add, purge.'

    option = await one(app, "/note add x --star 4", BOB)
    assert option.key == "error.unknown_option"
    assert text(app, option, "zh-CN") == "未知选项 --star（是否想用 --stars？）。可用选项：--pin, --stars"

    bad = await one(app, "/note add x --stars 9")
    assert text(app, bad) == "--stars must be from 1 to 5, got 9."

    missing = await one(app, "/note add --pin", BOB)
    assert (
        text(app, missing, "zh-CN")
        == "/note add 缺少TITLE。用法：/note add TITLE [BODY] [--pin] [--stars 整数]"
    )

    extra = await one(app, "/note list today")
    assert text(app, extra) == '/note list does not take "today". Usage: /note list'

    flagged = await one(app, "/note list --all")
    assert text(app, flagged) == "/note list takes no options, got --all. Usage: /note list"


async def test_a_moderator_subcommand_is_refused_and_audited_before_its_text_is_read(make_app) -> None:
    app = await make_app(extra_plugins=(Notes(),), plugins=MODERATION)
    refused = await one(app, '/note purge --bogus "unclosed', BOB)
    assert refused.key == "error.moderators_only"
    assert text(app, refused).startswith("/note purge is for moderators only.")
    log = await one(app, "/audit", MOD)
    assert [(e["actor"], e["action"], e["allowed"]) for e in log.data["entries"]] == [
        ("console:bob", "note.purge", False)
    ]
