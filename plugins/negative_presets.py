"""Negative-prompt presets: named negative prompts added with ``--preset a,b``.

The NAI list ships as ``nai``; ``[plugins.negative_presets]`` and the
``register_negative_presets`` hook add global ones; users save their own and moderators
a chat's or guild's (``/preset save NAME TEXT [--chat|--guild]``). A default applies when
a request names no preset: the user's (``/preset default NAME``), else the chat's, else
the guild's (moderators, ``--chat``/``--guild``), else the configured one. ``--preset
none`` turns it off for one request, ``/preset default none`` for good, ``/preset default
reset`` follows the chat/guild/configured default again.

A preset's text goes after the user's own negative prompt (and a style's), and a text the
negative prompt already holds is not added twice: a reroll or a pasted infotext carries
the presets' text already. The names are stored on the request
(``GenerationRequest.negative_presets``), never in the infotext.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bot.api import (
    CONFIG_OWNER,
    SCOPE_OPTIONS,
    ConfigError,
    Msg,
    NotFound,
    OptionSpec,
    PreferenceStore,
    UserError,
    audit,
    available,
    by_scope,
    check_length,
    check_name,
    find,
    hookimpl,
    join_parts,
    labelled,
    list_choices,
    listed,
    listing,
    mirror,
    missing_argument,
    names_in,
    own_scopes,
    parse_args,
    refill,
    refreshed,
    split_name,
    split_names,
    target_scope,
    valid_name,
    where,
)
from bot.types import (
    Argument,
    AutocompleteContext,
    AutocompleteSource,
    Choice,
    Command,
    CommandContext,
    Reply,
)
from models.style_store import SavedText, Scope, ScopeFull, StyleStore, name_key
from models.styles import NAME_LENGTH

log = logging.getLogger(__name__)

# NovelAI's "Low Quality + Bad Anatomy" undesired-content list, as the setup guide gives it
NAI_NEGATIVE = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry"
)
PRESETS = "presets"  # mirror kinds
DEFAULTS = "preset.default"  # also the preference key
NONE, RESET = "none", "reset"
RESERVED = (NONE, RESET)
ORDER = 500  # negative parts join by order: presets after other plugins' usual parts


class PresetsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    presets: dict[str, str] = {}
    default: str = ""
    max_name_length: int = Field(64, ge=1, le=NAME_LENGTH)
    max_per_scope: int = Field(50, ge=1)


def config(app: Any) -> PresetsConfig:
    return app.settings.plugin_config("negative_presets", PresetsConfig)  # type: ignore[return-value]


async def load(app: Any, scopes: Sequence[Scope] | None = None) -> None:
    store = StyleStore(app.store)
    refill(app, PRESETS, by_scope(await store.presets(scopes)), scopes)
    refill(app, DEFAULTS, await store.preference_values(DEFAULTS, scopes), scopes)


@hookimpl
def register_negative_presets(register: Any) -> None:
    register("nai", NAI_NEGATIVE)


@hookimpl
def register_options(register: Any) -> None:
    register(OptionSpec("preset", "names", ("presets",), description="option.preset", autocomplete=PRESETS))


@hookimpl
def register_commands(register: Any) -> None:
    name = Argument("name", "word", "arg.preset_name", autocomplete=PRESETS)
    subcommands = (
        Command("list", refreshed(load, _list), "cmd.preset.list"),
        Command("show", refreshed(load, _show), "cmd.preset.show", (name,)),
        Command(
            "save",
            refreshed(load, _save),
            "cmd.preset.save",
            (Argument("name", "word", "arg.preset_new_name"), Argument("text", "text", "arg.preset_text")),
            SCOPE_OPTIONS,
        ),
        Command("delete", refreshed(load, _delete), "cmd.preset.delete", (name,), SCOPE_OPTIONS),
        Command(
            "default",
            refreshed(load, _default),
            "cmd.preset.default",
            (Argument("names", "text", "arg.preset_default", required=False, autocomplete=PRESETS),),
            SCOPE_OPTIONS,
        ),
    )
    register(Command("preset", description="cmd.preset", subcommands=subcommands, default="list"))


@hookimpl
def register_autocomplete(register: Any) -> None:
    register(AutocompleteSource(PRESETS, complete_presets))


async def complete_presets(ctx: AutocompleteContext) -> list[Choice]:
    """The presets ``ctx.actor`` may use, each named with where it comes from."""
    await load(ctx.app, own_scopes(ctx.actor))
    return list_choices(labelled(ctx.app, PRESETS, ctx.actor, ctx.app.presets), ctx.partial)


@hookimpl
async def startup(app: Any) -> None:
    from bot.api import PresetEntry

    cfg = config(app)
    for name, text in cfg.presets.items():
        if not valid_name(name, cfg.max_name_length, RESERVED):
            raise ConfigError(f"[plugins.negative_presets] presets: {name!r} cannot be a preset name")
        if app.presets.owners.get(name_key(name)) != CONFIG_OWNER:  # a restarted App has them
            app.presets.add(name, PresetEntry(name, text), CONFIG_OWNER)
    try:
        names = parse_choice(cfg.default)
    except UserError:
        raise ConfigError("[plugins.negative_presets] default: none cannot be combined with names") from None
    for name in names:
        if app.presets.get(name) is None:
            raise ConfigError(f"[plugins.negative_presets] default: no global preset {name!r}")
    await load(app)


def parse_choice(raw: str) -> list[str]:
    """``a,b`` -> those names; ``none`` -> no preset at all (only on its own)."""
    names = split_names(raw)
    if any(name_key(name) == NONE for name in names):
        if len(names) > 1:
            raise UserError("preset.none_mixed", value=raw)
        return []
    return names


def find_preset(app: Any, scopes: Sequence[Scope], name: str) -> Any:
    """The preset of the first scope that has ``name``, else the global one, else None."""
    return find(app, PRESETS, scopes, name) or app.presets.get(name)


def _unknown(app: Any, actor: Any, name: str) -> UserError:
    return UserError("preset.unknown", name=name, available=available(app, PRESETS, actor, app.presets))


def default_names(app: Any, actor: Any) -> tuple[Scope | None, list[str]]:
    """The default that applies to ``actor`` and where it is set (None: the config's)."""
    held = mirror(app, DEFAULTS)
    for scope in own_scopes(actor):
        if scope in held:
            return scope, list(held[scope])
    return None, parse_choice(config(app).default)


@hookimpl(trylast=True)  # after styles and other plugins, so the texts they added are seen
def modify_request(draft: Any, actor: Any, app: Any) -> None:
    scopes = own_scopes(actor)
    raw = draft.options.get("preset")
    names = default_names(app, actor)[1] if raw is None else parse_choice(raw)
    presets = []
    for name in names:
        preset = find_preset(app, scopes, name)
        if preset is not None:
            presets.append(preset)
        elif raw is not None:
            raise _unknown(app, actor, name)
        else:  # a default whose preset was deleted since: drawing must go on
            log.warning("default negative preset %r of %s no longer exists", name, actor.key)
    for preset in presets:
        if preset.negative_prompt not in join_parts(draft.negative_prompt, draft.negative_parts):
            draft.add_negative(preset.negative_prompt, ORDER)
        draft.negative_presets.append(preset.name)


# /preset ---------------------------------------------------------------------------------------


def _scope_of(preset: Any) -> str:
    return preset.scope if isinstance(preset, SavedText) else "global"


async def _list(ctx: CommandContext) -> Reply:
    found = listing(ctx.app, PRESETS, ctx.actor, ctx.app.presets)
    scope, names = default_names(ctx.app, ctx.actor)
    params = {kind: listed(names) for kind, names in found.items()}
    params["default"] = _default_text(scope, names)
    return Reply("preset.list", params, data={"presets": found, "default": names})


def _default_text(scope: Scope | None, names: list[str]) -> Any:
    if not names:
        return Msg("preset.no_default")
    return Msg("preset.default_where", {"names": ", ".join(names), "where": where(scope or "global")})


async def _show(ctx: CommandContext) -> Reply:
    name = ctx.text
    preset = find_preset(ctx.app, own_scopes(ctx.actor), name)
    if preset is None:
        raise _unknown(ctx.app, ctx.actor, name)
    scope = _scope_of(preset)
    data = {"name": preset.name, "scope": scope, "negative_prompt": preset.negative_prompt}
    return Reply(
        "preset.show", {"name": preset.name, "where": where(scope), "text": preset.negative_prompt}, data=data
    )


async def _save(ctx: CommandContext) -> Reply:
    name, negative = split_name(ctx.text)
    scope = await target_scope(ctx, ctx.options, "preset.save", name)
    cfg, limits = config(ctx.app), ctx.app.settings.limits
    check_name(name, cfg.max_name_length, RESERVED)
    negative = parse_args(negative).text
    if not negative.strip():
        raise missing_argument(ctx, "text")
    check_length(name, "negative", negative, limits)
    try:
        added, _ = await StyleStore(ctx.app.store).save_presets(
            scope, [(name, negative)], by=ctx.actor.key, limit=cfg.max_per_scope
        )
    except ScopeFull as exc:
        raise UserError("preset.too_many", count=exc.count, max=exc.limit, where=where(scope)) from None
    await load(ctx.app, [scope])
    if scope[0] != "user":
        await audit(ctx, "preset.save", target=name)
    return Reply(
        "preset.saved" if added else "preset.replaced",
        {"name": name, "where": where(scope)},
        data={"preset": {"name": name, "scope": scope[0], "negative_prompt": negative}},
    )


async def _delete(ctx: CommandContext) -> Reply:
    name = ctx.text
    scope = await target_scope(ctx, ctx.options, "preset.delete", name)
    removed = await StyleStore(ctx.app.store).delete_preset(scope, name)
    if removed is not None:
        # a default of the same scope that named it would only dangle
        default = mirror(ctx.app, DEFAULTS).get(scope)
        if default and any(name_key(n) == name_key(removed.name) for n in default):
            kept = [n for n in default if name_key(n) != name_key(removed.name)]
            await PreferenceStore(ctx.app.store).set(scope, DEFAULTS, kept, by=ctx.actor.key)
    await load(ctx.app, [scope])
    if removed is None:
        raise NotFound(
            "preset.not_found",
            name=name,
            where=where(scope),
            available=listed(names_in(ctx.app, PRESETS, scope)),
        )
    if scope[0] != "user":
        await audit(ctx, "preset.delete", target=removed.name)
    return Reply("preset.deleted", {"name": removed.name, "where": where(scope)})


async def _default(ctx: CommandContext) -> Reply:
    """``/preset default``: what applies; ``NAME[,NAME]``, ``none`` or ``reset`` changes it."""
    text, options = ctx.text, ctx.options
    app = ctx.app
    if not text:
        if options:
            raise missing_argument(ctx)
        scope, names = default_names(app, ctx.actor)
        return Reply("preset.default_is", {"default": _default_text(scope, names)}, data={"default": names})
    scope = await target_scope(ctx, options, "preset.default", text)
    preferences = PreferenceStore(app.store)
    if name_key(text) == RESET:
        await preferences.delete(scope, DEFAULTS)
        names: list[str] = []
        key = "preset.default_reset"
    else:
        names = parse_choice(text)
        # a chat's or guild's default may only name presets everyone there can use
        scopes = own_scopes(ctx.actor)
        usable = scopes[scopes.index(scope) :]
        presets = [find_preset(app, usable, name) for name in names]
        for name, preset in zip(names, presets, strict=True):
            if preset is None:
                raise _unknown(app, ctx.actor, name)
        names = [preset.name for preset in presets]
        await preferences.set(scope, DEFAULTS, names, by=ctx.actor.key)
        key = "preset.default_set" if names else "preset.default_off"
    await load(app, [scope])
    if scope[0] != "user":
        await audit(ctx, "preset.default", target=", ".join(names) or text)
    return Reply(key, {"names": ", ".join(names), "where": where(scope)}, data={"default": names})
