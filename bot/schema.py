"""The command schema: what a command takes, declared once.

A ``Command`` names its positional ``arguments``, its ``options`` (``OptionSpec`` values
of ``bot.options``, or ``DRAW_OPTIONS``: the /draw options of the core and of every
plugin, by reference), its ``subcommands`` (each a ``Command`` with its own handler),
the file it takes (``attachment``) and whether it is for moderators. Everything else is
built from that one declaration:

- dispatch (``bot.dispatch``): the subcommand a first word names, the moderator gate,
  options converted and range-checked, required arguments, and translated errors that
  list what is allowed;
- ``/help`` (``bot.help``), in the actor's language;
- the platforms' views (``bot.platforms``): Telegram's command list, and a neutral tree
  that a Discord adapter turns into app commands, with autocomplete sources by name
  (``bot.autocomplete``).

A command either runs a handler or has subcommands, never both, because Discord cannot
run a command that has subcommands. ``default`` names the subcommand that runs when the
text names none (``/style`` is ``/style list``; ``/grid a cat --x ...`` is ``/grid plot``).

Texts (descriptions) are catalog keys of ``bot/i18n``, or a mapping from locale to text
for plugins that bring their own words (``{"en": ..., "zh-CN": ...}``). Every command,
argument, option and subcommand needs one in English and Chinese: startup fails naming
the plugin otherwise (``bot.platforms.check_commands``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.i18n import Translator
    from bot.options import OptionSpec
    from bot.types import Actor, CommandContext

Text = str | Mapping[str, str]  # a catalog key, or the text per locale
Handler = Callable[["CommandContext"], Awaitable[Any]]
Guard = Callable[["CommandContext"], Awaitable[None]]

# What a positional argument holds. "text" is the rest of the line; "raw" is the rest of
# the line with no option parsing at all (a pasted infotext); the others are one word
# (a quoted name counts as one). Adapters map "user" to a user picker, "integer" to a number.
ARGUMENT_KINDS = ("text", "raw", "word", "id", "image", "user", "integer")
DRAW_OPTIONS = "draw"  # ``Command.options``: the /draw options, core and plugins alike
MAX_CHOICES = 25  # Discord shows at most 25 choices or autocomplete answers


@dataclass(frozen=True)
class Argument:
    """A positional argument, in order. Only the last may be of kind "text" or "raw"."""

    name: str
    kind: str = "word"
    description: Text = ""
    required: bool = True
    autocomplete: str | None = None  # an autocomplete source's name (bot.autocomplete)
    label: Text = ""  # the usage placeholder; default: the catalog's schema.arg.<name>, else NAME


@dataclass(frozen=True)
class FileInput:
    """The file a command takes (an init image, a styles.csv), as an attachment."""

    description: Text
    required: bool = False


@dataclass(frozen=True)
class Command:
    """A command, a subcommand, or an action's target (``hidden``: no /help, no menu).

    ``handler(ctx)`` returns replies (a list, one, or None). ``guard(ctx)`` runs before
    the arguments are read, like the ``moderator`` gate, so that a refused attempt is
    audited however it is written (``ctx.text`` is still the raw text then).
    """

    name: str
    handler: Handler | None = None
    description: Text = ""
    arguments: tuple[Argument, ...] = ()
    options: tuple[OptionSpec, ...] | str = ()
    subcommands: tuple[Command, ...] = ()
    default: str | None = None
    attachment: FileInput | None = None
    moderator: bool = False
    guard: Guard | None = None
    details: Text = ""  # a longer explanation, shown by /help COMMAND only
    hidden: bool = False

    def subcommand(self, word: str) -> Command | None:
        folded = word.casefold()
        return next((sub for sub in self.subcommands if sub.name == folded), None)

    @property
    def reads_own_text(self) -> bool:
        """The handler reads options itself: /draw's (a pasted infotext becomes options
        first) or none at all (a raw argument)."""
        return self.options == DRAW_OPTIONS or any(arg.kind == "raw" for arg in self.arguments)

    def option_specs(self, draw_options: list[OptionSpec]) -> list[OptionSpec]:
        return list(draw_options) if self.options == DRAW_OPTIONS else list(self.options)


def resolve(command: Command, text: str) -> tuple[list[Command], str]:
    """The levels a command line selects and the text left for the last one.

    A first word that names a subcommand selects it. Otherwise the ``default``
    subcommand runs when the text is empty or the default takes arguments; else the
    resolution stops at a level with subcommands, which dispatch reports as unknown.
    """
    levels = [command]
    rest = text.strip()
    while levels[-1].subcommands:
        current = levels[-1]
        words = rest.split(maxsplit=1)
        found = current.subcommand(words[0]) if words else None
        if found is not None:
            levels.append(found)
            rest = words[1] if len(words) > 1 else ""
            continue
        default = current.subcommand(current.default) if current.default else None
        if default is not None and (not rest or default.arguments or default.reads_own_text):
            levels.append(default)
            continue
        break
    return levels, rest


def walk(command: Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Command]]:
    """Every level of a command with its path, depth first, the command itself first."""
    here = (*path, command.name)
    found = [(here, command)]
    for sub in command.subcommands:
        found.extend(walk(sub, here))
    return found


def localized(text: Text, translator: Translator, locale: str) -> str:
    """A description in ``locale``: a mapping's entry (English when it has none) or the
    catalog's text for a key."""
    if isinstance(text, Mapping):
        return text.get(locale) or text.get("en") or ""
    return translator.t(locale, text) if text else ""


def has_text(text: Text, translator: Translator, locale: str) -> bool:
    """Whether ``locale`` has its own words for ``text`` (no fallback to English)."""
    if isinstance(text, Mapping):
        return bool(text.get(locale))
    return bool(text) and bool(translator.catalogs.get(locale, {}).get(text))


@dataclass(frozen=True)
class Choice:
    """One autocomplete answer: ``name`` is shown (in the actor's language), ``value`` is sent."""

    name: str
    value: str


@dataclass(frozen=True)
class AutocompleteContext:
    actor: Actor
    app: Any
    partial: str  # what the user has typed so far in that field


@dataclass(frozen=True)
class AutocompleteSource:
    """A named source of choices (``styles``, ``samplers`` ...), found by adapters by name."""

    name: str
    complete: Callable[[AutocompleteContext], Awaitable[list[Choice]]]
