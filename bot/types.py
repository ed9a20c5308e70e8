"""Neutral data exchanged between adapters, the core and plugins.

Nothing here refers to Discord or Telegram objects: an adapter turns its platform's
event into an ``Invocation`` and renders ``Reply`` and ``JobEvent`` values back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
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
    person: str | None = None  # the user key this identity is linked to (/link), set by the core

    @property
    def identity(self) -> str:
        """This platform account's own user key."""
        return f"{self.platform}:{self.user_id}"

    @property
    def key(self) -> str:
        """Whose history, styles, presets and quota these are: the person's, once linked."""
        return self.person or self.identity

    @property
    def is_moderator(self) -> bool:
        return "moderator" in self.roles


@dataclass(frozen=True)
class Attachment:
    filename: str
    data: bytes
    content_type: str | None = None


@dataclass(frozen=True)
class Route:
    """Where a conversation is on its platform: where a command came from, and where the
    answers and the events of its jobs go. Stored with every job (``to_json``), so a job
    recovered after a restart, or a button pressed a week later, still answers there.

    ``thread_id`` is a Discord thread or a Telegram forum topic; ``reply_to_message_id``
    the message to answer (the command, the result whose button was pressed). An
    interaction token (Discord) lets the bot answer an interaction until
    ``token_expires_at``; after that the delivery layer drops it and posts to the chat.
    ``is_private``: a direct message / private chat (Telegram throttles those less).
    """

    platform: str
    chat_id: str | None = None
    thread_id: str | None = None
    reply_to_message_id: str | None = None
    interaction_token: str | None = None
    token_expires_at: datetime | None = None
    is_private: bool = False

    def __post_init__(self) -> None:
        if self.token_expires_at is not None and self.token_expires_at.tzinfo is None:
            raise ValueError("Route.token_expires_at must be timezone-aware")

    @classmethod
    def of(cls, actor: Actor) -> Route:
        """The chat an actor spoke in, for callers that have no richer route."""
        return cls(actor.platform, actor.chat_id)

    @property
    def destination(self) -> tuple[str, str | None, str | None]:
        """One conversation: progress is throttled per destination, answers kept in order."""
        return (self.platform, self.chat_id, self.thread_id)

    def usable(self, now: datetime) -> Route:
        """This route without an interaction token that has expired by ``now``."""
        if self.interaction_token is None or self.token_expires_at is None or now < self.token_expires_at:
            return self
        return replace(self, interaction_token=None, token_expires_at=None)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"platform": self.platform}
        for name in ("chat_id", "thread_id", "reply_to_message_id", "interaction_token"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.token_expires_at is not None:
            data["token_expires_at"] = self.token_expires_at.isoformat()
        if self.is_private:
            data["is_private"] = True
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Route:
        expires = data.get("token_expires_at")
        return cls(
            platform=str(data["platform"]),
            chat_id=_text(data.get("chat_id")),
            thread_id=_text(data.get("thread_id")),
            reply_to_message_id=_text(data.get("reply_to_message_id")),
            interaction_token=_text(data.get("interaction_token")),
            token_expires_at=datetime.fromisoformat(expires) if expires else None,
            is_private=bool(data.get("is_private", False)),
        )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class MessageRef:
    """A message the bot sent: where it is (chat and thread) and its platform id. The
    delivery layer edits it (progress, the result) and answers it (notices).

    What an adapter needs to edit or remove it in a later process travels with it (the
    delivery layer stores the whole reference on the job row): ``media`` says the
    message shows an image (a platform that cannot turn a text message into an image
    must know which it is), ``attached`` names the further messages sent with it for the
    same job (a batch's images, the original files under a result), which leave with it.
    """

    route: Route
    message_id: str
    media: bool = False
    attached: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"route": self.route.to_json(), "message_id": self.message_id}
        if self.media:
            data["media"] = True
        if self.attached:
            data["attached"] = list(self.attached)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MessageRef:
        return cls(
            Route.from_json(data["route"]),
            str(data["message_id"]),
            media=bool(data.get("media", False)),
            attached=tuple(str(m) for m in data.get("attached") or ()),
        )


@dataclass(frozen=True)
class Invocation:
    """One command from a user: ``/draw a cat --steps 20`` is command "draw" and the rest as text.

    ``route`` is where it came from (and where its jobs answer); without one it is the
    actor's chat."""

    command: str
    text: str
    actor: Actor
    route: Route = None  # type: ignore[assignment]  # filled from the actor when not given
    attachments: tuple[Attachment, ...] = ()

    def __post_init__(self) -> None:
        if self.route is None:
            object.__setattr__(self, "route", Route.of(self.actor))


@dataclass(frozen=True)
class Action:
    """A button on a result. ``id`` is ``<command>:<argument>`` and fits Discord custom_id."""

    id: str
    label_key: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> str:
        return self.id.split(":", 1)[0]


@dataclass(frozen=True)
class OutgoingFile:
    """A file for the user, on any platform: its bytes (an export, a grid) or a stored
    image by id (read through ``App.images``); the delivery layer hands adapters both, the
    bytes read. ``kind`` "image" is shown, "document" is attached as is (a PNG as a
    document keeps its infotext)."""

    name: str
    kind: str = "document"
    data: bytes | None = None
    image_id: str | None = None

    def __post_init__(self) -> None:
        if self.data is None and self.image_id is None:
            raise ValueError("an OutgoingFile needs data or an image_id")
        if self.kind not in ("image", "document"):
            raise ValueError(f"OutgoingFile.kind is image or document, got {self.kind!r}")


@dataclass
class Reply:
    """What the core answers to a command, before translation (``key`` + ``params``)."""

    key: str
    params: dict[str, Any] = field(default_factory=dict)
    files: list[OutgoingFile] = field(default_factory=list)
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
    """Something that happened to a job, for the conversation in ``route``. ``thread_key``
    names the chain of variations the job belongs to (its root's id), if any."""

    generation_id: str
    actor: Actor
    route: Route
    thread_key: str | None = None
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
    preview: bytes | None = None  # a small PNG of the image so far, when the engine made one
    kind: str = field(init=False, default="progress")


@dataclass(frozen=True)
class ImageOut:
    """A finished image by id: its bytes come from ``App.images`` (no shared disk assumed)."""

    id: str
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
class Deleted(JobEvent):
    """A generation was deleted (its owner or a moderator): ``message`` is the message
    that showed it, as the delivery layer kept it, so the adapter removes or edits it."""

    message: MessageRef | None = None
    kind: str = field(init=False, default="deleted")


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
