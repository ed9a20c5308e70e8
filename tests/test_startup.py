"""What a command loads before it does its work (issue 16): each imports the third-party
packages it needs when it runs, so the commands that never touch the engine or a chat
platform start without torch, diffusers, transformers, discord.py, python-telegram-bot
or procrastinate, and ``atelier --help`` without any third-party package at all.

Each check runs in a fresh interpreter and reads ``sys.modules`` at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.scenario import run_bare

ENGINE_AND_CHAT = {"torch", "diffusers", "transformers", "discord", "telegram", "procrastinate"}
# what the CLI module itself must not pull in: everything a command may need later
EVERY_HEAVY = ENGINE_AND_CHAT | {"pydantic", "sqlalchemy", "alembic", "pluggy", "numpy", "PIL", "aiosqlite"}

REPORT = """
import json, sys
{body}
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
"""

RUN_CLI = """
from bot.cli import main
try:
    code = main({argv!r})
except SystemExit as exit:
    code = exit.code
assert code in (0, None), code
"""


def _loaded(body: str) -> set[str]:
    return set(json.loads(run_bare(REPORT.format(body=body)).splitlines()[-1]))


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'[bot]\ndata_dir = "{tmp_path / "data"}"\n', encoding="utf-8")
    return config


def test_importing_the_cli_loads_no_third_party_package() -> None:
    leaked = _loaded("import bot.cli") & EVERY_HEAVY
    assert not leaked, leaked


def test_help_loads_no_third_party_package() -> None:
    leaked = _loaded(RUN_CLI.format(argv=["--help"])) & EVERY_HEAVY
    assert not leaked, leaked


def test_db_upgrade_loads_no_engine_or_chat_library(tmp_path: Path) -> None:
    argv = ["--config", str(_config(tmp_path)), "db", "upgrade"]
    loaded = _loaded(RUN_CLI.format(argv=argv))
    assert "alembic" in loaded  # it did run the migrations
    leaked = loaded & (ENGINE_AND_CHAT | {"numpy", "PIL"})
    assert not leaked, leaked


def test_listing_plugins_loads_no_engine_or_chat_library(tmp_path: Path) -> None:
    argv = ["--config", str(_config(tmp_path)), "plugins"]
    leaked = _loaded(RUN_CLI.format(argv=argv)) & (ENGINE_AND_CHAT | {"numpy"})
    assert not leaked, leaked


FIRST_ANSWERS = """
import asyncio
from bot.app import DeferredEngine, build_app
from bot.settings import load_settings
from bot.types import Actor

settings = load_settings({config!r})
settings = settings.model_copy(update={{"engine": settings.engine.model_copy(update={{"warm_up": False}})}})
app = build_app(settings)
assert type(app.engines[0]) is DeferredEngine and app.engines[0].device == "auto"
actor = Actor(platform="console", user_id="alice", name="Alice", locale="en", chat_id="c")

async def answer() -> None:
    await app.start()
    try:
        for line in ("/help", "/samplers", "/queue", "/history"):
            (reply,) = await app.service.handle_line(line, actor)
            assert not reply.error, reply
    finally:
        await app.stop(wait=False)

asyncio.run(answer())
"""


def test_the_bots_first_answers_load_no_engine_library(tmp_path: Path) -> None:
    """A bot answers before torch is loaded: its engine is built where it is first used
    (the device's thread: the warm-up or the first job), so /help and the other commands
    that need no engine answer more than a second sooner after a start."""
    loaded = _loaded(FIRST_ANSWERS.format(config=str(_config(tmp_path))))
    assert "sqlalchemy" in loaded and "pluggy" in loaded  # it did start and answer
    leaked = loaded & {"torch", "diffusers", "transformers"}
    assert not leaked, leaked
