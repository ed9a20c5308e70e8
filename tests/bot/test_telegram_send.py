"""How the Telegram adapter sends (bot/adapters/telegram/send.py): captions within
Telegram's limits and its retries, without a server (the library's own error types)."""

from __future__ import annotations

from typing import Any

import pytest
from telegram.error import BadRequest, NetworkError
from telegram.error import RetryAfter as TelegramRetryAfter

from bot.adapters.base import Outgoing, RetryAfter
from bot.adapters.telegram import send
from bot.adapters.telegram.send import CAPTION_LIMIT, Sender, result_caption
from bot.types import Actor, Finished, ImageOut, Route

ROUTE = Route("telegram", "42", is_private=True)


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waited: list[float] = []

    async def sleep(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(send.asyncio, "sleep", sleep)
    return waited


def failing(*errors: Exception) -> Any:
    """A Bot API call that raises ``errors`` in turn, then answers "sent"."""
    calls: list[int] = []

    async def call() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "sent"

    call.calls = calls  # type: ignore[attr-defined]
    return call


def test_a_results_caption_carries_its_parameters_within_1024_characters() -> None:
    actor = Actor("telegram", "42", "Ann")
    infotext = "a lighthouse " * 200 + "\nSteps: 20, Sampler: Euler a, Seed: 3"
    event = Finished("j1", actor, ROUTE, images=(ImageOut("i1", 3, 64, 64, infotext),))
    caption = result_caption(Outgoing(ROUTE, "finished", "[j1] done (seed 3)", "j1", source=event))
    assert caption.startswith("[j1] done (seed 3)\na lighthouse") and len(caption) == CAPTION_LIMIT
    assert result_caption(Outgoing(ROUTE, "progress", "[j1] step 2/4")) == "[j1] step 2/4"


async def test_a_429_is_waited_out_and_a_5xx_tried_again(no_waiting: list[float]) -> None:
    sender = Sender(None)
    call = failing(TelegramRetryAfter(3), NetworkError("Internal Server Error"))
    assert await sender._call(call) == "sent"
    assert len(call.calls) == 3 and no_waiting == [
        3.0,
        send.SERVER_ERROR_WAIT * 2,
    ]  # the second attempt waits longer


async def test_a_progress_step_hands_the_wait_to_the_delivery_layer(no_waiting: list[float]) -> None:
    sender = Sender(None)
    with pytest.raises(RetryAfter) as raised:
        await sender._call(failing(TelegramRetryAfter(5)), progress=True)
    assert raised.value.seconds == 5.0 and no_waiting == []


async def test_a_bad_request_or_a_413_is_not_tried_again() -> None:
    sender = Sender(None)
    for error in (BadRequest("message to edit not found"), NetworkError("Request Entity Too Large")):
        call = failing(error)
        with pytest.raises(NetworkError):
            await sender._call(call)
        assert len(call.calls) == 1
