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
