"""Autocomplete sources: named callbacks that suggest values while a user types.

A source is ``async (AutocompleteContext(actor, app, partial)) -> list[Choice]``. The
schema names sources on arguments and options (``autocomplete="styles"``); adapters
call ``complete(app, name, actor, partial)`` and never need to know where names come
from. All sources live in one registry, ``app.autocomplete``: the core's (below) and the
plugins' (``register_autocomplete``: styles, presets), a name registered twice failing
at startup naming both plugins.

Answers are capped at ``MAX_CHOICES`` (Discord's limit), matches by prefix before
matches anywhere. Model names are read off the event loop: the first listing of a
checkpoint library scans its folder, and VAE and LoRA names are a folder listing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bot.i18n import clipped
from bot.schema import MAX_CHOICES, AutocompleteContext, AutocompleteSource, Choice
from bot.types import Actor

log = logging.getLogger(__name__)

MAX_CHOICE_CHARS = 100  # Discord's limit on a choice's name and value


def _fit(text: str) -> str:
    return clipped(text, MAX_CHOICE_CHARS)


def matching(names: Iterable[str], partial: str) -> list[str]:
    """Names that start with ``partial`` (any case), then those that contain it, each once."""
    folded = partial.strip().casefold()
    unique = list(dict.fromkeys(names))
    first = [name for name in unique if name.casefold().startswith(folded)]
    rest = [name for name in unique if folded in name.casefold() and name not in first]
    return (first + rest)[:MAX_CHOICES]


def name_choices(names: Iterable[str], partial: str) -> list[Choice]:
    return [Choice(_fit(name), name) for name in matching(names, partial) if len(name) <= MAX_CHOICE_CHARS]


def list_choices(labelled: Iterable[tuple[str, str]], partial: str) -> list[Choice]:
    """Choices for a comma-separated list (``--style anime, wat``): the last item is
    completed, the ones before it are kept in the value. ``labelled`` gives each name
    with the label shown beside it."""
    head, _, last = partial.rpartition(",")
    prefix = ", ".join(part.strip() for part in head.split(",") if part.strip())
    taken = {part.strip().casefold() for part in head.split(",")}
    labels = dict(labelled)
    found = matching((name for name in labels if name.casefold() not in taken), last)
    choices = []
    for name in found:
        value = f"{prefix}, {name}" if prefix else name
        if len(value) <= MAX_CHOICE_CHARS:
            choices.append(Choice(_fit(f"{name} · {labels[name]}" if labels[name] else name), value))
    return choices


async def samplers(ctx: AutocompleteContext) -> list[Choice]:
    from pipeline.samplers import list_samplers

    return name_choices((info.name for info in list_samplers()), ctx.partial)


async def schedules(ctx: AutocompleteContext) -> list[Choice]:
    from pipeline.samplers import list_schedulers

    return name_choices((info.label for info in list_schedulers()), ctx.partial)


async def checkpoints(ctx: AutocompleteContext) -> list[Choice]:
    names = await asyncio.to_thread(ctx.app.library.names)
    return name_choices(names, ctx.partial)


def models_dir(app: Any) -> Path | None:
    """The folder /draw resolves VAE and LoRA names in: the library's."""
    return getattr(app.library, "models_dir", None)


async def vaes(ctx: AutocompleteContext) -> list[Choice]:
    from pipeline.vae import vae_names

    names = await asyncio.to_thread(vae_names, models_dir(ctx.app))
    return name_choices(names, ctx.partial)


async def loras(ctx: AutocompleteContext) -> list[Choice]:
    from pipeline.networks import NetworkLibrary

    names = await asyncio.to_thread(NetworkLibrary(models_dir(ctx.app)).lora_names)
    return list_choices(((name, "") for name in names), ctx.partial)  # --lora a, b


async def commands(ctx: AutocompleteContext) -> list[Choice]:
    """/help's argument: every visible command and subcommand, as "style save"."""
    from bot.schema import walk

    paths = [
        " ".join(path)
        for command in ctx.app.commands.items.values()
        if not command.hidden
        for path, level in walk(command)
        if not level.hidden
    ]
    return name_choices(sorted(paths), ctx.partial)


def core_sources() -> list[AutocompleteSource]:
    return [
        AutocompleteSource("samplers", samplers),
        AutocompleteSource("schedules", schedules),
        AutocompleteSource("checkpoints", checkpoints),
        AutocompleteSource("vaes", vaes),
        AutocompleteSource("loras", loras),
        AutocompleteSource("commands", commands),
    ]


async def complete(app: Any, source: str, actor: Actor, partial: str) -> list[Choice]:
    """The choices of source ``source`` for what ``actor`` typed so far, at most
    ``MAX_CHOICES``. A source that fails is logged and answers nothing: a suggestion
    list is no place for an error."""
    found = app.autocomplete.get(source)
    if found is None:
        raise KeyError(f"no autocomplete source {source!r}")
    try:
        choices = await found.complete(AutocompleteContext(actor, app, partial))
    except Exception:
        log.exception("autocomplete source %r failed", source)
        return []
    return list(choices)[:MAX_CHOICES]
