"""Who may see and touch a generation, and who asked for it: the core's one set of rules.

Public results are the community's; private ones their owner's and moderators'. Others
get the same "not found" as for a missing id, so a private id cannot be told from one
that does not exist. Plugins reach these rules through ``bot.api``.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.types import Actor, Route
from models.records import GenerationRecord


@dataclass(frozen=True)
class Audience:
    """Who to tell about a job, and where: what its events carry."""

    actor: Actor
    route: Route
    thread_key: str | None = None

    @classmethod
    def of(cls, record: GenerationRecord, default_locale: str) -> Audience:
        return cls(actor_of(record, default_locale), Route.from_json(record.route), record.thread_key)


def actor_of(record: GenerationRecord, default_locale: str) -> Actor:
    """Rebuild who asked from a stored job (restart recovery, cancels from other processes)."""
    user = record.user
    return Actor(
        platform=user.platform,
        user_id=user.platform_user_id,
        name=user.display_name,
        locale=user.locale or default_locale,
        chat_id=record.chat_id,
        guild_id=record.guild_id,
        roles=frozenset(record.actor_roles),
    )


def is_owner(record: GenerationRecord, actor: Actor) -> bool:
    return (record.user.platform, record.user.platform_user_id) == (actor.platform, actor.user_id)


def may_see(record: GenerationRecord, actor: Actor) -> bool:
    """Public results are the community's; private ones their owner's and moderators'."""
    return not record.private or actor.is_moderator or is_owner(record, actor)


def may_touch(record: GenerationRecord, actor: Actor) -> bool:
    return is_owner(record, actor) or actor.is_moderator
