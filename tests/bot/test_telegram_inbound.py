"""What a Telegram message means to the core (bot/adapters/telegram/inbound.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bot.adapters.telegram.inbound import addressed, command_line, locale_of, route_of


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("/draw a cat --steps 4", "/draw a cat --steps 4"),
        ("/draw a cat\nlowres, blurry", '/draw a cat --negative "lowres, blurry"'),
        ("/draw a cat\n--steps 4\nlowres\nbad hands", '/draw a cat --steps 4 --negative "lowres, bad hands"'),
        ("/draw@atelier_bot a cat\nugly", "/draw a cat --negative ugly"),
        ("/help draw", "/help draw"),
    ],
)
def test_a_draw_messages_later_lines_are_its_negative_prompt(text: str, line: str) -> None:
    assert command_line(text) == line


def test_a_pasted_infotext_goes_to_the_core_whole() -> None:
    text = "/draw a lighthouse\nNegative prompt: fog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512"
    assert command_line(text) == text


def test_a_command_for_another_bot_is_not_ours() -> None:
    assert addressed("/draw@atelier_bot a cat", "atelier_bot") == "draw"
    assert addressed("/Draw@Atelier_Bot a cat", "atelier_bot") == "draw"
    assert addressed("/draw@other_bot a cat", "atelier_bot") is None
    assert addressed("a cat", "atelier_bot") is None


@pytest.mark.parametrize(
    ("code", "locale"),
    [("zh", "zh-CN"), ("zh-hans", "zh-CN"), ("zh-CN", "zh-CN"), ("en-US", "en"), (None, "zh-CN")],
)
def test_the_users_language_picks_the_replies_language(code: str | None, locale: str) -> None:
    assert locale_of(SimpleNamespace(language_code=code), "zh-CN" if code is None else "en") == locale


def test_a_forum_topic_is_the_routes_thread_and_a_reply_chain_is_not() -> None:
    forum = SimpleNamespace(id=-100, type="supergroup", is_forum=True)
    group = SimpleNamespace(id=-200, type="supergroup", is_forum=False)
    in_topic = route_of(SimpleNamespace(chat=forum, message_thread_id=7, message_id=9))
    assert (in_topic.chat_id, in_topic.thread_id, in_topic.reply_to_message_id) == ("-100", "7", "9")
    assert not in_topic.is_private
    chain = route_of(SimpleNamespace(chat=group, message_thread_id=5, message_id=9))
    assert chain.thread_id is None
    private = route_of(
        SimpleNamespace(chat=SimpleNamespace(id=42, type="private"), message_thread_id=None, message_id=3)
    )
    assert private.is_private and private.chat_id == "42"
