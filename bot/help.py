"""/help, generated from the command schema (``bot.schema``) in the actor's language.

``/help`` lists every visible command with its one-line description; ``/help style`` or
``/help style save`` shows one command in full: usage, arguments, the file it takes,
options with their ranges, choices and aliases, and subcommands. The usage line is the
same one that "missing argument" errors show, so no handler writes usage text by hand.
Names, option names and choices are values and stay as they are in every language.
"""

from __future__ import annotations

from typing import Any

from bot.errors import UserError
from bot.i18n import Translator
from bot.options import OptionSpec
from bot.schema import DRAW_OPTIONS, Argument, Command, localized
from bot.types import CommandContext, Reply

MAX_INLINE_CHOICES = 4  # more choices than this are listed in the description, not the usage
MAX_USAGE_OPTIONS = 6  # a usage line lists a command's options up to this many


def visible_commands(app: Any) -> list[Command]:
    return sorted((c for c in app.commands.items.values() if not c.hidden), key=lambda c: c.name)


def argument_label(argument: Argument, translator: Translator, locale: str) -> str:
    """The placeholder of an argument in a usage line ("NAME", "名称")."""
    if argument.label:
        return localized(argument.label, translator, locale)
    key = f"schema.arg.{argument.name}"
    return translator.t(locale, key) if translator.has(key) else argument.name.upper()


def value_label(spec: OptionSpec, translator: Translator, locale: str) -> str:
    """The placeholder of an option's value ("N", "整数"); short choice lists as ``a|b``."""
    if spec.kind == "choice" and spec.choices is not None and len(spec.choices()) <= MAX_INLINE_CHOICES:
        return "|".join(spec.choices())
    key = f"schema.value.{spec.kind}"
    return translator.t(locale, key if translator.has(key) else "schema.value.other")


def option_usage(spec: OptionSpec, translator: Translator, locale: str) -> str:
    if spec.kind == "flag":
        return f"--{spec.name}"
    return f"--{spec.name} {value_label(spec, translator, locale)}"


def usage(app: Any, path: tuple[str, ...], command: Command, locale: str) -> str:
    """``/style save NAME [PROMPT] [--negative TEXT] ...`` in ``locale``."""
    translator = app.translator
    parts = ["/" + " ".join(path)]
    if command.subcommands:
        parts.append("|".join(sub.name for sub in command.subcommands if not sub.hidden))
        return " ".join(parts)
    for argument in command.arguments:
        label = argument_label(argument, translator, locale)
        parts.append(label if argument.required else f"[{label}]")
    specs = command.option_specs(app.service.options.specs)
    if command.options == DRAW_OPTIONS or len(specs) > MAX_USAGE_OPTIONS:
        parts.append(translator.t(locale, "help.any_options"))
    else:
        parts.extend(f"[{option_usage(spec, translator, locale)}]" for spec in specs)
    return " ".join(parts)


def overview(app: Any, locale: str) -> Reply:
    translator = app.translator
    lines = []
    for command in visible_commands(app):
        key = "help.line_moderators" if command.moderator else "help.line"
        description = localized(command.description, translator, locale)
        lines.append(translator.t(locale, key, name=command.name, description=description))
    names = [command.name for command in visible_commands(app)]
    return Reply("help.header", {"commands": "\n".join(lines)}, data={"commands": names})


def _option_line(app: Any, spec: OptionSpec, locale: str) -> str:
    translator, limits = app.translator, app.settings.limits
    notes = []
    bounds = ""
    if spec.bounds is not None:
        low, high = spec.bounds(limits)
        bounds = translator.t(locale, "help.note.range", min=low, max=high)
    if spec.aliases:
        aliases = ", ".join("--" + alias for alias in spec.aliases)
        notes.append(translator.t(locale, "help.note.aliases", aliases=aliases))
    if spec.kind == "choice" and spec.choices is not None and len(spec.choices()) > MAX_INLINE_CHOICES:
        notes.append(translator.t(locale, "help.note.choices", choices=", ".join(spec.choices())))
    return translator.t(
        locale,
        "help.option",
        usage=option_usage(spec, translator, locale),
        range=bounds,
        description=localized(spec.description, translator, locale),
        notes="".join(notes),
    )


