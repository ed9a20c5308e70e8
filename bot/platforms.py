"""What the chat platforms need from the command schema, decided once for every adapter.

``check_commands(app)`` runs at startup over every command, the plugins' included, and
fails naming the plugin when one breaks a platform's rules: names Discord takes (1-32
characters of ``[-_a-z0-9]``) and Telegram takes (``[a-z0-9_]``, visible commands),
at most 25 fields or subcommands per level, descriptions in English and Chinese of at
most 100 characters (Discord), a handler or subcommands (never both), known autocomplete
sources, at most 25 choices.

``telegram_commands(app, locale)`` is the list for Telegram's ``setMyCommands``;
``command_tree(app)`` is a neutral tree a Discord adapter turns into app commands as it
is (fields in the order Discord wants them, types, ranges, choices, autocomplete source
names, descriptions per locale); ``command_line(node, values)`` turns the values of an
interaction back into the text grammar for ``Service.handle``. Options marked
``advanced`` share one free-text field, "more", in the text grammar.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bot.commands import quote_value
from bot.plugins import PluginError
from bot.schema import ARGUMENT_KINDS, DRAW_OPTIONS, MAX_CHOICES, Command, Text, has_text, localized, walk

LOCALES = ("en", "zh-CN")  # every description must exist in each
MAX_FIELDS = 25  # Discord: options per command, subcommands per level, choices per option
MAX_DESCRIPTION = 100  # Discord: characters of a description
MAX_DEPTH = 3  # Discord: command, subcommand group, subcommand
DISCORD_NAME = re.compile(r"^[-_a-z0-9]{1,32}$")
TELEGRAM_NAME = re.compile(r"^[a-z0-9_]{1,32}$")
MORE = "more"  # the free-text field of the advanced options
FILE = "file"  # the attachment field

_OPTION_TYPES = {"int": "integer", "number": "number", "flag": "boolean"}
_ARGUMENT_TYPES = {"integer": "integer", "user": "user"}


@dataclass(frozen=True)
class Field:
    """One input of a command on a platform with typed fields.

    ``role`` says how its value goes back into the text grammar: "argument" (positional,
    in order), "option" (``--name value``; a boolean adds ``--name`` when true), "more"
    (grammar text appended as typed), "file" (sent as an attachment, not as text).
    """

    name: str
    type: str  # "string", "integer", "number", "boolean", "user", "attachment"
    description: dict[str, str]
    role: str
    required: bool = False
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    autocomplete: str | None = None
    rest: bool = False  # an argument that is the rest of the line: sent as typed, unquoted


@dataclass(frozen=True)
class Node:
    """A command or subcommand: ``path`` is the words the text grammar needs."""

    name: str
    path: tuple[str, ...]
    description: dict[str, str]
    fields: tuple[Field, ...] = ()
    subcommands: tuple[Node, ...] = ()
    moderator: bool = False


def _texts(app: Any, text: Text) -> dict[str, str]:
    return {locale: localized(text, app.translator, locale) for locale in LOCALES}


def _option_field(app: Any, spec: Any) -> Field:
    low = high = None
    if spec.bounds is not None and spec.kind in _OPTION_TYPES:
        low, high = spec.bounds(app.settings.limits)
    return Field(
        spec.name,
        _OPTION_TYPES.get(spec.kind, "string"),
        _texts(app, spec.description),
        "option",
        min=low,
        max=high,
        choices=tuple(spec.choices()) if spec.kind == "choice" and spec.choices else (),
        autocomplete=spec.autocomplete,
    )


def _fields(app: Any, command: Command) -> list[Field]:
    fields = [
        Field(
            arg.name,
            _ARGUMENT_TYPES.get(arg.kind, "string"),
            _texts(app, arg.description),
            "argument",
            required=arg.required,
            autocomplete=arg.autocomplete,
            rest=arg.kind in ("text", "raw"),
        )
        for arg in command.arguments
    ]
    specs = command.option_specs(app.service.options.specs)
    fields += [_option_field(app, spec) for spec in specs if not spec.advanced]
    if any(spec.advanced for spec in specs):
        fields.append(Field(MORE, "string", _texts(app, "schema.more"), MORE))
    if command.attachment is not None:
        description = _texts(app, command.attachment.description)
        fields.append(Field(FILE, "attachment", description, FILE, required=command.attachment.required))
    # Discord wants required fields first; positional arguments keep their order
    return [f for f in fields if f.required] + [f for f in fields if not f.required]


def _node(app: Any, command: Command, path: tuple[str, ...]) -> Node:
    here = (*path, command.name)
    return Node(
        command.name,
        here,
        _texts(app, command.description),
        tuple(_fields(app, command)) if not command.subcommands else (),
        tuple(_node(app, sub, here) for sub in command.subcommands if not sub.hidden),
        command.moderator,
    )


def command_tree(app: Any) -> list[Node]:
    """Every visible command, by name, as a platform-neutral tree."""
    visible = sorted((c for c in app.commands.items.values() if not c.hidden), key=lambda c: c.name)
    return [_node(app, command, ()) for command in visible]


def telegram_commands(app: Any, locale: str) -> list[tuple[str, str]]:
    """``(name, description)`` of every visible command, for Telegram's command menu."""
    return [(node.name, node.description[locale]) for node in command_tree(app)]


