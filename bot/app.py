"""The composition root: ``build_app(settings)`` wires store, plugins, registries, engine,
queue and service. Nothing is built at import time; nothing global is shared between Apps.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from bot import config_checks, db
from bot.autocomplete import core_sources
from bot.events import EventBus
from bot.i18n import Translator, default_translator
from bot.image_store import DatabaseImageStore, ImageStore, LocalImageStore, S3ImageStore
from bot.leases import Heartbeat, new_owner_id
from bot.platforms import check_commands
from bot.plugins import Registry, available_plugin_names, build_plugin_manager, call_collect, collect
from bot.relay import Relay
from bot.replay import EndReplay
from bot.schema import AutocompleteSource
from bot.service import Service, core_commands
from bot.settings import ConfigError, Settings, backend_problem, image_store_problem
from bot.types import Command
from models.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StyleEntry:
    name: str
    prompt: str
    negative_prompt: str = ""


@dataclass(frozen=True)
class PresetEntry:
    name: str
    negative_prompt: str


@dataclass
class App:
    settings: Settings
    pm: pluggy.PluginManager
    store: Store
    translator: Translator
    library: Any  # pipeline.checkpoints.CheckpointLibrary
    engines: list[Any]  # one pipeline.engine.Engine per device
    bus: EventBus = field(default_factory=EventBus)
    commands: Registry[Command] = field(default_factory=lambda: Registry("command"))
    styles: Registry[StyleEntry] = field(default_factory=lambda: Registry("style"))
    presets: Registry[PresetEntry] = field(default_factory=lambda: Registry("negative preset"))
    options: Registry[Any] = field(default_factory=lambda: Registry("/draw option"))  # bot.options.OptionSpec
    grid_axes: Registry[Any] = field(default_factory=lambda: Registry("grid axis"))  # xy_grid.GridAxis
    autocomplete: Registry[AutocompleteSource] = field(
        default_factory=lambda: Registry("autocomplete source")
    )
    queue: Any = None
    images: ImageStore = None  # type: ignore[assignment]  # the local images folder unless given
    owner: str = field(default_factory=new_owner_id)  # holds this App's jobs (bot/leases.py)
    # with a shared queue ([queue] backend = "procrastinate"): True in `atelier worker`,
    # whose devices run the jobs; False in the bot's process, which only enqueues
    worker: bool = False
    service: Service = field(init=False)
    heartbeat: Heartbeat = field(init=False)
    relay: Relay | None = field(init=False, default=None)
    replay: EndReplay = field(init=False)  # ends that never reached their chat (bot/replay.py)
    feed: Any = field(init=False, default=None)  # bot.worker.WorkerFeed in a worker
    started: bool = False

    def __post_init__(self) -> None:
        from pipeline.queue import LocalQueue

        self.service = Service(self)
        self.replay = EndReplay(self)
        self.heartbeat = Heartbeat(self.service, self.settings.queue.lease_seconds)
        queue = self.settings.queue
        if self.queue is None and self.shared_queue:
            from models.direct import PING_AFTER_IDLE
            from pipeline.queue.procrastinate import ProcrastinateQueue

            self.queue = ProcrastinateQueue(self.settings.database_url, ping_after_idle=PING_AFTER_IDLE)
        elif self.queue is None:
            self.queue = LocalQueue(
                self.engines,
                self.service,
                max_batch=queue.max_batch,
                batch_window=queue.batch_window_ms / 1000,
                warm_up=self.settings.engine.default_checkpoint if self.settings.engine.warm_up else None,
            )
        if self.images is None and queue.image_store == "s3":
            self.images = S3ImageStore.from_settings(self.settings, self.store)
        elif self.images is None and self.shared_queue and queue.image_store == "database":
            self.images = DatabaseImageStore(self.store)
        elif self.images is None:
            self.images = LocalImageStore(self.images_dir, self.store)

    @property
    def shared_queue(self) -> bool:
        """Jobs wait in PostgreSQL for workers (procrastinate), not in this process."""
        return self.settings.queue.backend == "procrastinate"

    @property
    def images_dir(self) -> Path:
        return self.settings.bot.images_path

    async def start(self, *, recover: bool = True) -> int:
        """Migrate (if configured), start plugins and workers, take over the unfinished jobs
        of processes that are gone, and keep this App's leases alive.

        With ``recover`` the heartbeat also takes over, while the App runs, the jobs of any
        process that goes away later. Then the ends of jobs that never reached their chat
        are shown (``EndReplay``; the delivery layers subscribe before). Returns the number
        of jobs taken over at start.
        """
        if self.settings.database.auto_upgrade:
            await asyncio.to_thread(db.upgrade, self.settings.database_url)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        await self.images.start()  # a store it cannot use (a bucket) stops the start
        models_dir = getattr(self.library, "models_dir", None)
        if models_dir is not None and not await asyncio.to_thread(Path(models_dir).is_dir):
            log.warning(
                "models folder %s does not exist: only the built-in checkpoints are available", models_dir
            )
        await asyncio.to_thread(config_checks.check_default_checkpoint, self.settings, self.library)
        await self.queue.start()
        if self.shared_queue:
            await self._start_shared()
        self.started = True
        await call_collect(self.pm.hook.startup, app=self)
        recovered = await self.service.recover() if recover else 0
        self.heartbeat.start(adopt=recover)
        await self.replay_ends()
        return recovered

    async def replay_ends(self) -> int:
        """Show the ends that never reached their chat; an error is logged, never raised."""
        try:
            return await self.replay.sweep()
        except Exception:
            log.exception("could not look for job ends that never reached their chat")
            return 0

    async def _start_shared(self) -> None:
        """A worker runs the shared queue's jobs on its devices and relays their events; the
        bot listens to them."""
        from bot.relay import Relay

        self.relay = Relay(self)
        if self.worker:
            from bot.worker import WorkerFeed

            self.feed = WorkerFeed(self, self.queue)
            await self.relay.forward()
            await self.feed.start()
            return
        await self.relay.listen()

    async def stop(self, *, wait: bool = True) -> None:
        """Stop the workers (``wait``: let running jobs finish), then release this App's
        open jobs so that another process, or the next start, takes them at once."""
        if self.started:
            if self.feed is not None:
                await self.feed.drain(wait=wait)
            await self.queue.stop(wait=wait)
            await self.heartbeat.stop()
            if self.relay is not None:
                await self.relay.stop()
            try:
                released = await self.store.release(self.owner)
            except Exception:  # unreleased jobs are taken over when their lease runs out
                log.exception("could not release this process's open jobs")
            else:
                if released:
                    log.info("released %d open job(s) for another process or the next start", released)
            await call_collect(self.pm.hook.shutdown, app=self)
            self.started = False
        await self.images.close()
        await self.store.close()

    async def idle(self) -> None:
        await self.queue.join()
        if self.relay is not None and not self.worker:  # the jobs' ends travel after them
            await self.relay.settled()


def build_app(
    settings: Settings,
    *,
    engines: list[Any] | None = None,
    library: Any = None,
    plugins: tuple[Any, ...] = (),
    worker: bool = False,
) -> App:
    """Build everything. ``engines``/``library`` let several Apps share loaded checkpoints;
    ``plugins`` registers extra plugin objects (embedding, tests) beside the built-in ones;
    ``worker``: the App of ``atelier worker`` (with a shared queue the bot's own App has
    no devices: workers run its jobs)."""
    problem = backend_problem(settings) or image_store_problem(settings)
    if problem:
        raise ConfigError(problem)
    pm = build_plugin_manager(settings.plugins.disabled)
    for plugin in plugins:
        pm.register(plugin, name=getattr(plugin, "__name__", None) or type(plugin).__name__)
    registered = {name for name, plugin in pm.list_name_plugin() if plugin is not None}
    config_checks.check_plugin_names(settings, available_plugin_names() | registered)
    config_checks.check_sampler_defaults(settings)
    if library is None:
        from pipeline.checkpoints import CheckpointLibrary

        library = CheckpointLibrary(
            settings.engine.models_dir,
            max_loaded=settings.engine.max_loaded,
            tokenizer_dir=settings.engine.tokenizer_dir or None,
            hash_cache=settings.bot.data_dir / "cache" / "hashes.json",
        )
    if engines is None and settings.queue.backend == "procrastinate" and not worker:
        engines = []
    if engines is None:
        devices = settings.engine.devices or (settings.engine.device,)
        made = DeferredEngine if not worker and all(deferrable(settings, d) for d in devices) else make_engine
        engines = [
            made(settings, library if index == 0 else library.for_device(), device=device)
            for index, device in enumerate(devices)
        ]
    app = App(
        settings=settings,
        pm=pm,
        store=Store.from_url(settings.database_url, echo=settings.database.echo),
        translator=default_translator(),
        library=library,
        engines=engines,
        worker=worker,
    )
    for command in core_commands(app.service):
        app.commands.add(command.name, command, "core")
    collect(pm, "register_commands", app.commands)
    collect(pm, "register_styles", app.styles, StyleEntry)
    collect(pm, "register_negative_presets", app.presets, PresetEntry)
    register_plugin_options(app)
    collect(pm, "register_grid_axes", app.grid_axes)
    for source in core_sources():
        app.autocomplete.add(source.name, source, "core")
    collect(pm, "register_autocomplete", app.autocomplete)
    check_commands(app)
    return app


def register_plugin_options(app: App) -> None:
    """Plugins' /draw options join the core table; a name or alias taken twice fails at
    startup naming both owners (the core included)."""
    taken = Registry[Any]("/draw option")
    for spec in app.service.options.specs:
        for name in (spec.name, *spec.aliases):
            taken.add(name, spec, "core")
    collect(app.pm, "register_options", app.options)
    for spec in app.options.items.values():
        owner = app.options.owners[spec.name.casefold()]
        for name in (spec.name, *spec.aliases):
            taken.add(name, spec, owner)
        app.service.options.add(spec)


def deferrable(settings: Settings, device: str) -> bool:
    """Whether ``make_engine`` cannot refuse these settings on any machine, so that the
    engine may be built where it is first used: a CPU, or the best device there is, and no
    attention backend that must be installed."""
    return device in ("cpu", "auto") and settings.engine.attention != "xformers"


class DeferredEngine:
    """A device's engine, built where it is first used: on its device's thread, by the
    warm-up at start or by the first job. Meanwhile the process answers its first commands,
    before torch and the engine's stack are loaded (more than a second of the start). Only
    for settings ``deferrable`` says nothing can refuse: a worker's engines, and any whose
    settings this machine might not honour, are built at once, so a bad one stops the start."""

    def __init__(self, settings: Settings, library: Any, *, device: str) -> None:
        self.library = library
        self._configured = device
        self._build = functools.partial(make_engine, settings, library, device=device)
        self._engine: Any = None
        self._lock = threading.Lock()

    @property
    def engine(self) -> Any:
        """The engine, built now if it is not yet (once, by whichever thread asks first)."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = self._build()
        return self._engine

    @property
    def device(self) -> Any:
        return self._configured if self._engine is None else self._engine.device

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine.generate(*args, **kwargs)

    def generate_batch(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine.generate_batch(*args, **kwargs)

    def warm_up(self, checkpoint: str) -> float:
        return self.engine.warm_up(checkpoint)

    def resident(self, checkpoint: str) -> bool:
        """Asked on the event loop: an engine not built yet holds no checkpoint."""
        return self._engine is not None and self._engine.resident(checkpoint)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.engine, name)


