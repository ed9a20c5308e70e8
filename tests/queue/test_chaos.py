"""The shared queue under a crash: two `atelier worker` processes and the bot's processes on
PostgreSQL; one worker is killed (SIGKILL) in the middle of a job. Every job still
finishes exactly once, every user gets each result once, quotas bill each image once,
and a worker stopped with SIGTERM drains and exits cleanly."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from models.quota_store import QuotaStore
from models.store import Store
from plugins.quotas import period_of
from tests.conftest import POSTGRES_URL, _drop_postgres_database, _fresh_postgres_database
from tests.scenario import ConsoleSession, console_env, jobs_of

CONFIG = """
[queue]
backend = "procrastinate"
lease_seconds = 3
max_batch = 1
[plugins.quotas]
per_scope = false
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not POSTGRES_URL, reason="the shared queue needs PostgreSQL (ATELIER_TEST_POSTGRES_URL)"
    ),
]


class Worker:
    """An `atelier worker` process with a folder (and images folder) of its own, as on
    another host."""

    def __init__(self, folder: Path, database_url: str) -> None:
        folder.mkdir(parents=True)
        env = {**console_env(folder, CONFIG, database_url), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "worker"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=folder,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_line(self, start: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if line.startswith(start):
                return line
        raise AssertionError(f"no line {start!r}; output:\n{''.join(self.output)}")

    @property
    def owner(self) -> str:
        return next(line.split()[1] for line in self.output if line.startswith("worker "))


async def _rows(
    url: str,
) -> tuple[dict[str, tuple[str, int, int, str | None]], dict[str, tuple[int, int, int]]]:
    store = Store.from_url(url)
    try:
        rows = {}
        for user in ("alice", "bob"):
            found = await store.find_user("console", user)
            assert found is not None
            for record in await store.list_for_user(found.id, limit=50):
                rows[record.id] = (record.status, record.attempts, len(record.images), record.owner)
        period = period_of("daily", datetime.now(UTC))[0]
        quotas = QuotaStore(store)
        usage = {}
        for user in ("alice", "bob"):
            used = await quotas.usage(f"console:{user}", "global", period)
            usage[user] = (used.images_used, used.images_reserved, used.jobs_open)
        return rows, usage
    finally:
        await store.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    url = asyncio.run(_fresh_postgres_database())
    try:
        yield url
    finally:
        asyncio.run(_drop_postgres_database(url))


def test_a_killed_worker_loses_no_job_and_bills_none_twice(tmp_path: Path, postgres_url: str) -> None:
    url = postgres_url
    workers = [Worker(tmp_path / f"worker-{n}", url) for n in (1, 2)]
    consoles: list[ConsoleSession] = []
    try:
        for worker in workers:
            worker.wait_line("worker ")
        for name in ("alice", "bob"):
            folder = tmp_path / f"bot-{name}"
            folder.mkdir()
            consoles.append(ConsoleSession(folder, user=name, env=console_env(folder, CONFIG, url)))
        jobs: dict[str, list[str]] = {}
        for console, name in zip(consoles, ("alice", "bob"), strict=True):
            # Alice's first job is long: it is still being drawn when its worker is killed,
            # however late its first step is heard on a busy machine
            jobs[name] = [
                jobs_of(console.command(f"/draw a lighthouse at night --seed {n} "
                                        + ("--steps 150 --size 256x256" if (name, n) == ("alice", 0)
                                           else "--steps 24 --size 192x192"),
                                        timeout=180))[0]
                for n in range(3)
            ]  # fmt: skip
        # kill whichever worker is drawing Alice's first job, in the middle of it
        first = jobs["alice"][0]
        consoles[0].wait_for(lambda e: e.get("id") == first and e["event"] == "progress", timeout=180)
        status, _, _, victim_owner = asyncio.run(_rows(url))[0][first]
        assert status == "running"
        victim = next(w for w in workers if w.owner == victim_owner)
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait()
        survivor = next(w for w in workers if w is not victim)

        for console, name in zip(consoles, ("alice", "bob"), strict=True):
            for job in jobs[name]:
                event = console.finished(job, timeout=300)
                assert event["event"] == "finished", event
        time.sleep(1)  # anything sent twice would have arrived by now
        for console, name in zip(consoles, ("alice", "bob"), strict=True):
            finished = [e["id"] for e in console.events if e["event"] == "finished"]
            assert sorted(finished) == sorted(jobs[name])  # each result once, only one's own

        rows, usage = asyncio.run(_rows(url))
        all_jobs = jobs["alice"] + jobs["bob"]
        assert {job: rows[job][0::2][:2] for job in all_jobs} == {job: ("finished", 1) for job in all_jobs}
        assert rows[first][1] == 2  # started on the killed worker, then again on the other
        assert usage == {"alice": (3, 0, 0), "bob": (3, 0, 0)}

        survivor.process.send_signal(signal.SIGTERM)  # drains: nothing runs, it exits at once
        assert survivor.process.wait(timeout=60) == 0, "".join(survivor.output)
        assert any(line.startswith("worker draining") for line in survivor.output)
        for console in consoles:
            console.close(timeout=120)
    finally:
        for process in [w.process for w in workers] + [c.process for c in consoles]:
            if process.poll() is None:
                process.kill()
                process.wait()
