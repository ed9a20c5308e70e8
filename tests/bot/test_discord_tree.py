"""The slash-command tree Discord registers: Chinese names for commands, subcommands and
fields, valid and distinct at every level (Discord refuses the whole tree otherwise)."""

from __future__ import annotations

from typing import Any

import pytest

from bot.adapters.discord.tree import CHINESE, NAME, command_payloads

KEPT_IN_ENGLISH = {"cfg", "vae", "lora", "id", "x", "y", "z"}  # A1111's own words and axis letters


def _levels(payloads: list[dict[str, Any]], path: str = "") -> list[tuple[str, list[dict[str, Any]]]]:
    """Every list of siblings in the tree, with where it is."""
    found = [(path or "/", payloads)]
    for item in payloads:
        found += _levels(item.get("options", []), f"{path}/{item['name']}")
    return found


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_commands_subcommands_and_fields_have_distinct_chinese_names(make_app) -> None:
    app = await make_app()
    payloads = command_payloads(app)
    untranslated = set()
    for where, siblings in _levels(payloads):
        for locale in CHINESE:
            names = [item.get("name_localizations", {}).get(locale, item["name"]) for item in siblings]
            assert len(names) == len(set(names)), (where, locale, names)
            assert all(NAME.match(name) and name == name.lower() for name in names), (where, names)
        untranslated |= {item["name"] for item in siblings if not item.get("name_localizations")}
    assert untranslated <= KEPT_IN_ENGLISH, untranslated - KEPT_IN_ENGLISH
    draw = next(p for p in payloads if p["name"] == "draw")
    steps = next(f for f in draw["options"] if f["name"] == "steps")
    assert steps["name_localizations"] == {"zh-CN": "步数", "zh-TW": "步数"}
    style = next(p for p in payloads if p["name"] == "style")
    save = next(s for s in style["options"] if s["name"] == "save")
    assert save["name_localizations"]["zh-CN"] == "保存"
