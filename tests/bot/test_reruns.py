"""Requests from A1111 infotexts: pasted into /draw or /pnginfo, or read from a PNG."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from bot.adapters.console import ConsoleAdapter
from bot.types import Actor, Attachment
from pipeline.infotext import parse
from tests.conftest import EventLog, png

ALICE = Actor(platform="console", user_id="alice", name="Alice", locale="en", chat_id="c")
BOB = Actor(platform="console", user_id="bob", name="Bob", locale="zh-CN", chat_id="c")

SEED_EXAMPLE = (
    "masterpiece, best quality, 1girl, (cat ears:1.1), looking at viewer\n"
    "Negative prompt: lowres, bad anatomy, bad hands, text, error, missing fingers\n"
    "Steps: 28, Sampler: Euler, CFG scale: 12, Seed: 42, Size: 512x512, Model hash: 925997e9, "
    "Clip skip: 2, ENSD: 31337"
)


async def test_the_seed_example_reports_the_missing_model_in_both_languages(make_app) -> None:
    app = await make_app()
    for actor, expected in (
        (ALICE, "hash 925997e9) is not in the models folder. Available: tiny"),
        (BOB, "哈希 925997e9）不在模型文件夹中"),
    ):
        replies = await app.service.handle_line("/draw " + SEED_EXAMPLE, actor)
        assert replies[0].error and replies[0].key == "error.model_missing"
        assert expected in app.translator.t(actor.locale, replies[0].key, **replies[0].params)
    assert await app.store.count_by_status() == {}


async def test_the_seed_example_runs_with_exactly_its_settings(make_app) -> None:
    app = await make_app()
    replies = await app.service.handle_line("/draw " + SEED_EXAMPLE + "\n--checkpoint tiny", ALICE)
    (job_id,) = replies[0].data["jobs"]
    await app.service.cancel(job_id, ALICE)  # a 512x512, 28-step run is not needed to check the row
    req = (await app.store.get(job_id)).request
    assert req.prompt == "masterpiece, best quality, 1girl, (cat ears:1.1), looking at viewer"
    assert req.negative_prompt == "lowres, bad anatomy, bad hands, text, error, missing fingers"
    assert (req.num_inference_steps, req.sampler_name, req.scheduler) == (28, "Euler", "Automatic")
    assert req.guidance_scale == 12 and isinstance(req.guidance_scale, int)
    assert (req.seed, req.width, req.height, req.clip_skip, req.ensd) == (42, 512, 512, 2, 31337)
    assert req.rng == "GPU" and req.checkpoint == "tiny"  # no RNG field means A1111's GPU source


async def test_pnginfo_shows_the_settings_and_the_command(make_app) -> None:
    app = await make_app()
    (reply,) = await app.service.handle_line("/pnginfo " + SEED_EXAMPLE, ALICE)
    command = reply.data["command"]
    assert command.startswith('/draw "masterpiece, best quality, 1girl, (cat ears:1.1), looking at viewer"')
    for part in (
        "--steps 28",
        "--sampler Euler",
        "--cfg 12",
        "--seed 42",
        "--size 512x512",
        "--clip-skip 2",
        "--ensd 31337",
        "--rng GPU",
    ):
        assert part in command
    text = app.translator.t("zh-CN", reply.key, **reply.params)
    assert text.startswith("参数：") and "重新生成：/draw" in text


@pytest.mark.parametrize("how", ["pasted", "png"])
async def test_an_image_reproduces_from_its_own_infotext(make_app, how: str) -> None:
    app = await make_app()
    log = EventLog(app)
    line = (
        '/draw a (cat:1.2) [sitting|standing], BREAK watercolour --negative "blurry" --steps 5 --cfg 6.5 '
        "--seed 9 --sampler DPM++ 2M --scheduler Karras --clip-skip 2 --subseed 4 --subseed-strength 0.3"
    )
    (first,) = (await app.service.handle_line(line, ALICE))[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", first))
    image = log.of("finished", first)[0].images[0]
    if how == "pasted":
        replies = await app.service.handle_line("/draw " + image.infotext, ALICE)
    else:
        data = await png(app, image)
        (info,) = await app.service.handle_line("/pnginfo", ALICE, attachments=(Attachment("x.png", data),))
        replies = await app.service.handle_line(info.data["command"], ALICE)
    (second,) = replies[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", second))
    again = log.of("finished", second)[0].images[0]
    assert again.infotext == image.infotext
    assert await png(app, again) == await png(app, image)


async def test_pnginfo_on_an_image_without_parameters(make_app) -> None:
    from PIL import Image

    app = await make_app()
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    (reply,) = await app.service.handle_line(
        "/pnginfo", ALICE, attachments=(Attachment("a.png", buffer.getvalue()),)
    )
    assert reply.key == "pnginfo.none"
    (reply,) = await app.service.handle_line("/pnginfo", ALICE, attachments=(Attachment("a.txt", b"hello"),))
    assert reply.error and reply.key == "error.init_image"


async def test_console_joins_continued_lines_and_attaches_files(make_app, tmp_path: Path) -> None:
    app = await make_app()
    out = io.StringIO()
    console = ConsoleAdapter(app, ALICE, json_mode=True, out=out)
    pasted = SEED_EXAMPLE.replace("\n", "\\\n").split("\n")

    async def lines():
        for line in [
            "/pnginfo " + pasted[0],
            *pasted[1:],
            "/pnginfo --attach " + str(tmp_path / "missing.png"),
        ]:
            yield line + "\n"

    await console.run_lines(lines())
    printed = out.getvalue()
    assert "--clip-skip 2" in printed and "--ensd 31337" in printed
    assert "console.attach_missing" in printed


async def test_hires_and_img2img_through_draw_and_back_from_their_infotext(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    (first,) = (
        await app.service.handle_line("/draw a lighthouse --steps 3 --seed 2 --hires --hr-scale 2", ALICE)
    )[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", first))
    image = log.of("finished", first)[0].images[0]
    assert (image.width, image.height) == (128, 128)
    fields = parse(image.infotext)
    assert fields["Denoising strength"] == "0.7" and fields["Hires upscale"] == "2.0"
    assert fields["Size-1"] == "64"  # the first pass's size, as A1111 writes it
    (again,) = (await app.service.handle_line("/draw " + image.infotext, ALICE))[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", again))
    assert await png(app, log.of("finished", again)[0].images[0]) == await png(app, image)

    upload = (Attachment("in.png", await png(app, image)),)
    replies = await app.service.handle_line(
        "/draw a painting --steps 4 --seed 3 --size 64x64", ALICE, attachments=upload
    )
    (refined,) = replies[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", refined))
    out = log.of("finished", refined)[0].images[0]
    assert "Denoising strength: 0.75" in out.infotext
    assert (await app.store.get(refined)).request.init_image.endswith(".png")
    refused = await app.service.handle_line("/draw x --hires", ALICE, attachments=upload)
    assert refused[0].error and refused[0].key == "error.hires_img2img"


async def test_a_pasted_infotext_becomes_options_without_being_retyped(make_app) -> None:
    """The infotext's fields are the request's values as they are: a prompt holding option-like
    text, quotes or a trailing backslash stays the prompt; an option after the infotext wins
    over its field; a field out of the limits is refused with the usual range message."""
    app = await make_app()
    prompt = 'a "quoted" sign saying --steps 99 and -- dashes \\'
    infotext = f"{prompt}\nNegative prompt: it's --cfg 3\nSteps: 3, Sampler: Euler, CFG scale: 6, Seed: 11, Size: 64x64"
    replies = await app.service.handle_line(f"/draw {infotext}\n--steps 2", ALICE)
    assert not replies[0].error, app.translator.t("en", replies[0].key, **replies[0].params)
    (job_id,) = replies[0].data["jobs"]
    await app.service.cancel(job_id, ALICE)
    req = (await app.store.get(job_id)).request
    assert (req.prompt, req.negative_prompt) == (prompt, "it's --cfg 3")
    assert (req.num_inference_steps, req.guidance_scale, req.seed, req.width) == (2, 6, 11, 64)
    too_many = infotext.replace("Steps: 3", "Steps: 9999")
    (refused,) = await app.service.handle_line(f"/draw {too_many}", ALICE)
    assert refused.error and refused.key == "error.out_of_range" and refused.params["name"] == "steps"
