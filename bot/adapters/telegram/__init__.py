"""Telegram: python-telegram-bot v22 on the adapter contract (docs/adapters.md §6).

``build(app, settings)`` is what ``atelier run`` calls when ``ATELIER_TELEGRAM_TOKEN``
is set. ``inbound`` turns messages and presses into core calls, ``send`` shows what the
delivery layer hands over, ``adapter`` ties them to the Application. Importing this
package alone loads no part of the library: only ``build`` does.
"""

from __future__ import annotations

from typing import Any


def build(app: Any, settings: Any) -> Any:
    """The adapter (``bot.adapters.telegram.adapter.TelegramAdapter``) for ``atelier run``."""
    from bot.adapters.telegram.adapter import TelegramAdapter

    return TelegramAdapter(app, settings)
