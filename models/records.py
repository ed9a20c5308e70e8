"""What repositories hand out: plain dataclasses, safe to pass to adapters and plugins."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pipeline.request import GenerationRequest


@dataclass(frozen=True)
class UserRecord:
    id: int
    platform: str
    platform_user_id: str
    display_name: str
    locale: str | None


@dataclass(frozen=True)
class ImageRecord:
    id: str
    generation_id: str
    index: int
    path: str
    width: int
    height: int
    seed: int
    subseed: int
    infotext: str


@dataclass(frozen=True)
class GenerationRecord:
    id: str
    user: UserRecord
    request: GenerationRequest
    status: str
    group_id: str
    group_index: int
    kind: str
    plan: str
    label: str | None
    parent_id: str | None
    chat_id: str | None
    guild_id: str | None
    route: dict[str, Any]  # bot.types.Route.to_json()
    actor_roles: tuple[str, ...]
    private: bool
    priority: int
    attempts: int
    error_key: str | None
    error: str | None
    model_hash: str | None
    device_seconds: float | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    images: tuple[ImageRecord, ...] = field(default_factory=tuple)
    spoiler: bool = False
    owner: str | None = None  # the process holding an open job (models.store.Lease)
    lease_expires_at: datetime | None = None
    thread_key: str | None = None  # the root id of the chain of variations it belongs to
    forever_run: str | None = None  # the forever run it belongs to (the run's first job)
    error_params: dict[str, Any] | None = None  # the values of ``error_key``'s message


@dataclass(frozen=True)
class JobSummary:
    """The few columns a plugin scans many jobs by (a forever run's jobs)."""

    id: str
    status: str
    batch_size: int
    forever_run: str | None


@dataclass(frozen=True)
class OpenJobs:
    """One user's jobs that wait or run (``Store.open_by_user``)."""

    user: str  # the user key, platform:id
    name: str
    queued: int
    running: int
