"""The console adapter and the CLI as a user runs them: real processes, real files."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.images import read_infotext
from pipeline.infotext import parse
from tests.conftest import _drop_postgres_database, _fresh_postgres_database

pytestmark = pytest.mark.slow


def _env(tmp_path: Path, database_url: str | None = None) -> dict[str, str]:
    config = tmp_path / "config.toml"
    if not config.exists():
        config.write_text(
            f'[bot]\ndata_dir = "{tmp_path / "data"}"\n[engine]\ndevice = "cpu"\nmodels_dir = "{tmp_path / "models"}"\n',
            encoding="utf-8",
        )
    env = {**os.environ, "ATELIER_CONFIG": str(config), "HF_HUB_OFFLINE": "1"}
    env.pop("ATELIER_DATABASE_URL", None)
    if database_url:
        env["ATELIER_DATABASE_URL"] = database_url
    return env


def _atelier(*args: str) -> list[str]:
    return [sys.executable, "-m", "bot.cli", *args]


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_generate_writes_a_png_whose_infotext_parses_back_and_repeats(tmp_path: Path) -> None:
    env = _env(tmp_path)
    outputs = []
    for name in ("x.png", "y.png"):
        out = tmp_path / name
        cmd = _atelier(
            "generate",
            "a cat",
            "--checkpoint",
            "tiny",
            "--seed",
            "1",
            "--steps",
            "4",
            "--size",
            "64x64",
            "-o",
            str(out),
        )
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        outputs.append(out)
    fields = parse(read_infotext(outputs[0].read_bytes()))
    assert fields["Prompt"] == "a cat"
    assert (fields["Seed"], fields["Steps"], fields["Size-1"], fields["Size-2"]) == ("1", "4", "64", "64")
    assert (fields["Sampler"], fields["CFG scale"]) == ("Euler a", "7")
    first, second = (Image.open(p).convert("RGB") for p in outputs)
    assert first.size == (64, 64)
    assert first.tobytes() == second.tobytes()


def test_generate_reports_bad_input(tmp_path: Path) -> None:
    cmd = _atelier("generate", "a cat", "--steps", "0", "-o", str(tmp_path / "x.png"))
    result = subprocess.run(
        cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert result.returncode == 2
    assert "--steps must be from 1 to 150, got 0" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_console_draw_prints_queued_progress_finished(tmp_path: Path) -> None:
    result = subprocess.run(
        _atelier("console", "--json", "--user", "alice"),
        input="/draw a cat --checkpoint tiny --steps 4 --size 64x64\n",
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    events = _events(result.stdout)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and "reply" in kinds
    job_kinds = [k for k in kinds if k != "reply"]
    assert job_kinds == ["queued", "started", "progress", "progress", "progress", "progress", "finished"]
    assert [(e["step"], e["total"]) for e in events if e["event"] == "progress"] == [
        (1, 4),
        (2, 4),
        (3, 4),
        (4, 4),
    ]
    path = Path(events[-1]["images"][0]["path"])
    assert path.is_file() and parse(read_infotext(path.read_bytes()))["Steps"] == "4"
    text = subprocess.run(
        _atelier("console", "--locale", "zh-CN"),
        input="/draw a cat --steps 0\n/draw a cat --steps 2 --size 64x64\n",
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert "--steps 必须在 1 到 150 之间，收到 0。" in text.stdout
    assert "已排队" in text.stdout and "完成：" in text.stdout and ".png" in text.stdout


def test_plugins_and_db_upgrade_commands(tmp_path: Path) -> None:
    env = _env(tmp_path)
    upgrade = subprocess.run(_atelier("db", "upgrade"), env=env, capture_output=True, text=True, timeout=120)
    assert upgrade.returncode == 0, upgrade.stderr
    from bot import db

    assert f"database at revision {db.current_revision('sqlite+aiosqlite://')}" in upgrade.stdout
    assert (tmp_path / "data" / "atelier.db").is_file()
    listing = subprocess.run(_atelier("plugins"), env=env, capture_output=True, text=True, timeout=120)
    assert "generate: check_request, plan_generation, register_commands, result_actions" in listing.stdout
    assert "pnginfo: register_commands" in listing.stdout
    assert (
        "quotas: check_request, generation_ended, generation_finished, register_commands, request_dropped, startup"
        in listing.stdout
    )
    assert "moderation: actor_roles, check_request, register_commands, startup" in listing.stdout


def test_bad_config_fails_at_startup_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[limits]\nmax_steps = -3\n", encoding="utf-8")
    result = subprocess.run(
        _atelier("plugins"), env=_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "[limits] max_steps" in result.stderr


@pytest.fixture(params=["sqlite", "postgres"])
def process_database(request: pytest.FixtureRequest, tmp_path: Path):
    """None (SQLite in the data dir) or a fresh PostgreSQL database, dropped afterwards."""
    if request.param == "sqlite":
        yield None
        return
    url = os.environ.get("ATELIER_TEST_POSTGRES_URL", "")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("ATELIER_TEST_POSTGRES_URL is not set under CI")
        pytest.skip("PostgreSQL not configured")
    database = asyncio.run(_fresh_postgres_database())
    yield database
    asyncio.run(_drop_postgres_database(database))


def test_sigkill_with_jobs_queued_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, process_database
) -> None:
    env = _env(tmp_path, process_database)
    proc = subprocess.Popen(
        _atelier("console", "--json"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        cwd=tmp_path,
    )
    assert proc.stdin and proc.stdout
    # one slow job occupies the device; three more wait behind it
    proc.stdin.write("/draw slow --steps 30 --size 128x128 --seed 1\n")
    for seed in (2, 3, 4):
        proc.stdin.write(f"/draw a cat --steps 4 --size 64x64 --seed {seed}\n")
    proc.stdin.flush()
    seen: list[dict] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("{"):
            seen.append(json.loads(line))
        if sum(e["event"] == "queued" for e in seen) == 4 and any(e["event"] == "progress" for e in seen):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not any(e["event"] == "finished" for e in seen)
    jobs = [e["id"] for e in seen if e["event"] == "queued"]
    assert len(jobs) == 4

    rerun = subprocess.run(
        _atelier("console", "--json"),
        input="",
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
    )
    assert rerun.returncode == 0, rerun.stderr
    events = _events(rerun.stdout)
    finished = [e["id"] for e in events if e["event"] == "finished"]
    assert sorted(finished) == sorted(jobs)  # all finish, each exactly once
    assert all(Path(e["images"][0]["path"]).is_file() for e in events if e["event"] == "finished")
