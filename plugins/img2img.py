"""img2img actions: refine or upscale a result through img2img.

``refine:ID.N`` (a button on every image of a result) and ``/refine ID[.N] [--denoise X]``
send image N back through img2img: the same prompt and settings, the image as the init
image at its own size, denoising strength ``[plugins.img2img] refine_denoise`` unless
``--denoise`` (0 to 1) is given. The refine gets a new random seed, so pressing Refine
again gives another take instead of the same picture; the seed is in its infotext, with
"Denoising strength", so any refine reproduces. A variation seed and the hires fix of the
original are not carried over (A1111 runs no hires pass in img2img; the image is already
at its final size). The refine is a child of the result and joins its thread
(``plugins.variations``).

``upscale:ID.N`` and ``/upscale ID[.N] [--scale X] [--denoise X]`` enlarge image N by
``[plugins.img2img] upscale_scale`` (Lanczos, the size rounded down to multiples of 8) and
send it through img2img at that size with the image's own seed and denoising strength
``upscale_denoise``: the detail is redrawn at the new size, and pressing Upscale again
gives the same picture. A size over ``[limits] max_size`` or ``max_pixels`` is refused
naming the largest allowed, before anything is stored.

The image is copied into the uploads folder (content-addressed, like a /draw attachment),
so the refine's row stays reproducible after the original result is deleted.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bot.api import (
    IMAGE,
    NotFound,
    OptionSpec,
    OptionValueError,
    hookimpl,
    pick_image,
    redraw,
    store_input_image,
    thread_key_of,
)
from bot.types import Action, Attachment, Command, CommandContext, Reply


class Img2ImgConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    refine_denoise: float = Field(0.5, ge=0, le=1)
    upscale_scale: float = Field(2.0, ge=1, le=4)
    upscale_denoise: float = Field(0.35, ge=0, le=1)


def config(app: Any) -> Img2ImgConfig:
    return app.settings.plugin_config("img2img", Img2ImgConfig)  # type: ignore[return-value]


REFINE_OPTIONS = (
    OptionSpec(
        "denoise",
        "number",
        ("denoising-strength", "strength"),
        bounds=lambda _: (0, 1),
        description="option.denoise",
    ),
)


UPSCALE_OPTIONS = (
    OptionSpec(
        "scale", "number", ("upscale-by",), bounds=lambda _: (1, 4), description="option.upscale.scale"
    ),
    *REFINE_OPTIONS,
)


@hookimpl
def startup(app: Any) -> None:
    config(app)  # a bad [plugins.img2img] table fails at startup, naming the key


@hookimpl
def result_actions(record: Any, actor: Any, app: Any) -> list[Action]:
    numbers = range(1, len(record.images) + 1)
    return [
        *(Action(f"refine:{record.id}.{number}", "action.refine", {"n": number}) for number in numbers),
        *(Action(f"upscale:{record.id}.{number}", "action.upscale", {"n": number}) for number in numbers),
    ]


@hookimpl
def register_commands(register: Any) -> None:
    register(Command("refine", refine, "cmd.refine", (IMAGE,), REFINE_OPTIONS))
    register(Command("upscale", upscale, "cmd.upscale", (IMAGE,), UPSCALE_OPTIONS))


async def _image_bytes(app: Any, record: Any, image: Any) -> bytes:
    try:
        data: bytes = await app.images.read(image.id)
    except NotFound:  # the files were removed while the row stayed
        raise NotFound("error.not_found", id=record.id) from None
    return data


async def refine(ctx: CommandContext) -> list[Reply]:
    app, given = ctx.app, ctx.options
    record, image = await pick_image(app, ctx.actor, ctx.text)
    data = await _image_bytes(app, record, image)
    stored = await asyncio.to_thread(
        store_input_image,
        Attachment(PurePosixPath(image.path).name, data),
        app.images_dir / "inputs",
        app.settings.limits,
    )
    changes = {
        "seed": -1,
        "subseed": -1,
        "subseed-strength": 0,
        "seed-resize-from": (0, 0),
        "hires": False,
        "size": stored.size,
        "init-image": stored.path,
        "denoise": float(given.get("denoise", config(app).refine_denoise)),
    }
    return await redraw(
        app, record, changes, ctx.actor, ctx.invocation.route, thread_key=await thread_key_of(app, record)
    )


def upscaled_size(width: int, height: int, scale: float, limits: Any) -> tuple[int, int]:
    """``width`` x ``height`` times ``scale``, in multiples of 8; refused over the limits."""
    size = (int(width * scale) // 8 * 8, int(height * scale) // 8 * 8)
    if max(size) > limits.max_size or size[0] * size[1] > limits.max_pixels:
        raise OptionValueError(
            "error.upscale_too_large",
            width=size[0],
            height=size[1],
            max_size=limits.max_size,
            max_pixels=limits.max_pixels,
        )
    return size


def _resized_png(data: bytes, size: tuple[int, int]) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def upscale(ctx: CommandContext) -> list[Reply]:
    app, given = ctx.app, ctx.options
    record, image = await pick_image(app, ctx.actor, ctx.text)
    cfg = config(app)
    size = upscaled_size(
        image.width, image.height, float(given.get("scale", cfg.upscale_scale)), app.settings.limits
    )
    data = await _image_bytes(app, record, image)
    png = await asyncio.to_thread(_resized_png, data, size)
    stored = await asyncio.to_thread(
        store_input_image,
        Attachment(f"{PurePosixPath(image.path).stem}-{size[0]}x{size[1]}.png", png),
        app.images_dir / "inputs",
        app.settings.limits,
    )
    changes = {
        "seed": image.seed,
        "subseed": -1,
        "subseed-strength": 0,
        "seed-resize-from": (0, 0),
        "hires": False,
        "batch": 1,
        "count": 1,
        "size": stored.size,
        "init-image": stored.path,
        "denoise": float(given.get("denoise", cfg.upscale_denoise)),
    }
    return await redraw(
        app, record, changes, ctx.actor, ctx.invocation.route, thread_key=await thread_key_of(app, record)
    )
