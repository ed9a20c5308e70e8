"""A test-only chat platform and its adapter, written on the adapter contract.

``FakePlatform`` is the chat service: its messages, threads and every call the bot made
outlive a bot restart, as a real platform's do. ``FakeChat`` is the adapter: it turns a
user's command or button press into a core call and sends what the delivery layer hands
it. Everything else (routing, throttling, tracking, paging, fitting) is the core's.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Any

from bot.adapters.base import Button, Limits, Outgoing
from bot.delivery import Delivery
from bot.types import Actor, MessageRef, OutgoingFile, Reply, Route

PLATFORM = "fakechat"


@dataclass
class Posted:
    """A message as the platform shows it now; ``versions`` counts its edits + 1."""

    id: str
    route: Route
    text: str
    files: tuple[OutgoingFile, ...]
    buttons: tuple[tuple[Button, ...], ...]
    reply_to: str | None
    kind: str
    versions: int = 1


@dataclass
class Call:
    """One ``deliver`` call: when, what, and which message it landed in."""

    at: float
    message: Outgoing
    posted: str


@dataclass
class FakePlatform:
    messages: dict[str, Posted] = field(default_factory=dict)
    threads: dict[str, str] = field(default_factory=dict)  # thread id -> the message it hangs under
    calls: list[Call] = field(default_factory=list)
    failures: list[Exception] = field(default_factory=list)  # raised by the next deliver calls
    ids: Any = field(default_factory=lambda: itertools.count(1))

    def in_place(self, where: Route) -> list[Posted]:
        """The messages of one conversation, oldest first."""
        return [m for m in self.messages.values() if m.route.destination == where.destination]


class FakeChat:
    platform = PLATFORM

    def __init__(self, app: Any, server: FakePlatform, *, limits: Limits | None = None) -> None:
        self.app = app
        self.server = server
        self.base = limits or Limits(
            progress_interval=3.0, buttons_per_row=5, rows_per_message=5, action_id_bytes=64, threads=True
        )
        self.delivery = Delivery(app, self)

    def limits(self, route: Route) -> Limits:
        # as Telegram: a private chat may be edited more often than a group
        interval = self.base.progress_interval / 3 if route.is_private else self.base.progress_interval
        return replace(self.base, progress_interval=interval)

    async def start(self) -> None:
        self.delivery.start()

    async def stop(self) -> None:
        await self.delivery.stop()

    async def deliver(self, message: Outgoing) -> MessageRef:
        if self.server.failures:
            raise self.server.failures.pop(0)
        server = self.server
        edited = server.messages.get(message.edit.message_id) if message.edit else None
        if edited is not None:
            edited.text, edited.files, edited.buttons = message.text, message.files, message.buttons
            edited.kind, edited.versions = message.kind, edited.versions + 1
            posted = edited
        else:
            where = Route(message.route.platform, message.route.chat_id, message.route.thread_id)
            if message.open_thread and message.reply_to is not None:
                thread = f"thread-{next(server.ids)}"
                server.threads[thread] = message.reply_to.message_id
                where = replace(where, thread_id=thread)
            answered = message.reply_to.message_id if message.reply_to else message.route.reply_to_message_id
            posted = Posted(
                f"m{next(server.ids)}",
                where,
                message.text,
                message.files,
                message.buttons,
                answered,
                message.kind,
            )
            server.messages[posted.id] = posted
        server.calls.append(Call(time.monotonic(), message, posted.id))
        return MessageRef(posted.route, posted.id)

    # what users do on the platform ------------------------------------------------------------------

    def _actor(self, user: str, route: Route, locale: str) -> Actor:
        return Actor(PLATFORM, user, user.title(), locale=locale, chat_id=route.chat_id)

    async def type(
        self,
        text: str,
        *,
        user: str = "alice",
        chat: str = "group",
        private: bool = False,
        locale: str = "en",
    ) -> list[Reply]:
        """A user sends a command in a chat: the message it is gets an id, and answers reply to it."""
        said = Posted(f"m{next(self.server.ids)}", Route(PLATFORM, chat), text, (), (), None, "user")
        self.server.messages[said.id] = said
        route = Route(PLATFORM, chat, reply_to_message_id=said.id, is_private=private)
        return await self.delivery.command(text, self._actor(user, route, locale), route)

    async def press(
        self, message_id: str, label: str, *, user: str = "alice", locale: str = "en"
    ) -> list[Reply]:
        """A user presses the button labelled ``label`` on a message."""
        message = self.server.messages[message_id]
        (button,) = [b for row in message.buttons for b in row if b.label == label]
        route = replace(message.route, reply_to_message_id=message.id)
        return await self.delivery.press(button.id, self._actor(user, route, locale), route)
