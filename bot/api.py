"""The plugin API: everything a plugin uses from the core, in one module.

A plugin imports from here, from ``bot.types`` (the data it receives and returns), from
``pipeline`` (the engine's A1111 semantics) and from its own stores in ``models``; never
``bot.service``, ``models.tables`` or another plugin (tests/test_layout.py enforces it).
What is here:

- the hook marker (``hookimpl``), messages (``Msg``), errors and the option types;
- drawing: ``draw`` (the /draw path for an actor), ``redraw`` (a child of a stored
  request: reroll, variation, refine), ``options_from_request`` (the options that rebuild
  a stored request), ``default_plan``, ``plan_of`` (a request's plan, made once);
- records and visibility: ``visible`` (a generation the actor may see, else "not found",
  the core's one rule), ``is_owner``/``may_see``, ``group_jobs``, ``pick_image``,
  ``lineage``/``thread_key_of`` (the chain a result grew from);
- telling a job's user something later: ``post_notice``;
- plugin state: ``plugin_state`` (a ``PreferenceStore``: JSON values per scope, most
  specific first, and ``claim`` for exactly-once work across processes);
- moderation and scopes (``audit``, ``require_moderator``, ``scope_of`` ...), named texts
  per scope (``bot.scoped_names``, for styles and presets) and X/Y/Z grid axes
  (``GridAxis`` and the grid's shape, ``bot.grid_axes``).

The ``App`` a hook receives carries ``settings``, ``store`` (generation records) and
``service``; the functions below are the supported way to use the latter two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bot.access import actor_of, is_owner, may_see, may_touch
from bot.app import PresetEntry, StyleEntry
from bot.autocomplete import list_choices
from bot.commands import QUOTES, parse_args
from bot.draw import freeze, join_parts, options_from_request, random_seed
from bot.drawing import default_plan, plan_of
from bot.errors import (
    CommandSyntaxError,
    ImageStoreError,
    NotFound,
    OptionValueError,
    PermissionDenied,
    UserError,
)
from bot.governance import (
    GLOBAL,
    GLOBAL_MODERATOR,
    asks_global,
    audit,
    format_time,
    named_user,
    parse_duration,
    require_global_moderator,
    require_moderator,
    scope_key,
    scope_of,
    user_key,
    whole_number,
)
from bot.grid_axes import (
    AXIS_OPTIONS,
    HARD_MAX_CELLS,
    SCRIPT,
    AxisChoice,
    GridAxis,
    GridCell,
    GridSpec,
    builtin_axes,
    find_axis,
    grid_from_infotext_fields,
    loop_order,
    read_axis,
    read_grid,
    read_values,
)
from bot.help import missing_argument, usage_of
from bot.hookspecs import hookimpl
from bot.i18n import Msg, clipped
from bot.inputs import store_input_image
from bot.lineage import IMAGE, MAX_LINEAGE, lineage, pick_image, thread_key_of
from bot.options import OptionSpec, convert_value, parse_int, shown
from bot.plugins import maybe_await
from bot.reruns import draw_line, options_from_infotext, unknown_hash_note
from bot.schema import DRAW_OPTIONS
from bot.scoped_names import (
    CONFIG_OWNER,
    SCOPE_OPTIONS,
    available,
    by_scope,
    check_length,
    check_name,
    find,
    labelled,
    listed,
    listing,
    mirror,
    names_in,
    own_scopes,
    refill,
    refreshed,
    split_name,
    split_names,
    target_scope,
    valid_name,
    where,
)
from bot.settings import ConfigError
from models.preferences import GLOBAL as GLOBAL_SCOPE
from models.preferences import PreferenceStore, actor_scopes
from models.preferences import Scope as PreferenceScope
from models.records import GenerationRecord, ImageRecord
from models.tables import OPEN_STATUSES

if TYPE_CHECKING:
    from bot.types import Actor, Reply, Route

__all__ = [
    "AXIS_OPTIONS",
    "CONFIG_OWNER",
    "DRAW_OPTIONS",
    "GLOBAL",
    "GLOBAL_MODERATOR",
    "GLOBAL_SCOPE",
    "HARD_MAX_CELLS",
    "IMAGE",
    "MAX_LINEAGE",
    "OPEN_STATUSES",
    "QUOTES",
    "SCOPE_OPTIONS",
    "SCRIPT",
    "AxisChoice",
    "CommandSyntaxError",
    "ConfigError",
    "GenerationRecord",
    "GridAxis",
    "GridCell",
    "GridSpec",
    "ImageRecord",
    "ImageStoreError",
    "Msg",
    "NotFound",
    "OptionSpec",
    "OptionValueError",
    "PermissionDenied",
    "PreferenceScope",
    "PreferenceStore",
    "PresetEntry",
    "StyleEntry",
    "UserError",
    "actor_of",
    "actor_scopes",
    "asks_global",
    "audit",
    "available",
    "builtin_axes",
    "by_scope",
    "check_length",
    "check_name",
    "clipped",
    "convert_value",
    "default_plan",
    "draw",
    "draw_line",
    "find",
    "find_axis",
    "format_time",
    "freeze",
    "grid_from_infotext_fields",
    "group_jobs",
    "hookimpl",
    "is_owner",
    "join_parts",
    "labelled",
    "lineage",
    "list_choices",
    "listed",
    "listing",
    "loop_order",
    "may_see",
    "may_touch",
    "maybe_await",
    "mirror",
    "missing_argument",
    "named_user",
    "names_in",
    "options_from_infotext",
    "options_from_request",
    "own_scopes",
    "parse_args",
    "parse_duration",
    "parse_int",
    "pick_image",
    "plan_of",
    "plugin_state",
    "post_notice",
    "random_seed",
    "redraw",
    "read_axis",
    "read_grid",
    "read_values",
    "refill",
    "refreshed",
    "require_global_moderator",
    "require_moderator",
    "scope_key",
    "scope_of",
    "shown",
    "split_name",
    "split_names",
    "store_input_image",
    "target_scope",
    "thread_key_of",
    "unknown_hash_note",
    "usage_of",
    "user_key",
    "valid_name",
    "visible",
    "where",
    "whole_number",
]


async def draw(
    app: Any,
    actor: Actor,
    prompt: str,
    options: dict[str, Any],
    route: Route,
    *,
    parent_id: str | None = None,
    thread_key: str | None = None,
    forever_run: str | None = None,
) -> list[Reply]:
    """The /draw path for ``actor`` (modify_request, checks, plan, store, queue); its jobs
    answer at ``route``. ``parent_id`` makes them a result's children, ``thread_key`` puts
    them in a chain's thread, ``forever_run`` in a forever run."""
    return await app.service.draw(
        actor, prompt, options, route, parent_id=parent_id, thread_key=thread_key, forever_run=forever_run
    )


