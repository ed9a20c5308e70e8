"""SQLite run in the event loop's thread: what the async engine sees, and a busy database
waited for without blocking the loop."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from models import sqlite_inline
from models.store import create_engine, sqlite_pragmas


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "inline.db"


@pytest.fixture
async def engine(path: Path):
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE jobs (id INTEGER PRIMARY KEY, name TEXT)"))
    yield engine
    await engine.dispose()


async def test_the_engine_uses_the_inline_driver_with_the_usual_settings(engine) -> None:
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert isinstance(raw, sqlite_inline.Connection)
        assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        assert (await conn.execute(text("PRAGMA synchronous"))).scalar() == 1  # NORMAL
        assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
        # SQLite's own handler would block the loop: ours waits, up to the timeout asked for
        assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == 0
        assert raw.busy_timeout == 30.0


async def test_rows_round_trip_and_a_rollback_takes_a_write_back(engine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO jobs (name) VALUES (:n)"), [{"n": "a"}, {"n": "b"}])
    with pytest.raises(RuntimeError):
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO jobs (name) VALUES ('c')"))
            raise RuntimeError("undo")
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT id, name FROM jobs ORDER BY id"))).all()
        inserted = await conn.execute(text("INSERT INTO jobs (name) VALUES ('d') RETURNING id"))
        assert inserted.scalar() == 3
        await conn.rollback()
    assert [tuple(row) for row in rows] == [(1, "a"), (2, "b")]


async def test_a_writer_waits_for_another_ones_lock_while_the_loop_runs_on(engine) -> None:
    """One task holds the write lock across an await; another task's write waits (the
    loop keeps running: a ticker ticks meanwhile) and goes through once the first commits."""
    order: list[str] = []
    ticks = 0
    holding = asyncio.Event()

    async def holder() -> None:
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO jobs (name) VALUES ('first')"))
            holding.set()
            await asyncio.sleep(0.3)
            order.append("first commits")

    async def waiter() -> None:
        await holding.wait()
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO jobs (name) VALUES ('second')"))
            order.append("second wrote")

    async def ticker() -> None:
        nonlocal ticks
        while len(order) < 2:
            ticks += 1
            await asyncio.sleep(0.01)

    await asyncio.wait_for(asyncio.gather(holder(), waiter(), ticker()), 10)
    assert order == ["first commits", "second wrote"]
    assert ticks >= 10  # the loop was never blocked for the 0.3 s the lock was held
    async with engine.connect() as conn:
        names = (await conn.execute(text("SELECT name FROM jobs ORDER BY id"))).scalars().all()
    assert names == ["first", "second"]


async def test_a_write_still_busy_after_the_busy_timeout_fails_as_sqlite_would(engine, path: Path) -> None:
    other = sqlite3.connect(path, isolation_level=None)  # another process, as it were
    other.execute("BEGIN IMMEDIATE")  # holds the write lock
    try:
        async with engine.connect() as conn:
            await conn.execute(text("PRAGMA busy_timeout=200"))
            started = time.monotonic()
            with pytest.raises(OperationalError, match="database is locked"):
                await conn.execute(text("INSERT INTO jobs (name) VALUES ('x')"))
            waited = time.monotonic() - started
            assert 0.2 <= waited < 15  # the 200 ms asked for, not the engine's 30 s
    finally:
        other.rollback()
        other.close()


async def test_a_timeout_given_to_connect_is_the_time_a_busy_write_waits(path: Path) -> None:
    """``?timeout=`` in a URL reaches ``connect``: it becomes our wait, SQLite's stays 0."""
    connection = await sqlite_inline.connect(str(path), timeout=7)
    try:
        assert connection.busy_timeout == 7.0
        assert connection._conn.execute("PRAGMA busy_timeout").fetchone() == (0,)
    finally:
        await connection.close()


async def test_a_busy_write_goes_through_when_the_other_process_commits(engine, path: Path) -> None:
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    sqlite_pragmas(other)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO jobs (name) VALUES ('theirs')")
    asyncio.get_running_loop().call_later(0.2, other.execute, "COMMIT")
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO jobs (name) VALUES ('ours')"))
    other.close()
    async with engine.connect() as conn:
        names = (await conn.execute(text("SELECT name FROM jobs ORDER BY id"))).scalars().all()
    assert names == ["theirs", "ours"]


