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

from bot.commands import parse_args
from bot.errors import OptionValueError, PermissionDenied, UserError
from bot.options import int_in_range, parse_int, shown
from bot.types import Actor, CommandContext
from models.moderation_store import ModerationStore

GLOBAL = "global"
# The role of moderators who may change settings everywhere (``--global``); the moderation
# plugin gives it to the moderators its configuration names.
GLOBAL_MODERATOR = "global_moderator"
_DURATION = re.compile(r"^(\d+)\s*([mhdw])$", re.IGNORECASE)
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# The longest duration a ban or /export --since takes: ten years is past every real use,
# and far enough from datetime's limits (year 9999) that no arithmetic on it overflows.
MAX_DURATION = timedelta(days=3650)
MAX_DURATION_TEXT = "3650d"
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
        raise UserError("error.bad_user", value=shown(text))
    return f"{actor.platform}:{word}"


def named_user(text: str, actor: Actor) -> str | None:
    """The user a command's first word names, or None when it names none.

    Never raises: moderator commands check the role before reading their arguments, and
    the audit entry of a refused attempt still records whom it was aimed at.
    """
    words = text.split(maxsplit=1)
    if not words or words[0].startswith("--"):
        return None
    try:
        return user_key(words[0], actor)
    except UserError:
        return None


def parse_duration(text: str, name: str = "for") -> timedelta:
    """``30m``, ``12h``, ``7d``, ``2w`` up to ``MAX_DURATION``; refused otherwise, naming
    the forms or the range allowed."""
    match = _DURATION.match(text.strip())
    count = parse_int(match.group(1)) if match else None
    if match is None or count is None:
        raise OptionValueError("error.bad_duration", value=shown(text))
    seconds = count * _UNIT_SECONDS[match.group(2).lower()]
    if not 0 < seconds <= MAX_DURATION.total_seconds():
        raise OptionValueError("error.duration_range", name=name, value=shown(text), max=MAX_DURATION_TEXT)
    return timedelta(seconds=seconds)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def whole_number(name: str, raw: str | None, *, minimum: int = 0, maximum: int = 10**9) -> int:
    return int_in_range(name, raw or "", minimum, maximum)


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
        # the text as typed: dispatch hands handlers the positional part only
        detail={"command": f"/{ctx.invocation.command} {ctx.invocation.text}".strip(), **detail},
    )


async def require_moderator(
    ctx: CommandContext, action: str, target: str | None = None, *, command: str | None = None
) -> None:
    """Refuse a non-moderator, after writing the attempt to the audit log. The refusal
    names ``command`` (a subcommand's path, ``quota set``), by default the command typed."""
    if ctx.actor.is_moderator:
        return
    await audit(ctx, action, allowed=False, target=target)
    raise PermissionDenied("error.moderators_only", command=command or ctx.invocation.command)


def asks_global(text: str) -> bool:
    """Whether a command's raw text carries ``--global``. Never raises: text that cannot
    be read is reported when the arguments are read."""
    try:
        parsed = parse_args(text)
    except UserError:
        return False
    return any(name == "global" for name, _value in parsed.options)


async def require_global_moderator(ctx: CommandContext, action: str, target: str | None = None) -> None:
    """Refuse a change everywhere to all but global moderators, after writing the attempt
    (in the global scope) to the audit log."""
    if GLOBAL_MODERATOR in ctx.actor.roles:
        return
    await audit(ctx, action, allowed=False, target=target, scope=GLOBAL)
    raise PermissionDenied("error.global_moderators_only", command=ctx.invocation.command)