def make_engine(settings: Settings, library: Any, *, device: str | None = None) -> Any:
    """The engine for ``[engine]`` on ``device`` (default ``[engine] device``); logs one line
    saying how it runs. Raises ``ConfigError`` for a setting this machine cannot honour
    (xformers asked for but unavailable, a CUDA device it does not have)."""
    import torch

    from pipeline.engine import Engine
    from pipeline.memory import MemorySettings, SettingError

    config = settings.engine
    device = device or config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise ConfigError(f"[engine] device {device!r}: this machine has {count} CUDA device(s)")
    precision = config.precision
    if precision == "auto":
        precision = "fp16" if device.startswith("cuda") else "fp32"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    memory = MemorySettings(
        mode=config.memory_mode,
        attention=config.attention,
        no_half_vae=config.no_half_vae,
        vae_tiling_pixels=config.vae_tiling_pixels,
        budget_gb=config.memory_budget_gb,
        oom_retry=config.oom_retry,
    )
    try:
        engine = Engine(
            library, device=device, dtype=dtype, memory_settings=memory, preview_every=config.preview_every,
            compile=config.compile, channels_last=config.channels_last,
        )  # fmt: skip
    except SettingError as exc:
        raise ConfigError(f"[engine] {exc.key}: {exc}") from None
    log.info("engine: %s", engine.memory.describe(library.max_loaded))
    return engine
