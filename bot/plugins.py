"""The plugin host: one pluggy manager per App, registries that remember who registered what.

Built-in plugins are modules listed in ``DEFAULT_PLUGINS``; third-party plugins come
from the ``atelier`` entry-point group. Any of them can be disabled by name in config.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

import pluggy

from bot import hookspecs

log = logging.getLogger(__name__)

DEFAULT_PLUGINS = (
    "plugins.generate",
    "plugins.pnginfo",
    "plugins.moderation",
    "plugins.quotas",
    "plugins.styles",
    "plugins.negative_presets",
    "plugins.xy_grid",
    "plugins.variations",
    "plugins.img2img",
    "plugins.forever",
    "plugins.history",
)
ENTRY_POINT_GROUP = "atelier"

T = TypeVar("T")


class PluginError(Exception):
    """A plugin could not be loaded or registered something invalid (fails at startup)."""


def builtin_name(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def build_plugin_manager(
    disabled: Iterable[str] = (),
    *,
    builtins: Iterable[str] = DEFAULT_PLUGINS,
    entry_point_group: str = ENTRY_POINT_GROUP,
) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("atelier")
    pm.add_hookspecs(hookspecs)
    blocked = set(disabled)
    for name in blocked:
        pm.set_blocked(name)
    for module_name in builtins:
        name = builtin_name(module_name)
        if name in blocked:
            continue
        pm.register(importlib.import_module(module_name), name=name)
    for ep in entry_points(group=entry_point_group):
        if ep.name in blocked or pm.has_plugin(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
    pm.check_pending()
    return pm


def available_plugin_names(
    builtins: Iterable[str] = DEFAULT_PLUGINS, entry_point_group: str = ENTRY_POINT_GROUP
) -> set[str]:
    """Every plugin that could be loaded, enabled or not: what config may name."""
    return {builtin_name(module) for module in builtins} | {
        ep.name for ep in entry_points(group=entry_point_group)
    }


def plugin_hooks(pm: pluggy.PluginManager) -> list[tuple[str, list[str]]]:
    """Every registered plugin with the hooks it implements (for ``atelier plugins``)."""
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda pair: pair[0]):
        if plugin is None:
            continue
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        out.append((name, hooks))
    return out


@dataclass
class Registry(Generic[T]):
    """Named items from plugins. A duplicate name fails naming both plugins."""

    kind: str
    items: dict[str, T] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, item: T, owner: str) -> None:
        key = name.casefold()
        if key in self.owners:
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by plugin {self.owners[key]!r} and by {owner!r}"
            )
        self.items[key] = item
        self.owners[key] = owner

    def get(self, name: str) -> T | None:
        return self.items.get(name.casefold())

    def names(self) -> list[str]:
        return list(self.items)


def collect(
    pm: pluggy.PluginManager, hook_name: str, registry: Registry[Any], make: Callable[..., Any] | None = None
) -> None:
    """Call a ``register_*`` hook plugin by plugin, so each registration knows its owner."""
    hook = getattr(pm.hook, hook_name)
    for impl in reversed(hook.get_hookimpls()):
        owner = pm.get_name(impl.plugin) or repr(impl.plugin)

        def register(*args: Any, _owner: str = owner, **kwargs: Any) -> None:
            item = make(*args, **kwargs) if make else args[0]
            registry.add(item.name, item, _owner)

        impl.function(register=register)


async def maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def call_collect(hook: Any, **kwargs: Any) -> list[Any]:
    """Call a collect hook whose implementations may be async, one at a time in pluggy's
    call order; results in that order. When one raises, the later ones are not called at
    all (calling the hook as a whole would have made their coroutines already, and left
    them never awaited)."""
    results = []
    for impl in reversed(hook.get_hookimpls()):
        result = impl.function(*(kwargs[name] for name in impl.argnames))
        results.append(await maybe_await(result))
    return results
