"""/help, generated from the command schema (bot/help.py): every built-in command and
subcommand rendered in English and Chinese, and a few pages checked word for word."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.app import build_app
from bot.help import argument_label, visible_commands
from bot.schema import localized, walk
from bot.types import Actor, Reply
from tests.conftest import make_settings

LOCALES = ("en", "zh-CN")
# Words a Chinese page may hold besides names and values: file formats, acronyms, and the
# axis names and values its examples use ("steps: 10-30 [3]").
TERMS = {
    "A1111", "CFG", "CLIP", "CPU", "CSV", "DDIM", "ENSD", "Euler", "GPU", "ID", "JPEG", "LoRA", "NV",
    "PNG", "VAE", "WebP", "cfg", "csv", "index", "json", "none", "reset", "sampler", "steps", "styles",
    "zip",
}  # fmt: skip


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    return build_app(make_settings(tmp_path_factory.mktemp("help")), engines=[object()], library=object())


async def page(app, line: str, locale: str) -> str:
    actor = Actor(platform="console", user_id="alice", name="Alice", locale=locale, chat_id="c")
    (reply,) = await app.service.handle_line(line, actor)
    assert not reply.error, (line, reply)
    return app.translator.t(locale, reply.key, **reply.params)


def every_page(app) -> list[tuple[tuple[str, ...], object]]:
    return [
        (path, level)
        for command in visible_commands(app)
        for path, level in walk(command)
        if not level.hidden
    ]


def allowed_words(app) -> set[str]:
    words = set(TERMS)
    for _, level in every_page(app):
        words.add(level.name)
        for spec in level.option_specs(app.service.options.specs):
            words.update(re.findall(r"[A-Za-z]+", spec.name))
            if spec.choices is not None:
                words.update(re.findall(r"[A-Za-z][A-Za-z0-9]*", " ".join(spec.choices())))
    return words


def english_words(text: str, allowed: set[str]) -> list[str]:
    """Latin words of two letters or more that are not names, options or values."""
    without_options = re.sub(r"--[a-z0-9-]+", " ", text)
    found = re.findall(r"(?<![0-9A-Za-z])[A-Za-z][A-Za-z0-9]+", without_options)  # not 512x768
    return [word for word in found if word not in allowed]


@pytest.mark.parametrize("locale", LOCALES)
async def test_help_lists_every_visible_command_with_its_description(app, locale: str) -> None:
    text = await page(app, "/help", locale)
    lines = text.splitlines()[1:]
    commands = visible_commands(app)
    assert len(lines) == len(commands) == 30
    for line, command in zip(lines, commands, strict=True):
        assert line.startswith(f"/{command.name} — {localized(command.description, app.translator, locale)}")
    assert "/rerun" not in text and "/grid-again" not in text  # buttons' targets


@pytest.mark.parametrize("locale", LOCALES)
async def test_help_of_every_command_shows_each_argument_option_and_subcommand(app, locale: str) -> None:
    translator, allowed = app.translator, allowed_words(app)
    for path, level in every_page(app):
        text = await page(app, "/help " + " ".join(path), locale)
        head = f"/{' '.join(path)} — {localized(level.description, translator, locale)}"
        assert text.startswith(head), path
        for argument in level.arguments:
            label = argument_label(argument, translator, locale)
            assert re.search(
                rf"^  {re.escape(label)}.* — {re.escape(localized(argument.description, translator, locale))}$",
                text,
                re.M,
            ), (path, argument.name)
        for spec in level.option_specs(app.service.options.specs):
            description = localized(spec.description, translator, locale)
            assert description and re.search(
                rf"^  --{spec.name}\b.* — {re.escape(description)}", text, re.M
            ), (path, spec.name)
        for sub in level.subcommands:
            description = localized(sub.description, translator, locale)
            assert re.search(
                rf"^  /{' '.join((*path, sub.name))}\b.* — {re.escape(description)}", text, re.M
            ), (path, sub.name)
        if locale == "zh-CN":
            assert english_words(text, allowed) == [], (path, text)
        assert not re.search(r"\b(cmd|arg|option|schema|help|file|details)\.[a-z]", text), (path, text)  # fmt: skip


async def test_help_of_an_unknown_command_or_subcommand_lists_what_exists(app) -> None:
    actor = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
    (unknown,) = await app.service.handle_line("/help paint", actor)
    assert unknown.key == "error.unknown_command" and "/draw" in unknown.params["allowed"]
    (sub,) = await app.service.handle_line("/help style rename", actor)
    assert (
        sub.key == "error.unknown_subcommand"
        and sub.params["allowed"] == "list, show, save, delete, import, export"
    )


STORED = {
    ("/help cancel", "en"): """\
