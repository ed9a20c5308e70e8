"""The adapter contract: what a chat platform implements, and what it is handed.

An adapter turns its platform's events into ``Invocation``s (with a typed ``Route``) and
passes them to its ``Delivery`` (bot/delivery.py), which runs them and hands back every
answer and job event as an ``Outgoing``: translated text, files with their bytes, and
buttons already paged and fitted to the platform's limits. The adapter only says what
its platform allows (``limits``) and sends (``deliver``); routing, throttling, message
tracking, paging, upload fitting and retries are the delivery layer's, the same for
every platform. docs/adapters.md describes the whole contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from bot.types import JobEvent, MessageRef, OutgoingFile, Reply, Route


@dataclass(frozen=True)
class Limits:
    """What a platform allows for one route; None means "no limit".

    ``progress_interval``: seconds between two progress messages in one conversation
    (Discord 2, Telegram 1 in private chats and 3 in groups); 0 sends every step.
    ``progress_per_chat``: the interval holds for the whole chat, its threads (forum
    topics) together, rather than for each conversation (Telegram limits a group, not a
    topic).
    ``action_id_bytes``: the longest button id (Telegram callback data: 64); longer action
    ids travel as short tokens that a press resolves. ``image_bytes``: the largest image
    shown inline; ``document_bytes``: the largest file attached as a document.
    ``threads``: the platform opens a thread for a chain of variations (Discord).
    """

    progress_interval: float = 0.0
    progress_per_chat: bool = False
    buttons_per_row: int | None = None
    rows_per_message: int | None = None
    action_id_bytes: int | None = None
    image_bytes: int | None = None
    document_bytes: int | None = None
    threads: bool = False


@dataclass(frozen=True)
class Button:
    """A button: ``id`` is what a press hands back to ``Delivery.press`` (an action id, or
    a token standing for one), ``label`` its translated text."""

    id: str
    label: str


@dataclass(frozen=True)
class Outgoing:
    """One message to send (or one edit of a message sent before).

    ``kind`` is "reply" or "error" for an answer to a command, the event's kind
    ("queued", "started", "progress", "finished", "failed", "cancelled", "notice") for a
    job's message, or "actions" for a further page of buttons. ``edit``: replace that
    message's content (or, where the platform cannot, send a new message and return it);
    ``reply_to``: answer that message. ``open_thread``: start a thread under
    ``reply_to`` (the chain's first result) and post there; the returned reference's
    route names the thread. ``source`` is the neutral value rendered, for adapters that
    show more than text (the console's JSON lines).
    """

    route: Route
    kind: str
    text: str
    generation_id: str | None = None
    files: tuple[OutgoingFile, ...] = ()  # every file with its bytes, fitted to the limits
    buttons: tuple[tuple[Button, ...], ...] = ()  # rows
    edit: MessageRef | None = None
    reply_to: MessageRef | None = None
    open_thread: bool = False
    spoiler: bool = False
    source: JobEvent | Reply | None = None


class RetryAfter(Exception):  # noqa: N818  (named as the platforms name it)
    """Raised by ``deliver`` when the platform asks to wait (HTTP 429, Telegram's
    retry_after): the delivery layer waits and tries again, a bounded number of times."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"retry after {seconds} s")
        self.seconds = seconds


class DeliveryFailed(Exception):
    """Raised by ``deliver`` when a send or edit failed for good (the message was deleted,
    the bot lost access). A failed edit is sent again as a new message."""


class Adapter(Protocol):
    """A chat platform. ``platform`` is the ``Route.platform`` its conversations carry.

    Optional: ``accepts(event) -> bool`` narrows which of its platform's job events it is
    handed (the console, a one-user terminal, takes only its user's)."""

    platform: str

    def limits(self, route: Route) -> Limits:
        """What the platform allows at ``route`` (a private chat may differ from a group)."""
        ...

    async def start(self) -> None:
        """Connect to the platform and start turning its events into invocations."""
        ...

    async def stop(self) -> None:
        """Stop taking new events and disconnect."""
        ...

    async def deliver(self, message: Outgoing) -> MessageRef:
        """Send ``message`` (or edit ``message.edit``) and return the message that now
        shows it. Raise ``RetryAfter`` or ``DeliveryFailed`` when it could not be sent."""
        ...


def flat_buttons(message: Outgoing) -> list[Button]:
    """The buttons of a message in reading order."""
    return [button for row in message.buttons for button in row]
