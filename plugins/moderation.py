"""Moderation: moderator roles, bans, word lists and regexes, NSFW rules, audit log.

Moderators are the user ids in config (global moderators: they may also act on the
``global`` scope), plus anyone whose adapter-given roles include one of
``moderator_roles`` (Discord "Manage Server" or a configured role, Telegram chat
admins: adapters put "moderator"/"admin" on ``Actor.roles``). Checks run ``tryfirst``,
so a banned user or a blocked word is refused before quotas reserve anything.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bot.api import (
    GLOBAL,
    GLOBAL_MODERATOR,
    Msg,
    NotFound,
    OptionSpec,
    PermissionDenied,
    UserError,
    asks_global,
    audit,
    format_time,
    hookimpl,
    missing_argument,
    named_user,
    parse_duration,
    require_global_moderator,
    scope_of,
    user_key,
)
from bot.types import Admission, Argument, Command, CommandContext, Denial, Reply
from models.moderation_store import ModerationStore

NsfwRule = Literal["channel", "never", "always"]


def _check_patterns(patterns: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression {pattern!r}: {exc}") from None
    return patterns


class ScopeRules(BaseModel):
    """One guild/chat's additions: its own moderators and words; its NSFW rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    moderators: tuple[str, ...] = ()
    blocked_words: tuple[str, ...] = ()
    blocked_patterns: tuple[str, ...] = ()
    nsfw: NsfwRule | None = None

    _patterns = field_validator("blocked_patterns")(_check_patterns)


class ModerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    moderators: tuple[str, ...] = ()
    moderator_roles: tuple[str, ...] = ("moderator", "admin")
    blocked_words: tuple[str, ...] = ()
    blocked_patterns: tuple[str, ...] = ()
    nsfw: NsfwRule = "channel"
    nsfw_spoiler: bool = True
    nsfw_words: tuple[str, ...] = ("nsfw", "nude", "naked", "explicit")
    audit_limit: int = Field(20, ge=1, le=200)
    scopes: dict[str, ScopeRules] = {}

    _patterns = field_validator("blocked_patterns")(_check_patterns)


def config(app: Any) -> ModerationConfig:
    return app.settings.plugin_config("moderation", ModerationConfig)  # type: ignore[return-value]


