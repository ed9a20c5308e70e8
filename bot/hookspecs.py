"""The plugin contract. Markers and empty specs only.

Hooks are called by keyword. Collect hooks return a list of every plugin's result;
``firstresult`` hooks stop at the first non-None result and are plain ``def``. Hooks
marked "may be async" may return an awaitable, which the core awaits. No hook receives
a Discord or Telegram object.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from bot.app import App
    from bot.grid_axes import GridAxis
    from bot.options import OptionSpec
    from bot.types import (
        Action,
        Actor,
        Admission,
        AutocompleteSource,
        Command,
        Denial,
        DrawRequest,
        Plan,
        Reply,
        RequestDraft,
    )
    from models.records import GenerationRecord

hookspec = pluggy.HookspecMarker("atelier")
hookimpl = pluggy.HookimplMarker("atelier")


@hookspec
def register_commands(register: Callable[[Command], None]) -> None:
    """Called once at startup. Call ``register(Command(...))`` for each command the plugin
    adds, declared with the schema of ``bot.schema`` (handler, description, arguments,
    options, subcommands, file, moderator flag), from which dispatch, /help and every
    platform's command list are built. A name registered twice, or a command that breaks
    a platform's rules (name, description in English and Chinese, at most 25 fields),
    fails at startup naming the plugin. Actions on results (buttons) are commands too
    (``hidden``): ``Action.id`` is ``<command>:<argument>``."""


@hookspec
def register_autocomplete(register: Callable[[AutocompleteSource], None]) -> None:
    """Called once at startup. Call ``register(AutocompleteSource(name, callback))``
    (``bot.schema``) for each source of suggestions the plugin adds; ``callback`` is
    ``async (AutocompleteContext) -> list[Choice]``. Arguments and options name sources
    with ``autocomplete="name"``; adapters ask ``bot.autocomplete.complete``. A name
    registered twice (the core's included) fails at startup naming both."""


@hookspec
def register_styles(register: Callable[..., None]) -> None:
    """Called once at startup. Call ``register(name, prompt, negative_prompt)`` for each
    global style. Per-user and per-guild styles live in the store, not here."""


@hookspec
def register_negative_presets(register: Callable[[str, str], None]) -> None:
    """Called once at startup. Call ``register(name, negative_prompt)`` for each preset."""


@hookspec
def modify_request(draft: RequestDraft, actor: Actor, app: App) -> None:
    """Called for every /draw before validation, synchronously. Edit ``draft`` (a
    ``RequestDraft``) in place: add ordered prompt parts, apply styles or presets, fill
    defaults. The return value is ignored."""


@hookspec
def actor_roles(actor: Actor, app: App) -> Iterable[str] | None:
    """Called for every command before it runs, synchronously. Return role names (an
    iterable of str) to add to ``actor.roles`` (e.g. "moderator" for a configured user id),
    or None. Roles only ever grow: adapters' roles stay. The result is what every later
    hook, the stored job and ``Actor.is_moderator`` see."""


@hookspec
def check_request(
    request: DrawRequest, actor: Actor, app: App
) -> Denial | Admission | None | Awaitable[Denial | Admission | None]:
    """Called for every validated request (a ``DrawRequest``) before anything is stored.
    Return a ``Denial`` to refuse it, an ``Admission`` to let it in with a lower priority
    and a note to the user, or None. May be async. Results are taken in hook call order
    and the first Denial wins: nothing is queued, and async implementations after it are
    never awaited. So a check that reserves something (quotas) runs ``trylast`` and its
    reservation is only made when every earlier check admitted the request."""


@hookspec
def request_dropped(request: DrawRequest, app: App) -> None | Awaitable[None]:
    """Called when a request that every ``check_request`` admitted could not be stored
    (a database error): undo what ``check_request`` reserved for it. May be async; errors
    are logged. Not called for denied requests."""


@hookspec(firstresult=True)
def plan_generation(request: DrawRequest, app: App) -> Plan | None:
    """Turn a ``DrawRequest`` into a ``Plan`` (the jobs to store and queue).
    First non-None result wins; the built-in ``generate`` plugin is the trylast default,
    and the core plans one job per batch if no plugin answers. Synchronous."""


@hookspec
def result_actions(record: GenerationRecord, actor: Actor, app: App) -> list[Action] | None:
    """Called when a job finished, with its ``GenerationRecord``. Return a list of
    ``Action`` (buttons) to offer on the result, or None. Lists are concatenated in hook
    call order."""


@hookspec
def generation_finished(record: GenerationRecord, app: App) -> None | Awaitable[None]:
    """Called once per job that finished (status "finished"), after its images are stored.
    May be async. Errors are logged and never reach the user or other plugins."""


@hookspec
def generations_finished(records: list[GenerationRecord], app: App) -> None | Awaitable[None]:
    """Called once for the jobs of one device whose ends were stored together (one or
    more, in the order they ran), before ``generation_finished`` is called for each of
    them: a plugin may do its per-job work here for all of them at once (quotas settle
    them in one round trip). May be async. Errors are logged and never reach the user or
    other plugins."""


@hookspec
def generation_ended(record: GenerationRecord, app: App) -> None | Awaitable[None]:
    """Called once per job that ended without finishing (status "failed" or "cancelled"),
    after the status is stored, with its ``GenerationRecord``. Never called for a job that
    is only interrupted and queued again, nor for one that finished. May be async. Errors
    are logged and never reach the user or other plugins (quotas release reservations)."""


@hookspec(firstresult=True)
def handle_error(exception: BaseException, actor: Actor, app: App) -> Reply | None:
    """Called for an exception that is not a ``UserError``. Return a ``Reply`` to show
    instead of the generic "something went wrong (ref ...)", or None. Synchronous."""


@hookspec
def startup(app: App) -> None | Awaitable[None]:
    """Called once when the App starts, after the store and queue are ready. May be async."""


@hookspec
def shutdown(app: App) -> None | Awaitable[None]:
    """Called once when the App stops, before the store closes. May be async."""


@hookspec
def register_options(register: Callable[[OptionSpec], None]) -> None:
    """Called once at startup. Call ``register(OptionSpec(...))`` (``bot.options``) for each
    option the plugin adds to /draw (``--style``, ``--preset`` ...). The parsed value is in
    ``draft.options`` / ``request.options`` under the option's name. A name (or alias)
    taken by the core or another plugin fails at startup naming both."""


@hookspec
def register_grid_axes(register: Callable[[GridAxis], None]) -> None:
    """Called once at startup. Call ``register(axis)`` for each X/Y/Z grid axis the plugin
    adds; ``axis`` is a ``GridAxis`` (``bot.api``) (its name, value kind and how a value
    changes a cell's request). Read by the xy_grid plugin; a duplicate name fails at
    startup naming both plugins."""
