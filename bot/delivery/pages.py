"""Buttons paged to a platform's limits, with ids that fit its size for a button id.

Rows are filled in the order plugins offered the actions (``result_actions`` order);
``rows_per_message`` rows make one page, and each further page is a message of its own.
An action id longer than ``action_id_bytes`` is replaced by a token stored in the
database (models/delivery_store.py), which ``Delivery.press`` resolves: a press still
works after a restart.
"""

from __future__ import annotations

from collections.abc import Sequence

from bot.adapters.base import Button, Limits
from bot.i18n import Translator
from bot.types import Action
from models.delivery_store import TOKEN_BYTES, DeliveryStore

Page = tuple[tuple[Button, ...], ...]


async def page_actions(
    actions: Sequence[Action], limits: Limits, translator: Translator, locale: str, store: DeliveryStore
) -> list[Page]:
    """The pages of buttons; at least one (empty when there are no actions)."""
    if limits.action_id_bytes is not None and limits.action_id_bytes < TOKEN_BYTES:
        raise ValueError(f"action_id_bytes must allow a token ({TOKEN_BYTES} bytes)")
    buttons = []
    for action in actions:
        button_id = action.id
        if limits.action_id_bytes is not None and len(button_id.encode("utf-8")) > limits.action_id_bytes:
            button_id = await store.token(action.id)
        buttons.append(Button(button_id, translator.t(locale, action.label_key, **action.params)))
    per_row = limits.buttons_per_row or max(len(buttons), 1)
    rows = [tuple(buttons[i : i + per_row]) for i in range(0, len(buttons), per_row)]
    per_page = limits.rows_per_message or max(len(rows), 1)
    pages = [tuple(rows[i : i + per_page]) for i in range(0, len(rows), per_page)]
    return pages or [()]
