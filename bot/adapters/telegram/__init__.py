"""Telegram: python-telegram-bot v22 on the adapter contract (docs/adapters.md).

``build(app, settings)`` is what ``atelier run`` calls when ``ATELIER_TELEGRAM_TOKEN``
is set. ``inbound`` turns messages and presses into core calls, ``send`` shows what the
delivery layer hands over, ``adapter`` ties them to the Application.
"""

from __future__ import annotations

from typing import Any

from bot.adapters.telegram.adapter import TelegramAdapter


def build(app: Any, settings: Any) -> TelegramAdapter:
    return TelegramAdapter(app, settings)


__all__ = ["TelegramAdapter", "build"]
