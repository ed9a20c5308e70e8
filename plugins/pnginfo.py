"""/pnginfo: read the parameters of a PNG (ours, A1111's, NovelAI's), of a pasted
infotext or of one of the bot's generations (``/pnginfo ID``), and answer with the /draw
command that reproduces them, plus a button that draws it.

The button's id must fit a Discord custom_id, so the parameters stay on the server: the
infotext is stored as a global preference under a fresh ULID and the button is
``rerun:<ulid>``. Anyone who can press it draws it as their own job (the parameters were
shown in the same message). Re-running goes through the /draw path of a pasted infotext,
so a model that is missing is reported, never silently swapped.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from typing import Any

from ulid import ULID

from bot.api import GLOBAL_SCOPE as GLOBAL
from bot.api import (
    Msg,
    NotFound,
    PreferenceStore,
    UserError,
    draw_line,
    hookimpl,
    missing_argument,
    options_from_infotext,
    shown,
    unknown_hash_note,
)
from bot.types import Action, Argument, Command, CommandContext, FileInput, Reply

READABLE_FORMATS = ("PNG", "JPEG", "WEBP")  # where A1111 (and NovelAI) keep parameters
_ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$", re.IGNORECASE)
KEY_PREFIX = "pnginfo."


@hookimpl
def register_commands(register: Any) -> None:
    register(
        Command(
            "pnginfo",
            pnginfo,
            "cmd.pnginfo",
            # raw: a pasted infotext is read as it is, whatever dashes it holds
            arguments=(Argument("source", "raw", "arg.pnginfo_source", required=False),),
            attachment=FileInput("file.pnginfo"),
        )
    )
    register(Command("rerun", rerun, hidden=True, arguments=(Argument("key", "word"),)))


def _image_infotext(name: str, data: bytes) -> str | None:
    """On a worker thread: the infotext of an uploaded image; UserError when the upload is
    not an image of a format that carries parameters. Its text is read within the caps of
    ``pipeline.images`` (the upload's size is capped before any command runs)."""
    from pipeline.images import ImageFormatError, image_format, read_infotext

    allowed = ", ".join(READABLE_FORMATS)
    not_an_image = UserError(
        "error.init_image", detail=Msg("pnginfo.not_an_image", {"name": shown(name), "allowed": allowed})
    )
    try:
        kind = image_format(data)
    except ImageFormatError:
        raise not_an_image from None
    if kind not in READABLE_FORMATS:
        detail = Msg("pnginfo.wrong_format", {"name": name, "format": kind, "allowed": allowed})
        raise UserError("error.init_image", detail=detail)
    try:
        return read_infotext(data)
    except ImageFormatError:
        raise not_an_image from None


async def _source_text(ctx: CommandContext) -> str | None:
    text = ctx.text.strip()
    if ctx.invocation.attachments:
        attachment = ctx.invocation.attachments[0]
        return await asyncio.to_thread(_image_infotext, attachment.filename, attachment.data)
    if _ULID.match(text):
        record = await ctx.app.service.visible(text.upper(), ctx.actor)
        return record.images[0].infotext if record.images else None
    if not text:
        raise missing_argument(ctx)
    return text


async def pnginfo(ctx: CommandContext) -> Reply | list[Reply]:
    text = await _source_text(ctx)
    if not text:
        return Reply("pnginfo.none")
    actions: list[Action] = []
    try:
        prompt, options = options_from_infotext(text, ctx.app.library)
    except UserError as exc:
        if exc.key != "error.model_missing":
            raise
        # shown without the model; no button, since it would not draw exactly this
        prompt, options = options_from_infotext(text, ctx.app.library, with_model=False)
    else:
        key = str(ULID())
        await PreferenceStore(ctx.app.store).set(
            GLOBAL, KEY_PREFIX + key, {"infotext": text}, by=ctx.actor.key
        )
        actions.append(Action(f"rerun:{key}", "action.rerun"))
    command = draw_line(prompt, options)
    result = Reply(
        "pnginfo.result",
        {"infotext": text, "command": command},
        actions=actions,
        data={"command": command},
    )
    note = unknown_hash_note(text, ctx.app.library, options.get("checkpoint"))
    return result if note is None else [result, note]


async def rerun(ctx: CommandContext) -> list[Reply]:
    """The re-run button of a /pnginfo answer: /draw with the stored infotext pasted."""
    key = ctx.text.strip()
    stored = None
    if _ULID.match(key):
        stored = await PreferenceStore(ctx.app.store).get(GLOBAL, KEY_PREFIX + key.upper())
    if not stored:
        raise NotFound("pnginfo.rerun_gone", id=key)
    text = stored["infotext"]
    if "\n" not in text.strip():  # no prompt line: the same request as the command shown
        text = draw_line(*options_from_infotext(text, ctx.app.library)).removeprefix("/draw ")
    invocation = replace(ctx.invocation, command="draw", text=text, attachments=())
    return await ctx.app.service.draw_command(CommandContext(invocation, ctx.app))
