"""What a Telegram message or button press means to the core: the command line in the
console's grammar, who is asking (an ``Actor``) and where to answer (a ``Route``).

Telegram has no typed command options, so a command is typed the console's way
(``/draw a cat --steps 20``). Two things are Telegram's own: a /draw message's second and
later lines are its negative prompt (unless they are a pasted A1111 infotext, which the
core reads as options), and a command in a group may name the bot (``/draw@AtelierBot``);
one naming another bot is not ours.
"""

from __future__ import annotations

import re
from typing import Any

from bot.commands import quote_value
from bot.i18n import normalize_locale
from bot.reruns import split_infotext
from bot.types import Actor, Route

PLATFORM = "telegram"
_COMMAND = re.compile(r"^/([A-Za-z][\w-]*)(?:@(\w+))?(?=\s|$)")
ATTACHMENT_COMMANDS = ("draw", "pnginfo")  # a photo or document with one of these in its caption


def addressed(text: str, bot_username: str | None) -> str | None:
    """The command a message's text starts with, or None when it starts with none or
    names another bot (``/draw@OtherBot``)."""
    match = _COMMAND.match(text.strip())
    if match is None:
        return None
    target = match.group(2)
    if target and bot_username and target.lower() != bot_username.lower():
        return None
    return match.group(1).lower()


def command_line(text: str) -> str:
    """A message's text as the line ``Service.handle_line`` takes.

    ``/draw a cat\\nblurry, ugly`` -> ``/draw a cat --negative "blurry, ugly"``; later lines
    that start with ``--`` stay options. A pasted infotext is left whole: the core turns
    its fields into options.
    """
    text = text.strip()
    match = _COMMAND.match(text)
    if match is None or match.group(1).lower() != "draw" or "\n" not in text:
        return text
    rest = text[match.end() :].strip()
    if split_infotext(rest) is not None:
        return text
    first, *later = rest.split("\n")
    options = [line.strip() for line in later if line.strip().startswith("--")]
    negative = ", ".join(line.strip() for line in later if line.strip() and not line.strip().startswith("--"))
    words = [f"/{match.group(1)}", first.strip(), *options]
    if negative:
        words.append(f"--negative {quote_value(negative)}")
    return " ".join(word for word in words if word)


def locale_of(user: Any, default: str) -> str:
    """The user's Telegram language (zh, zh-hans, zh-CN ... -> Chinese); the bot's own
    default when Telegram does not say."""
    code = getattr(user, "language_code", None)
    return normalize_locale(code) if code else default


def route_of(message: Any, *, reply_to: int | None = None) -> Route:
    """Where a message is: its chat, its forum topic (only in a forum: elsewhere a thread
    id marks a reply chain), and the message to answer (itself unless given)."""
    chat = message.chat
    topic = (
        message.message_thread_id if getattr(chat, "is_forum", False) and message.message_thread_id else None
    )
    return Route(
        PLATFORM,
        str(chat.id),
        str(topic) if topic is not None else None,
        reply_to_message_id=str(reply_to if reply_to is not None else message.message_id),
        is_private=chat.type == "private",
    )


def actor_of(user: Any, chat: Any, default_locale: str, roles: frozenset[str] = frozenset()) -> Actor:
    name = user.username or user.full_name or str(user.id)
    return Actor(
        PLATFORM,
        str(user.id),
        name,
        locale=locale_of(user, default_locale),
        chat_id=str(chat.id),
        roles=roles,
    )
