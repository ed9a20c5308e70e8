"""What the styles and negative_presets plugins share: named texts per scope.

Users keep their own styles and presets; moderators keep a chat's or a guild's with
``--chat``/``--guild``; global ones come from config and the ``register_*`` hooks. A
name is looked up personal first, then the chat's, the guild's, and the global ones.

``modify_request`` is synchronous, so what it resolves must already be in memory: each
plugin mirrors its tables per App, loads them at startup, and reloads the scopes one of
its commands touches (the caller's scopes before every command, the written scope after
every write). All writes go through these commands, so the mirror holds everything this
process stored; another process's writes on a shared database show up when the user
next runs one of the commands, or at the next start.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from bot.commands import QUOTES
from bot.errors import UserError
from bot.governance import require_moderator
from bot.i18n import Msg
from bot.options import OptionSpec
from bot.types import Actor, CommandContext, Reply
from models.preferences import actor_scopes
from models.style_store import SavedText, Scope, name_key

CONFIG_OWNER = "config"  # the owner of registry entries that come from [plugins.*] tables
_BAD_NAME_CHARS = re.compile(r'[,"\u201c\u201d\x00-\x1f\x7f]')

# per App (keyed by its store): kind -> scope -> what that scope holds
_MIRRORS: weakref.WeakKeyDictionary[Any, dict[str, dict[Scope, Any]]] = weakref.WeakKeyDictionary()


def mirror(app: Any, kind: str) -> dict[Scope, Any]:
    return _MIRRORS.setdefault(app.store, {}).setdefault(kind, {})


def refill(app: Any, kind: str, found: dict[Scope, Any], scopes: Sequence[Scope] | None) -> None:
    """Replace the mirror with what was read: every scope (``scopes`` None) or just those."""
    held = mirror(app, kind)
    if scopes is None:
        held.clear()
        held.update(found)
        return
    for scope in scopes:
        if scope in found:
            held[scope] = found[scope]
        else:
            held.pop(scope, None)


def by_scope(rows: Iterable[SavedText]) -> dict[Scope, dict[str, SavedText]]:
    """Rows grouped by scope, each group keyed by name (any case), in stored order."""
    grouped: dict[Scope, dict[str, SavedText]] = {}
    for row in rows:
        grouped.setdefault(row.where, {})[name_key(row.name)] = row
    return grouped


def own_scopes(actor: Actor) -> list[Scope]:
    """The scopes that hold saved names for ``actor``, most specific first (no global)."""
    return [scope for scope in actor_scopes(actor) if scope[0] != "global"]


def find(app: Any, kind: str, scopes: Sequence[Scope], name: str) -> SavedText | None:
    held, key = mirror(app, kind), name_key(name)
    for scope in scopes:
        found = held.get(scope, {}).get(key)
        if found is not None:
            return found
    return None


def names_in(app: Any, kind: str, scope: Scope) -> list[str]:
    return [row.name for row in mirror(app, kind).get(scope, {}).values()]


def global_names(registry: Any) -> list[str]:
    return [entry.name for entry in registry.items.values()]


def listing(app: Any, kind: str, actor: Actor, registry: Any) -> dict[str, list[str]]:
    """Names by scope kind ("user", "chat", "guild", "global") as the actor sees them."""
    scopes = dict(own_scopes(actor))
    found = {k: names_in(app, kind, (k, scopes[k])) if k in scopes else [] for k in ("user", "chat", "guild")}
    return {**found, "global": global_names(registry)}


def available(app: Any, kind: str, actor: Actor, registry: Any) -> str:
    """Every name the actor may use, for "unknown name" errors."""
    names = [name for names in listing(app, kind, actor, registry).values() for name in names]
    return ", ".join(dict.fromkeys(names)) or "-"


def listed(names: list[str]) -> str:
    return ", ".join(names) or "-"


def split_names(raw: str) -> list[str]:
    """``"a, b,a"`` -> ``["a", "b"]``: comma-separated, trimmed, each name once (any case)."""
    names: dict[str, str] = {}
    for part in raw.split(","):
        if part.strip():
            names.setdefault(name_key(part.strip()), part.strip())
    return list(names.values())


def valid_name(name: str, max_length: int, reserved: Sequence[str] = ()) -> bool:
    return (
        bool(name)
        and name == name.strip()
        and max(len(name), len(name_key(name))) <= max_length
        and not name.startswith(("#", "-"))
        and not _BAD_NAME_CHARS.search(name)
        and name_key(name) not in reserved
    )


def check_name(name: str, max_length: int, reserved: Sequence[str] = ()) -> None:
    """Names appear in ``--style a,b`` lists and in A1111's styles.csv, hence the rules."""
    if name_key(name) in reserved:
        raise UserError("saved.reserved_name", name=name)
    if not valid_name(name, max_length):
        raise UserError("saved.bad_name", name=name, max=max_length)


