"""Job events as JSON for the relay between processes: every event type, every value
type it carries, and nothing else."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from bot.relay import decode_event, decode_events, encode_event, pack_events
from bot.types import (
    Action,
    Actor,
    Cancelled,
    Deleted,
    Failed,
    Finished,
    ImageOut,
    MessageRef,
    Notice,
    OutgoingFile,
    Progress,
    Queued,
    Reply,
    Route,
    Started,
)

ACTOR = Actor(
    "discord", "42", "Mei", "zh-CN", "c1", "g1", frozenset({"moderator", "vip"}), True, "telegram:7"
)
ROUTE = Route(
    "discord", "c1", "t9", reply_to_message_id="m3", interaction_token="tok",
    token_expires_at=datetime(2026, 12, 6, 9, 0, tzinfo=UTC),
)  # fmt: skip

EVENTS = [
    Queued("g", ACTOR, ROUTE, "root", position=3),
    Started("g", ACTOR, ROUTE),
    Progress("g", ACTOR, ROUTE, step=2, total=20, preview=b"\x89PNG\x00\xff"),
    Finished(
        "g", ACTOR, ROUTE, "root",
        images=(ImageOut("i1", 5, 512, 768, "a cat\nSteps: 20"),),
        actions=(Action("vary:g.1", "action.vary", {"n": 1}), Action("delete:g", "action.delete")),
        spoiler=True,
    ),
    Failed("g", ACTOR, ROUTE, key="error.interrupted", params={"attempts": 3, "detail": "x"}),
    Cancelled("g", ACTOR, ROUTE),
    Deleted("g", ACTOR, ROUTE, message=MessageRef(ROUTE, "m5", media=True, attached=("d1", "d2"))),
    Notice(
        "g", ACTOR, ROUTE,
        reply=Reply(
            "grid.ready", {"cells": 9, "ids": ["a", "b"]},
            files=[OutgoingFile("grid.png", "image", data=b"\x00\x01"), OutgoingFile("x.png", image_id="i1")],
            actions=[Action("grid:again", "action.grid_again")],
            data={"nested": {"k": [1, 2.5, None, True]}},
        ),
    ),
]  # fmt: skip


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.kind)
def test_every_event_survives_the_trip(event) -> None:
    text = encode_event(event)
    json.loads(text)  # plain JSON
    assert decode_event(text) == event


def test_only_known_types_are_built() -> None:
    forged = json.dumps({"$t": "Popen", "v": {"args": ["sh"]}})
    with pytest.raises(ValueError, match="unknown value"):
        decode_event(forged)
    with pytest.raises(ValueError, match="not a job event"):
        decode_event(json.dumps({"$t": "Actor", "v": {"platform": "x", "user_id": "1", "name": "n"}}))


def test_small_events_are_packed_into_notifications_in_order() -> None:
    """Runs of small events become one notification each, never over the limit in bytes
    (Chinese text counts three a character); a large one stays apart, to be stored."""
    chinese = Failed(
        "g", ACTOR, ROUTE, key="error.x", params={"detail": "灯塔" * 200}
    )  # 1,200 bytes, 400 characters
    sent = [*EVENTS, chinese, *EVENTS, chinese, *EVENTS]
    texts = [encode_event(event) for event in sent]
    limit = 2000  # each event fits, two or three together do
    texts.insert(5, "x" * (limit + 1))  # apart, where it came
    notifications = pack_events(texts, limit=limit)
    big = notifications.index(["x" * (limit + 1)])
    small = [n for n in notifications if isinstance(n, str)]
    assert 1 < len(small) < len(texts) - 1
    assert all(len(n.encode()) <= limit for n in small)
    events = [event for n in notifications[:big] for event in decode_events(n)]
    events += [event for n in notifications[big + 1 :] for event in decode_events(n)]
    assert events == sent
    assert pack_events([texts[0]]) == [texts[0]]  # alone: the event itself
    assert decode_events(texts[0]) == [EVENTS[0]]
    with pytest.raises(ValueError, match="not a job event"):
        decode_events(json.dumps([json.loads(texts[0]), 5]))


async def test_events_cross_between_processes_through_postgresql_small_and_large() -> None:
    """Two Apps on one database: what one publishes, the other's bus gets, in order; an
    event past ``INLINE_LIMIT`` (a preview) travels as a stored payload named in the
    notification, and the small ones published together share notifications."""
    import asyncio
    from types import SimpleNamespace

    from sqlalchemy import func, select

    from bot import db
    from bot.events import EventBus
    from bot.relay import INLINE_LIMIT, Relay
    from models.store import Store
    from models.tables import RelayPayload
    from tests.conftest import POSTGRES_URL, _drop_postgres_database, _fresh_postgres_database

    if not POSTGRES_URL:
        pytest.skip("PostgreSQL not configured (ATELIER_TEST_POSTGRES_URL)")
    url = await _fresh_postgres_database()
    await asyncio.to_thread(db.upgrade, url)
    apps = [
        SimpleNamespace(store=Store.from_url(url), bus=EventBus(), settings=SimpleNamespace(database_url=url))
        for _ in range(2)
    ]
    sender, listener = Relay(apps[0]), Relay(apps[1])
    heard: list[object] = []
    apps[1].bus.subscribe(heard.append)
    big = Progress("g", ACTOR, ROUTE, step=3, total=20, preview=bytes(range(256)) * (INLINE_LIMIT // 100))
    sent = [EVENTS[0], big, *EVENTS[1:]]
    import asyncpg

    from bot.relay import CHANNEL

    notified: list[str] = []
    raw = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    await raw.add_listener(CHANNEL, lambda *args: notified.append(args[-1]))
    try:
        await listener.listen()
        await sender.forward()
        for event in sent:  # all at once: they wait in the outbox together
            apps[0].bus.publish(event)
        for _ in range(400):
            if len(heard) >= len(sent):
                break
            await asyncio.sleep(0.01)
        assert len(encode_event(big)) > INLINE_LIMIT
        assert heard == sent
        # the first small one, the large one by reference, the other small ones together
        assert len(notified) == 3 and notified[1].startswith('{"ref"')
        assert decode_events(notified[0]) == sent[:1] and decode_events(notified[2]) == sent[2:]
        async with apps[0].store.session() as session:  # the large one went through its row
            assert await session.scalar(select(func.count()).select_from(RelayPayload)) == 1
    finally:
        await raw.close()
        await sender.stop()
        await listener.stop()
        for app in apps:
            await app.store.close()
        await _drop_postgres_database(url)
