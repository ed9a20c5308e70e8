"""img2img actions: refine a result through img2img.

``refine:ID.N`` (a button on every image of a result) and ``/refine ID[.N] [--denoise X]``
send image N back through img2img: the same prompt and settings, the image as the init
image at its own size, denoising strength ``[plugins.img2img] refine_denoise`` unless
``--denoise`` (0 to 1) is given. The refine gets a new random seed, so pressing Refine
again gives another take instead of the same picture; the seed is in its infotext, with
"Denoising strength", so any refine reproduces. A variation seed and the hires fix of the
original are not carried over (A1111 runs no hires pass in img2img; the image is already
at its final size). The refine is a child of the result and joins its thread
(``plugins.variations``).

The image is copied into the uploads folder (content-addressed, like a /draw attachment),
so the refine's row stays reproducible after the original result is deleted.
"""

from __future__ import annotations

import asyncio
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bot.api import (
    IMAGE,
    NotFound,
    OptionSpec,
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


@hookimpl
def startup(app: Any) -> None:
    config(app)  # a bad [plugins.img2img] table fails at startup, naming the key


@hookimpl
def result_actions(record: Any, actor: Any, app: Any) -> list[Action]:
    return [
        Action(f"refine:{record.id}.{number}", "action.refine", {"n": number})
        for number in range(1, len(record.images) + 1)
    ]


@hookimpl
def register_commands(register: Any) -> None:
    register(Command("refine", refine, "cmd.refine", (IMAGE,), REFINE_OPTIONS))


async def refine(ctx: CommandContext) -> list[Reply]:
    app, given = ctx.app, ctx.options
    record, image = await pick_image(app, ctx.actor, ctx.text)
    try:
        data = await app.images.read(image.id)
    except NotFound:  # the files were removed while the row stayed
        raise NotFound("error.not_found", id=record.id) from None
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
