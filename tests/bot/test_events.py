"""The event bus: every subscriber gets every event; one that fails does not stop the others."""

from __future__ import annotations

from bot.events import EventBus
from bot.types import Actor, Route, Started


def test_a_failing_subscriber_does_not_stop_the_others_and_unsubscribing_works() -> None:
    bus = EventBus()
    seen: list[str] = []

    def broken(event) -> None:
        raise RuntimeError("boom")

    bus.subscribe(broken)
    unsubscribe = bus.subscribe(lambda event: seen.append(event.generation_id))
    actor = Actor("console", "alice", "Alice")
    bus.publish(Started("01J", actor, Route.of(actor)))
    unsubscribe()
    bus.publish(Started("01K", actor, Route.of(actor)))
    assert seen == ["01J"]