async def redraw(
    app: Any,
    record: GenerationRecord,
    changes: dict[str, Any],
    actor: Actor,
    route: Route,
    *,
    parent_id: str | None = None,
    thread_key: str | None = None,
    forever_run: str | None = None,
    prompt: str | None = None,
) -> list[Reply]:
    """A child of ``record`` (a reroll, variation, refine, remix, the next job of a run):
    the stored, effective request with only ``changes`` (/draw option values) applied and,
    when given, ``prompt`` instead of its prompt; checked, planned and queued like /draw.
    Styles and presets are not applied again. ``parent_id`` defaults to ``record``'s id."""
    return await app.service.redraw(
        record,
        changes,
        actor,
        route,
        parent_id=parent_id,
        thread_key=thread_key,
        forever_run=forever_run,
        prompt=prompt,
    )


async def visible(app: Any, generation_id: str, actor: Actor) -> GenerationRecord:
    """The generation, or ``NotFound`` when it does not exist or ``actor`` may not see it."""
    record: GenerationRecord = await app.service.visible(generation_id, actor)
    return record


def post_notice(app: Any, record: GenerationRecord, reply: Reply) -> None:
    """Tell ``record``'s user something later (a finished grid, an ended run), where the
    job answers."""
    app.service.post(record, reply)


async def group_jobs(app: Any, group_id: str, *, open_only: bool = False) -> list[GenerationRecord]:
    """The jobs one request planned (a grid's cells), in plan order; ``open_only``: those
    still queued or running."""
    if open_only:
        found: Sequence[GenerationRecord] = await app.store.list_group(group_id, statuses=OPEN_STATUSES)
    else:
        found = await app.store.list_group(group_id)
    return list(found)


def plugin_state(app: Any) -> PreferenceStore:
    """Small JSON values per scope (user, chat, guild, global), the plugins' run-time state."""
    return PreferenceStore(app.store)
