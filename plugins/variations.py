"""Seed variations: V-buttons on results, subtle and strong variation strengths, lineage threads.

A variation of an image is A1111's "variation seed": the image's own seed, every other
parameter of its job unchanged, and a new random variation seed (subseed) mixed in at a
strength, ``[plugins.variations] subtle_strength`` for the V buttons and
``strong_strength`` for the strong ones (``/vary --strength X`` for any other). The batch
size stays the original's, so a V press on a batch of four gives four variations (one
seed, consecutive variation seeds, as A1111 does). A1111 keeps one variation seed per
image, so a variation of a variation is again a variation of the same seed with a new
variation seed: close to its parent at a subtle strength, and its infotext reproduces it.

Images are named ``ID.N`` with N counted from 1 (the label of button VN); ``ID`` alone is
image 1. Buttons: ``vary:ID.N`` (subtle) and ``vary:ID.N --strong`` for every image.

Lineage and threads: every job made from a result (a variation, a refine, a reroll, a
forever run) stores the result as its ``parent_id``. Variations and refines also carry a
``thread_key``: the id of the chain's root, the same for the whole chain, so the delivery
layer posts them in one Discord thread or Telegram reply chain under the original. They
answer where the button was pressed (the press's route). ``/lineage ID`` walks the
parent links to the root.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bot.api import (
    IMAGE,
    OptionSpec,
    UserError,
    hookimpl,
    lineage,
    pick_image,
    redraw,
    thread_key_of,
)
from bot.types import Action, Argument, Command, CommandContext, Reply


class VariationsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    subtle_strength: float = Field(0.15, gt=0, le=1)
    strong_strength: float = Field(0.5, gt=0, le=1)


def config(app: Any) -> VariationsConfig:
    return app.settings.plugin_config("variations", VariationsConfig)  # type: ignore[return-value]


VARY_OPTIONS = (
    OptionSpec(
        "strength",
        "number",
        ("variation-strength",),
        bounds=lambda _: (0.01, 1),
        description="option.vary.strength",
    ),
    OptionSpec("strong", "flag", description="option.vary.strong"),
    OptionSpec(
        "count", "int", ("n-iter",), bounds=lambda lim: (1, lim.max_count), description="option.count"
    ),
)


# hooks -----------------------------------------------------------------------------------------


@hookimpl
def startup(app: Any) -> None:
    config(app)  # a bad [plugins.variations] table fails at startup, naming the key


@hookimpl
def result_actions(record: Any, actor: Any, app: Any) -> list[Action]:
    actions = []
    for number in range(1, len(record.images) + 1):
        target = f"{record.id}.{number}"
        actions.append(Action(f"vary:{target}", "action.vary", {"n": number}))
        actions.append(Action(f"vary:{target} --strong", "action.vary_strong", {"n": number}))
    return actions


@hookimpl
def register_commands(register: Any) -> None:
    register(Command("vary", vary, "cmd.vary", (IMAGE,), VARY_OPTIONS))
    register(Command("lineage", lineage_command, "cmd.lineage", (Argument("id", "id", "arg.generation"),)))


# commands --------------------------------------------------------------------------------------


async def vary(ctx: CommandContext) -> list[Reply]:
    """``/vary ID[.N] [--strong | --strength X] [--count N]``: a variation of one image."""
    app, given = ctx.app, ctx.options
    if "strong" in given and "strength" in given:
        raise UserError("variations.strength_twice")
    record, image = await pick_image(app, ctx.actor, ctx.text)
    cfg = config(app)
    strength = given.get("strength", cfg.strong_strength if given.get("strong") else cfg.subtle_strength)
    changes = {
        "count": given.get("count", 1),
        "seed": image.seed,
        "subseed": -1,
        "subseed-strength": float(strength),
    }
    return await redraw(
        app, record, changes, ctx.actor, ctx.invocation.route, thread_key=await thread_key_of(app, record)
    )


async def lineage_command(ctx: CommandContext) -> Reply:
    """``/lineage ID``: the ids from the chain's root down to ID, with what each changed."""
    record = await ctx.app.service.visible(ctx.text.strip(), ctx.actor)
    chain = await lineage(ctx.app, record)
    steps = [
        {
            "id": item.id,
            "parent_id": item.parent_id,
            "status": item.status,
            "seed": item.request.seed,
            "subseed": item.request.subseed,
            "subseed_strength": item.request.subseed_strength,
            "denoising_strength": item.request.denoising_strength,
            "thread": item.thread_key,
        }
        for item in chain
    ]
    return Reply(
        "lineage.chain",
        {"id": record.id, "depth": len(chain) - 1, "chain": " → ".join(item.id for item in chain)},
        data={"lineage": [item.id for item in chain], "steps": steps},
    )
