"""Instruct-pix2pix checkpoints through /draw: Image CFG scale as an option, a [defaults]
setting and an infotext field; text to image refused with a translated message before
anything is queued."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from bot.reruns import options_from_infotext
from bot.settings import ConfigError, parse_settings
from bot.types import Actor, Attachment
from tests.conftest import EventLog, png
from tests.pipeline.test_pix2pix import _edit_pipeline

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

ALICE = Actor(platform="console", user_id="alice", name="Alice", locale="en", chat_id="c")
LI = Actor(platform="console", user_id="li", name="Li", locale="zh-CN", chat_id="c")


def _models(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    _edit_pipeline().save_pretrained(folder / "Stable-diffusion" / "edit")
    return folder


def _upload() -> tuple[Attachment, ...]:
    from PIL import Image

    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), np.full((64, 64), 40)], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return (Attachment("in.png", buffer.getvalue()),)


async def test_an_edit_checkpoint_edits_an_attached_image_and_its_infotext_redraws_it(
    make_app, tmp_path
) -> None:
    app = await make_app(models_dir=_models(tmp_path))
    log = EventLog(app)
    line = "/draw make it blue --checkpoint edit --steps 3 --seed 2 --image-cfg 1.25"
    replies = await app.service.handle_line(line, ALICE, attachments=_upload())
    assert not replies[0].error, app.translator.t("en", replies[0].key, **replies[0].params)
    (job,) = replies[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", job))
    image = log.of("finished", job)[0].images[0]
    assert "CFG scale: 7, Image CFG scale: 1.25, Seed: 2" in image.infotext
    assert (await app.store.get(job)).request.image_cfg_scale == 1.25
    # the infotext pasted with the same image makes the same request, and the same pixels
    (again,) = (await app.service.handle_line("/draw " + image.infotext, ALICE, attachments=_upload()))[
        0
    ].data["jobs"]
    await log.wait_for(lambda: log.of("finished", again))
    assert (await app.store.get(again)).request.image_cfg_scale == 1.25
    assert await png(app, log.of("finished", again)[0].images[0]) == await png(app, image)


async def test_text_to_image_with_an_edit_checkpoint_is_refused_in_the_users_language(
    make_app, tmp_path
) -> None:
    app = await make_app(models_dir=_models(tmp_path))
    for actor, words in ((ALICE, "edits images. Attach the image"), (LI, "是图像编辑模型")):
        (reply,) = await app.service.handle_line("/draw make it blue --checkpoint edit", actor)
        assert reply.error and reply.key == "error.edit_model_needs_image"
        text = app.translator.t(actor.locale, reply.key, **reply.params)
        assert "edit" in text and words in text, text


async def test_models_names_edit_and_inpainting_checkpoints_in_the_users_language(make_app, tmp_path) -> None:
    from tests.pipeline.test_checkpoint_yaml import _inpainting_pipeline

    folder = _models(tmp_path)
    _inpainting_pipeline().save_pretrained(folder / "Stable-diffusion" / "fill")
    app = await make_app(models_dir=folder)
    for actor, words in (
        (ALICE, ("edit (instruct-pix2pix: edits an attached image)", "fill (inpainting)")),
        (LI, ("edit（图像编辑模型：", "fill（局部重绘）")),
    ):
        (listing,) = await app.service.handle_line("/models", actor)
        # the built-in tiny checkpoint is a plain one
        assert listing.data["checkpoint_kinds"] == {"edit": "edit", "fill": "inpainting"}
        text = app.translator.t(actor.locale, listing.key, **listing.params)
        assert all(w in text for w in words) and "tiny *," in text, text


async def test_and_with_an_image_cfg_scale_other_than_one_is_refused(make_app, tmp_path) -> None:
    app = await make_app(models_dir=_models(tmp_path))
    line = "/draw a cat AND a dog --checkpoint edit --steps 2"
    (reply,) = await app.service.handle_line(line, ALICE, attachments=_upload())
    assert reply.error and reply.key == "error.edit_model_and"
    assert "--image-cfg is 1" in app.translator.t("en", reply.key, **reply.params)
    (reply,) = await app.service.handle_line(line + " --image-cfg 1", ALICE, attachments=_upload())
    assert not reply.error
    await app.service.cancel(reply.data["jobs"][0], ALICE)


async def test_an_image_cfg_scale_out_of_range_names_the_range(make_app) -> None:
    app = await make_app()
    for actor, words in (
        (ALICE, "--image-cfg must be from 0 to 30.0"),
        (LI, "--image-cfg 必须在 0 到 30.0 之间"),
    ):
        (reply,) = await app.service.handle_line("/draw a cat --image-cfg 31", actor)
        assert reply.error and reply.key == "error.out_of_range"
        assert words in app.translator.t(actor.locale, reply.key, **reply.params)
    pasted = "a cat\nSteps: 3, Sampler: Euler, CFG scale: 7, Image CFG scale: 45, Seed: 1, Size: 64x64"
    (reply,) = await app.service.handle_line("/draw " + pasted, ALICE)
    assert reply.error and reply.key == "error.out_of_range" and reply.params["name"] == "image-cfg"


def test_the_infotext_field_keeps_its_printed_type() -> None:
    base = "a cat\nSteps: 3, Sampler: Euler, CFG scale: 7, Image CFG scale: {}, Seed: 1, Size: 64x64"
    assert options_from_infotext(base.format("1.5"), None, with_model=False)[1]["image-cfg"] == 1.5
    whole = options_from_infotext(base.format("2"), None, with_model=False)[1]["image-cfg"]
    assert whole == 2 and isinstance(whole, int)


def test_image_cfg_scale_default_is_a1111s_and_is_checked_at_startup() -> None:
    assert parse_settings({}).defaults.image_cfg_scale == 1.5
    assert parse_settings({"defaults": {"image_cfg_scale": 0}}).defaults.image_cfg_scale == 0
    with pytest.raises(ConfigError, match="image_cfg_scale"):
        parse_settings({"defaults": {"image_cfg_scale": 31}})
