"""What quotas and moderation share: scope keys, naming users in commands, durations,
and the moderator gate that writes every refused attempt to the audit log.

Scopes are where a setting or a ban applies: ``"global"`` or one guild/chat, keyed by
platform so ids of different platforms never collide. A Discord guild is the scope of
its channels; a Telegram chat (or a console session) is its own scope.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from bot.errors import OptionValueError, PermissionDenied, UserError
from bot.options import int_in_range, number_in_range
from bot.types import Actor, CommandContext
from models.moderation_store import ModerationStore

GLOBAL = "global"
_DURATION = re.compile(r"^(\d+)\s*([mhdw])$", re.IGNORECASE)
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_MENTION = re.compile(r"^<@!?(\d+)>$")  # a Discord mention pasted as text


def scope_key(platform: str, guild_id: str | None, chat_id: str | None) -> str:
    if guild_id:
        return f"{platform}:guild:{guild_id}"
    if chat_id:
        return f"{platform}:chat:{chat_id}"
    return GLOBAL


def scope_of(actor: Actor) -> str:
    return scope_key(actor.platform, actor.guild_id, actor.chat_id)


def user_key(text: str, actor: Actor) -> str:
    """``@bob``/``bob`` -> a user of the actor's platform; ``<@123>`` (Discord); ``telegram:42``."""
    word = text.strip()
    mention = _MENTION.match(word)
    if mention:
        return f"discord:{mention.group(1)}"
    word = word.removeprefix("@")
    platform, sep, rest = word.partition(":")
    if sep and platform in ("console", "discord", "telegram") and rest:
        return word
    if not word or any(ch.isspace() for ch in word):
        raise UserError("error.bad_user", value=text.strip())
    return f"{actor.platform}:{word}"


def parse_duration(text: str) -> timedelta:
    """``30m``, ``12h``, ``7d``, ``2w``; refused otherwise, naming the forms allowed."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise OptionValueError("error.bad_duration", value=text)
    return timedelta(**{_UNITS[match.group(2).lower()]: int(match.group(1))})


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def whole_number(name: str, raw: str | None, *, minimum: int = 0, maximum: int = 10**9) -> int:
    return int_in_range(name, raw or "", minimum, maximum)


def number(name: str, raw: str | None, *, minimum: float = 0, maximum: float = 1e9) -> float:
    return float(number_in_range(name, raw or "", minimum, maximum))


def options_of(parsed_options: list[tuple[str, str | None]], allowed: dict[str, bool]) -> dict[str, Any]:
    """Options of a moderator command: ``allowed`` maps each name to whether it takes a value."""
    found: dict[str, Any] = {}
    names = ", ".join("--" + n for n in allowed)
    for name, value in parsed_options:
        if name not in allowed:
            raise UserError("error.unknown_option", name=name, suggestion="", allowed=names)
        if name in found:
            raise UserError("error.duplicate_option", name=name)
        if allowed[name] and value is None:
            raise UserError("error.missing_value", name=name)
        if not allowed[name] and value is not None:
            raise UserError("error.unexpected_value", name=name, value=value)
        found[name] = value if allowed[name] else True
    return found


async def audit(
    ctx: CommandContext,
    action: str,
    *,
    allowed: bool = True,
    target: str | None = None,
    scope: str | None = None,
    **detail: Any,
) -> None:
    await ModerationStore(ctx.app.store).audit(
        ctx.actor.key,
        action,
        scope=scope or scope_of(ctx.actor),
        allowed=allowed,
        target=target,
        detail={"command": f"/{ctx.invocation.command} {ctx.text}".strip(), **detail},
    )


async def require_moderator(ctx: CommandContext, action: str, target: str | None = None) -> None:
    """Refuse a non-moderator, after writing the attempt to the audit log."""
    if ctx.actor.is_moderator:
        return
    await audit(ctx, action, allowed=False, target=target)
    raise PermissionDenied("error.moderators_only", command=ctx.invocation.command)
