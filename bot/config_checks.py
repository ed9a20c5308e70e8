"""Startup checks of settings that need more than the file: installed samplers, plugins
and checkpoints. Each failure is a ``ConfigError`` naming the table and key, so a value
that would fail every /draw later stops the start instead (README: a bad value stops the
start)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from bot.errors import UserError
from bot.settings import ConfigError, Settings


def _suggest(name: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if not close:
        folded = {k.casefold(): k for k in known}
        close = difflib.get_close_matches(name.casefold(), list(folded), n=1, cutoff=0.6)
        close = [folded[c] for c in close]
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_sampler_defaults(settings: Settings) -> None:
    from bot.draw import resolve_sampler, resolve_scheduler
    from pipeline import samplers

    defaults = settings.defaults
    try:
        resolve_scheduler(defaults.scheduler)
    except UserError:
        labels = [info.label for info in samplers.list_schedulers()]
        raise ConfigError(
            f"[defaults] scheduler: unknown schedule type {defaults.scheduler!r}"
            f"{_suggest(defaults.scheduler, labels)}; the schedule types: {', '.join(labels)}"
        ) from None
    try:
        resolve_sampler(defaults.sampler, defaults.scheduler)
    except UserError:
        names = samplers.sampler_names()
        raise ConfigError(
            f"[defaults] sampler: unknown sampler {defaults.sampler!r}"
            f"{_suggest(defaults.sampler, names)}; the samplers: {', '.join(names)}"
        ) from None


def check_plugin_names(settings: Settings, known: Iterable[str]) -> None:
    """``[plugins] disabled`` and ``[plugins.<name>]`` tables must name plugins that exist:
    a typo would otherwise leave a plugin enabled, or its settings unread, in silence."""
    known = sorted(set(known))
    listing = ", ".join(known)
    for name in settings.plugins.disabled:
        if name not in known:
            raise ConfigError(
                f"[plugins] disabled: no plugin is called {name!r}{_suggest(name, known)}; "
                f"the plugins: {listing}"
            )
    for name in (settings.plugins.model_extra or {}).keys():
        if name not in known:
            raise ConfigError(
                f"[plugins.{name}]: no plugin is called {name!r}{_suggest(name, known)}; the plugins: {listing}"
            )


def check_default_checkpoint(settings: Settings, library: Any) -> None:
    """Blocking (it scans the models folder): call it from a thread."""
    name = settings.engine.default_checkpoint
    names = library.names()
    if name in names or name.casefold() in {n.casefold() for n in names}:
        return
    raise ConfigError(
        f"[engine] default_checkpoint: no checkpoint is called {name!r}{_suggest(name, names)}; "
        f"the checkpoints: {', '.join(sorted(names)) or 'none'}"
    )
