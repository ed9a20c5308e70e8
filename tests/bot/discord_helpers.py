"""Shared pieces of the Discord adapter tests: a server and a user on the fake Discord,
a bot started on it in-process or as ``atelier run``, and readers for the messages it
posts (results, their buttons and their PNGs)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import discord
import pytest

from bot.adapters.discord.adapter import DiscordAdapter
from tests.fakes.discord_api import FakeDiscord, user_json
from tests.scenario import console_env

GUILD, CHANNEL = "700000000000000001", "700000000000000010"
ALICE = user_json("500000000000000005", "alice")
BOB = user_json("500000000000000006", "bob")


@pytest.fixture(autouse=True)
def restore_discord_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter points discord.py at the fake; every test gets Discord's own back."""
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(
        discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    )


@asynccontextmanager
async def running(make_app: Callable[..., Any], dc: FakeDiscord, **tables: Any) -> AsyncIterator[Any]:
    """A bot on the fake: its adapter starts before the App, as ``atelier run`` does."""
    discord_table = {"api_base": dc.api_base, "gateway_url": dc.gateway_url, **tables.pop("discord", {})}
    app = await make_app(start=False, discord=discord_table, **tables)
    adapter = DiscordAdapter(app, app.settings, "fake-token")
    await adapter.start()
    await app.start()
    try:
        yield app, adapter
    finally:
        await adapter.stop()


def server(dc: FakeDiscord) -> None:
    dc.guild(GUILD, owner_id="1")
    dc.channel(GUILD, CHANNEL)


def option(name: str, value: Any) -> dict[str, Any]:
    kind = (
        4 if isinstance(value, int) and not isinstance(value, bool) else 5 if isinstance(value, bool) else 3
    )
    return {"name": name, "type": kind, "value": value}


def results(dc: FakeDiscord, channel: str | None = None) -> list[dict[str, Any]]:
    """Messages that show a finished job: an image and buttons."""
    return [
        m
        for m in dc.messages.values()
        if m["attachments"] and m["components"] and (channel is None or m["channel_id"] == channel)
    ]


def buttons(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for row in message["components"] for b in row["components"]]


def button(message: dict[str, Any], label: str) -> str:
    return next(b["custom_id"] for b in buttons(message) if b["label"] == label)


async def draw(dc: FakeDiscord, *options: dict[str, Any], user: dict[str, Any] = ALICE, **where: Any) -> Any:
    where.setdefault("guild_id", GUILD)
    where.setdefault("channel_id", CHANNEL)
    return await dc.slash("draw", list(options), user=user, **where)


async def result_of(dc: FakeDiscord, count: int = 1, **kwargs: Any) -> dict[str, Any]:
    await dc.wait_for(lambda: len(results(dc, **kwargs)) >= count, timeout=300)
    return results(dc, **kwargs)[count - 1]


async def submit_remix(dc: FakeDiscord, message: dict[str, Any], remix: str, prompt: str) -> None:
    """Alice sends the Remix form (button ``remix`` of ``message``) with ``prompt``."""
    await dc.submit_modal(
        remix, {"prompt": prompt}, user=ALICE, guild_id=GUILD, channel_id=CHANNEL, message_id=message["id"]
    )


def png_of(dc: FakeDiscord, message: dict[str, Any]) -> bytes:
    return dc.files[message["attachments"][0]["id"]]


async def bot_process(tmp_path: Path, dc: FakeDiscord) -> asyncio.subprocess.Process:
    """``atelier run`` with a Discord token, pointed at the fake."""
    env = console_env(tmp_path)
    env.update(
        ATELIER_DISCORD_TOKEN="fake-token",
        ATELIER_DISCORD_API_BASE=dc.api_base,
        ATELIER_DISCORD_GATEWAY_URL=dc.gateway_url,
    )
    env.pop("ATELIER_TELEGRAM_TOKEN", None)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "run", cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE
    )
