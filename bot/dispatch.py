"""Running one command by its schema (``bot.schema``).

In order:

1. the subcommand the first word names (or the command's ``default``) is selected;
2. if any selected level is for moderators, a non-moderator is refused and the attempt
   audited (action: the path joined by dots, ``quota.set``; target: the user the first
   argument names), before anything else in the text is read;
3. a level that still has subcommands means the word named none: a translated error
   lists the allowed ones;
4. the command's ``guard`` runs (the same reason: refusals audited whatever the text);
5. options are parsed and converted with the command's ``OptionSpec`` values (unknown or
   bad ones get a translated error listing the allowed names or range); the handler gets
   the positional text as ``ctx.text`` and the values as ``ctx.options``. A command with
   the /draw options, or with a raw argument, reads its own text;
6. a missing required argument, or text for a command that takes none, is refused with
   the usage line of the schema.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bot.commands import parse_args
from bot.errors import CommandSyntaxError, UserError
from bot.governance import named_user, require_moderator
from bot.help import missing_argument, usage_of
from bot.options import OptionTable, shown
from bot.schema import Command, resolve
from bot.types import CommandContext, Invocation


async def run_command(app: Any, command: Command, invocation: Invocation) -> Any:
    levels, rest = resolve(command, invocation.text)
    leaf = levels[-1]
    ctx = CommandContext(invocation, app, command=leaf, path=tuple(level.name for level in levels), rest=rest)
    if any(level.moderator for level in levels):
        await require_moderator(ctx, ".".join(ctx.path), _target(leaf, rest, ctx), command=" ".join(ctx.path))
    if leaf.subcommands:
        allowed = ", ".join(sub.name for sub in leaf.subcommands if not sub.hidden)
        value = shown(rest.split(maxsplit=1)[0]) if rest else ""
        raise UserError("error.unknown_subcommand", name=" ".join(ctx.path), value=value, allowed=allowed)
    if leaf.guard is not None:
        await leaf.guard(ctx)
    ctx = read_arguments(ctx)
    assert leaf.handler is not None  # a command without subcommands has one (checked at startup)
    return await leaf.handler(ctx)


def _target(command: Command, rest: str, ctx: CommandContext) -> str | None:
    """Whom a refused moderator command was aimed at, for the audit log (never raises)."""
    if command.arguments and command.arguments[0].kind == "user":
        return named_user(rest, ctx.actor)
    return None


def read_arguments(ctx: CommandContext) -> CommandContext:
    command = ctx.command
    assert command is not None
    if command.reads_own_text:
        return ctx
    parsed = parse_args(ctx.text)
    specs = command.option_specs(ctx.app.service.options.specs)
    if parsed.options and not specs:
        name = parsed.options[0][0]
        raise CommandSyntaxError(
            "error.no_options", name=shown(name), command=" ".join(ctx.path), usage=usage_of(ctx)
        )
    options = OptionTable(specs).convert(parsed, ctx.app.settings.limits)
    text = parsed.text
    if not text.strip():
        if command.arguments and command.arguments[0].required:
            raise missing_argument(ctx)
    elif not command.arguments:
        raise CommandSyntaxError(
            "error.unexpected_text", command=" ".join(ctx.path), value=shown(text), usage=usage_of(ctx)
        )
    return replace(ctx, rest=text, options=options)