def _options_section(app: Any, command: Command, locale: str) -> list[str]:
    specs = command.option_specs(app.service.options.specs)
    translator = app.translator
    lines: list[str] = []
    for advanced, heading in ((False, "help.options"), (True, "help.more_options")):
        group = [spec for spec in specs if spec.advanced == advanced]
        if group:
            lines.append(translator.t(locale, heading))
            lines.extend(_option_line(app, spec, locale) for spec in group)
    return lines


def command_page(app: Any, path: tuple[str, ...], command: Command, locale: str) -> str:
    """One command (or subcommand) in full."""
    translator = app.translator
    head = translator.t(
        locale,
        "help.line_moderators" if command.moderator else "help.line",
        name=" ".join(path),
        description=localized(command.description, translator, locale),
    )
    lines = [head, translator.t(locale, "help.usage", usage=usage(app, path, command, locale))]
    if command.details:
        lines.append(localized(command.details, translator, locale))
    if command.arguments:
        lines.append(translator.t(locale, "help.arguments"))
        for argument in command.arguments:
            lines.append(
                translator.t(
                    locale,
                    "help.argument" if argument.required else "help.argument_optional",
                    name=argument_label(argument, translator, locale),
                    description=localized(argument.description, translator, locale),
                )
            )
    if command.attachment is not None:
        lines.append(
            translator.t(
                locale,
                "help.file" if command.attachment.required else "help.file_optional",
                description=localized(command.attachment.description, translator, locale),
            )
        )
    lines.extend(_options_section(app, command, locale))
    subcommands = [sub for sub in command.subcommands if not sub.hidden]
    if subcommands:
        lines.append(translator.t(locale, "help.subcommands"))
        for sub in subcommands:
            line = translator.t(
                locale,
                "help.subcommand_moderators" if sub.moderator else "help.subcommand",
                usage=usage(app, (*path, sub.name), sub, locale),
                description=localized(sub.description, translator, locale),
            )
            lines.append(line)
        if command.default:
            lines.append(translator.t(locale, "help.default", path=" ".join(path), default=command.default))
        lines.append(translator.t(locale, "help.more", path=" ".join(path)))
    return "\n".join(lines)


def find(app: Any, words: list[str]) -> tuple[tuple[str, ...], Command]:
    """The command (and subcommands) ``words`` name; unknown ones are refused, listing
    what exists."""
    name = words[0].removeprefix("/").casefold()
    command = app.commands.get(name)
    if command is None or command.hidden:
        allowed = ", ".join("/" + c.name for c in visible_commands(app))
        raise UserError("error.unknown_command", name=name, allowed=allowed)
    path = (command.name,)
    for word in words[1:]:
        sub = command.subcommand(word)
        if sub is None or sub.hidden:
            allowed = ", ".join(s.name for s in command.subcommands if not s.hidden)
            raise UserError("error.unknown_subcommand", name=" ".join(path), value=word, allowed=allowed)
        command, path = sub, (*path, sub.name)
    return path, command


async def help_command(ctx: CommandContext) -> Reply:
    words = ctx.text.split()
    locale = ctx.actor.locale
    if not words:
        return overview(ctx.app, locale)
    path, command = find(ctx.app, words)
    text = command_page(ctx.app, path, command, locale)
    return Reply("help.command", {"text": text}, data={"command": list(path)})


def usage_of(ctx: CommandContext) -> str:
    """The usage line of the command that runs, in the actor's language."""
    command = ctx.command if ctx.command is not None else ctx.app.commands.get(ctx.invocation.command)
    path = ctx.path or (ctx.invocation.command,)
    return usage(ctx.app, path, command, ctx.actor.locale)


def missing_argument(ctx: CommandContext, argument: str | None = None) -> UserError:
    """The error "/style save needs NAME. Usage: ..." for the named argument (by default
    the command's first), with the usage line of the schema."""
    command = ctx.command
    arguments = command.arguments if command is not None else ()
    found = next((arg for arg in arguments if arg.name == argument or argument is None), None)
    what = argument_label(found, ctx.app.translator, ctx.actor.locale) if found is not None else ""
    name = " ".join(ctx.path or (ctx.invocation.command,))
    return UserError("error.missing_argument", name=name, what=what, usage=usage_of(ctx))
