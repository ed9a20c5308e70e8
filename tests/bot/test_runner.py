"""``atelier run`` with chat platforms: adapters and the App start and stop together."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.runner import PLATFORMS, chosen_platforms, serve
from bot.settings import Secrets
from tests.chat_adapter import FakeChat, FakePlatform
from tests.conftest import make_settings


def test_platforms_are_chosen_by_their_tokens_and_the_config(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url)
    assert chosen_platforms(settings) == []
    both = settings.model_copy(update={"secrets": Secrets(discord_token="d", telegram_token="t")})
    assert [p.name for p in chosen_platforms(both)] == ["discord", "telegram"]
    off = make_settings(tmp_path, database_url, discord={"enabled": False})
    off = off.model_copy(update={"secrets": Secrets(discord_token="d", telegram_token="t")})
    assert [p.name for p in chosen_platforms(off)] == ["telegram"]
    assert {p.module for p in PLATFORMS} == {"bot.adapters.discord", "bot.adapters.telegram"}


async def test_serve_starts_the_adapters_then_the_app_and_stops_all_on_request(make_app) -> None:
    app = await make_app(start=False)
    server = FakePlatform()
    chat = FakeChat(app, server)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(app, [chat], stop=stop))
    await asyncio.wait_for(_until(lambda: app.started), 30)
    (accepted, *_) = await chat.type("/draw a cat --steps 2 --size 64x64")
    (job,) = accepted.data["jobs"]
    await asyncio.wait_for(_until(lambda: any(c.message.kind == "finished" for c in server.calls)), 60)
    stop.set()
    await asyncio.wait_for(serving, 30)
    assert not app.started
    assert (await _status(make_app, job)) == "finished"


async def _status(make_app, job: str) -> str:
    again = await make_app(start=False)
    return (await again.store.get(job)).status


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.02)
