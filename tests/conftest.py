"""Shared fixtures: settings in a temp dir, SQLite and PostgreSQL stores, one tiny engine."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports transformers

import asyncio
import atexit
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.settings import Settings, parse_settings

POSTGRES_URL = os.environ.get("ATELIER_TEST_POSTGRES_URL", "")


def fuzz_examples(full: int) -> int:
    """Cases for a long fuzz test: all ``full`` of them under ``ATELIER_FUZZ=full`` (``make
    fuzz``), a tenth (at least 300) in the everyday suite, which must stay quick."""
    return full if os.environ.get("ATELIER_FUZZ") == "full" else max(300, full // 10)


BACKENDS = ["sqlite", "postgres"]


def pytest_configure(config: pytest.Config) -> None:
    """Where pytest-xdist runs the tests in several processes (``scripts/test``), each has
    one torch thread, and so have the processes its tests start: two workers with two
    threads each would fight over two cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def make_settings(tmp_path: Path, database_url: str = "", **tables: dict[str, Any]) -> Settings:
    data: dict[str, Any] = {
        "bot": {"data_dir": str(tmp_path / "data")},
        "database": {"url": database_url},
        # warm_up off: an App in a test draws what the test asks for and nothing else
        "engine": {"models_dir": str(tmp_path / "models"), "device": "cpu", "warm_up": False},
        "defaults": {"steps": 4, "width": 64, "height": 64},
    }
    for table, values in tables.items():
        data.setdefault(table, {}).update(values)
    return parse_settings(data)


