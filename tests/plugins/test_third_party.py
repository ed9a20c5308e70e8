"""A plugin from another distribution (the `atelier` entry-point group) extends the bot with
a command, a style and a grid axis; and the core draws with every built-in plugin off."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from bot.platforms import command_tree, telegram_commands
from bot.plugins import DEFAULT_PLUGINS, builtin_name
from bot.types import Actor
from tests.scenario import ConsoleSession, jobs_of

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")

PLUGIN = '''
"""A third-party Atelier plugin: only public hooks, nothing imported from plugins/."""

from bot.hookspecs import hookimpl
from bot.types import Argument, Command, OptionSpec, Reply
from plugins.xy_grid import GridAxis


async def greet(ctx):
    return Reply("greeting", data={"hello": ctx.actor.name, "said": ctx.text, "loud": ctx.options.get("loud", False)})


@hookimpl
def register_commands(register):
    register(
        Command(
            "greet",
            greet,
            {"en": "Greet someone", "zh-CN": "打个招呼"},
            arguments=(
                Argument(
                    "words",
                    "text",
                    {"en": "What to say", "zh-CN": "要说的话"},
                    label={"en": "WORDS", "zh-CN": "话语"},
                ),
            ),
            options=(OptionSpec("loud", "flag", description={"en": "Shout it", "zh-CN": "大声说"}),),
        )
    )


@hookimpl
def register_styles(register):
    register("postcard", "vintage postcard, {prompt}", "modern")


def tint(cell, value, values):
    cell.prompt = f"{cell.prompt}, {value} tint"


@hookimpl
def register_grid_axes(register):
    register(GridAxis("Postcard tint", "str", tint))
'''


def install(site: Path) -> Path:
    """Write the plugin and its dist-info (as pip would) into ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "atelier_postcards.py").write_text(textwrap.dedent(PLUGIN), encoding="utf-8")
    dist = site / "atelier_postcards-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: atelier-postcards\nVersion: 0.1\n", encoding="utf-8"
    )
    (dist / "entry_points.txt").write_text("[atelier]\npostcards = atelier_postcards\n", encoding="utf-8")
    return site


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("atelier_postcards", None)


async def test_an_entry_point_plugin_adds_a_command_a_style_and_a_grid_axis(make_app, installed) -> None:
    app = await make_app()
    assert app.pm.get_plugin("postcards") is not None
    assert app.commands.owners["greet"] == "postcards"
    (reply,) = await app.service.handle_line("/greet world --loud", ALICE)
    assert reply.data == {"hello": "Alice", "said": "world", "loud": True}
    # declared with the schema, it is on every platform and in /help, in both languages
    assert ("greet", "Greet someone") in telegram_commands(app, "en")
    assert ("greet", "打个招呼") in telegram_commands(app, "zh-CN")
    (node,) = [node for node in command_tree(app) if node.name == "greet"]
    assert [(f.name, f.type, f.required) for f in node.fields] == [
        ("words", "string", True),
        ("loud", "boolean", False),
    ]
    (listing,) = await app.service.handle_line("/help", ALICE)
    assert "/greet — Greet someone" in app.translator.t("en", listing.key, **listing.params)
    (page,) = await app.service.handle_line("/help greet", replace(ALICE, locale="zh-CN"))
    assert app.translator.t("zh-CN", page.key, **page.params) == (
        "/greet — 打个招呼\n用法：/greet 话语 [--loud]\n参数：\n  话语 — 要说的话\n选项：\n  --loud — 大声说"
    )
    style = app.styles.get("postcard")
    assert (style.prompt, style.negative_prompt, app.styles.owners["postcard"]) == (
        "vintage postcard, {prompt}",
        "modern",
        "postcards",
    )
    assert app.grid_axes.owners["postcard tint"] == "postcards"

    # the axis drives a real grid: one cell per value, each changed by the plugin
    await app.queue.stop()
    (accepted, *_) = await app.service.handle_line('/grid a harbour --x "postcard tint: sepia, teal"', ALICE)
    assert accepted.key == "draw.accepted", accepted
    cells = [await app.store.get(job) for job in accepted.data["jobs"]]
    assert [cell.request.prompt for cell in cells] == ["a harbour, sepia tint", "a harbour, teal tint"]


async def test_a_disabled_entry_point_plugin_adds_nothing(make_app, installed) -> None:
    app = await make_app(plugins={"disabled": ["postcards"]})
    assert app.pm.get_plugin("postcards") is None
    assert app.commands.get("greet") is None and app.styles.get("postcard") is None
    assert (await app.service.handle_line("/greet", ALICE))[0].key == "error.unknown_command"


@pytest.mark.slow
def test_atelier_plugins_lists_the_installed_plugin_with_its_hooks(tmp_path: Path) -> None:
    site = install(tmp_path / "site")
    (tmp_path / "config.toml").write_text(f'[bot]\ndata_dir = "{tmp_path / "data"}"\n', encoding="utf-8")
    env = {**os.environ, "ATELIER_CONFIG": str(tmp_path / "config.toml"), "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(root)])
    listing = subprocess.run(
        [sys.executable, "-m", "bot.cli", "plugins"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert listing.returncode == 0, listing.stderr
    assert "postcards: register_commands, register_grid_axes, register_styles" in listing.stdout.splitlines()
    assert "history: check_request, register_commands, register_options, startup" in listing.stdout


@pytest.mark.slow
def test_draw_works_with_every_builtin_plugin_disabled(tmp_path: Path) -> None:
    names = ", ".join(f'"{builtin_name(module)}"' for module in DEFAULT_PLUGINS)
    with ConsoleSession(tmp_path, config=f"[plugins]\ndisabled = [{names}]\n") as session:
        (job,) = jobs_of(session.command("/draw a lone tree --steps 2 --seed 4"))
        done = session.finished(job)
        assert done["event"] == "finished" and Path(done["images"][0]["path"]).is_file()
        assert "Seed: 4" in done["images"][0]["infotext"]
        # the buttons come from plugins; only the core's own Delete is left
        assert [a["id"] for a in done["actions"]] == [f"delete:{job}"]
        (unknown,) = session.command("/history")
        assert unknown["key"] == "error.unknown_command" and "/draw" in unknown["text"]