def check_length(name: str, what: str, text: str, limits: Any) -> None:
    """A saved text is refused when no prompt could hold it (``[limits] max_prompt_length``)."""
    if len(text) > limits.max_prompt_length:
        raise UserError(
            "saved.too_long", name=name, what=Msg(f"saved.text.{what}"), length=len(text),
            max=limits.max_prompt_length,
        )  # fmt: skip


def split_name(text: str) -> tuple[str, str]:
    """The leading name (quoted when it holds spaces) and the text after it."""
    text = text.strip()
    if text[:1] in QUOTES:
        end = text.find(QUOTES[text[0]], 1)
        if end > 0:
            return text[1:end], text[end + 1 :].strip()
    words = text.split(maxsplit=1)
    return (words[0], words[1]) if len(words) == 2 else (text, "")


def where(scope: Scope | str) -> Msg:
    kind = scope if isinstance(scope, str) else scope[0]
    return Msg(f"saved.scope.{kind}")


async def target_scope(
    ctx: CommandContext,
    options: dict[str, Any],
    action: str,
    target: str | None = None,
    *,
    write: bool = True,
) -> Scope:
    """The actor's own scope, or with ``--chat``/``--guild`` the chat's or guild's, which
    only moderators may change (refusals are written to the audit log)."""
    actor = ctx.actor
    if options.get("chat") and options.get("guild"):
        raise UserError("saved.one_scope")
    scopes = dict(own_scopes(actor))
    kind = "chat" if options.get("chat") else "guild" if options.get("guild") else "user"
    if kind not in scopes:
        raise UserError(f"saved.no_{kind}")
    if kind != "user" and write:
        await require_moderator(ctx, action, target)
    return (kind, scopes[kind])


Handler = Callable[[CommandContext], Awaitable[Reply]]


def refreshed(load: Callable[[Any, Sequence[Scope]], Awaitable[None]], handler: Handler) -> Handler:
    """``handler`` run after the caller's scopes are read again from the store, so what
    another process wrote shows up (see the module's docstring)."""

    async def run(ctx: CommandContext) -> Reply:
        await load(ctx.app, own_scopes(ctx.actor))
        return await handler(ctx)

    return run


def labelled(app: Any, kind: str, actor: Actor, registry: Any) -> list[tuple[str, str]]:
    """Every name the actor may use with where it comes from, in the actor's language:
    the one that applies first when a name is in several scopes."""
    found: dict[str, tuple[str, str]] = {}
    for scope_kind, names in listing(app, kind, actor, registry).items():
        label = app.translator.t(actor.locale, f"saved.scope.{scope_kind}")
        for name in names:
            found.setdefault(name_key(name), (name, label))
    return list(found.values())


SCOPE_OPTIONS = (
    OptionSpec("chat", "flag", description="option.scope.chat"),
    OptionSpec("guild", "flag", description="option.scope.guild"),
)
