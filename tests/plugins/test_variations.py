"""Variations: V-buttons, A1111 variation seeds, lineage and thread keys (SQLite and PostgreSQL),
and a console session that presses the buttons."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.settings import ConfigError
from bot.types import Actor, Route
from models.store import Store
from pipeline.infotext import parse
from plugins.forever import ForeverConfig
from plugins.img2img import Img2ImgConfig
from plugins.variations import VariationsConfig
from tests.conftest import EventLog, opened, png
from tests.scenario import ConsoleSession, jobs_of

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
BOB = Actor(platform="console", user_id="bob", name="Bob", chat_id="c")
ROOT = Path(__file__).resolve().parents[2]
ROUTE = Route("console", "c1", thread_id="t1")
STRENGTHS = {"variations": {"subtle_strength": 0.2, "strong_strength": 0.6}}


async def run(app, line: str, actor: Actor = ALICE, route: dict | None = None):
    return await app.service.handle_line(line, actor, route or ROUTE)


async def finished(app, log: EventLog, replies) -> list:
    assert not replies[0].error, replies
    ids = replies[0].data["jobs"]
    await log.wait_for(lambda: all(log.of("finished", i) for i in ids))
    return [log.of("finished", i)[0] for i in ids]


def pixels(source) -> np.ndarray:
    image = source if isinstance(source, Image.Image) else Image.open(source)
    return np.asarray(image, dtype=np.int16)


async def test_v_buttons_on_every_image_name_it_and_fit_a_custom_id(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    (result,) = await finished(app, log, await run(app, "/draw a cat --batch 2 --steps 2"))
    ids = [a.id for a in result.actions]
    job = result.generation_id
    for number in (1, 2):
        assert f"vary:{job}.{number}" in ids and f"vary:{job}.{number} --strong" in ids
    assert all(len(i) <= 64 for i in ids)  # Telegram callback_data (Discord custom_id allows 100)
    labels = {a.id: app.translator.t("en", a.label_key, **a.params) for a in result.actions}
    assert labels[f"vary:{job}.2"] == "V2" and labels[f"vary:{job}.2 --strong"] == "V2 strong"
    zh = {app.translator.t("zh-CN", a.label_key, **a.params) for a in result.actions}
    assert zh >= {"V1", "V1 强"}


async def test_a_variation_keeps_the_seed_changes_the_subseed_and_reproduces(make_app) -> None:
    app = await make_app(plugins=STRENGTHS)
    log = EventLog(app)
    (parent,) = await finished(app, log, await run(app, "/draw a lighthouse --seed 7 --batch 2 --steps 3"))
    parent_record = await app.store.get(parent.generation_id)
    (subtle,) = await finished(
        app, log, await app.service.run_action(f"vary:{parent.generation_id}.2", ALICE)
    )
    record = await app.store.get(subtle.generation_id)
    assert record.parent_id == parent.generation_id
    assert [i.seed for i in subtle.images] == [8, 8]  # image 2's seed, for the whole batch
    assert record.request.subseed != parent_record.request.subseed
    assert record.request.subseed_strength == 0.2
    assert (record.request.num_inference_steps, record.request.prompt) == (3, "a lighthouse")
    fields = parse(subtle.images[0].infotext)
    assert fields["Seed"] == "8" and fields["Variation seed strength"] == "0.2"
    assert fields["Variation seed"] == str(record.request.subseed)
    original = pixels(await opened(app, parent.images[1]))
    varied = pixels(await opened(app, subtle.images[0]))
    assert np.abs(varied - original).max() > 0  # a different picture ...
    # ... that its own infotext draws again (alone, as a batch image within one level, as any batch image)
    (again,) = await finished(app, log, await run(app, "/draw " + subtle.images[0].infotext))
    assert again.images[0].infotext == subtle.images[0].infotext
    assert np.abs(pixels(await opened(app, again.images[0])) - varied).max() <= 1

    (strong,) = await finished(
        app, log, await app.service.run_action(f"vary:{parent.generation_id}.1 --strong", ALICE)
    )
    assert parse(strong.images[0].infotext)["Variation seed strength"] == "0.6"
    assert [i.seed for i in strong.images] == [7, 7]
    replies = await run(app, f"/vary {parent.generation_id} --strength 0.35 --count 2")
    records = [await app.store.get(i) for i in replies[0].data["jobs"]]
    assert [r.request.subseed_strength for r in records] == [0.35, 0.35]
    assert [r.request.seed for r in records] == [7, 7]
    assert records[1].request.subseed == records[0].request.subseed + 2  # A1111's batches


async def test_a_depth_3_chain_is_walkable_and_keeps_one_thread(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    (root,) = await finished(app, log, await run(app, "/draw a fox --seed 11 --steps 2"))
    chain = [root.generation_id]
    for _ in range(3):
        (child,) = await finished(app, log, await app.service.run_action(f"vary:{chain[-1]}.1", ALICE, ROUTE))
        chain.append(child.generation_id)
    records = [await app.store.get(i) for i in chain]
    assert [r.parent_id for r in records] == [None, *chain[:-1]]
    assert [Route.from_json(r.route) for r in records] == [ROUTE] * 4
    assert [r.thread_key for r in records] == [None] + [root.generation_id] * 3
    assert {r.request.seed for r in records} == {11}
    assert len({r.request.subseed for r in records[1:]}) == 3

    (reply,) = await run(app, f"/lineage {chain[-1]}")
    assert reply.data["lineage"] == chain and reply.params["depth"] == 3
    assert [step["parent_id"] for step in reply.data["steps"]] == [None, *chain[:-1]]
    text = app.translator.t("en", reply.key, **reply.params)
    assert text.startswith(f"Lineage of {chain[-1]} (3 step(s)") and " → ".join(chain) in text
    assert "来源链" in app.translator.t("zh-CN", reply.key, **reply.params)
    (middle,) = await run(app, f"/lineage {chain[1]}")
    assert middle.data["lineage"] == chain[:2]
    # the deepest variation draws again from its infotext, pixel for pixel
    deepest = log.of("finished", chain[-1])[0].images[0]
    (again,) = await finished(app, log, await run(app, "/draw " + deepest.infotext))
    assert await png(app, again.images[0]) == await png(app, deepest)


async def test_bad_targets_and_options_are_refused_naming_what_is_allowed(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    (result,) = await finished(app, log, await run(app, "/draw a cat --batch 2 --steps 2"))
    job = result.generation_id
    cases = {
        "/vary": "error.missing_argument",
        "/vary what?": "variations.bad_target",
        f"/vary {job}.3": "variations.bad_index",
        f"/vary {job}.0": "variations.bad_index",
        "/vary 01AAAAAAAAAAAAAAAAAAAAAAAA": "error.not_found",
        f"/vary {job} --strength 2": "error.out_of_range",
        f"/vary {job} --strong --strength 0.3": "variations.strength_twice",
        f"/vary {job} --count 99": "error.out_of_range",
        f"/vary {job} --seed 3": "error.unknown_option",
        "/lineage": "error.missing_argument",
    }
    for line, key in cases.items():
        (reply,) = await run(app, line)
        assert reply.error and reply.key == key, (line, reply)
    (index,) = await run(app, f"/vary {job}.3")
    assert "images 1 to 2" in app.translator.t("en", index.key, **index.params)
    assert "1 到 2" in app.translator.t("zh-CN", index.key, **index.params)

    private = (await run(app, "/draw a secret --private --steps 2"))[0].data["jobs"][0]
    await log.wait_for(lambda: log.of("finished", private))
    (hidden,) = await run(app, f"/vary {private}", BOB)
    assert hidden.key == "error.not_found"
    (lineage,) = await run(app, f"/lineage {private}", BOB)
    assert lineage.key == "error.not_found"

    await app.queue.stop()
    (queued,) = (await run(app, "/draw a dog"))[0].data["jobs"]
    (unfinished,) = await run(app, f"/vary {queued}")
    assert unfinished.key == "variations.unfinished" and unfinished.params["status"] == "queued"
    assert await app.store.count_by_status() == {"finished": 2, "queued": 1}  # nothing else stored


def test_config_toml_lists_the_settings_of_variations_img2img_and_forever() -> None:
    from bot.settings import parse_settings

    settings = parse_settings(tomllib.loads((ROOT / "config.toml").read_text(encoding="utf-8")))
    for name, model in (
        ("variations", VariationsConfig),
        ("img2img", Img2ImgConfig),
        ("forever", ForeverConfig),
    ):
        assert set(settings.plugins.table(name)) == set(model.model_fields), name
        assert settings.plugin_config(name, model) == model(), name


@pytest.mark.parametrize(
    ("name", "model", "values", "expected"),
    [
        ("variations", VariationsConfig, {"subtle_strength": 0}, "[plugins.variations] subtle_strength"),
        ("variations", VariationsConfig, {"strong": 0.5}, "[plugins.variations] strong: unknown key"),
        ("img2img", Img2ImgConfig, {"refine_denoise": 1.5}, "[plugins.img2img] refine_denoise"),
        ("forever", ForeverConfig, {"max_images": 0}, "[plugins.forever] max_images"),
    ],
)
def test_bad_settings_fail_naming_table_and_key(name, model, values, expected) -> None:
    from bot.settings import parse_settings

    with pytest.raises(ConfigError) as info:
        parse_settings({"plugins": {name: values}}).plugin_config(name, model)
    assert expected in str(info.value)


# the core calls every startup hook before awaiting any, so the async ones after the failing
# one are never awaited
@pytest.mark.filterwarnings("ignore:coroutine .startup. was never awaited:RuntimeWarning")
async def test_a_bad_table_fails_at_startup(make_app) -> None:
    with pytest.raises(ConfigError, match=r"\[plugins.forever\] max_images"):
        await make_app(plugins={"forever": {"max_images": "many"}})


@pytest.mark.slow
def test_console_session_varies_a_variation_and_shows_the_lineage(tmp_path: Path) -> None:
    with ConsoleSession(tmp_path, config="[plugins.variations]\nsubtle_strength = 0.1\n") as session:
        (root,) = jobs_of(session.command("/draw a red boat --seed 21"))
        first = session.finished(root)
        assert f"vary:{root}.1" in [a["id"] for a in first["actions"]]
        chain = [root]
        for _ in range(3):  # pressing V1 is typing its action
            (child,) = jobs_of(session.command(f"/vary {chain[-1]}.1"))
            done = session.finished(child)
            assert done["event"] == "finished", done
            assert done["images"][0]["seed"] == 21
            assert "Variation seed strength: 0.1" in done["images"][0]["infotext"]
            chain.append(child)
        (lineage,) = session.command(f"/lineage {chain[-1]}")
        assert lineage["lineage"] == chain
        assert lineage["text"].endswith(" → ".join(chain))
        walked, current = [], chain[-1]  # /show re-posts each result and names its parent
        while current:
            (shown,) = session.command(f"/show {current}")
            assert shown["key"] == "show.result" and shown["files"] and shown["images"][0]["seed"] == 21
            assert f"vary:{current}.1" in [a["id"] for a in shown["actions"]]
            walked.append(current)
            current = shown["parent_id"]
        assert walked == chain[::-1]
        (strong,) = jobs_of(session.command(f"/vary {root}.1 --strong"))
        assert "Variation seed strength: 0.5" in session.finished(strong)["images"][0]["infotext"]
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'atelier.db'}")

    async def threads() -> list:
        try:
            return [(await store.get(i)).thread_key for i in chain]
        finally:
            await store.close()

    assert asyncio.run(threads()) == [None, root, root, root]
