"""Neutral data exchanged between adapters, the core and plugins.

Nothing here refers to Discord or Telegram objects: an adapter turns its platform's
event into an ``Invocation`` and renders ``Reply`` and ``JobEvent`` values back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the command schema's types, importable where plugins import the other core types
from bot.options import OptionSpec as OptionSpec
from bot.schema import Argument as Argument
from bot.schema import AutocompleteContext as AutocompleteContext
from bot.schema import AutocompleteSource as AutocompleteSource
from bot.schema import Choice as Choice
from bot.schema import Command as Command
from bot.schema import FileInput as FileInput
from pipeline.request import GenerationRequest


@dataclass(frozen=True)
class Actor:
    """Who is asking, where. ``roles`` are neutral ("moderator", tier names ...)."""

    platform: str  # "console", "discord", "telegram"
    user_id: str
    name: str
    locale: str = "en"
    chat_id: str | None = None  # channel (Discord) or chat (Telegram)
    guild_id: str | None = None
    roles: frozenset[str] = frozenset()
    nsfw_allowed: bool = False

    @property
    def key(self) -> str:
        return f"{self.platform}:{self.user_id}"

    @property
    def is_moderator(self) -> bool:
        return "moderator" in self.roles


@dataclass(frozen=True)
class Attachment:
    filename: str
    data: bytes
    content_type: str | None = None


@dataclass(frozen=True)
class Invocation:
    """One command from a user: ``/draw a cat --steps 20`` is command "draw" and the rest as text."""

    command: str
    text: str
    actor: Actor
    reply_to: dict[str, Any] = field(default_factory=dict)  # adapter routing data, stored with jobs
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True)
class Action:
    """A button on a result. ``id`` is ``<command>:<argument>`` and fits Discord custom_id."""

    id: str
    label_key: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> str:
        return self.id.split(":", 1)[0]


@dataclass
class Reply:
    """What the core answers to a command, before translation (``key`` + ``params``)."""

    key: str
    params: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # machine-readable extras (json console)
    error: bool = False


@dataclass(frozen=True)
class Denial:
    """Returned by ``check_request`` to refuse a request; rendered from the catalogs."""

    key: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Admission:
    """Returned by ``check_request`` to admit a request at a lower priority (e.g. quotas'
    relaxed mode); ``key``/``params`` are a note shown beside the accepted reply."""

    priority: int = 0
    key: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    max_running: int | None = None  # most of this user's jobs that may run at once
    spoiler: bool = False  # show the results as spoilers (blurred until clicked)


@dataclass
class RequestDraft:
    """A /draw request before it is frozen: plugins edit it in ``modify_request``."""

    prompt: str
    negative_prompt: str
    options: dict[str, Any]  # parsed option values by name, defaults filled in
    parent_id: str | None = None
    prompt_parts: list[tuple[int, str]] = field(default_factory=list)
    negative_parts: list[tuple[int, str]] = field(default_factory=list)
    # names recorded on the request (GenerationRequest.styles / negative_presets)
    styles: list[str] = field(default_factory=list)
    negative_presets: list[str] = field(default_factory=list)

    def add_prompt(self, text: str, order: int = 100) -> None:
        """Append ``text`` to the prompt; parts are joined after all hooks ran, by ``order``."""
        self.prompt_parts.append((order, text))

    def add_negative(self, text: str, order: int = 100) -> None:
        self.negative_parts.append((order, text))


@dataclass(frozen=True)
class DrawRequest:
    """A validated request: the first batch's effective parameters plus how many batches."""

    generation: GenerationRequest
    count: int
    actor: Actor
    options: dict[str, Any] = field(default_factory=dict)
    parent_id: str | None = None


@dataclass(frozen=True)
class PlannedJob:
    request: GenerationRequest
    kind: str = "txt2img"
    label: str | None = None  # e.g. a grid cell's axis values


@dataclass(frozen=True)
class Plan:
    """What ``plan_generation`` returns: the jobs to store and queue, in order."""

    jobs: tuple[PlannedJob, ...]
    kind: str = "draw"


@dataclass(frozen=True)
class JobEvent:
    generation_id: str
    actor: Actor
    reply_to: dict[str, Any]
    # set by subclasses
    kind: str = field(init=False, default="event")


@dataclass(frozen=True)
class Queued(JobEvent):
    position: int = 1
    kind: str = field(init=False, default="queued")


@dataclass(frozen=True)
class Started(JobEvent):
    kind: str = field(init=False, default="started")


@dataclass(frozen=True)
class Progress(JobEvent):
    step: int = 0
    total: int = 0
    kind: str = field(init=False, default="progress")


@dataclass(frozen=True)
class ImageOut:
    id: str
    path: Path
    seed: int
    width: int
    height: int
    infotext: str


@dataclass(frozen=True)
class Finished(JobEvent):
    images: tuple[ImageOut, ...] = ()
    actions: tuple[Action, ...] = ()
    spoiler: bool = False
    kind: str = field(init=False, default="finished")


@dataclass(frozen=True)
class Failed(JobEvent):
    key: str = "error.internal"
    params: dict[str, Any] = field(default_factory=dict)
    kind: str = field(init=False, default="failed")


@dataclass(frozen=True)
class Cancelled(JobEvent):
    kind: str = field(init=False, default="cancelled")


@dataclass(frozen=True)
class Notice(JobEvent):
    """A message a plugin posts later about a job or a group of jobs (a finished grid, a
    stopped run): rendered like a ``Reply`` (text, files, actions), routed like the job."""

    reply: Reply = field(default_factory=lambda: Reply(""))
    kind: str = field(init=False, default="notice")


@dataclass(frozen=True)
class CommandContext:
    """What a command handler gets: the invocation, the App (the core's public surface)
    and what dispatch read from the text with the command's schema (``bot.schema``):
    the command or subcommand that runs, its path (``("style", "save")``), the text left
    for its positional arguments and its converted options."""

    invocation: Invocation
    app: Any
    command: Command | None = None
    path: tuple[str, ...] = ()
    rest: str | None = None  # the positional text; None: the invocation's whole text
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def actor(self) -> Actor:
        return self.invocation.actor

    @property
    def text(self) -> str:
        return self.invocation.text if self.rest is None else self.rest
