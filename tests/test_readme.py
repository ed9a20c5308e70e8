"""The README's promises that are cheap to keep honest."""

from __future__ import annotations

import argparse
from pathlib import Path

from bot.cli import _parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_every_atelier_subcommand_is_in_the_readme_command_table() -> None:
    table = README.split("## Commands of the `atelier` program", 1)[1].split("\n## ", 1)[0]
    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        names = [f"atelier {name} {child}" for a in nested for child in a.choices] or [f"atelier {name}"]
        for full in names:
            assert f"`{full}" in table, full


def test_a_postgresql_that_refuses_skips_its_tests_saying_what_to_set() -> None:
    """``make test`` on a machine whose PostgreSQL has no such database (or wants a
    password): the PostgreSQL half of a test is skipped with advice, not an error."""
    import os
    import subprocess
    import sys

    from tests.conftest import POSTGRES_URL

    # the configured server asked for a database it lacks; without one, a port nobody serves
    server = POSTGRES_URL.rsplit("/", 1)[0] if POSTGRES_URL else "postgresql+asyncpg://postgres@127.0.0.1:1"
    env = {**os.environ, "ATELIER_TEST_POSTGRES_URL": f"{server}/atelier_no_such_database"}
    env.pop("CI", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/models/test_store.py", "-k", "postgres"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0 and "skipped" in summary, result.stdout + result.stderr
    assert "passed" not in summary and "error" not in summary and "failed" not in summary, summary
    assert (
        "set ATELIER_TEST_POSTGRES_URL=postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE" in result.stdout
    )
