"""/pnginfo: read the parameters of a PNG (ours, A1111's, NovelAI's) or of a pasted
infotext, and answer with the /draw command that reproduces them.
"""

from __future__ import annotations

from typing import Any

from bot.errors import UserError
from bot.hookspecs import hookimpl
from bot.reruns import draw_line, options_from_infotext
from bot.types import Command, CommandContext, Reply


@hookimpl
def register_commands(register: Any) -> None:
    register(Command("pnginfo", pnginfo, "help.pnginfo"))


async def pnginfo(ctx: CommandContext) -> Reply:
    text = ctx.text.strip()
    if ctx.invocation.attachments:
        import asyncio

        from pipeline.images import ImageFormatError, read_infotext

        try:
            found = await asyncio.to_thread(read_infotext, ctx.invocation.attachments[0].data)
        except ImageFormatError as exc:
            raise UserError("error.init_image", detail=str(exc)) from None
        if not found:
            return Reply("pnginfo.none")
        text = found
    if not text:
        raise UserError("error.missing_argument", name="pnginfo", what="PNG")
    try:
        prompt, options = options_from_infotext(text, ctx.app.library)
    except UserError as exc:
        if exc.key != "error.model_missing":
            raise
        prompt, options = options_from_infotext(text, ctx.app.library, with_model=False)
    return Reply(
        "pnginfo.result",
        {"infotext": text, "command": draw_line(prompt, options)},
        data={"command": draw_line(prompt, options)},
    )
