"""Job ends that never reached their chat are shown at the next start (bot/replay.py):
the real discord.py client against the fake Discord, real SQLite and PostgreSQL, the
shared queue with a worker App that ends jobs while the bot is down or not listening."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import discord
import pytest
from sqlalchemy import select, text, update

from bot.adapters.discord.adapter import DiscordAdapter
from bot.app import App, build_app
from bot.errors import UserError
from bot.types import Actor, Route
from models.base import utcnow
from models.tables import Generation
from tests.bot.discord_helpers import CHANNEL, draw, option, results, server
from tests.conftest import (
    POSTGRES_URL,
    EventLog,
    _drop_postgres_database,
    _fresh_postgres_database,
    make_settings,
)
from tests.fakes.discord_api import FakeDiscord
from tests.queue.test_contract import GatedRunner


@pytest.fixture(autouse=True)
def restore_discord_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(
        discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    )


ALICE = Actor(platform="discord", user_id="500000000000000005", name="alice", chat_id=CHANNEL)


class Bot:
    """A bot process on the fake Discord: its adapter starts before the App."""

    def __init__(self, tmp_path: Path, url: str, dc: FakeDiscord, library: Any, **queue: Any) -> None:
        self.tmp_path, self.url, self.dc, self.library, self.queue = tmp_path, url, dc, library, queue
        self.name = "bot"  # its data folder under tmp_path (images of the local image store)
        self.app: App | None = None
        self.adapter: DiscordAdapter | None = None

    def settings(self, name: str, **queue: Any) -> Any:
        discord_table = {"api_base": self.dc.api_base, "gateway_url": self.dc.gateway_url}
        return make_settings(
            self.tmp_path / name, self.url, queue={**self.queue, **queue}, discord=discord_table
        )

    async def start(self, *, engines: list[Any] | None = None) -> App:
        settings = self.settings(self.name)
        self.app = build_app(settings, engines=engines if engines is not None else [], library=self.library)
        self.adapter = DiscordAdapter(self.app, settings, "fake-token")
        await self.adapter.start()
        await self.app.start()
        return self.app

    async def stop(self) -> None:
        if self.adapter is not None:
            await self.adapter.stop()
        if self.app is not None:
            await self.app.stop(wait=False)
        self.app = self.adapter = None


async def status_of(app: App, job: str) -> tuple[str, Any]:
    async with app.store.session() as session:
        row = (await session.execute(select(Generation.status, Generation.end_delivered_at).where(
            Generation.id == job))).one()  # fmt: skip
    return row[0], row[1]


async def wait_status(app: App, job: str, status: str) -> None:
    for _ in range(600):
        if (await status_of(app, job))[0] == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{job} never became {status}")


@pytest.fixture
async def postgres() -> Any:
    if not POSTGRES_URL:
        pytest.skip("the shared queue needs PostgreSQL (ATELIER_TEST_POSTGRES_URL)")
    url = await _fresh_postgres_database()
    yield url
    await _drop_postgres_database(url)


class FailingRunner(GatedRunner):
    def generate(self, request, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.started.append(request.seed)
        self.gate.acquire(timeout=30)
        raise UserError("error.interrupted", attempts=7)


@asynccontextmanager
async def drawing_on_a_worker(
    tmp_path: Path, postgres: str, tiny_library: Any, runner: GatedRunner
) -> AsyncIterator[tuple[FakeDiscord, Bot, App, App, str]]:
    """A bot on the fake Discord and a worker App on the shared queue, with one /draw from
    the channel running on the worker and held at its gate: the fake, the bot, the bot's
    App, the worker and the job. Everything is stopped when the block ends."""
    async with FakeDiscord() as dc:
        server(dc)
        bot = Bot(tmp_path, postgres, dc, tiny_library, backend="procrastinate", lease_seconds=3)
        worker = build_app(bot.settings("worker"), engines=[runner], library=tiny_library, worker=True)
        try:
            app = await bot.start()
            await worker.start()
            await draw(dc, option("prompt", "a lantern"))
            for _ in range(600):
                if runner.started:
                    break
                await asyncio.sleep(0.05)
            assert runner.started, [m["content"] for m in dc.messages.values()]
            (job,) = [r.id for r in await app.store.list_open()]
            yield dc, bot, app, worker, job
        finally:
            runner.gate.release(10)
            await bot.stop()
            if worker.started:
                await worker.stop(wait=False)
            else:
                await worker.store.close()


@pytest.mark.parametrize("runner_class", [GatedRunner, FailingRunner])
async def test_an_end_while_the_bot_was_down_is_posted_once_at_its_start(
    tmp_path: Path, postgres: str, tiny_library: Any, runner_class: type
) -> None:
    runner = runner_class()
    async with drawing_on_a_worker(tmp_path, postgres, tiny_library, runner) as (dc, bot, app, worker, job):
        await bot.stop()
        runner.gate.release()
        await wait_status(worker, job, "finished" if runner_class is GatedRunner else "failed")
        assert (await status_of(worker, job))[1] is None  # nobody heard it
        texts = lambda: [m["content"] or "" for m in dc.in_channel(CHANNEL)]  # noqa: E731
        if runner_class is GatedRunner:
            assert not results(dc, CHANNEL)
        else:
            assert not any("interrupted 7 times" in t for t in texts())
        app = await bot.start()
        if runner_class is GatedRunner:
            await dc.wait_for(lambda: len(results(dc, CHANNEL)) == 1, timeout=60)
            (message,) = results(dc, CHANNEL)
            assert dc.files[message["attachments"][0]["id"]].startswith(b"\x89PNG")
        else:
            await dc.wait_for(lambda: any("interrupted 7 times" in t for t in texts()), timeout=60)
        for _ in range(100):
            if (await status_of(app, job))[1] is not None:
                break
            await asyncio.sleep(0.05)
        assert (await status_of(app, job))[1] is not None
        sent = len(dc.requests)
        await bot.stop()
        app = await bot.start()  # a second restart posts nothing more
        await asyncio.sleep(0.5)
        assert await app.replay.sweep() == 0
        new = [r for r in dc.requests[sent:] if r.method in ("POST", "PATCH") and "messages" in r.path]
        assert not new, new


async def test_an_end_heard_by_nobody_while_the_relay_reconnects_is_posted_once(
    tmp_path: Path, postgres: str, tiny_library: Any
) -> None:
    runner = GatedRunner()
    async with drawing_on_a_worker(tmp_path, postgres, tiny_library, runner) as (dc, bot, app, worker, job):
        relay = app.relay
        assert relay is not None
        url, relay._url = relay._url, "postgresql://postgres@127.0.0.1:1/nothing"  # away for now
        pid = relay._connection.get_server_pid()
        async with app.store.session() as session:
            await session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        runner.gate.release()
        await wait_status(worker, job, "finished")
        await asyncio.sleep(0.3)
        assert not results(dc, CHANNEL)
        relay._url = url  # the database is back
        await dc.wait_for(lambda: len(results(dc, CHANNEL)) == 1, timeout=60)
        await asyncio.sleep(0.5)
        assert len(results(dc, CHANNEL)) == 1
        assert await app.replay.sweep() == 0


async def _end_without_delivery(make_app: Any, **queue: Any) -> tuple[App, str]:
    """A Discord job that finished in a process that stopped before it sent the result:
    the App has no Discord adapter, so nothing delivered it."""
    app = await make_app(queue=queue)
    log = EventLog(app)
    route = Route("discord", CHANNEL)
    (reply,) = await app.service.handle_line("/draw a lantern --seed 3", ALICE, route)
    job = reply.data["jobs"][0]
    await log.wait_for(lambda: bool(log.of("finished", job)))
    return app, job


async def test_a_local_end_never_delivered_is_posted_at_the_next_start(
    tmp_path: Path, make_app: Any, database_url: str, tiny_library: Any, tiny_engine: Any
) -> None:
    app, job = await _end_without_delivery(make_app)
    assert (await status_of(app, job))[1] is None
    await app.stop()
    async with FakeDiscord() as dc:
        server(dc)
        bot = Bot(tmp_path, database_url, dc, tiny_library)
        bot.name = "."  # the stopped App's folder, where its images are
        try:
            app = await bot.start(engines=[tiny_engine])
            await dc.wait_for(lambda: len(results(dc, CHANNEL)) == 1, timeout=60)
            await bot.stop()
            app = await bot.start(engines=[tiny_engine])
            await asyncio.sleep(0.5)
            assert len(results(dc, CHANNEL)) == 1
            assert (await status_of(app, job))[1] is not None
        finally:
            await bot.stop()


async def test_a_telegram_end_never_delivered_is_posted_at_the_next_start(
    tmp_path: Path, make_app: Any, database_url: str, tiny_library: Any, tiny_engine: Any
) -> None:
    from bot.adapters.telegram import build
    from tests.bot.test_telegram import TOKEN, documents, secrets_for, until
    from tests.fakes.telegram_api import FakeTelegram

    chat = 301
    li = Actor(platform="telegram", user_id="77", name="li", locale="zh-CN", chat_id=str(chat))
    app = await make_app()
    log = EventLog(app)
    (reply,) = await app.service.handle_line("/draw a lantern --seed 3", li, Route("telegram", str(chat)))
    (job,) = reply.data["jobs"]
    await log.wait_for(lambda: bool(log.of("finished", job)))
    await app.stop()  # it had no Telegram adapter: the result never reached the chat
    async with FakeTelegram(tokens=(TOKEN,)) as tg:
        settings = make_settings(tmp_path, database_url).model_copy(update={"secrets": secrets_for(tg)})
        for start in range(2):  # the first start posts the result; the second, nothing more
            app = build_app(settings, engines=[tiny_engine], library=tiny_library)
            adapter = build(app, settings)
            await adapter.start()
            await app.start()
            try:
                if start == 0:
                    (png,) = await until(lambda: documents(tg, chat))
                    assert png.files["document"].startswith(b"\x89PNG")
                    for _ in range(100):
                        if (await status_of(app, job))[1] is not None:
                            break
                        await asyncio.sleep(0.05)
                    assert (await status_of(app, job))[1] is not None
                else:
                    assert await app.replay.sweep() == 0
                    await asyncio.sleep(0.5)
                    assert len(documents(tg, chat)) == 1
            finally:
                await adapter.stop()
                await app.stop(wait=False)


async def test_a_live_delivery_is_recorded_and_not_posted_again(
    tmp_path: Path, database_url: str, tiny_library: Any, tiny_engine: Any
) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        bot = Bot(tmp_path, database_url, dc, tiny_library)
        try:
            app = await bot.start(engines=[tiny_engine])
            await draw(dc, option("prompt", "a lantern"))
            await dc.wait_for(lambda: len(results(dc, CHANNEL)) == 1, timeout=120)
            (record,) = await app.store.list_for_user(
                (await app.store.find_user("discord", ALICE.user_id)).id
            )
            for _ in range(100):
                if (await status_of(app, record.id))[1] is not None:
                    break
                await asyncio.sleep(0.05)
            assert (await status_of(app, record.id))[1] is not None
            sent = len(dc.requests)
            await bot.stop()
            app = await bot.start(engines=[tiny_engine])
            assert await app.replay.sweep() == 0
            await asyncio.sleep(0.3)
            new = [r for r in dc.requests[sent:] if r.method in ("POST", "PATCH") and "messages" in r.path]
            assert not new
        finally:
            await bot.stop()


async def test_only_ends_within_the_window_are_replayed(make_app: Any) -> None:
    app, job = await _end_without_delivery(make_app)
    app.replay.serve("discord")
    log = EventLog(app)
    async with app.store.session() as session:
        await session.execute(
            update(Generation).where(Generation.id == job).values(finished_at=utcnow() - timedelta(hours=25))
        )
    assert await app.replay.sweep() == 0
    async with app.store.session() as session:
        await session.execute(
            update(Generation).where(Generation.id == job).values(finished_at=utcnow() - timedelta(hours=23))
        )
    assert await app.replay.sweep() == 1
    (finished,) = log.of("finished", job)
    assert finished.route.chat_id == CHANNEL and len(finished.images) == 1
    assert [a.id for a in finished.actions][-1] == f"delete:{job}"


async def test_replay_hours_zero_replays_nothing(make_app: Any) -> None:
    app, job = await _end_without_delivery(make_app, replay_hours=0)
    app.replay.serve("discord")
    assert await app.replay.sweep() == 0


async def test_console_jobs_and_other_platforms_are_not_replayed(make_app: Any) -> None:
    app, job = await _end_without_delivery(make_app)
    app.replay.serve("console")
    app.replay.serve("telegram")
    assert await app.replay.sweep() == 0
