"""The slash commands Discord shows, built from the command schema (bot/platforms.py).

``command_payloads(app)`` is the JSON Discord's bulk registration takes: every visible
command (the plugins' too) with its subcommands, typed fields, ranges, choices and
autocomplete, in English with Chinese descriptions. Registering is rate limited by
Discord, so ``register`` sends the tree only when its hash differs from the one kept in
the store for that scope (global, or one guild); ``force`` sends it anyway
(``atelier discord sync``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

from bot.platforms import Field, Node, command_tree
from models.preferences import GLOBAL, PreferenceStore, Scope

log = logging.getLogger(__name__)

HASH_KEY = "discord.commands_hash"
SUBCOMMAND, GROUP = 1, 2
FIELD_TYPES = {"string": 3, "integer": 4, "boolean": 5, "user": 6, "number": 10, "attachment": 11}
CONTEXTS = [0, 1]  # in servers and in the bot's DMs
# Discord's locales for Chinese: both read the Chinese catalog
CHINESE = ("zh-CN", "zh-TW")
NAME = re.compile(r"^[-_\w]{1,32}$")  # Discord: letters of any script, digits, - and _


def _localized(texts: dict[str, str]) -> dict[str, str]:
    return {locale: texts["zh-CN"] for locale in CHINESE}


def _field(app: Any, field: Field) -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": FIELD_TYPES[field.type],
        "name": field.name,
        "name_localizations": _names(app, field.name, "discord.field."),
        "description": field.description["en"],
        "description_localizations": _localized(field.description),
        "required": field.required,
    }
    if field.choices:
        data["choices"] = [{"name": choice, "value": choice} for choice in field.choices]
    elif field.autocomplete:
        data["autocomplete"] = True
    if field.type in ("integer", "number"):
        if field.min is not None:
            data["min_value"] = field.min
        if field.max is not None:
            data["max_value"] = field.max
    return data


def _options(app: Any, node: Node) -> list[dict[str, Any]]:
    if not node.subcommands:
        return [_field(app, field) for field in node.fields]
    return [_sub(app, sub) for sub in node.subcommands]


def _sub(app: Any, node: Node) -> dict[str, Any]:
    return {
        "type": GROUP if node.subcommands else SUBCOMMAND,
        "name": node.name,
        "name_localizations": _names(app, node.name, "discord.subcommand."),
        "description": node.description["en"],
        "description_localizations": _localized(node.description),
        "options": _options(app, node),
    }


def _names(app: Any, name: str, prefix: str = "discord.name.") -> dict[str, str]:
    """The Chinese name of a command (``discord.name.<name>``), a subcommand
    (``discord.subcommand.<name>``) or a field (``discord.field.<name>``) where the catalog
    has one; a plugin's without one keeps its English name in every language. Discord
    sends interactions with the English names, so these are for reading only."""
    key = f"{prefix}{name}"
    if not app.translator.has(key):
        return {}
    chinese = app.translator.t("zh-CN", key)
    if not NAME.match(chinese):
        return {}
    return dict.fromkeys(CHINESE, chinese)


def command_payloads(app: Any) -> list[dict[str, Any]]:
    return [
        {
            "type": 1,
            "name": node.name,
            "name_localizations": _names(app, node.name),
            "description": node.description["en"],
            "description_localizations": _localized(node.description),
            "options": _options(app, node),
            "contexts": CONTEXTS,
            "integration_types": [0],
        }
        for node in command_tree(app)
    ]


def tree_hash(payloads: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(payloads, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def find_node(app: Any, path: list[str]) -> Node | None:
    """The command or subcommand an interaction names (its name, then subcommand names)."""
    nodes = command_tree(app)
    found: Node | None = None
    for name in path:
        found = next((node for node in nodes if node.name == name), None)
        if found is None:
            return None
        nodes = list(found.subcommands)
    return found


async def register(
    app: Any, http: Any, application_id: int, *, guild: str | None = None, force: bool = False
) -> bool:
    """Register the tree (globally, or in one guild) unless the store says Discord has this
    exact tree already; returns whether it was sent."""
    payloads = command_payloads(app)
    digest = tree_hash(payloads)
    scope: Scope = ("guild", f"discord:{guild}") if guild else GLOBAL
    preferences = PreferenceStore(app.store)
    if not force and await preferences.get(scope, HASH_KEY) == digest:
        return False
    if guild:
        await http.bulk_upsert_guild_commands(application_id, int(guild), payloads)
    else:
        await http.bulk_upsert_global_commands(application_id, payloads)
    await preferences.set(scope, HASH_KEY, digest, by="discord")
    log.info("registered %d slash commands %s", len(payloads), f"in guild {guild}" if guild else "globally")
    return True
