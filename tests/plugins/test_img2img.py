"""Refine (img2img of a result) and uploads through /draw: sizes, denoising strength in the
infotext, translated refusals that store nothing (SQLite and PostgreSQL), and a console session."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.types import Actor, Attachment, Route
from pipeline.infotext import parse
from tests.conftest import EventLog, opened, png
from tests.scenario import ConsoleSession, jobs_of

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
ROUTE = Route("console", "c", reply_to_message_id="m1")


def encoded(size: tuple[int, int], fmt: str = "PNG", color=(200, 80, 40)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, color)
    image.paste((20, 90, 220), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    image.save(buffer, format=fmt)
    return buffer.getvalue()


async def run(app, line: str, attachments: tuple[Attachment, ...] = (), actor: Actor = ALICE):
    return await app.service.handle_line(line, actor, ROUTE, attachments)


async def finished(log: EventLog, replies) -> list:
    assert not replies[0].error, replies
    ids = replies[0].data["jobs"]
    await log.wait_for(lambda: all(log.of("finished", i) or log.of("failed", i) for i in ids))
    assert not any(log.of("failed", i) for i in ids), [log.of("failed", i) for i in ids]
    return [log.of("finished", i)[0] for i in ids]


async def test_refine_sends_a_result_back_through_img2img_as_a_child(make_app) -> None:
    app = await make_app(plugins={"img2img": {"refine_denoise": 0.4}})
    log = EventLog(app)
    (parent,) = await finished(log, await run(app, "/draw a harbour --seed 5 --steps 4 --batch 2"))
    ids = [a.id for a in parent.actions]
    job = parent.generation_id
    assert f"refine:{job}.1" in ids and f"refine:{job}.2" in ids

    (refined,) = await finished(log, await app.service.run_action(f"refine:{job}.2", ALICE, ROUTE))
    record = await app.store.get(refined.generation_id)
    assert record.parent_id == job and record.thread_key == job
    assert Route.from_json(record.route) == ROUTE  # it answers where the button was pressed
    assert record.request.init_image.startswith(str((app.images_dir / "inputs").resolve()))
    assert Image.open(record.request.init_image).tobytes() == (await opened(app, parent.images[1])).tobytes()
    assert record.request.seed not in (5, 6)  # a new seed: another take on each press
    assert (record.request.prompt, record.request.num_inference_steps) == ("a harbour", 4)
    fields = parse(refined.images[0].infotext)
    assert fields["Denoising strength"] == "0.4" and fields["Size-1"] == "64"
    assert len(refined.images) == 2  # the batch size stays

    # the refine draws again from its infotext and the same image
    upload = (Attachment("p.png", await png(app, parent.images[1])),)
    (again,) = await finished(log, await run(app, "/draw " + refined.images[0].infotext, upload))
    assert again.images[0].infotext == refined.images[0].infotext
    diff = np.abs(
        np.asarray((await opened(app, again.images[0])), np.int16)
        - np.asarray((await opened(app, refined.images[0])), np.int16)
    )
    assert diff.max() <= 1  # a batch image and its solo run, as the engine guarantees

    (chosen,) = await finished(log, await run(app, f"/refine {job} --denoise 0.3"))
    assert parse(chosen.images[0].infotext)["Denoising strength"] == "0.3"
    for line, key in (
        (f"/refine {job} --denoise 1.5", "error.out_of_range"),
        (f"/refine {job} --denoise lots", "error.not_a_number"),
        (f"/refine {job}.9", "variations.bad_index"),
        ("/refine", "error.missing_argument"),
    ):
        (reply,) = await run(app, line)
        assert reply.error and reply.key == key, (line, reply)
    (bad,) = await run(app, f"/refine {job} --denoise 1.5")
    assert "--denoise must be from 0 to 1" in app.translator.t("en", bad.key, **bad.params)


async def test_upscale_enlarges_an_image_and_redraws_it_with_its_seed(make_app) -> None:
    app = await make_app(plugins={"img2img": {"upscale_denoise": 0.3}}, limits={"max_pixels": 16384})
    log = EventLog(app)
    (source,) = await finished(log, await run(app, "/draw a harbour --seed 21 --batch 2"))
    job = source.generation_id
    assert {f"upscale:{job}.1", f"upscale:{job}.2"} <= {a.id for a in source.actions}
    (big,) = await finished(log, await app.service.run_action(f"upscale:{job}.2", ALICE, ROUTE))
    record = await app.store.get(big.generation_id)
    assert record.parent_id == job and len(big.images) == 1
    fields = parse(big.images[0].infotext)
    assert (fields["Size-1"], fields["Size-2"]) == ("128", "128")
    assert fields["Seed"] == str(source.images[1].seed) and fields["Denoising strength"] == "0.3"
    assert (await opened(app, big.images[0])).size == (128, 128)
    # the same press draws the same picture: the image's own seed, not a new one
    (again,) = await finished(log, await run(app, f"/upscale {job}.2"))
    assert await png(app, again.images[0]) == await png(app, big.images[0])
    (custom,) = await finished(log, await run(app, f"/upscale {job}.1 --scale 1.5 --denoise 0.5"))
    assert parse(custom.images[0].infotext)["Size-1"] == "96"
    before = await app.store.count_by_status()
    (refused,) = await run(app, f"/upscale {job}.1 --scale 3")
    assert refused.error and refused.key == "error.upscale_too_large"
    assert "at most 2048 px a side and 16384 pixels" in app.translator.t("en", refused.key, **refused.params)
    (bad,) = await run(app, f"/upscale {job}.1 --scale 9")
    assert bad.error and bad.key == "error.out_of_range"
    assert await app.store.count_by_status() == before


async def test_refine_of_a_hires_result_runs_img2img_at_its_final_size(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    (hires,) = await finished(log, await run(app, "/draw a tower --steps 2 --hires --hr-scale 1.5"))
    assert (hires.images[0].width, hires.images[0].height) == (96, 96)
    (refined,) = await finished(log, await run(app, f"/refine {hires.generation_id}"))
    fields = parse(refined.images[0].infotext)
    assert fields["Size-1"] == "96" and fields["Denoising strength"] == "0.5"
    assert "Hires upscale" not in fields


async def test_an_uploaded_png_draws_at_its_size_in_multiples_of_8(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    upload = (Attachment("photo.png", encoded((100, 75))),)
    (result,) = await finished(log, await run(app, "/draw a watercolour --steps 3 --seed 2", upload))
    image = result.images[0]
    assert (image.width, image.height) == (96, 72)
    assert (await opened(app, image)).size == (96, 72)
    fields = parse(image.infotext)
    assert fields["Denoising strength"] == "0.75" and (fields["Size-1"], fields["Size-2"]) == ("96", "72")
    record = await app.store.get(result.generation_id)
    assert Image.open(record.request.init_image).size == (100, 75)  # kept as sent, resized by the engine

    jpeg = (Attachment("photo.jpg", encoded((80, 64), "JPEG")),)
    (sized,) = await finished(
        log, await run(app, "/draw a sketch --steps 2 --size 64x64 --denoise 0.6", jpeg)
    )
    assert (sized.images[0].width, sized.images[0].height) == (64, 64)
    assert parse(sized.images[0].infotext)["Denoising strength"] == "0.6"


async def test_a_large_upload_is_scaled_to_the_limits(make_app) -> None:
    app = await make_app(limits={"max_size": 256, "max_pixels": 128 * 128})
    await app.queue.stop()
    upload = (Attachment("wide.png", encoded((1000, 500))),)
    (reply,) = await run(app, "/draw a field", upload)
    record = await app.store.get(reply.data["jobs"][0])
    assert (record.request.width, record.request.height) == (176, 88)  # 1000x500 scaled into 128x128 pixels


@pytest.mark.parametrize(
    ("name", "data", "detail_en", "detail_zh"),
    [
        (
            "notes.txt",
            b"this is not an image at all",
            "it is not an image that can be read",
            "不是可以读取的图片",
        ),
        ("anim.gif", None, "GIF images are not accepted; send PNG, JPEG, WEBP", "不接受 GIF"),
        ("icon.png", encoded((32, 32)), "32x32 is too small: each side must be at least 64", "32x32 太小"),
        ("broken.png", encoded((64, 64))[:60], "it is not an image that can be read", "不是可以读取的图片"),
    ],
)
async def test_a_bad_upload_gets_a_translated_error_and_nothing_is_stored(
    make_app, name, data, detail_en, detail_zh
) -> None:
    if data is None:
        data = encoded((64, 64), "GIF")
    app = await make_app()
    for locale, expected in (("en", detail_en), ("zh-CN", detail_zh)):
        actor = Actor(platform="console", user_id="alice", name="Alice", chat_id="c", locale=locale)
        (reply,) = await run(app, "/draw a cat", (Attachment(name, data),), actor)
        assert reply.error and reply.key == "error.init_image"
        text = app.translator.t(locale, reply.key, **reply.params)
        assert expected in text, text
    assert app.translator.t("en", reply.key, **reply.params).startswith(
        "The attached image could not be used"
    )
    assert app.translator.t("zh-CN", reply.key, **reply.params).startswith("附带的图片无法使用")
    assert await app.store.count_by_status() == {}
    inputs = app.images_dir / "inputs"
    assert not inputs.exists() or not any(inputs.iterdir())


@pytest.mark.slow
def test_console_session_draws_from_an_attached_png_and_refines_it(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(encoded((72, 64)))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"GIF89a but not really")
    with ConsoleSession(tmp_path) as session:
        (job,) = jobs_of(session.command(f"/draw a watercolour harbour --seed 4 --attach {photo}"))
        done = session.finished(job)
        assert done["event"] == "finished", done
        image = done["images"][0]
        assert (image["width"], image["height"]) == (72, 64)
        assert "Denoising strength: 0.75" in image["infotext"]
        assert f"refine:{job}.1" in [a["id"] for a in done["actions"]]
        (refine,) = jobs_of(session.command(f"/refine {job}.1"))
        refined = session.finished(refine)
        assert "Denoising strength: 0.5" in refined["images"][0]["infotext"]
        (error,) = session.command(f"/draw a cat --attach {junk}")
        assert error["event"] == "error" and error["key"] == "error.init_image"
        assert "not an image that can be read" in error["text"]
