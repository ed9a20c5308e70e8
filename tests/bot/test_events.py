"""Neutral rendering of events: a plugin's later Notice reads like a reply, routed like its job."""

from __future__ import annotations

from pathlib import Path

from bot.events import event_json, event_text
from bot.i18n import default_translator
from bot.types import Action, Actor, Notice, Reply


def test_a_notice_renders_text_files_and_actions_in_the_actors_language() -> None:
    translator = default_translator()
    reply = Reply(
        "cancel.done",
        {"id": "01J"},
        files=[Path("grid.png")],
        actions=[Action("reroll:01J", "action.reroll")],
    )
    for locale in ("en", "zh-CN"):
        actor = Actor("console", "alice", "Alice", locale=locale)
        event = Notice("01J", actor, {"console": True}, reply=reply)
        data = event_json(event, translator)
        expected = translator.t(locale, "cancel.done", id="01J")
        assert data["event"] == "notice" and data["id"] == "01J" and data["key"] == "cancel.done"
        assert data["text"] == expected and data["files"] == ["grid.png"] and data["error"] is False
        assert data["actions"] == [{"id": "reroll:01J", "label": translator.t(locale, "action.reroll")}]
        assert event_text(event, translator) == f"[01J] {expected} grid.png"
