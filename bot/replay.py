"""Showing job ends that never reached their chat.

A job's end (finished, failed, cancelled) is stored before it is published, and the
delivery layer records on the row when the chat accepted it, or when it gave up after
its bounded retries (``generations.end_delivered_at``). An end can miss its chat: the
process stopped or crashed between the commit and the send, or, with the shared queue,
a worker ended the job while the bot process was down or its relay was not listening.

``EndReplay.sweep`` runs when an App that delivers to chat platforms starts, and again
when the relay listens after a lost connection: it rebuilds the end events of the jobs
that ended within ``[queue] replay_hours`` and were never shown, for the platforms this
process delivers to, and publishes them on the bus, where the delivery layer shows them
as live events, in the job's own message and thread. Only chat platforms (Discord,
Telegram) are replayed: a console session is gone with its process.

An end goes out once in normal operation: the delivery layer shows a job's end only once
per process, whether it came live or from a sweep. After a crash between the send and the
record an end may be shown twice (at least once).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from bot.access import Audience
from bot.i18n import Msg
from bot.types import Cancelled, Failed, Finished, ImageOut, JobEvent, Route
from models.base import utcnow
from models.delivery_store import DeliveryStore
from models.records import GenerationRecord

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger(__name__)

CHAT_PLATFORMS = frozenset({"discord", "telegram"})


class EndReplay:
    """One App's sweep; the delivery layers of its chat platforms sign up (``serve``)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.platforms: set[str] = set()
        # True while a sweep publishes: the delivery layer tells replayed ends from live ones
        self.replaying = False

    def serve(self, platform: str) -> None:
        if platform in CHAT_PLATFORMS:
            self.platforms.add(platform)

    def leave(self, platform: str) -> None:
        self.platforms.discard(platform)

    async def sweep(self) -> int:
        """Publish the ends never shown; returns how many."""
        hours = self.app.settings.queue.replay_hours
        if not hours or not self.platforms:
            return 0
        since = utcnow() - timedelta(hours=hours)
        records = await DeliveryStore(self.app.store).undelivered_ends(since)
        events = [
            self.end_event(record)
            for record in records
            if Route.from_json(record.route).platform in self.platforms
        ]
        self.replaying = True
        try:
            for event in events:
                self.app.bus.publish(event)
        finally:
            self.replaying = False
        if events:
            log.info("showing %d job end(s) that never reached their chat", len(events))
        return len(events)

    def end_event(self, record: GenerationRecord) -> JobEvent:
        """The event a job's end was published as, rebuilt from its row."""
        audience = Audience.of(record, self.app.settings.bot.locale)
        fields = (record.id, audience.actor, audience.route, audience.thread_key)
        if record.status == "finished":
            actions = self.app.service.result_actions(record, audience.actor)
            images = tuple(ImageOut(i.id, i.seed, i.width, i.height, i.infotext) for i in record.images)
            return Finished(*fields, images=images, actions=tuple(actions), spoiler=record.spoiler)
        if record.status == "failed":
            params = loaded_params(record.error_params or {})
            return Failed(*fields, key=record.error_key or "error.internal", params=params)
        return Cancelled(*fields)


def stored_params(params: dict[str, Any]) -> dict[str, Any]:
    """A message's values as JSON: nested messages (``Msg``) by key and values."""
    return {name: _stored(value) for name, value in params.items()}


def _stored(value: Any) -> Any:
    if isinstance(value, Msg):
        return {"$msg": value.key, "params": stored_params(value.params)}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def loaded_params(params: dict[str, Any]) -> dict[str, Any]:
    return {name: _loaded(value) for name, value in params.items()}


def _loaded(value: Any) -> Any:
    if isinstance(value, dict) and "$msg" in value:
        return Msg(value["$msg"], loaded_params(value.get("params") or {}))
    return value