@functools.lru_cache(maxsize=1024)
def _word_regex(word: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def find_blocked(text: str, words: list[str], patterns: list[str]) -> str | None:
    """The first blocked word (or the text a pattern matched) in ``text``, else None."""
    for word in words:
        if _word_regex(word).search(text):
            return word
    for pattern in patterns:
        match = _regex(pattern).search(text)
        if match:
            return match.group(0)
    return None


# hooks -----------------------------------------------------------------------------------------


@hookimpl
def startup(app: Any) -> None:
    config(app)  # a bad [plugins.moderation] table fails at startup, naming the key


def _keys(actor: Any) -> set[str]:
    """The account's own key and, once linked (/link), its person's: a ban or a moderator
    entry of either holds, so linking neither escapes a ban nor loses a role."""
    return {actor.key, getattr(actor, "identity", actor.key)}


@hookimpl
def actor_roles(actor: Any, app: Any) -> set[str]:
    cfg = config(app)
    roles: set[str] = set()
    keys = _keys(actor)
    if keys & set(cfg.moderators):
        roles |= {"moderator", GLOBAL_MODERATOR}
    scope = cfg.scopes.get(scope_of(actor))
    if scope is not None and keys & set(scope.moderators):
        roles.add("moderator")
    if actor.roles & set(cfg.moderator_roles):
        roles.add("moderator")
    return roles


@hookimpl(tryfirst=True)
async def check_request(request: Any, actor: Any, app: Any) -> Any:
    cfg = config(app)
    scope = scope_of(actor)
    store = ModerationStore(app.store)
    bans = [ban for key in sorted(_keys(actor)) for ban in await store.bans([scope, GLOBAL], user_key=key)]
    bans.sort(key=lambda b: (b.expires_at is not None, -(b.expires_at.timestamp() if b.expires_at else 0)))
    if bans and not actor.is_moderator:
        ban = bans[0]
        reason = ban.reason or Msg("moderation.no_reason")
        if ban.expires_at is None:
            return Denial("moderation.banned_forever", {"reason": reason})
        return Denial("moderation.banned", {"until": format_time(ban.expires_at), "reason": reason})
    rules = cfg.scopes.get(scope, ScopeRules())
    words = [*cfg.blocked_words, *rules.blocked_words]
    patterns = [*cfg.blocked_patterns, *rules.blocked_patterns]
    for rule in await store.rules([scope, GLOBAL]):
        (words if rule.kind == "word" else patterns).append(rule.pattern)
    generation = request.generation
    for field, text in (("prompt", generation.prompt), ("negative", generation.negative_prompt)):
        found = find_blocked(text, words, patterns)
        if found is not None:
            return Denial("moderation.blocked", {"field": Msg(f"moderation.field.{field}"), "word": found})
    nsfw = rules.nsfw or cfg.nsfw
    found = find_blocked(generation.prompt, list(cfg.nsfw_words), [])
    if found is None:
        return None
    if nsfw == "always" or (nsfw == "channel" and actor.nsfw_allowed):
        # allowed here; the adapters blur the result until clicked (Discord/Telegram spoilers)
        return Admission(spoiler=True) if cfg.nsfw_spoiler else None
    return Denial(f"moderation.nsfw_{nsfw}", {"word": found})


USER = Argument("user", "user", "arg.user")
GLOBAL_FLAG = OptionSpec("global", "flag", description="option.moderation.global")
WORD_OPTIONS = (OptionSpec("regex", "str", description="option.words.regex"), GLOBAL_FLAG)
WORD = Argument("word", "text", "arg.word", required=False)  # or --regex PATTERN


@hookimpl
def register_commands(register: Any) -> None:
    """Every command here is for moderators as a whole: dispatch checks the role (and
    audits a refusal) before it reads any argument, and a guard does the same for the
    global moderator role where ``--global`` is given. /delete is the core's (owners too)."""
    ban_options = (
        OptionSpec("for", "duration", description="option.ban.for"),
        OptionSpec("reason", "str", description="option.ban.reason"),
        GLOBAL_FLAG,
    )
    ban, unban = _global_guard("ban", names_user=True), _global_guard("unban", names_user=True)
    register(Command("ban", ban_command, "cmd.ban", (USER,), ban_options, moderator=True, guard=ban))
    register(
        Command("unban", unban_command, "cmd.unban", (USER,), (GLOBAL_FLAG,), moderator=True, guard=unban)
    )
    register(Command("bans", bans_command, "cmd.bans", moderator=True))
    add, remove = _global_guard("words.add"), _global_guard("words.remove")
    words = (
        Command("list", list_words, "cmd.words.list"),
        Command("add", add_word, "cmd.words.add", (WORD,), WORD_OPTIONS, guard=add),
        Command("remove", remove_word, "cmd.words.remove", (WORD,), WORD_OPTIONS, guard=remove),
    )
    register(Command("words", description="cmd.words", subcommands=words, default="list", moderator=True))
    limit = OptionSpec("limit", "int", bounds=lambda _: (1, 200), description="option.audit.limit")
    register(Command("audit", audit_command, "cmd.audit", options=(limit,), moderator=True))


# commands --------------------------------------------------------------------------------------


def _global_guard(action: str, *, names_user: bool = False) -> Any:
    """A guard that refuses ``--global`` to all but global moderators before the arguments
    are read, so that every such attempt is audited however the rest is written."""

    async def guard(ctx: CommandContext) -> None:
        if asks_global(ctx.text):
            target = named_user(ctx.text, ctx.actor) if names_user else None
            await require_global_moderator(ctx, action, target)

    return guard


def _target_scope(ctx: CommandContext, options: dict[str, Any]) -> str:
    if not options.get("global"):
        return scope_of(ctx.actor)
    if GLOBAL_MODERATOR not in ctx.actor.roles:  # the command's guard refused and audited it already
        raise PermissionDenied("error.global_moderators_only", command=ctx.invocation.command)
    return GLOBAL


def _where(scope: str) -> Any:
    return Msg("moderation.everywhere") if scope == GLOBAL else Msg("moderation.here")


async def ban_command(ctx: CommandContext) -> Reply:
    target = user_key(ctx.text, ctx.actor)
    options = ctx.options
    scope = _target_scope(ctx, options)
    expires = datetime.now(UTC) + parse_duration(options["for"]) if "for" in options else None
    reason = options.get("reason", "")
    await ModerationStore(ctx.app.store).ban(
        target, scope, reason=reason, expires_at=expires, banned_by=ctx.actor.key
    )
    until = format_time(expires) if expires else None
    await audit(ctx, "ban", target=target, scope=scope, until=until, reason=reason)
    return Reply(
        "moderation.ban_done",
        {
            "user": target,
            "where": _where(scope),
            "until": until or Msg("moderation.forever"),
            "reason": reason or Msg("moderation.no_reason"),
        },
    )


async def unban_command(ctx: CommandContext) -> Reply:
    target = user_key(ctx.text, ctx.actor)
    scope = _target_scope(ctx, ctx.options)
    removed = await ModerationStore(ctx.app.store).unban(target, scope)
    await audit(ctx, "unban", target=target, scope=scope, removed=removed)
    if not removed:
        raise NotFound("moderation.not_banned", user=target, where=_where(scope))
    return Reply("moderation.unban_done", {"user": target, "where": _where(scope)})


async def bans_command(ctx: CommandContext) -> Reply:
    bans = await ModerationStore(ctx.app.store).bans([scope_of(ctx.actor), GLOBAL])
    if not bans:
        return Reply("moderation.no_bans")
    lines = [
        f"{b.user_key} ({'global' if b.scope == GLOBAL else b.scope}) "
        f"{format_time(b.expires_at) if b.expires_at else '-'} {b.reason}".rstrip()
        for b in bans
    ]
    data = {"bans": [{"user": b.user_key, "scope": b.scope, "reason": b.reason} for b in bans]}
    return Reply("moderation.bans", {"count": len(bans), "list": "\n".join(lines)}, data=data)


async def list_words(ctx: CommandContext) -> Reply:
    rules = await ModerationStore(ctx.app.store).rules([scope_of(ctx.actor), GLOBAL])
    cfg = config(ctx.app)
    listed = [f"{r.kind}: {r.pattern}" for r in rules]
    listed += [f"word: {w} (config)" for w in cfg.blocked_words]
    listed += [f"regex: {p} (config)" for p in cfg.blocked_patterns]
    return Reply("moderation.words", {"list": "\n".join(listed) or "-"})


def _rule(ctx: CommandContext) -> tuple[str, str]:
    """``(kind, pattern)``: a word, or with ``--regex`` a pattern (then no word)."""
    options = ctx.options
    kind = "regex" if "regex" in options else "word"
    pattern = (options["regex"] if kind == "regex" else ctx.text).strip()
    if not pattern or (kind == "regex" and ctx.text.strip()):
        raise missing_argument(ctx)
    if kind == "regex":
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError("moderation.bad_regex", pattern=pattern, detail=str(exc)) from None
    return kind, pattern


async def add_word(ctx: CommandContext) -> Reply:
    kind, pattern = _rule(ctx)
    scope = _target_scope(ctx, ctx.options)
    changed = await ModerationStore(ctx.app.store).add_rule(scope, kind, pattern, ctx.actor.key)
    await audit(ctx, "words.add", target=pattern, scope=scope, kind=kind, changed=changed)
    return Reply("moderation.word_added", {"word": pattern, "where": _where(scope)})


async def remove_word(ctx: CommandContext) -> Reply:
    kind, pattern = _rule(ctx)
    scope = _target_scope(ctx, ctx.options)
    changed = await ModerationStore(ctx.app.store).remove_rule(scope, kind, pattern)
    await audit(ctx, "words.remove", target=pattern, scope=scope, kind=kind, changed=changed)
    if not changed:
        raise NotFound("moderation.no_such_word", word=pattern)
    return Reply("moderation.word_removed", {"word": pattern, "where": _where(scope)})


async def audit_command(ctx: CommandContext) -> Reply:
    limit = ctx.options.get("limit", config(ctx.app).audit_limit)
    scopes = [scope_of(ctx.actor)]
    if GLOBAL_MODERATOR in ctx.actor.roles:
        scopes.append(GLOBAL)
    entries = await ModerationStore(ctx.app.store).audit_log(scopes, limit=limit)
    lines = [
        f"{format_time(e.created_at)} {e.actor_key} {e.action} {e.target or ''} "
        f"{'ok' if e.allowed else 'REFUSED'}".replace("  ", " ")
        for e in entries
    ]
    data = {
        "entries": [
            {"actor": e.actor_key, "action": e.action, "target": e.target, "allowed": e.allowed}
            for e in entries
        ]
    }
    return Reply("moderation.audit", {"count": len(entries), "list": "\n".join(lines) or "-"}, data=data)
