"""/queue's own rendering: how long a job has waited, and a long list cut short. Places
and the moderators' view are in the queue contract (tests/queue/test_contract.py), on
both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from bot.i18n import default_translator
from bot.queue_view import SHOWN, _waited
from bot.types import Actor

ALICE = Actor(platform="console", user_id="alice", name="Alice", locale="en", chat_id="c")
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("seconds", "english", "chinese"),
    [
        (0, "waited 0 s", "已等待 0 秒"),
        (59, "waited 59 s", "已等待 59 秒"),
        (60, "waited 1 min", "已等待 1 分钟"),
        (3599, "waited 59 min", "已等待 59 分钟"),
        (3600 + 5 * 60 + 30, "waited 1 h 5 min", "已等待 1 小时 5 分钟"),
        (-3, "waited 0 s", "已等待 0 秒"),  # a clock a little behind the database's
    ],
)
def test_waited_reads_in_seconds_minutes_or_hours(seconds: int, english: str, chinese: str) -> None:
    message = _waited(NOW, NOW - timedelta(seconds=seconds))
    translator = default_translator()
    assert translator.t("en", message.key, **message.params) == english
    assert translator.t("zh-CN", message.key, **message.params) == chinese


async def test_a_long_list_shows_the_oldest_with_buttons_and_counts_the_rest(make_app) -> None:
    app = await make_app(limits={"max_count": 16})
    await app.queue.stop()  # nothing runs: every job waits
    (reply,) = await app.service.handle_line(f"/draw a kite --count {SHOWN + 2}", ALICE)
    jobs = reply.data["jobs"]
    (queue,) = await app.service.handle_line("/queue", ALICE)
    assert queue.params["count"] == SHOWN + 2
    assert [job["id"] for job in queue.data["jobs"]] == jobs[:SHOWN]  # oldest first
    lines = queue.params["list"].splitlines()
    assert len(lines) == SHOWN + 1 and lines[-1] == "… and 2 more (/history lists them all)"
    assert [action.id for action in queue.actions] == [f"cancel:{job}" for job in jobs[:SHOWN]]
    assert [action.params["n"] for action in queue.actions] == list(range(1, SHOWN + 1))
