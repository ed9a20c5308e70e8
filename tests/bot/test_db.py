"""Schema upgrades: one transaction under a lock, on SQLite and PostgreSQL.

Several processes may upgrade one database at once (each bot process auto-upgrades at
start); an upgrade that fails or is killed half-way must leave the schema it started from,
so that the next upgrade simply runs again.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import MetaData, Table, insert, inspect, select, text

from bot import db
from models import Base
from models.store import create_engine
from tests.scenario import console_env

HEAD = db.current_revision("sqlite+aiosqlite://")
ALL_TABLES = {table.name for table in Base.metadata.sorted_tables} | {"alembic_version"}
_NOW = datetime(2026, 12, 1, tzinfo=UTC)


async def _schema(url: str) -> tuple[set[str], str | None]:
    """The tables, and the revision the database says it is at (None: never upgraded)."""
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            tables = set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
            version = None
            if "alembic_version" in tables:
                version = await connection.scalar(text("SELECT version_num FROM alembic_version"))
            return tables, version
    finally:
        await engine.dispose()


async def _execute(url: str, statement: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def test_a_failing_revision_leaves_the_schema_it_started_from(database_url: str) -> None:
    # a table revision 0005 creates second: revisions 0001-0004 and 0005's first table run, then it fails
    await _execute(database_url, "CREATE TABLE negative_presets (id INTEGER)")
    with pytest.raises(Exception, match="negative_presets"):
        await asyncio.to_thread(db.upgrade, database_url)
    assert await _schema(database_url) == ({"negative_presets"}, None)

    await _execute(database_url, "DROP TABLE negative_presets")
    await asyncio.to_thread(db.upgrade, database_url)
    assert await _schema(database_url) == (ALL_TABLES, HEAD)


async def test_an_upgrade_keeps_rows_that_refer_to_a_table_it_copies(database_url: str) -> None:
    """Revision 0003 copies generations on SQLite (batch mode) and drops the old table;
    images and child generations that refer to it keep their rows and references."""
    await asyncio.to_thread(db.upgrade, database_url, "0002")
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            tables = await connection.run_sync(
                lambda c: {
                    n: Table(n, MetaData(), autoload_with=c) for n in ("users", "generations", "images")
                }
            )
            await connection.execute(
                insert(tables["users"]).values(
                    id=1, platform="console", platform_user_id="alice", display_name="", created_at=_NOW
                )
            )
            for job_id, parent in (("G1", None), ("G2", "G1")):
                await connection.execute(insert(tables["generations"]).values(_generation(job_id, parent)))
            await connection.execute(
                insert(tables["images"]).values(
                    id="I1",
                    generation_id="G1",
                    index=0,
                    path="x.png",
                    width=64,
                    height=64,
                    seed=1,
                    subseed=0,
                    infotext="a cat",
                    created_at=_NOW,
                )
            )
        await asyncio.to_thread(db.upgrade, database_url)
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT id, generation_id FROM images"))).all() == [
                ("I1", "G1")
            ]
            parents = await connection.execute(text("SELECT id, parent_id FROM generations ORDER BY id"))
            assert parents.all() == [("G1", None), ("G2", "G1")]
            assert (
                await connection.scalar(select(text("version_num")).select_from(text("alembic_version")))
                == HEAD
            )
    finally:
        await engine.dispose()


async def test_revision_0008_turns_reply_to_keys_into_a_route_and_columns(database_url: str) -> None:
    """Rows stored with a reply_to dict keep what it meant: the thread and forever keys
    become columns, the route is the user's platform and the job's chat, and console keys
    are dropped; downgrading puts the keys back."""
    await asyncio.to_thread(db.upgrade, database_url, "0007")
    engine = create_engine(database_url)
    old = {
        "G1": {"console": True},
        "G2": {"console": True, "thread": "G1"},
        "G3": {"cli": True, "forever": "G1", "thread": "G1"},
    }
    try:
        async with engine.begin() as connection:
            tables = await connection.run_sync(
                lambda c: {n: Table(n, MetaData(), autoload_with=c) for n in ("users", "generations")}
            )
            await connection.execute(
                insert(tables["users"]).values(
                    id=1, platform="telegram", platform_user_id="7", display_name="", created_at=_NOW
                )
            )
            for job_id, reply_to in old.items():
                row = {**_generation(job_id, None), "reply_to": reply_to, "chat_id": "-100"}
                await connection.execute(insert(tables["generations"]).values(row))
        await asyncio.to_thread(db.upgrade, database_url)
        async with engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT id, route, thread_key, forever_run, message_ref FROM generations ORDER BY id")
            )
            found = [(i, _json(route), thread, run, ref) for i, route, thread, run, ref in rows]
        route = {"platform": "telegram", "chat_id": "-100"}
        assert found == [
            ("G1", route, None, None, None),
            ("G2", route, "G1", None, None),
            ("G3", route, "G1", "G1", None),
        ]
        await asyncio.to_thread(_downgrade, database_url, "0007")
        async with engine.connect() as connection:
            rows = await connection.execute(text("SELECT id, reply_to FROM generations ORDER BY id"))
            assert [(i, _json(value)) for i, value in rows] == [
                ("G1", {}),
                ("G2", {"thread": "G1"}),
                ("G3", {"thread": "G1", "forever": "G1"}),
            ]
    finally:
        await engine.dispose()


def _json(value: object) -> object:
    return json.loads(value) if isinstance(value, str) else value


def _downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(db.alembic_config(url), revision)


def _generation(job_id: str, parent_id: str | None) -> dict:
    """A generations row as revision 0002 has them (every NOT NULL column)."""
    return dict(
        id=job_id,
        user_id=1,
        parent_id=parent_id,
        group_id=job_id,
        group_index=0,
        kind="txt2img",
        plan="draw",
        status="finished",
        params={},
        prompt="a cat",
        negative_prompt="",
        checkpoint="tiny",
        sampler_name="Euler a",
        seed=1,
        steps=4,
        width=64,
        height=64,
        batch_size=1,
        reply_to={},
        actor_roles=[],
        private=False,
        priority=0,
        attempts=1,
        created_at=_NOW,
    )


# real processes -----------------------------------------------------------------------------


def _upgrade_command() -> list[str]:
    return [sys.executable, "-m", "bot.cli", "db", "upgrade"]


def _url(tmp_path: Path, database: str | None) -> str:
    return database or f"sqlite+aiosqlite:///{tmp_path / 'data' / 'atelier.db'}"


@pytest.mark.slow
def test_five_upgrades_at_once_on_a_fresh_database_all_succeed(tmp_path: Path, process_database) -> None:
    env = console_env(tmp_path, database_url=process_database)
    runs = [
        subprocess.Popen(
            _upgrade_command(),
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    for run in runs:
        out, err = run.communicate(timeout=180)
        assert run.returncode == 0, err
        assert f"database at revision {HEAD}" in out
    assert asyncio.run(_schema(_url(tmp_path, process_database))) == (ALL_TABLES, HEAD)


@pytest.mark.slow
def test_an_upgrade_killed_half_way_on_sqlite_leaves_a_database_that_upgrades(tmp_path: Path) -> None:
    """SIGKILL at several moments after the upgrade opened the database: each time the
    database is as before (never upgraded) or at the head, never in between, and the next
    upgrade succeeds."""
    seen = []
    for n, delay in enumerate((0.0, 0.02, 0.05, 0.1, 0.2, 0.4)):
        folder = tmp_path / str(n)
        folder.mkdir()
        env = console_env(folder)
        path = folder / "data" / "atelier.db"
        run = subprocess.Popen(_upgrade_command(), env=env, cwd=folder, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not path.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        url = _url(folder, None)
        tables, version = asyncio.run(_schema(url))
        assert (tables, version) in ((set(), None), (ALL_TABLES, HEAD)), (delay, tables, version)
        seen.append(version)
        done = subprocess.run(
            _upgrade_command(), env=env, cwd=folder, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert asyncio.run(_schema(url)) == (ALL_TABLES, HEAD)
    assert None in seen  # at least one kill landed before the upgrade committed


async def test_job_rows_carry_only_the_indexes_their_lookups_use(database_url: str) -> None:
    """Each status change of a job writes an entry in every index of ``generations``:
    thread_key and forever_run, never looked up, have none, and parent_id's holds only
    the rows that have a parent (revision 0012; downgraded, the old ones come back)."""

    async def indexes() -> dict[str, tuple[list[str], str | None]]:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as connection:
                found = await connection.run_sync(lambda c: inspect(c).get_indexes("generations"))
        finally:
            await engine.dispose()
        where = {"postgresql": "postgresql_where", "sqlite": "sqlite_where"}
        return {
            index["name"]: (
                index["column_names"],
                next(
                    (str(v) for k, v in index.get("dialect_options", {}).items() if k in where.values()), None
                ),
            )
            for index in found
        }

    await asyncio.to_thread(db.upgrade, database_url)
    now = await indexes()
    assert "ix_generations_thread_key" not in now and "ix_generations_forever_run" not in now
    columns, predicate = now["ix_generations_parent_id"]
    assert columns == ["parent_id"] and predicate is not None
    assert "parent_id is not null" in predicate.lower()
    assert now["ix_generations_status_created"] == (["status", "created_at"], None)

    await asyncio.to_thread(_downgrade_to, database_url, "0011")
    before = await indexes()
    assert before["ix_generations_thread_key"] == (["thread_key"], None)
    assert before["ix_generations_forever_run"] == (["forever_run"], None)
    assert before["ix_generations_parent_id"] == (["parent_id"], None)
    await asyncio.to_thread(db.upgrade, database_url)
    assert await indexes() == now


def _downgrade_to(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(db.alembic_config(url), revision)
