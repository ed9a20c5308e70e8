"""``atelier run`` with chat platforms: one App (one queue, one history) and one adapter per
platform whose token is set, started and stopped together.

Each platform is a module in ``bot/adapters`` with a ``build(app, settings)`` function
returning its adapter (``bot/adapters/base.py``); it is imported only when its token is
set, so a Telegram-only bot never imports discord.py. A rejected token or an unreachable
platform raises ``StartError`` from the adapter's ``start``: the run stops with that
message and a non-zero exit. SIGTERM and SIGINT stop taking commands, let running jobs
stop at their next step (they are queued again for the next start) and close the
platforms cleanly.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bot.settings import Settings

log = logging.getLogger(__name__)


class StartError(Exception):
    """A platform refused to start (bad token, unreachable API); the message says which."""


@dataclass(frozen=True)
class Platform:
    name: str
    module: str  # has build(app, settings) -> adapter
    token: Callable[[Settings], str | None]
    enabled: Callable[[Settings], bool]


PLATFORMS = (
    Platform(
        "discord",
        "bot.adapters.discord",
        lambda s: s.secrets.discord_token,
        lambda s: s.discord.enabled,
    ),
    Platform(
        "telegram",
        "bot.adapters.telegram",
        lambda s: s.secrets.telegram_token,
        lambda s: s.telegram.enabled,
    ),
)


def chosen_platforms(settings: Settings) -> list[Platform]:
    """The platforms whose token is set and that the config does not switch off."""
    return [p for p in PLATFORMS if p.token(settings) and p.enabled(settings)]


def build_adapters(app: Any, settings: Settings, platforms: list[Platform]) -> list[Any]:
    adapters = []
    for platform in platforms:
        try:
            module = importlib.import_module(platform.module)
        except ModuleNotFoundError as exc:
            if exc.name != platform.module:
                raise
            raise StartError(f"this version has no {platform.name} adapter") from None
        adapters.append(module.build(app, settings))
    return adapters


async def serve(app: Any, adapters: list[Any], *, stop: asyncio.Event | None = None) -> None:
    """Start the adapters (their delivery subscribes first, so recovered jobs' events reach
    them), then the App; serve until ``stop`` is set or SIGTERM/SIGINT; stop everything."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
    started: list[Any] = []
    try:
        for adapter in adapters:
            await adapter.start()
            started.append(adapter)
        recovered = await app.start()
        if recovered:
            log.info("queued again %d job(s) left by an earlier run", recovered)
        log.info("serving %s", ", ".join(a.platform for a in adapters))
        await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if app.started:  # running jobs stop at their next step and are queued again
            await app.queue.stop(wait=False)
        for adapter in reversed(started):  # their delivery flushes what is still queued
            try:
                await adapter.stop()
            except Exception:
                log.exception("stopping the %s adapter failed", adapter.platform)
        await app.stop(wait=False)  # releases this process's open jobs, closes the store
