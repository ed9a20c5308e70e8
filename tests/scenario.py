"""Console scenarios: a real ``atelier console --json`` process driven line by line.

What a user types goes to stdin; every reply and job event comes back as a JSON object.
``ConsoleSession`` lets a scenario read the ids of earlier results before typing the next
command (pressing a button is typing its action: ``/reroll <id>``).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Event = dict[str, Any]
ROOT = Path(__file__).resolve().parents[1]


def run_bare(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter from the checkout with a bare environment (no
    ATELIER_* variables, no tokens; ``env`` adds to it); its stdout. The test fails,
    showing stderr, if the code does."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def console_env(tmp_path: Path, config: str = "", database_url: str | None = None) -> dict[str, str]:
    """Environment for a console process: a config in ``tmp_path`` (``config`` is extra TOML
    appended after the [bot] and [engine] tables), offline, on SQLite unless told otherwise.
    No warm-up: a scenario's process draws what the scenario asks for and nothing else."""
    path = tmp_path / "config.toml"
    if not path.exists():
        path.write_text(
            f'[bot]\ndata_dir = "{tmp_path / "data"}"\n'
            f'[engine]\ndevice = "cpu"\nwarm_up = false\nmodels_dir = "{tmp_path / "models"}"\n'
            f"[defaults]\nsteps = 3\nwidth = 64\nheight = 64\n{config}",
            encoding="utf-8",
        )
    env = {**os.environ, "ATELIER_CONFIG": str(path), "HF_HUB_OFFLINE": "1"}
    env.pop("ATELIER_DATABASE_URL", None)
    if database_url:
        env["ATELIER_DATABASE_URL"] = database_url
    return env


class ConsoleSession:
    """``with ConsoleSession(tmp_path, user="alice") as s: s.send("/draw a cat"); s.wait_for(...)``."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        user: str = "alice",
        locale: str = "en",
        config: str = "",
        database_url: str | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        args = [sys.executable, "-m", "bot.cli", "console", "--json", "--user", user, "--locale", locale]
        self.process = subprocess.Popen(
            [*args, *extra_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=env or console_env(tmp_path, config, database_url),
            cwd=tmp_path,
        )
        self.events: list[Event] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def _pump(self, timeout: float) -> bool:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            return True
        if line is None:
            return False
        if line.startswith("{"):
            self.events.append(json.loads(line))
        return True

    def wait_for(self, predicate: Callable[[Event], bool], *, timeout: float = 120, start: int = 0) -> Event:
        """The first event (from index ``start``) matching ``predicate``, reading as needed."""
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = max(seen, len(self.events))
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching event; got {self.events[start:]}\n{self.stderr_text()}")
            if not self._pump(0.2) and self._lines.empty():
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                raise AssertionError(f"console exited; events {self.events[start:]}\n{self.stderr_text()}")

    def command(self, line: str, *, timeout: float = 60) -> list[Event]:
        """Type a command and return the replies it printed (``reply``/``error`` events)."""
        start = len(self.events)
        self.send(line)
        self.wait_for(lambda e: e["event"] in ("reply", "error"), timeout=timeout, start=start)
        time.sleep(0.05)
        while not self._lines.empty():
            self._pump(0)
        return [e for e in self.events[start:] if e["event"] in ("reply", "error")]

    def finished(self, job_id: str, *, timeout: float = 120) -> Event:
        return self.wait_for(
            lambda e: e.get("id") == job_id and e["event"] in ("finished", "failed", "cancelled"),
            timeout=timeout,
        )

    def close(self, timeout: float = 180) -> list[Event]:
        """End input, wait until the console exits (after its queue drained), return every event."""
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        while self._pump(0) and not self._lines.empty():
            pass
        assert self.process.returncode == 0, self.stderr_text()
        return self.events

    def stderr_text(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()

    def __enter__(self) -> ConsoleSession:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            if exc[0] is None:
                self.close()
            else:
                self.process.kill()
                self.process.wait()


def jobs_of(replies: list[Event]) -> list[str]:
    """The job ids a /draw-like command's accepted reply names."""
    return [job for reply in replies for job in reply.get("jobs", [])]