def command_line(node: Node, values: Mapping[str, Any]) -> tuple[str, str]:
    """An interaction's values (by field name) as ``(command, text)`` in the text grammar:
    what ``Service.handle`` takes as an ``Invocation``. Files travel as attachments."""
    words = list(node.path[1:])
    by_role = {role: [f for f in node.fields if f.role == role] for role in ("argument", "option", MORE)}
    for field in by_role["argument"]:
        value = values.get(field.name)
        if value is not None and str(value) != "":
            words.append(str(value) if field.rest else quote_value(str(value)))
    options = []
    for field in by_role["option"]:
        value = values.get(field.name)
        if value is None or value is False:
            continue
        options.append(f"--{field.name}" if value is True else f"--{field.name} {quote_value(str(value))}")
    if values.get(MORE):
        options.append(str(values[MORE]))
    text = " ".join(words)
    # after a multi-line argument (a pasted A1111 infotext) options go on lines of their
    # own, where /draw reads a paste's overrides, never onto its parameter line
    return node.path[0], ("\n" if "\n" in text else " ").join([text, *options] if text else options)


# startup checks ----------------------------------------------------------------------------------


def check_commands(app: Any) -> None:
    """Raise ``PluginError`` naming the plugin of the first command, argument or option
    that a platform would refuse."""
    for spec in app.service.options.specs:
        owner = app.options.owners.get(spec.name.casefold(), "core")
        problem = _option_problem(app, spec)
        if problem:
            raise PluginError(f"/draw option --{spec.name} of plugin {owner!r}: {problem}")
    for key, command in app.commands.items.items():
        owner = app.commands.owners[key]
        for path, level in walk(command):
            problem = _command_problem(app, level, path)
            if problem:
                raise PluginError(f"command /{' '.join(path)} of plugin {owner!r}: {problem}")


def _text_problem(app: Any, text: Text, what: str) -> str | None:
    for locale in LOCALES:
        if not has_text(text, app.translator, locale):
            return f"{what} has no {locale} description"
        length = len(localized(text, app.translator, locale))
        if length > MAX_DESCRIPTION:
            return f"{what}'s {locale} description is {length} characters (at most {MAX_DESCRIPTION})"
    return None


def _option_problem(app: Any, spec: Any) -> str | None:
    if not DISCORD_NAME.match(spec.name):
        return "the name must be 1-32 characters of a-z, 0-9, - and _"
    if spec.kind == "choice" and spec.choices is not None and len(spec.choices()) > MAX_CHOICES:
        return f"{len(spec.choices())} choices (at most {MAX_CHOICES}; use an autocomplete source)"
    if spec.autocomplete and app.autocomplete.get(spec.autocomplete) is None:
        return f"no autocomplete source {spec.autocomplete!r}"
    return _text_problem(app, spec.description, "it")


def _command_problem(app: Any, command: Command, path: tuple[str, ...]) -> str | None:
    if command.subcommands:
        if command.handler or command.arguments or command.options or command.attachment:
            return "a command with subcommands takes no handler, arguments, options or file itself"
        if command.default and command.subcommand(command.default) is None:
            return f"the default {command.default!r} is none of its subcommands"
    elif command.handler is None:
        return "it has neither a handler nor subcommands"
    if command.hidden:
        return None  # an action's target: on no menu, in no /help
    if not DISCORD_NAME.match(command.name):
        return "the name must be 1-32 characters of a-z, 0-9, - and _ (Discord)"
    if len(path) == 1 and not TELEGRAM_NAME.match(command.name):
        return "the name must be 1-32 characters of a-z, 0-9 and _ (Telegram)"
    if len(path) > MAX_DEPTH:
        return f"subcommands nest at most {MAX_DEPTH - 1} levels deep (Discord)"
    if len([sub for sub in command.subcommands if not sub.hidden]) > MAX_FIELDS:
        return f"more than {MAX_FIELDS} subcommands"
    return (
        _text_problem(app, command.description, "it")
        or _arguments_problem(app, command)
        or _fields_problem(app, command)
    )


def _arguments_problem(app: Any, command: Command) -> str | None:
    for index, argument in enumerate(command.arguments):
        what = f"argument {argument.name!r}"
        if argument.kind not in ARGUMENT_KINDS:
            return f"{what}: unknown kind {argument.kind!r} (one of {', '.join(ARGUMENT_KINDS)})"
        if argument.kind in ("text", "raw") and index != len(command.arguments) - 1:
            return f"{what}: a {argument.kind} argument takes the rest of the line, so it comes last"
        if argument.required and not all(arg.required for arg in command.arguments[:index]):
            return f"{what}: a required argument cannot follow an optional one"
        if not DISCORD_NAME.match(argument.name):
            return f"{what}: the name must be 1-32 characters of a-z, 0-9, - and _"
        if argument.autocomplete and app.autocomplete.get(argument.autocomplete) is None:
            return f"{what}: no autocomplete source {argument.autocomplete!r}"
        problem = _text_problem(app, argument.description, what)
        if problem:
            return problem
    return None


def _fields_problem(app: Any, command: Command) -> str | None:
    if command.options != DRAW_OPTIONS:
        for spec in command.option_specs([]):
            problem = _option_problem(app, spec)
            if problem:
                return f"option --{spec.name}: {problem}"
    fields = _fields(app, command)
    if len(fields) > MAX_FIELDS:
        return f"{len(fields)} fields (at most {MAX_FIELDS}: mark options advanced)"
    names = [field.name for field in fields]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        return f"a field name is used twice: {', '.join(twice)}"
    return None