/cancel — Cancel a queued or running job
Usage: /cancel ID
Arguments:
  ID — A generation's ID""",
    ("/help cancel", "zh-CN"): """\
/cancel — 取消排队中或正在运行的任务
用法：/cancel ID
参数：
  ID — 一次生成的 ID""",
    ("/help vary", "en"): """\
/vary — Variations of one image of a result
Usage: /vary ID[.N] [--strength X] [--strong] [--count N]
Arguments:
  ID[.N] — A result's ID; ID.N for its image N (1 = the first)
Options:
  --strength X (0.01 to 1) — Variation strength (default: subtle) (also --variation-strength)
  --strong — A strong variation
  --count N (1 to 8) — Number of batches (also --n-iter)""",
    ("/help vary", "zh-CN"): """\
/vary — 生成某个结果中一张图的变体
用法：/vary ID[.序号] [--strength 数值] [--strong] [--count 整数]
参数：
  ID[.序号] — 某个结果的 ID；ID.序号 表示其中第几张图（1 为第一张）
选项：
  --strength 数值（0.01 到 1） — 变异强度（默认为轻微）（别名 --variation-strength）
  --strong — 较强的变异
  --count 整数（1 到 8） — 批次数（别名 --n-iter）""",
    ("/help style", "en"): """\
/style — Saved prompt styles: yours, the chat's, the server's
Usage: /style list|show|save|delete|import|export
Subcommands:
  /style list — The styles you can use, by where they come from
  /style show NAME — A style's prompt and negative prompt
  /style save NAME [PROMPT] [--negative TEXT] [--from ID] [--chat] [--guild] — Save a style; a name used again replaces it
  /style delete NAME [--chat] [--guild] — Delete a style
  /style import [--chat] [--guild] — Import the styles of an A1111 styles.csv
  /style export [--chat] [--guild] — The styles as an A1111 styles.csv
Without a subcommand, /style runs /style list.
/help style SUBCOMMAND shows a subcommand in full.""",
    ("/help quota set", "zh-CN"): """\
/quota set — 设置某个用户在此处的额度（仅限管理员）
用法：/quota set @用户 [--images 整数] [--gpu-seconds 数值]
参数：
  @用户 — 用户：@名字、提及，或“平台:ID”
选项：
  --images 整数（0 到 1000000000） — 图片数量
  --gpu-seconds 数值（0 到 1000000000） — GPU 秒数""",
}


@pytest.mark.parametrize(("line", "locale"), list(STORED))
async def test_stored_help_pages(app, line: str, locale: str) -> None:
    assert await page(app, line, locale) == STORED[line, locale]


async def test_a_missing_argument_shows_the_schemas_usage(app) -> None:
    actor = Actor(platform="console", user_id="alice", name="Alice", locale="zh-CN", chat_id="c")
    (reply,) = await app.service.handle_line("/style save", actor)
    assert isinstance(reply, Reply) and reply.key == "error.missing_argument"
    assert app.translator.t("zh-CN", reply.key, **reply.params) == (
        "/style save 缺少名称。用法：/style save 名称 [提示词] [--negative 文本] [--from ID] [--chat] [--guild]"
    )


def test_no_catalog_keeps_a_hand_written_usage(tmp_path: Path) -> None:
    """The help texts the schema replaced are gone from both catalogs."""
    app = build_app(make_settings(tmp_path), engines=[object()], library=object())
    for locale in LOCALES:
        catalog = app.translator.catalogs[locale]
        assert not [key for key in catalog if key.startswith("help.") and key[5:] in app.commands.items]
