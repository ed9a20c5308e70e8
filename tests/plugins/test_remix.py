"""Remix: a result's request again with a new prompt, from its button or /remix."""

from __future__ import annotations

from bot.types import Actor
from tests.conftest import EventLog

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")


async def test_remix_runs_the_request_with_a_new_prompt_and_asks_for_one_without(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    (first,) = (await app.service.handle_line("/draw a cat --steps 2 --cfg 5", ALICE))[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", first))
    actions = [a.id for a in log.of("finished", first)[0].actions]
    assert f"remix:{first}" in actions

    (asked,) = await app.service.run_action(f"remix:{first}", ALICE)
    assert asked.error and asked.key == "remix.prompt_needed"
    assert app.translator.t("en", asked.key, **asked.params) == (
        f"Give the new prompt: /remix {first} PROMPT (it was: a cat)"
    )
    (accepted,) = await app.service.handle_line(f"/remix {first} a dog in the rain", ALICE)
    (child,) = accepted.data["jobs"]
    await log.wait_for(lambda: log.of("finished", child))
    record = await app.store.get(child)
    assert record.parent_id == first and record.request.prompt == "a dog in the rain"
    assert record.request.guidance_scale == 5 and record.request.num_inference_steps == 2
