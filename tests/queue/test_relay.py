"""Job events as JSON for the relay between processes: every event type, every value
type it carries, and nothing else."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from bot.relay import decode_event, encode_event
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
