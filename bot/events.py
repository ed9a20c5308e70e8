"""The event bus between the service and the adapters.

Every ``JobEvent`` is published on the App's bus; each adapter's delivery layer
(bot/delivery) subscribes once and keeps the events routed to its platform. Jobs
recovered after a restart publish through the same bus, so their results still reach
their users.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bot.types import JobEvent

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