class _Databases:
    """Fresh PostgreSQL databases made ahead and dropped behind, on a thread of its own:
    a test waits neither for CREATE DATABASE (0.2 s) nor for DROP DATABASE (0.1 s), which
    the server runs while the tests go on. ``close`` (at exit) drops what is left."""

    AHEAD = 2  # databases kept ready

    def __init__(self, base: str) -> None:
        self.base = base
        self.ready: queue.Queue[str | None] = queue.Queue()  # None: the thread failed
        self.dropping: queue.Queue[str] = queue.Queue()
        self.wake = threading.Event()
        self.asked = 0
        self.closing = False
        self.failed: BaseException | None = None
        self.connection: Any = None
        self.thread = threading.Thread(target=self._run, name="test databases", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def take(self) -> str:
        self.asked += 1
        self.wake.set()
        name = self.ready.get(timeout=120)
        if name is None:
            self.ready.put(None)  # for the next test that asks
            raise RuntimeError("could not make a PostgreSQL database for the test") from self.failed
        return name

    def drop(self, name: str) -> None:
        self.dropping.put(name)
        self.wake.set()

    def close(self) -> None:
        self.closing = True
        self.wake.set()
        self.thread.join(timeout=60)

    def _run(self) -> None:
        made = 0
        try:
            while True:
                self.wake.clear()
                try:
                    self._execute(f'DROP DATABASE IF EXISTS "{self.dropping.get_nowait()}" WITH (FORCE)')
                    continue
                except queue.Empty:
                    pass
                if self.closing:
                    while not self.ready.empty():
                        if (name := self.ready.get_nowait()) is not None:
                            self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    return
                if made < self.asked + self.AHEAD:
                    name = f"atelier_test_{uuid.uuid4().hex[:12]}"
                    self._execute(f'CREATE DATABASE "{name}"')
                    self.ready.put(name)
                    made += 1
                    continue
                self.wake.wait()
        except BaseException as exc:  # every test that asks is told, none left waiting
            self.failed = exc
            self.ready.put(None)

    def _execute(self, statement: str) -> None:
        """Run ``statement`` on the thread's connection, connecting again once when a test
        dropped it (as a server restart would)."""
        import psycopg

        for attempt in (1, 2):
            try:
                if self.connection is None or self.connection.closed:
                    self.connection = psycopg.connect(self.base, autocommit=True)
                self.connection.execute(statement)
                return
            except psycopg.OperationalError:
                self.connection = None
                if attempt == 2:
                    raise


_databases: _Databases | None = None


async def _fresh_postgres_database() -> str:
    """A new, empty database per test: isolation without cleaning up after others."""
    global _databases
    import asyncpg

    base = POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://")
    if _databases is None:
        try:  # the first: is the server there, and does it let us in?
            conn = await asyncpg.connect(base)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # a server that wants a password, or has no such database, is no failure of the
            # code under test: say what to set and skip (under CI it must work)
            if os.environ.get("CI") == "true":
                raise
            where = POSTGRES_URL.rsplit("@", 1)[-1]
            pytest.skip(
                f"PostgreSQL at {where} refused the tests ({type(exc).__name__}: {exc}); set "
                "ATELIER_TEST_POSTGRES_URL=postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE to run its tests"
            )
        await conn.close()
        _databases = _Databases(base)
    name = await asyncio.to_thread(_databases.take)
    return POSTGRES_URL.rsplit("/", 1)[0] + "/" + name


async def terminate_other_connections(url: str) -> int:
    """Drop every other connection to ``url``'s PostgreSQL database, as a restart of the
    server would; returns how many were dropped."""
    import asyncpg

    killer = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return await killer.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await killer.close()


async def wait_for_lock_waiters(url: str, count: int) -> None:
    """Wait until ``count`` connections to ``url``'s PostgreSQL database wait for a lock
    (another transaction's rows), at most two seconds."""
    import asyncpg

    watcher = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    waiting = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    try:
        for _ in range(200):
            if await watcher.fetchval(waiting) == count:
                return
            await asyncio.sleep(0.01)
        assert await watcher.fetchval(waiting) == count
    finally:
        await watcher.close()


async def _drop_postgres_database(url: str) -> None:
    """Drop a database of ``_fresh_postgres_database`` (behind the tests, on the thread
    that made it)."""
    assert _databases is not None
    _databases.drop(url.rsplit("/", 1)[1])


@pytest.fixture(params=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The same test on SQLite and on PostgreSQL (required under CI, else skipped if absent)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'atelier.db'}"
        return
    if not POSTGRES_URL:
        if os.environ.get("CI") == "true":
            pytest.fail("ATELIER_TEST_POSTGRES_URL is not set under CI")
        pytest.skip("PostgreSQL not configured (ATELIER_TEST_POSTGRES_URL)")
    url = await _fresh_postgres_database()
    try:
        yield url
    finally:
        await _drop_postgres_database(url)


@pytest.fixture(params=BACKENDS)
def process_database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """For tests that run bot processes: None (SQLite in the data dir) or a fresh
    PostgreSQL database, dropped afterwards."""
    if request.param == "sqlite":
        yield None
        return
    if not POSTGRES_URL:
        if os.environ.get("CI") == "true":
            pytest.fail("ATELIER_TEST_POSTGRES_URL is not set under CI")
        pytest.skip("PostgreSQL not configured (ATELIER_TEST_POSTGRES_URL)")
    url = asyncio.run(_fresh_postgres_database())
    try:
        yield url
    finally:
        asyncio.run(_drop_postgres_database(url))


@pytest.fixture(scope="session")
def tiny_library() -> Any:
    from pipeline.checkpoints import CheckpointLibrary

    return CheckpointLibrary(None)


@pytest.fixture(scope="session")
def tiny_engine(tiny_library: Any) -> Any:
    from pipeline.engine import Engine

    return Engine(tiny_library, device="cpu")


@pytest.fixture
async def make_app(
    tmp_path: Path, database_url: str, tiny_library: Any, tiny_engine: Any
) -> AsyncIterator[Callable[..., Any]]:
    """Build and start Apps on this test's database; all are stopped at the end."""
    from bot.app import build_app

    apps = []

    async def factory(
        *,
        extra_plugins: tuple[Any, ...] = (),
        start: bool = True,
        models_dir: Path | None = None,
        **tables: dict[str, Any],
    ) -> Any:
        """``models_dir``: a library (and engine) of its own over that folder instead of the
        shared tiny one."""
        settings = make_settings(tmp_path, database_url, **tables)
        library, engine = tiny_library, tiny_engine
        if models_dir is not None:
            from pipeline.checkpoints import CheckpointLibrary
            from pipeline.engine import Engine

            library = CheckpointLibrary(models_dir)
            engine = Engine(library, device="cpu")
        app = build_app(settings, engines=[engine], library=library, plugins=extra_plugins)
        apps.append(app)
        if start:
            await app.start()
        return app

    yield factory
    for app in apps:
        await app.stop(wait=False)


async def expire_leases(app: Any) -> None:
    """``app`` hangs past its lease: it renews nothing any more, and its leases are in the
    past, as they would be ``lease_seconds`` later."""
    from datetime import timedelta

    from sqlalchemy import update

    from models.base import utcnow
    from models.tables import Generation

    await app.heartbeat.stop()
    async with app.store.session() as session:
        await session.execute(
            update(Generation)
            .where(Generation.owner == app.owner)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


async def crash(app: Any) -> None:
    """What other processes see once ``app``'s process died and its lease ran out: nothing
    of it runs or renews any more."""
    await app.queue.stop()
    await expire_leases(app)


class EventLog:
    """Collects bus events; ``wait_for`` awaits a condition on them with a timeout."""

    def __init__(self, app: Any) -> None:
        self.events: list[Any] = []
        self._changed = asyncio.Event()
        app.bus.subscribe(self._on_event)

    def _on_event(self, event: Any) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, kind: str, generation_id: str | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if e.kind == kind and (generation_id is None or e.generation_id == generation_id)
        ]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 60) -> None:
        async def loop() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)


async def png(app: Any, image: Any) -> bytes:
    """A finished image's PNG bytes, as adapters get them: through the App's image store."""
    return await app.images.read(image.id)


async def opened(app: Any, image: Any) -> Any:
    """A finished image as a PIL image (decoded from its stored bytes)."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(await png(app, image)))
