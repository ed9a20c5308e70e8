"""The event bus between the service and the adapters, and neutral rendering of events.

Every ``JobEvent`` is published on the App's bus; an adapter subscribes once and routes
events by ``reply_to``. Jobs recovered after a restart publish through the same bus, so
their results still reach their users.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from bot.i18n import Translator
from bot.types import Cancelled, Failed, Finished, JobEvent, Notice, Progress, Queued, Reply, Started

log = logging.getLogger(__name__)

Subscriber = Callable[[JobEvent], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def publish(self, event: JobEvent) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber failed on %s", event.kind)


def event_text(event: JobEvent, translator: Translator) -> str:
    locale = event.actor.locale
    short = event.generation_id
    if isinstance(event, Queued):
        return translator.t(locale, "event.queued", id=short, position=event.position)
    if isinstance(event, Started):
        return translator.t(locale, "event.started", id=short)
    if isinstance(event, Progress):
        return translator.t(locale, "event.progress", id=short, step=event.step, total=event.total)
    if isinstance(event, Finished):
        paths = " ".join(str(image.path) for image in event.images)
        return translator.t(locale, "event.finished", id=short, paths=paths)
    if isinstance(event, Failed):
        reason = translator.t(locale, event.key, **event.params)
        return translator.t(locale, "event.failed", id=short, reason=reason)
    if isinstance(event, Cancelled):
        return translator.t(locale, "event.cancelled", id=short)
    if isinstance(event, Notice):
        text = reply_text(event.reply, translator, locale)
        files = " ".join(str(path) for path in event.reply.files)
        return f"[{short}] {text}" + (f" {files}" if files else "")
    return f"[{short}] {event.kind}"


def event_json(event: JobEvent, translator: Translator) -> dict[str, Any]:
    data: dict[str, Any] = {
        "event": event.kind,
        "id": event.generation_id,
        "text": event_text(event, translator),
    }
    if isinstance(event, Queued):
        data["position"] = event.position
    elif isinstance(event, Progress):
        data.update(step=event.step, total=event.total)
    elif isinstance(event, Finished):
        data["images"] = [
            {
                "id": i.id,
                "path": str(i.path),
                "seed": i.seed,
                "width": i.width,
                "height": i.height,
                "infotext": i.infotext,
            }
            for i in event.images
        ]
        data["actions"] = [
            {"id": a.id, "label": translator.t(event.actor.locale, a.label_key, **a.params)}
            for a in event.actions
        ]
        data["spoiler"] = event.spoiler
    elif isinstance(event, Failed):
        data["key"] = event.key
    elif isinstance(event, Notice):
        data.update(reply_json(event.reply, translator, event.actor.locale))
        data.update(event="notice", id=event.generation_id, error=event.reply.error)
    return data


def reply_text(reply: Reply, translator: Translator, locale: str) -> str:
    return translator.t(locale, reply.key, **reply.params)


def reply_json(reply: Reply, translator: Translator, locale: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "event": "error" if reply.error else "reply",
        "key": reply.key,
        "text": reply_text(reply, translator, locale),
    }
    if reply.files:
        data["files"] = [str(path) for path in reply.files]
    if reply.actions:
        data["actions"] = [
            {"id": a.id, "label": translator.t(locale, a.label_key, **a.params)} for a in reply.actions
        ]
    data.update(reply.data)
    return data
