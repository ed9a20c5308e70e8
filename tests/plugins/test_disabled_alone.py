"""Each built-in plugin disabled alone: /draw still draws, and every other built-in still
does its job (a short scenario each, through the service as an adapter drives it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bot.plugins import DEFAULT_PLUGINS, builtin_name
from bot.types import Actor, Route
from tests.conftest import EventLog

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
MOD = Actor(platform="console", user_id="mod", name="Mod", chat_id="c")
ROUTE = Route("console", "c")
BUILTINS = [builtin_name(module) for module in DEFAULT_PLUGINS]
TABLES = {"moderation": {"moderators": ["console:mod"]}, "forever": {"max_images": 2}}


async def run(app: Any, line: str, actor: Actor = ALICE) -> list[Any]:
    replies = await app.service.handle_line(line, actor, ROUTE)
    assert replies and not any(r.error for r in replies), (line, replies)
    return replies


async def drawn(app: Any, log: EventLog, line: str) -> Any:
    """The finished record of the one job ``line`` queues."""
    (job,) = (await run(app, line))[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", job) or log.of("failed", job))
    assert log.of("finished", job), log.of("failed", job)
    return await app.store.get(job)


async def generate(app: Any, log: EventLog) -> None:
    record = await drawn(app, log, "/draw a lighthouse --seed 5")
    (finished,) = log.of("finished", record.id)
    assert f"reroll:{record.id}" in [a.id for a in finished.actions]
    again = await app.service.run_action(f"reroll:{record.id}", ALICE, ROUTE)
    assert again[0].key == "draw.accepted", again


async def styles(app: Any, log: EventLog) -> None:
    await run(app, "/style save warm warm light, {prompt}")
    record = await drawn(app, log, "/draw a barn --style warm")
    assert record.request.prompt == "warm light, a barn"


async def negative_presets(app: Any, log: EventLog) -> None:
    record = await drawn(app, log, "/draw a barn --preset nai")
    assert "lowres" in record.request.negative_prompt


async def xy_grid(app: Any, log: EventLog) -> None:
    replies = await run(app, '/grid a barn --x "steps: 1,2" --seed 3')
    cells = replies[0].data["jobs"]
    assert len(cells) == 2
    await log.wait_for(lambda: any(n.reply.key == "grid.done" for n in log.of("notice")))


async def variations(app: Any, log: EventLog) -> None:
    parent = await drawn(app, log, "/draw a barn --seed 4")
    child = await drawn(app, log, f"/vary {parent.id}")
    assert child.parent_id == parent.id and child.request.seed == parent.request.seed


async def img2img(app: Any, log: EventLog) -> None:
    parent = await drawn(app, log, "/draw a barn --seed 4")
    child = await drawn(app, log, f"/refine {parent.id}")
    assert child.parent_id == parent.id and child.request.denoising_strength == 0.5


async def forever(app: Any, log: EventLog) -> None:
    await run(app, "/draw a comet --forever --steps 2")
    await log.wait_for(lambda: any(n.reply.key == "forever.capped" for n in log.of("notice")))


async def history(app: Any, log: EventLog) -> None:
    record = await drawn(app, log, "/draw a barn")
    (page,) = await run(app, "/history")
    assert record.id in str(page.params) + str(page.data)


async def pnginfo(app: Any, log: EventLog) -> None:
    record = await drawn(app, log, "/draw a barn --steps 3")
    (info,) = await run(app, f"/pnginfo {record.id}")
    assert "Steps: 3" in str(info.params) + str(info.data)


async def quotas(app: Any, log: EventLog) -> None:
    (status,) = await run(app, "/quota")
    assert status.key == "quota.status"


async def moderation(app: Any, log: EventLog) -> None:
    await run(app, "/ban @console:bob", MOD)
    bob = Actor(platform="console", user_id="bob", name="Bob", chat_id="c")
    refused = await app.service.handle_line("/draw a barn", bob, ROUTE)
    assert refused[0].error, refused


SCENARIOS: dict[str, Callable[[Any, EventLog], Awaitable[None]]] = {
    "generate": generate,
    "styles": styles,
    "negative_presets": negative_presets,
    "xy_grid": xy_grid,
    "variations": variations,
    "img2img": img2img,
    "forever": forever,
    "history": history,
    "pnginfo": pnginfo,
    "quotas": quotas,
    "moderation": moderation,
}


def test_every_builtin_has_a_scenario() -> None:
    assert sorted(SCENARIOS) == sorted(BUILTINS)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("disabled", BUILTINS)
async def test_the_core_and_every_other_plugin_work_with_one_disabled(make_app, disabled: str) -> None:
    app = await make_app(
        plugins={"disabled": [disabled], **{k: v for k, v in TABLES.items() if k != disabled}}
    )
    assert app.pm.get_plugin(disabled) is None
    log = EventLog(app)
    await drawn(app, log, "/draw a cat --seed 1")
    for name, scenario in SCENARIOS.items():
        if name != disabled:
            await scenario(app, log)
    await app.idle()
