"""X/Y/Z grids through the core with the real tiny engine, on SQLite and PostgreSQL:
planning in A1111's order, the labelled grid, reproduction of every cell from its own
infotext, Z axes, third-party axes, bad input, the cell cap and cancelled cells."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.hookspecs import hookimpl
from bot.types import Actor
from models.preferences import PreferenceStore
from pipeline.grid import annotate_grid
from pipeline.images import read_infotext
from pipeline.infotext import parse
from plugins import xy_grid
from plugins.xy_grid import GridAxis, loop_order
from tests.conftest import EventLog
from tests.scenario import ConsoleSession, jobs_of

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
BOB = Actor(platform="console", user_id="bob", name="Bob", locale="zh-CN", chat_id="c")
MOD = Actor(platform="console", user_id="mod", name="Mod", chat_id="c")
ELSEWHERE = Actor(platform="console", user_id="carol", name="Carol", chat_id="other")
# a grid is several jobs at once: lift the quota on open jobs so it never interferes
QUOTAS = {"quotas": {"max_queued": 0}}
SLOW = 900  # seconds: the tiny engine is quick, a shared CPU may not be


async def run(app, line: str, actor: Actor = ALICE):
    return await app.service.handle_line(line, actor)


def text(app, reply, locale: str = "en") -> str:
    return app.translator.t(locale, reply.key, **reply.params)


async def grid_notice(app, log: EventLog, jobs: list[str]):
    """The one notice a grid posts, after every cell ended."""
    await log.wait_for(lambda: any(n.generation_id in jobs for n in log.of("notice")), timeout=SLOW)
    await app.idle()
    notices = [n for n in log.of("notice") if n.generation_id in jobs]
    assert len(notices) == 1, notices
    return notices[0]


def cell_image(app, record) -> Image.Image:
    return Image.open(app.images_dir / record.images[0].path).convert("RGB")


def tile(grid: Image.Image, left: int, top: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    return grid.crop((left, top, left + size[0], top + size[1]))


def has_ink(region: Image.Image) -> bool:
    return any(low < 255 for low, _ in region.getextrema())


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    """Equal up to the float rounding of a larger UNet batch (cells and reruns may run in
    different micro-batches): no channel differs by more than one level."""
    if a.size != b.size:
        return False
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()) <= 1


async def test_a_3x3_grid_is_labelled_in_a1111_order_and_every_cell_reproduces_from_its_infotext(
    make_app,
) -> None:
    app = await make_app(plugins=QUOTAS)
    log = EventLog(app)
    replies = await run(app, '/grid a cat --x "steps: 2-4" --y "cfg: 5-7 [3]" --seed 1234')
    assert [r.key for r in replies] == ["draw.accepted", "grid.planned"], replies
    jobs = replies[0].data["jobs"]
    assert len(jobs) == 9
    notice = await grid_notice(app, log, jobs)

    records = [await app.store.get(job) for job in jobs]
    assert {r.plan for r in records} == {"grid"} and len({r.group_id for r in records}) == 1
    # no costly axis: Y outside, X inside, so the plan order is A1111's image order
    expected = [(s, c) for c in (5.0, 6.0, 7.0) for s in (2, 3, 4)]
    assert [(r.request.num_inference_steps, r.request.guidance_scale) for r in records] == expected
    assert [r.label for r in records] == [f"Steps: {s} | CFG Scale: {c}" for s, c in expected]
    assert {r.request.seed for r in records} == {1234} and all(r.status == "finished" for r in records)

    reply = notice.reply
    assert reply.key == "grid.done" and not reply.error
    assert reply.data["cells"] == jobs and reply.data["missing"] == []
    assert text(app, reply) == "Grid of 9 cells (3 × 3) is ready."
    assert [a.id for a in reply.actions] == [f"grid-again:{jobs[0]}"]
    (file,) = reply.files
    assert file.kind == "image" and file.name.endswith("-grid.png")
    assert Path(reply.data["grid"]).read_bytes() == file.data  # kept beside the images
    grid = Image.open(io.BytesIO(file.data)).convert("RGB")
    pad_left = 64 * 3 // 4  # A1111: three quarters of a cell when rows have labels
    assert grid.width == pad_left + 3 * 64
    pad_top = grid.height - 3 * 64
    assert pad_top > 0  # the X labels' band
    for index, record in enumerate(records):
        x, y = index % 3, index // 3
        assert same_pixels(tile(grid, pad_left + 64 * x, pad_top + 64 * y), cell_image(app, record)), index
    assert has_ink(grid.crop((pad_left, 0, grid.width, pad_top)))  # X labels
    assert has_ink(grid.crop((0, pad_top, pad_left, grid.height)))  # Y labels
    assert not has_ink(grid.crop((0, 0, pad_left, pad_top)))  # the corner stays white
    assert not same_pixels(cell_image(app, records[0]), cell_image(app, records[2]))  # steps matter

    infotext = read_infotext(file.data)
    assert infotext == records[0].images[0].infotext
    fields = parse(infotext)
    assert (fields["Script"], fields["X Type"], fields["X Values"]) == ("X/Y/Z plot", "Steps", "2-4")
    assert (fields["Y Type"], fields["Y Values"]) == ("CFG Scale", "5-7 [3]")
    assert "Script" not in parse(records[1].images[0].infotext)

    reruns = []
    for record in records:
        (accepted,) = await run(app, "/draw " + record.images[0].infotext)
        reruns.extend(accepted.data["jobs"])
    await log.wait_for(lambda: all(log.of("finished", job) for job in reruns), timeout=SLOW)
    for record, rerun in zip(records, reruns, strict=True):
        again = await app.store.get(rerun)
        assert again.plan == "draw"
        assert same_pixels(cell_image(app, again), cell_image(app, record)), record.label


async def test_a_z_axis_puts_one_titled_grid_per_value_side_by_side(make_app) -> None:
    app = await make_app(plugins=QUOTAS)
    log = EventLog(app)
    replies = await run(app, '/grid a cat --x "steps: 1,2" --z "sampler: Euler, DDIM" --seed 7')
    jobs = replies[0].data["jobs"]
    notice = await grid_notice(app, log, jobs)
    records = [await app.store.get(job) for job in jobs]
    assert [(r.request.num_inference_steps, r.request.sampler_name) for r in records] == [
        (1, "Euler"),
        (2, "Euler"),
        (1, "DDIM"),
        (2, "DDIM"),
    ]
    assert records[0].label == "Steps: 1 | Euler"  # A1111 shows the bare sampler name
    assert notice.reply.data["cells"] == jobs
    grid = Image.open(io.BytesIO(notice.reply.files[0].data)).convert("RGB")
    assert grid.width == 2 * (2 * 64)  # no Y labels: no left band; the Z grids side by side
    top = grid.height - 64  # Z titles, then each grid's X labels, above the cells
    assert top > 0
    for index, record in enumerate(records):
        x, z = index % 2, index // 2
        assert same_pixels(tile(grid, z * 128 + x * 64, top), cell_image(app, record)), record.label
    fields = parse(read_infotext(notice.reply.files[0].data))
    assert (fields["Z Type"], fields["Z Values"]) == ("Sampler", "Euler, DDIM")
    assert "Y Type" not in fields


async def test_costly_axes_run_outermost_and_cells_keep_their_grid_places(make_app) -> None:
    app = await make_app(plugins=QUOTAS)
    log = EventLog(app)
    replies = await run(app, '/grid a cat --x "checkpoint: tiny, tiny" --y "steps: 1,2" --seed 3')
    jobs = replies[0].data["jobs"]
    notice = await grid_notice(app, log, jobs)
    records = [await app.store.get(job) for job in jobs]
    # Checkpoint name costs most: X is the outer loop, so Y changes first in the plan
    assert [r.request.num_inference_steps for r in records] == [1, 2, 1, 2]
    assert [r.group_index for r in records] == [0, 1, 2, 3]
    # the grid is in image order (x + y*|X|) whatever order the cells ran in
    assert notice.reply.data["cells"] == [jobs[0], jobs[2], jobs[1], jobs[3]]
    grid = Image.open(io.BytesIO(notice.reply.files[0].data)).convert("RGB")
    pad_left, pad_top = 48, grid.height - 2 * 64
    for place, job in enumerate(notice.reply.data["cells"]):
        x, y = place % 2, place // 2
        expected = cell_image(app, await app.store.get(job))
        assert same_pixels(tile(grid, pad_left + 64 * x, pad_top + 64 * y), expected)


async def test_a_third_party_axis_drives_cells_and_grid_options_compose_with_draw(make_app) -> None:
    def mood(cell, value, values):
        cell.prompt = f"{cell.prompt}, {value} mood"

    class Moods:
        @hookimpl
        def register_grid_axes(self, register):
            register(GridAxis("Mood", "str", mood, aliases=("feeling",)))

    app = await make_app(plugins=QUOTAS, extra_plugins=(Moods(),))
    assert app.grid_axes.owners["mood"] != "xy_grid"
    log = EventLog(app)
    # --x is a /draw option too: everything else of /draw applies to every cell
    line = '/draw a cat --x "FEELING: happy, sad" --negative blurry --steps 2 --cfg 6 --seed 11'
    (accepted,) = await run(app, line)
    jobs = accepted.data["jobs"]
    notice = await grid_notice(app, log, jobs)
    records = [await app.store.get(job) for job in jobs]
    assert [r.request.prompt for r in records] == ["a cat, happy mood", "a cat, sad mood"]
    assert [r.label for r in records] == ["Mood: happy", "Mood: sad"]
    assert {
        (r.request.negative_prompt, r.request.num_inference_steps, r.request.guidance_scale) for r in records
    } == {("blurry", 2, 6)}
    assert not same_pixels(cell_image(app, records[0]), cell_image(app, records[1]))
    assert notice.reply.key == "grid.done"
    assert parse(records[0].images[0].infotext)["X Type"] == "Mood"

    # the grid's button runs it again with a new seed, axes and all
    again = await app.service.run_action(notice.reply.actions[0].id, ALICE)
    again_jobs = again[0].data["jobs"]
    second = await grid_notice(app, log, again_jobs)
    rerun = [await app.store.get(job) for job in again_jobs]
    assert [r.request.prompt for r in rerun] == ["a cat, happy mood", "a cat, sad mood"]
    assert rerun[0].request.seed != 11 and rerun[0].parent_id == jobs[0]
    assert second.reply.key == "grid.done"


@pytest.mark.parametrize(
    ("line", "key", "english", "chinese"),
    [
        (
            '--x "colour: red"',
            "error.grid.unknown_axis",
            'Unknown grid axis "colour". Axes: CFG Scale,',
            "未知的网格轴",
        ),
        (
            '--x "steps: 1-5 (2)"',
            "error.grid.bad_values",
            'The Steps values "1-5 (2)" could not be read: "1-5 (2)" is not a whole number',
            "不是整数",
        ),
        ('--x "cfg: 1-2 (+0)"', "error.grid.bad_values", "a range step must not be 0", "步长不能为 0"),
        ('--x "sampler: Eular, DDIM"', "error.grid.bad_values", 'unknown sampler "Eular"', "未知的采样器"),
        ('--x "steps: 5-1"', "error.grid.empty_axis", "give no value", "没有得到任何值"),
        ("--x steps", "error.grid.bad_axis_option", '--x must be AXIS: VALUES, e.g. --x "steps', "格式应为"),
        (
            '--x "steps: 2, 500"',
            "error.grid.bad_cell",
            "The grid cell Steps: 500 cannot be drawn: --steps must be from 1 to 150, got 500.",
            "无法绘制",
        ),
        (
            '--y "prompt s/r: dog, wolf"',
            "error.grid.bad_cell",
            '"dog" is not in the prompt or the negative',
            "搜索/替换",
        ),
        (
            '--x "denoising: 0.5, 0.7"',
            "error.grid.bad_cell",
            "changes nothing without --hires",
            "没有 --hires",
        ),
        ('--x "steps: 1,2" --count 2', "error.grid.count", "leave out --count (got 2)", "去掉 --count"),
        ("--steps 2", "error.grid.no_axes", "/grid plot needs at least one axis", "至少需要一个轴"),
    ],
)
async def test_bad_grid_input_is_refused_in_the_users_language_and_nothing_is_stored(
    make_app, line: str, key: str, english: str, chinese: str
) -> None:
    app = await make_app(plugins=QUOTAS)
    for actor, locale, expected in ((ALICE, "en", english), (BOB, "zh-CN", chinese)):
        (reply,) = await run(app, f"/grid a cat {line}", actor)
        assert reply.error and reply.key == key, reply
        assert expected in text(app, reply, locale), text(app, reply, locale)
    assert await app.store.count_by_status() == {}


async def test_the_cell_cap_refuses_big_grids_and_moderators_change_it(make_app) -> None:
    app = await make_app(
        plugins={**QUOTAS, "xy_grid": {"max_cells": 4}, "moderation": {"moderators": ["console:mod"]}}
    )
    log = EventLog(app)
    big = '/grid a cat --x "steps: 1-3" --y "cfg: 5, 6"'
    (reply,) = await run(app, big)
    assert reply.error and reply.key == "error.grid.too_many_cells"
    assert text(app, reply) == "This grid has 6 cells (3 × 2); at most 4 are allowed here. Use fewer values."
    assert "最多允许 4 格" in text(app, reply, "zh-CN")
    assert await app.store.count_by_status() == {}
    assert (await run(app, "/grid cap"))[0].data["max_cells"] == 4

    (refused,) = await run(app, "/grid cap 10", BOB)
    assert refused.key == "error.moderators_only" and "仅限管理员" in text(app, refused, "zh-CN")
    (done,) = await run(app, "/grid cap 6", MOD)
    assert (
        done.key == "grid.cap_set"
        and text(app, done) == "Grids in this server or chat may now have at most 6 cells."
    )
    assert (await run(app, "/grid cap", BOB))[0].data["max_cells"] == 6

    (accepted, _) = await run(app, big)
    assert len(accepted.data["jobs"]) == 6
    assert (await run(app, big, ELSEWHERE))[0].key == "error.grid.too_many_cells"  # another chat

    local_moderator = replace(ELSEWHERE, roles=frozenset({"moderator"}))
    (reply,) = await run(app, "/grid cap 1 --global", local_moderator)
    assert reply.key == "error.global_moderators_only"
    (done,) = await run(app, "/grid cap 2 --global", MOD)
    assert "everywhere" in text(app, done)
    assert (await run(app, "/grid cap", ELSEWHERE))[0].data["max_cells"] == 2
    assert (await run(app, "/grid cap"))[0].data["max_cells"] == 6  # the chat's own cap wins
    (reply,) = await run(app, "/grid cap 5000", MOD)
    assert reply.error and "1000" in text(app, reply)
    await grid_notice(app, log, accepted.data["jobs"])


async def test_cancelled_cells_are_black_in_the_grid_and_the_notice_says_so(make_app) -> None:
    app = await make_app(plugins=QUOTAS)
    log = EventLog(app)
    replies = await run(app, '/grid a cat --x "steps: 1,2,3" --y "cfg: 5,6" --seed 9')
    jobs = replies[0].data["jobs"]
    for job in reversed(jobs[3:]):  # the last ones are surely still queued
        await app.service.cancel(job, ALICE)
    notice = await grid_notice(app, log, jobs)
    records = {job: await app.store.get(job) for job in jobs}
    cancelled = [job for job in jobs if records[job].status == "cancelled"]
    finished = [job for job in jobs if records[job].status == "finished"]
    assert cancelled and finished and len(cancelled) + len(finished) == 6
    reply = notice.reply
    assert reply.key == "grid.partial" and reply.data["missing"] == cancelled
    assert f"{len(finished)} finished, 0 failed and {len(cancelled)} cancelled" in text(app, reply)
    assert "格已取消" in text(app, reply, "zh-CN")
    grid = Image.open(io.BytesIO(reply.files[0].data)).convert("RGB")
    pad_left, pad_top = 48, grid.height - 2 * 64
    for place, job in enumerate(reply.data["cells"]):
        cell = tile(grid, pad_left + 64 * (place % 3), pad_top + 64 * (place // 3))
        if job in cancelled:
            assert cell.getextrema() == ((0, 0), (0, 0), (0, 0)), place
        else:
            assert same_pixels(cell, cell_image(app, records[job])), place

    # a grid whose every cell is cancelled gets a notice and no image
    replies = await run(app, '/grid a dog --x "steps: 1,2"')
    second = replies[0].data["jobs"]
    for job in reversed(second):
        await app.service.cancel(job, ALICE)
    nothing = (await grid_notice(app, log, second)).reply
    statuses = {(await app.store.get(job)).status for job in second}
    if statuses == {"cancelled"}:
        assert nothing.key == "grid.nothing" and nothing.error and not nothing.files
        assert "2 cancelled" in text(app, nothing)


async def test_cells_ending_at_once_post_the_grid_exactly_once(make_app) -> None:
    app = await make_app(plugins=QUOTAS)
    log = EventLog(app)
    replies = await run(app, '/grid a cat --x "steps: 1,2" --y "cfg: 5,6"')
    jobs = replies[0].data["jobs"]
    await grid_notice(app, log, jobs)
    records = [await app.store.get(job) for job in jobs]
    await asyncio.gather(*(xy_grid.cell_ended(record, app) for record in records))
    assert len(log.of("notice")) == 1  # already posted: nobody posts again
    await PreferenceStore(app.store).delete(("grid", records[0].group_id), xy_grid.POSTED_KEY)
    await asyncio.gather(*(xy_grid.cell_ended(record, app) for record in records * 2))
    assert len(log.of("notice")) == 2  # eight calls at once, one grid


async def test_every_prompt_a_grid_brings_in_goes_through_the_word_lists(make_app) -> None:
    app = await make_app(plugins={**QUOTAS, "moderation": {"blocked_words": ["wolf"]}})
    log = EventLog(app)
    (reply,) = await run(app, '/grid a cat --x "prompt s/r: cat, dog, wolf"')
    assert reply.error and reply.key == "moderation.blocked" and reply.params["word"] == "wolf"
    assert await app.store.count_by_status() == {}
    # where NSFW words are allowed, a cell that brings one in makes the whole grid a spoiler
    nsfw_channel = replace(ALICE, nsfw_allowed=True)
    (accepted, _) = await run(app, '/grid a cat --x "prompt s/r: cat, nude cat" --steps 1', nsfw_channel)
    records = [await app.store.get(job) for job in accepted.data["jobs"]]
    assert [r.request.prompt for r in records] == ["a cat", "a nude cat"]
    assert all(r.spoiler for r in records)
    await grid_notice(app, log, accepted.data["jobs"])


def test_loop_order_puts_the_dearest_axis_outermost() -> None:
    assert loop_order((0, 0, 0)) == (2, 1, 0)  # Z, Y, X
    assert loop_order((1.0, 0, 0)) == (0, 2, 1)
    assert loop_order((1.0, 0.7, 0)) == (0, 1, 2)
    assert loop_order((0, 0.7, 0)) == (1, 2, 0)
    assert loop_order((0.7, 0, 1.0)) == (2, 0, 1)
    assert loop_order((1.0, 1.0, 0)) == (2, 1, 0)  # no single dearest axis


def test_legend_margins_follow_a1111() -> None:
    grid = Image.new("RGB", (2 * 100, 3 * 80), "#808080")
    labelled, (left, top) = annotate_grid(grid, (100, 80), ["a", "b"], ["", "", ""])
    assert (left, labelled.width) == (0, 200) and top > 0 and labelled.height == 240 + top
    labelled, (left, top) = annotate_grid(grid, (100, 80), ["", ""], ["r1", "", "r3"])
    assert (left, top) == (75, 0) and labelled.size == (275, 240)
    assert labelled.crop((75, 0, 275, 240)).getextrema() == ((128, 128),) * 3


async def test_axis_names_match_in_any_case_and_by_alias(make_app) -> None:
    app = await make_app(start=False)
    from bot.grid_axes import find_axis

    for name, expected in [
        ("cfg", "CFG Scale"),
        ("CFG Scale", "CFG Scale"),
        ("cfg-scale", "CFG Scale"),
        ("var. seed", "Var. seed"),
        ("Variation seed", "Var. seed"),
        ("prompt s/r", "Prompt S/R"),
        ("CHECKPOINT", "Checkpoint name"),
        ("sigma churn", "Sigma Churn"),
        ("Sigma min", "Sigma min"),
        ("s tmax", "Sigma max"),
        ("schedule rho", "Schedule rho"),
        ("eta", "Eta"),
        ("image cfg", "Image CFG Scale"),
    ]:
        assert find_axis(app, name).name == expected


async def test_an_axis_typed_with_a_chinese_keyboard_or_an_equals_sign_reads_as_with_a_colon(
    make_app,
) -> None:
    app = await make_app(start=False)
    from bot.errors import UserError
    from bot.grid_axes import read_axis

    for raw, name, values in [
        ("steps: 1-3", "Steps", [1, 2, 3]),
        ("steps：1-3", "Steps", [1, 2, 3]),  # full-width colon
        ("steps=1-3", "Steps", [1, 2, 3]),
        ("cfg：5，7, 9", "CFG Scale", [5.0, 7.0, 9.0]),  # full-width commas between numbers
        ("prompt s/r: cat, a=b", "Prompt S/R", ["cat", "a=b"]),  # the colon comes first
        ("prompt s/r=cat，dog, fox", "Prompt S/R", ["cat，dog", "fox"]),  # a prompt's own comma stays
        ("prompt s/r=(cat:1.2), dog", "Prompt S/R", ["(cat:1.2)", "dog"]),  # the first separator counts
    ]:
        choice = read_axis(app, "x", raw)
        assert (choice.axis.name, choice.values) == (name, values), raw
    with pytest.raises(UserError) as refused:
        read_axis(app, "x", "steps 1-3")
    assert refused.value.key == "error.grid.bad_axis_option"


async def test_a_grid_over_sigma_churn_renders_and_each_cell_keeps_its_churn(make_app) -> None:
    app = await make_app(plugins=QUOTAS)
    log = EventLog(app)
    line = '/grid a cat --x "Sigma Churn: 0, 0.5" --y "Sigma max: 0, 2" --sampler Euler --steps 4 --seed 7'
    replies = await run(app, line)
    assert [r.key for r in replies] == ["draw.accepted", "grid.planned"], replies
    jobs = replies[0].data["jobs"]
    notice = await grid_notice(app, log, jobs)
    records = [await app.store.get(job) for job in jobs]
    assert [(r.request.s_churn, r.request.s_tmax) for r in records] == [
        (0.0, 0.0),
        (0.5, 0.0),
        (0.0, 2.0),
        (0.5, 2.0),
    ]
    assert [r.label for r in records][:2] == [
        "Sigma Churn: 0.0 | Sigma max: 0.0",
        "Sigma Churn: 0.5 | Sigma max: 0.0",
    ]
    assert all(r.status == "finished" for r in records)
    assert notice.reply.key == "grid.done" and notice.reply.data["missing"] == []
    churned = parse(records[1].images[0].infotext)
    assert churned["Sigma churn"] == "0.5" and "Sigma tmax" not in churned
    assert parse(records[3].images[0].infotext)["Sigma tmax"] == "2.0"
    assert "Sigma churn" not in parse(records[0].images[0].infotext)
    assert not same_pixels(cell_image(app, records[0]), cell_image(app, records[1]))  # churn matters
    (file,) = notice.reply.files
    grid = Image.open(io.BytesIO(file.data)).convert("RGB")
    assert grid.width == 64 * 3 // 4 + 2 * 64


def test_config_toml_lists_the_grid_settings_with_their_defaults() -> None:
    import tomllib

    from bot.settings import ConfigError, parse_settings
    from plugins.xy_grid import GridConfig

    root = Path(__file__).resolve().parents[2]
    settings = parse_settings(tomllib.loads((root / "config.toml").read_text(encoding="utf-8")))
    assert set(settings.plugins.table("xy_grid")) == set(GridConfig.model_fields)
    assert settings.plugin_config("xy_grid", GridConfig) == GridConfig()
    with pytest.raises(ConfigError, match=r"\[plugins.xy_grid\] max_cells"):
        parse_settings({"plugins": {"xy_grid": {"max_cells": 0}}}).plugin_config("xy_grid", GridConfig)


@pytest.mark.slow
def test_console_scenario_a_grid_from_the_command_to_the_labelled_image(tmp_path: Path) -> None:
    config = "[plugins.xy_grid]\nmax_cells = 9\n"
    with ConsoleSession(tmp_path, config=config) as session:
        replies = session.command('/grid a lighthouse --x "steps: 1-3" --y "cfg: 5-7 [3]" --seed 42')
        jobs = jobs_of(replies)
        assert len(jobs) == 9 and replies[1]["key"] == "grid.planned", replies
        notice = session.wait_for(lambda e: e["event"] == "notice" and e["id"] in jobs, timeout=SLOW)
        assert notice["key"] == "grid.done" and notice["cells"] == jobs
        assert notice["text"] == "Grid of 9 cells (3 × 3) is ready."
        assert notice["actions"] == [{"id": f"grid-again:{jobs[0]}", "label": "Grid again (new seed)"}]
        finished = {e["id"]: e for e in session.events if e["event"] == "finished"}
        grid = Image.open(notice["files"][0]).convert("RGB")
        pad_top = grid.height - 3 * 64
        for index, job in enumerate(jobs):
            image = finished[job]["images"][0]
            assert parse(image["infotext"])["Steps"] == str(1 + index % 3)
            cell = Image.open(image["path"]).convert("RGB")
            assert same_pixels(tile(grid, 48 + 64 * (index % 3), pad_top + 64 * (index // 3)), cell)
        assert parse(read_infotext(Path(notice["files"][0]).read_bytes()))["Y Values"] == "5-7 [3]"

        (error,) = session.command('/grid a lighthouse --x "steps: 1-20"')
        assert error["event"] == "error" and error["key"] == "error.grid.too_many_cells"
        assert "at most 9 are allowed here" in error["text"]
        (error,) = session.command('/grid a lighthouse --x "colour: red, blue"')
        assert error["key"] == "error.grid.unknown_axis" and "Steps" in error["text"]
        (error,) = session.command("/grid cap 20")
        assert error["key"] == "error.moderators_only"
    assert len([e for e in session.events if e["event"] == "notice"]) == 1


async def test_grid_again_of_a_private_grid_is_refused_to_the_same_id_on_another_platform(make_app) -> None:
    app = await make_app(plugins=QUOTAS)
    await app.queue.stop()  # the stored cells are all "grid again" reads
    owner = Actor(platform="discord", user_id="123", name="Owner", chat_id="c")
    namesake = Actor(platform="telegram", user_id="123", name="Namesake", chat_id="c")
    private = (await run(app, '/grid a secret map --x "steps: 2,3" --private --seed 5', owner))[0]
    public = (await run(app, '/grid an open field --x "steps: 2,3" --seed 6', owner))[0]
    first_private, first_public = private.data["jobs"][0], public.data["jobs"][0]
    before = await app.store.count_by_status()

    (refused,) = await app.service.run_action(f"grid-again:{first_private}", namesake)
    assert refused.error and refused.key == "error.not_found"
    assert "secret" not in text(app, refused)
    assert await app.store.count_by_status() == before  # nothing queued for the namesake

    mine = await app.service.run_action(f"grid-again:{first_private}", owner)
    assert mine[0].key == "draw.accepted" and len(mine[0].data["jobs"]) == 2
    again = await app.store.get(mine[0].data["jobs"][0])
    assert again.private and again.request.prompt == "a secret map"
    viewer = await app.service.run_action(f"grid-again:{first_public}", namesake)
    assert viewer[0].key == "draw.accepted"  # a public grid is the community's, the new one the viewer's
    record = await app.store.get(viewer[0].data["jobs"][0])
    assert (record.user.platform, record.user.platform_user_id) == ("telegram", "123")


async def test_a_one_axis_grid_names_its_axis_not_its_count_twice(make_app) -> None:
    app = await make_app(plugins={**QUOTAS, "xy_grid": {"max_cells": 4}})
    (reply,) = await run(app, '/grid a cat --x "seed: 1-6"')
    assert reply.key == "error.grid.too_many_cells"
    assert text(app, reply) == "This grid has 6 cells (Seed); at most 4 are allowed here. Use fewer values."


async def test_a_grids_cells_are_built_off_the_event_loop(make_app, monkeypatch) -> None:
    """Each cell is frozen like a /draw (names resolved against the models folder): in a
    worker thread, never on the event loop's."""
    import threading

    app = await make_app()
    log = EventLog(app)
    threads = []
    original = xy_grid.freeze
    monkeypatch.setattr(
        xy_grid, "freeze", lambda *a: threads.append(threading.current_thread()) or original(*a)
    )
    replies = await run(app, '/grid a cat --steps 1 --x "steps: 1, 2" --y "sampler: euler, k_euler_a"')
    assert not replies[0].error, replies
    jobs = replies[0].data["jobs"]
    await grid_notice(app, log, jobs)
    assert len(threads) == 5  # the control draft and the four cells
    assert threading.main_thread() not in threads
    records = [await app.store.get(job) for job in jobs]
    assert sorted(r.request.sampler_name for r in records) == ["Euler", "Euler", "Euler a", "Euler a"]
