"""Processes sharing one database: owner ids, and real bot processes that start together,
serve side by side, hang and get killed, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import selectinload

from bot.leases import new_owner_id, owner_gone
from models.store import Store
from models.tables import Generation
from tests.scenario import ConsoleSession, Event, console_env, jobs_of

LEASE = 4  # seconds; the heartbeat renews every third of it
CONFIG = f"[queue]\nlease_seconds = {LEASE}\n"


def test_only_an_owner_that_exited_in_this_process_space_is_gone() -> None:
    host, _pid, space, token = new_owner_id().rsplit(":", 3)
    if space == "-":
        pytest.skip("no /proc: only leases tell whether an owner is gone")
    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    assert owner_gone(f"{host}:{exited.stdout.strip()}:{space}:{token}")
    assert not owner_gone(f"{host}:{os.getpid()}:{space}:{token}")  # this process (another App in it)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        try:
            assert not owner_gone(f"{host}:{alive.pid}:{space}:{token}")
        finally:
            alive.kill()
    # another machine or container: its process ids mean nothing here, only its lease counts
    assert not owner_gone(f"{host}:{exited.stdout.strip()}:elsewhere:{token}")
    assert not owner_gone("an id from a newer version")


# real processes ---------------------------------------------------------------------------------


class Row(NamedTuple):
    status: str
    attempts: int
    images: int
    owner_pid: int | None


def _rows(tmp_path: Path, database: str | None) -> dict[str, Row]:
    """Every stored job, with the process id its owner id names."""
    url = database or f"sqlite+aiosqlite:///{tmp_path / 'data' / 'atelier.db'}"

    async def read() -> dict[str, Row]:
        store = Store.from_url(url)
        try:
            async with store.session() as session:
                rows = await session.scalars(select(Generation).options(selectinload(Generation.images)))
                return {
                    r.id: Row(
                        r.status, r.attempts, len(r.images), int(r.owner.split(":")[1]) if r.owner else None
                    )
                    for r in rows
                }
        finally:
            await store.close()

    return asyncio.run(read())


def _in_transaction(tmp_path: Path, database: str | None) -> bool:
    """Whether some process holds a write transaction (SQLite) or has one open (PostgreSQL)."""
    if database is None:
        connection = sqlite3.connect(tmp_path / "data" / "atelier.db", timeout=0.2)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.rollback()
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            connection.close()

    async def busy() -> bool:
        store = Store.from_url(database)
        try:
            async with store.session() as session:
                count = await session.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND state IN ('active', 'idle in transaction')"
                    )
                )
                return bool(count)
        finally:
            await store.close()

    return asyncio.run(busy())


def _hang(session: ConsoleSession, tmp_path: Path, database: str | None) -> None:
    """SIGSTOP a bot process between two of its database transactions. A process stopped in
    the middle of one keeps its locks, which no lease can take back (SQLite's write lock
    stops every writer); what leases cover is a process that hangs while drawing."""
    for _ in range(200):
        os.kill(session.process.pid, signal.SIGSTOP)
        if not _in_transaction(tmp_path, database):
            return
        os.kill(session.process.pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("the database never went quiet")


def _files(tmp_path: Path) -> tuple[int, list[Path]]:
    """How many PNGs were written, and any temporary file left behind."""
    images = tmp_path / "data" / "images"
    return len(list(images.rglob("*.png"))), list(images.rglob("*.partial"))


def _session(tmp_path: Path, user: str, database: str | None) -> ConsoleSession:
    # one torch thread per process: several processes share few cores
    env = {**console_env(tmp_path, CONFIG, database), "OMP_NUM_THREADS": "1"}
    return ConsoleSession(tmp_path, user=user, env=env)


def _job_ids(events: list[Event], kind: str | None = None) -> list[str]:
    """Ids of the job events (``kind`` only) a console printed, in order."""
    return [e["id"] for e in events if "id" in e and (kind is None or e["event"] == kind)]


def _stop(*sessions: ConsoleSession | None) -> None:
    for session in sessions:
        if session is not None and session.process.poll() is None:
            session.process.kill()
            session.process.wait()


@pytest.mark.slow
def test_five_processes_start_together_on_a_fresh_database(tmp_path: Path, process_database) -> None:
    sessions = [_session(tmp_path, f"user{n}", process_database) for n in range(5)]
    try:
        for n, session in enumerate(sessions):
            session.send(f"/draw a lantern number {n} --steps 2 --seed {n}")
        printed = [session.close(timeout=600) for session in sessions]
    finally:
        _stop(*sessions)
    jobs = []
    for events in printed:
        (job_id,) = jobs_of([e for e in events if e["event"] == "reply"])
        assert set(_job_ids(events)) == {job_id}  # its own job only, and it finished once
        assert _job_ids(events, "finished") == [job_id]
        jobs.append(job_id)
    rows = _rows(tmp_path, process_database)
    assert {job: row[:3] for job, row in rows.items()} == {job: ("finished", 1, 1) for job in jobs}
    assert _files(tmp_path) == (5, [])


@pytest.mark.slow
def test_processes_sharing_a_database_run_each_job_once(tmp_path: Path, process_database) -> None:
    alice = _session(tmp_path, "alice", process_database)
    bob = dave = None
    try:
        # 1. Bob's process starts while Alice's serves: it takes none of her jobs, and in
        #    more than a lease her heartbeat keeps them.
        # long enough to still run when Bob has started and a lease and a half has passed,
        # on a fast machine too (it is cancelled once that is checked)
        (slow,) = jobs_of(alice.command("/draw a slow comet --steps 150 --size 768x768", timeout=300))
        queued = [jobs_of(alice.command(f"/draw a lighthouse --steps 2 --seed {n}"))[0] for n in range(3)]
        alice.wait_for(lambda e: e["event"] == "progress" and e["id"] == slow, timeout=300)
        bob = _session(tmp_path, "bob", process_database)
        (boat,) = jobs_of(bob.command("/draw a boat --steps 2", timeout=300))  # replies after its start
        time.sleep(LEASE * 1.5)
        rows = _rows(tmp_path, process_database)
        assert rows[slow][:2] == ("running", 1) and rows[slow].owner_pid == alice.process.pid
        assert all(rows[j][:2] == ("queued", 0) and rows[j].owner_pid == alice.process.pid for j in queued)
        alice.command(f"/cancel {slow}")
        for job in queued:
            alice.finished(job)
        bob.finished(boat)

        # 2. Alice's process hangs past its lease while drawing: Bob's takes over her jobs.
        #    When she resumes and ends the drawing, it is no longer hers: no result, no file.
        #    (This drawing and the one killed below are 256x256: the device runs on while the
        #    test reads the first step, and at 64x64 it had sometimes finished all 20.)
        (hung,) = jobs_of(alice.command("/draw a windmill --steps 30 --seed 7 --size 256x256"))
        (waiting,) = jobs_of(alice.command("/draw a mill pond --steps 2 --seed 8"))
        alice.wait_for(lambda e: e["event"] == "progress" and e["id"] == hung)
        _hang(alice, tmp_path, process_database)
        try:
            bob.finished(hung, timeout=300)
            bob.finished(waiting, timeout=300)
        finally:
            os.kill(alice.process.pid, signal.SIGCONT)
        alice.wait_for(lambda e: e["event"] == "progress" and e["id"] == hung and e["step"] == 30)
        bob.close()

        # 3. Alice's process is killed while drawing: the next start takes over and runs
        #    each of her open jobs once.
        (killed,) = jobs_of(alice.command("/draw a tower --steps 30 --seed 9 --size 256x256"))
        left = [jobs_of(alice.command(f"/draw a bridge --steps 2 --seed {n}"))[0] for n in (10, 11)]
        alice.wait_for(lambda e: e["event"] == "progress" and e["id"] == killed)
        alice.process.kill()
        alice.process.wait()
        dave = _session(tmp_path, "dave", process_database)
        dave.close(timeout=600)
    finally:
        _stop(alice, bob, dave)

    assert not [e for e in bob.events if e.get("key") == "console.recovered"]
    (recovered,) = [e for e in dave.events if e.get("key") == "console.recovered"]
    assert recovered["text"].startswith("3 unfinished job(s)")
    # each result reached one console, once: its user's, or the one that took the job over
    assert sorted(_job_ids(alice.events, "finished")) == sorted(queued)
    assert sorted(_job_ids(bob.events, "finished")) == sorted([boat, hung, waiting])
    assert sorted(_job_ids(dave.events, "finished")) == sorted([killed, *left])
    assert not {slow, *queued} & set(_job_ids(bob.events))

    rows = _rows(tmp_path, process_database)
    assert rows[slow][:3] == ("cancelled", 1, 0)
    for job in (*queued, boat, waiting, *left):
        assert rows[job][:3] == ("finished", 1, 1), job
    for job in (hung, killed):  # one interrupted attempt, then one run to the end
        assert rows[job][:3] == ("finished", 2, 1), job
    assert rows[hung].owner_pid == bob.process.pid and rows[killed].owner_pid == dave.process.pid
    assert _files(tmp_path) == (sum(row.images for row in rows.values()), [])