async def test_errors_other_than_busy_are_raised_at_once(engine) -> None:
    async with engine.connect() as conn:
        started = time.monotonic()
        with pytest.raises(OperationalError, match="no such table"):
            await conn.execute(text("SELECT * FROM missing"))
        assert time.monotonic() - started < 15  # no busy wait (the engine's is 30 s)


def _log_pages(path: Path) -> int:
    """The pages in the database's write-ahead log now (a passive checkpoint's count)."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    finally:
        connection.close()


async def _commit_rows(engine, count: int) -> None:
    for _ in range(count):
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO jobs (name) VALUES (:n)"), {"n": "x" * 2000})


async def test_checkpoints_run_on_a_thread_and_a_quiet_database_starts_its_log_again(
    engine, path: Path, monkeypatch
) -> None:
    """A checkpoint syncs the database file: it never runs inside a commit on the loop,
    but every ``CHECKPOINT_EVERY`` commits on a thread; once the database is quiet for
    ``IDLE_SECONDS`` the log starts again from the top."""
    monkeypatch.setattr(sqlite_inline, "IDLE_SECONDS", 0.2)
    async with engine.connect() as conn:
        assert (await conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar() == 0
    before = sqlite_inline.CHECKPOINTS.done.get(str(path), 0)
    await _commit_rows(engine, 2 * sqlite_inline.CHECKPOINT_EVERY)
    await sqlite_inline.CHECKPOINTS.wait()
    assert sqlite_inline.CHECKPOINTS.done.get(str(path), 0) > before
    await asyncio.sleep(0.6)  # quiet
    await sqlite_inline.CHECKPOINTS.wait()
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO jobs (name) VALUES ('last')"))
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM jobs"))).scalar() == 201
    # the log started again from the top: it holds the last commit's pages, not 200 commits'
    assert 0 < _log_pages(path) <= 4


async def test_commits_on_every_connection_count_towards_the_next_checkpoint(engine, path: Path) -> None:
    """Two connections' commits, interleaved, each fewer than ``CHECKPOINT_EVERY``, still
    make a checkpoint: they are counted per database file."""
    before = sqlite_inline.CHECKPOINTS.done.get(str(path), 0)
    half = sqlite_inline.CHECKPOINT_EVERY // 2 + 1
    async with engine.connect() as first, engine.connect() as second:
        for _ in range(half):
            for conn in (first, second):
                await conn.execute(text("INSERT INTO jobs (name) VALUES ('x')"))
                await conn.commit()
    await sqlite_inline.CHECKPOINTS.wait()
    assert sqlite_inline.CHECKPOINTS.done.get(str(path), 0) == before + 1


async def test_a_checkpoint_under_writes_keeps_no_writer_waiting(engine, path: Path) -> None:
    """While a reader reads an older snapshot, a checkpoint copies what was committed and
    returns, and a writer that will not wait at all (a busy statement fails at once) writes
    all the while: the checkpoint never takes the write lock from it."""
    await _commit_rows(engine, 20)
    reader = sqlite3.connect(path, isolation_level=None)
    writer = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM jobs").fetchone() == (20,)  # holds its snapshot
        await _commit_rows(engine, 5)
        checkpoint = threading.Thread(target=sqlite_inline._checkpoint, args=(str(path), False))
        checkpoint.start()
        for index in range(30):
            writer.execute("INSERT INTO jobs (name) VALUES (?)", (f"during {index}",))
            time.sleep(0.01)
        checkpoint.join()
        assert reader.execute("SELECT count(*) FROM jobs").fetchone() == (20,)
    finally:
        reader.close()
        writer.close()
    with contextlib.closing(sqlite3.connect(path)) as look:
        copied = look.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert copied[0] == 0 and copied[1] > 25  # the log was not started again: a reader was there


async def test_a_log_past_its_bound_starts_again_while_writes_go_on(engine, path: Path, monkeypatch) -> None:
    """A database never quiet still has its log started again once it is
    ``LOG_PAGES_BOUND`` pages long, by the checkpoint every ``CHECKPOINT_EVERY`` commits."""
    monkeypatch.setattr(sqlite_inline, "IDLE_SECONDS", 3600.0)  # never quiet here
    monkeypatch.setattr(sqlite_inline, "LOG_PAGES_BOUND", 50)
    await _commit_rows(engine, sqlite_inline.CHECKPOINT_EVERY)
    await sqlite_inline.CHECKPOINTS.wait()
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO jobs (name) VALUES ('last')"))
    assert 0 < _log_pages(path) <= 4
