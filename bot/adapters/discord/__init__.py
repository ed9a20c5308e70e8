"""Discord: slash commands from the command schema, buttons that survive restarts,
variation threads and live progress, through the core's delivery layer.

``build(app, settings)`` is what ``atelier run`` calls when ``ATELIER_DISCORD_TOKEN`` is
set (bot/runner.py). The adapter translates and decides nothing: what it shows comes from
the command schema (``tree``), the delivery layer and the core's events; what users do
becomes ``Invocation``s and presses (``interactions``); ``adapter`` sends.
"""

from __future__ import annotations

from typing import Any

from bot.adapters.discord.adapter import DiscordAdapter


def build(app: Any, settings: Any) -> DiscordAdapter:
    return DiscordAdapter(app, settings, settings.secrets.discord_token or "")


__all__ = ["DiscordAdapter", "build"]
