"""The platform views of the command schema (bot/platforms.py): startup checks that name
the plugin, Telegram's command list, and the neutral tree a Discord adapter builds from."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.app import build_app
from bot.hookspecs import hookimpl
from bot.options import OptionSpec
from bot.platforms import DISCORD_NAME, TELEGRAM_NAME, command_line, command_tree, telegram_commands
from bot.plugins import PluginError
from bot.types import Actor, Argument, Command, Reply
from tests.conftest import make_settings

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
TEXT = {"en": "Something", "zh-CN": "某物"}


async def noop(ctx):
    return Reply("note")


def app_with(tmp_path: Path, *commands: Command, options: tuple[OptionSpec, ...] = ()):
    class Extra:
        @hookimpl
        def register_commands(self, register):
            for command in commands:
                register(command)

        @hookimpl
        def register_options(self, register):
            for spec in options:
                register(spec)

    return build_app(make_settings(tmp_path), plugins=(Extra(),), engines=[object()], library=object())


BROKEN = [
    (Command("Shout", noop, TEXT), "command /Shout of plugin 'Extra': the name must be 1-32"),
    (Command("shout-out", noop, TEXT), "command /shout-out of plugin 'Extra': .* \\(Telegram\\)"),
    (
        Command("shout", noop, {"en": "Shout"}),
        "command /shout of plugin 'Extra': it has no zh-CN description",
    ),
    (Command("shout", noop, "cmd.nowhere"), "command /shout of plugin 'Extra': it has no en description"),
    (Command("shout", noop, {"en": "x" * 101, "zh-CN": "喊"}), "en description is 101 characters"),
    (
        Command(
            "shout",
            noop,
            TEXT,
            options=tuple(OptionSpec(f"o{i}", "flag", description=TEXT) for i in range(26)),
        ),
        "command /shout of plugin 'Extra': 26 fields \\(at most 25",
    ),
    (
        Command("shout", noop, TEXT, subcommands=(Command("loud", noop, TEXT),)),
        "a command with subcommands takes no handler",
    ),
    (Command("shout", None, TEXT), "it has neither a handler nor subcommands"),
    (
        Command("shout", noop, TEXT, (Argument("who", "user", TEXT, autocomplete="friends"),)),
        "argument 'who': no autocomplete source 'friends'",
    ),
    (
        Command("shout", noop, TEXT, (Argument("words", "text", TEXT), Argument("who", "user", TEXT))),
        "argument 'words': a text argument takes the rest of the line, so it comes last",
    ),
    (
        Command(
            "shout",
            noop,
            TEXT,
            (Argument("who", "user", TEXT, required=False), Argument("n", "integer", TEXT)),
        ),
        "argument 'n': a required argument cannot follow an optional one",
    ),
    (
        Command("shout", noop, TEXT, (Argument("who", "user", {"en": "Who"}),)),
        "command /shout of plugin 'Extra': argument 'who' has no zh-CN description",
    ),
]


@pytest.mark.parametrize(("command", "message"), BROKEN)
def test_commands_a_platform_would_refuse_fail_at_startup_naming_the_plugin(
    tmp_path: Path, command: Command, message: str
) -> None:
    with pytest.raises(PluginError, match=message):
        app_with(tmp_path, command)


def test_draw_options_are_checked_too(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="/draw option --mood of plugin 'Extra': it has no en description"):
        app_with(tmp_path, options=(OptionSpec("mood", "str"),))
    many = tuple(OptionSpec(f"extra{i}", "flag", description=TEXT) for i in range(2))
    with pytest.raises(PluginError, match="command /draw of plugin 'core': 26 fields"):
        app_with(tmp_path, options=many)  # one more typed field than Discord takes
    advanced = tuple(OptionSpec(f"extra{i}", "flag", description=TEXT, advanced=True) for i in range(3))
    app_with(tmp_path, options=advanced)  # advanced ones share the "more" field


def test_every_builtin_command_fits_both_platforms(tmp_path: Path) -> None:
    app = build_app(make_settings(tmp_path), engines=[object()], library=object())
    listed = telegram_commands(app, "en")
    names = [name for name, _ in listed]
    assert names == sorted(names) and all(TELEGRAM_NAME.match(name) for name in names)
    assert {"draw", "style", "preset", "grid", "quota", "help"} <= set(names)
    assert "rerun" not in names and "grid-again" not in names  # actions' targets
    assert dict(listed)["draw"] == "Draw images from a prompt"
    assert dict(telegram_commands(app, "zh-CN"))["draw"] == "根据提示词生成图片"
    for node in command_tree(app):
        for sub in (node, *node.subcommands):
            assert DISCORD_NAME.match(sub.name) and len(sub.fields) <= 25, sub.path
            for field in sub.fields:
                assert DISCORD_NAME.match(field.name), (sub.path, field.name)
                assert all(0 < len(text) <= 100 for text in field.description.values()), field


def test_the_draw_tree_gives_types_ranges_choices_and_sources(tmp_path: Path) -> None:
    app = build_app(make_settings(tmp_path), engines=[object()], library=object())
    (draw,) = [node for node in command_tree(app) if node.name == "draw"]
    fields = {field.name: field for field in draw.fields}
    assert draw.fields[0].name == "prompt" and draw.fields[0].role == "argument"
    assert (fields["steps"].type, fields["steps"].min, fields["steps"].max) == ("integer", 1, 150)
    assert (fields["cfg"].type, fields["cfg"].min, fields["cfg"].max) == ("number", 1.0, 30.0)
    assert fields["hires"].type == "boolean"
    assert fields["sampler"].autocomplete == "samplers" and fields["style"].autocomplete == "styles"
    assert fields["checkpoint"].autocomplete == "checkpoints" and fields["vae"].autocomplete == "vaes"
    assert fields["preset"].autocomplete == "presets"
    assert fields["seed"].type == "string"  # up to 2**63-1: more than a Discord integer holds
    assert "rng" not in fields and "hr-scale" not in fields  # advanced: in the "more" field
    assert fields["more"].role == "more" and fields["file"].type == "attachment"
    assert fields["steps"].description == {"en": "Sampling steps", "zh-CN": "采样步数"}
    (quota,) = [node for node in command_tree(app) if node.name == "quota"]
    subs = {sub.name: sub for sub in quota.subcommands}
    assert not subs["show"].moderator and subs["set"].moderator
    assert [(f.name, f.type, f.required) for f in subs["set"].fields] == [
        ("user", "user", True),
        ("images", "integer", False),
        ("gpu-seconds", "number", False),
    ]


async def test_an_interactions_values_run_as_the_text_command(make_app) -> None:
    app = await make_app()
    (style,) = [node for node in command_tree(app) if node.name == "style"]
    (save,) = [sub for sub in style.subcommands if sub.name == "save"]
    values = {
        "name": "film noir",
        "prompt": "film noir, {prompt}",
        "negative": "color, bright",
        "chat": False,
    }
    command, text = command_line(save, values)
    assert (command, text) == ("style", 'save "film noir" film noir, {prompt} --negative "color, bright"')
    (saved,) = await app.service.handle_line(f"/{command} {text}", ALICE)
    assert saved.key == "style.saved" and saved.data["style"] == {
        "name": "film noir",
        "scope": "user",
        "prompt": "film noir, {prompt}",
        "negative_prompt": "color, bright",
    }
    (draw,) = [node for node in command_tree(app) if node.name == "draw"]
    assert command_line(draw, {"prompt": "a cat", "steps": 2, "hires": True, "more": "--eta 0.5"}) == (
        "draw",
        "a cat --steps 2 --hires --eta 0.5",
    )


async def test_a_pasted_infotext_keeps_its_lines_when_an_option_is_set_too(make_app) -> None:
    """A Discord /draw whose prompt field holds a pasted infotext and whose steps field is
    set: the option is an override on its own line, not part of the infotext's Model."""
    app = await make_app()
    (draw,) = [node for node in command_tree(app) if node.name == "draw"]
    paste = "a red fox\nNegative prompt: lowres, bad hands\nSteps: 2, Sampler: Euler, Seed: 5, Size: 64x64, Model: tiny"
    command, text = command_line(draw, {"prompt": paste, "steps": 3})
    assert text == paste + "\n--steps 3"
    (accepted, *_) = await app.service.handle_line(f"/{command} {text}", ALICE)
    assert accepted.key == "draw.accepted", accepted
    request = (await app.store.get(accepted.data["jobs"][0])).request
    assert (request.prompt, request.negative_prompt) == ("a red fox", "lowres, bad hands")
    assert (request.num_inference_steps, request.seed) == (3, 5)
